"""One entropy-bounded denoising step over a tile of canvases (DiffusionGemma's sampler).

Mirrors transformers' ``EntropyBoundSampler``, ``LinearTemperatureScheduleLogitsProcessor`` and
``StableAndConfidentStoppingCriteria`` op for op, so that a request with seed s draws exactly what
``model.generate`` draws at batch 1 after ``torch.manual_seed(s)``. Each row has its own
``torch.Generator``; its draws are taken ahead of the logits (``random_draws``) and never depend on
the other rows of the tile.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from .random_draws import TileDraws
from .work import DecodeWork


# Upper bound on the fp32 [rows, canvas, vocab] copies alive in one tile: the (scaled in place)
# logits, the probabilities, this tile's and the next tile's exponential draws, and the entropy's
# normalised logits and p*log(p) (6), plus one for the lm head's output before the cast and
# soft-capping (the self-conditioning softmax comes after the entropy's copies are freed).
SAMPLING_FP32_COPIES = 7


def tile_rows_for(budget_bytes: int, canvas_length: int, vocab_size: int) -> int:
    """Rows per sampling tile so that the fp32 [rows, canvas, vocab] transient stays within budget."""
    per_row = SAMPLING_FP32_COPIES * canvas_length * vocab_size * 4
    return max(1, budget_bytes // per_row)


@functools.lru_cache(maxsize=4096)
def step_temperature(t_min: float, t_max: float, cur_step: int, max_steps: int, device: str) -> float:
    """Temperature at step ``cur_step`` (N..1, steps *remaining*), computed as transformers does: fp32
    tensor ops on the model's device (CUDA divides by a Python int as a multiply by its reciprocal, so
    the device matters to the last bit). Returned as the exact fp32 value and cached: requests share few
    parameter sets, and a cached value costs no device round trip."""
    step = torch.tensor(cur_step, dtype=torch.int32, device=device)
    return float(t_min + ((t_max - t_min) * (step / max_steps)))


@dataclass
class TileResult:
    next_canvas: torch.Tensor  # [n, C] the renoised canvas fed to the next step
    argmax: torch.Tensor  # [n, C] draft: argmax of the scaled logits
    confident: torch.Tensor  # [n] bool: mean entropy below the threshold
    scaled_logits: torch.Tensor  # [n, C, V] fp32, for self-conditioning
    probs: torch.Tensor  # [n, C, V] fp32 softmax of the scaled logits (== the self-conditioning softmax in fp32)
    usable: torch.Tensor  # [n] bool: no NaN or +inf logit in the row (its entropies are finite); -inf is allowed


def denoise_tile(
    logits: torch.Tensor,  # [n, C, V] fp32, soft-capped; scaled in place
    rows: list[DecodeWork],  # per row: cur_step, max_steps, t_min, t_max, entropy_bound, confidence_threshold
    draws: TileDraws,  # this step's random numbers for each row, drawn from the row's generator
) -> TileResult:
    n, canvas_len, vocab = logits.shape
    device = logits.device
    temps = torch.tensor(
        [step_temperature(r.t_min, r.t_max, r.cur_step, r.max_steps, str(device)) for r in rows],
        dtype=torch.float32, device=device
    ).view(n, 1, 1)
    scaled = logits.div_(temps)
    probs = torch.softmax(scaled, dim=-1, dtype=torch.float32)
    # torch.multinomial(probs[i], 1, generator=g) is argmax(probs[i] / q) with q ~ Exp(1) from g;
    # q was drawn ahead (random_draws), so this is the reference's draw, row for row.
    sampled = torch.argmax(torch.div(probs, draws.exponentials, out=draws.exponentials), dim=-1)
    argmax = torch.argmax(scaled, dim=-1)

    # Categorical(logits=scaled).entropy(), op for op, without the distribution object's overhead
    normalized = scaled - scaled.logsumexp(dim=-1, keepdim=True)
    p_log_p = torch.softmax(normalized, dim=-1)
    p_log_p.mul_(normalized.clamp_(min=torch.finfo(normalized.dtype).min))
    del normalized
    entropy = -p_log_p.sum(-1)  # [n, C]
    del p_log_p
    sorted_entropy, order = torch.sort(entropy, dim=-1, descending=False)
    cumulative = torch.cumsum(sorted_entropy, dim=-1)
    # Accept the k lowest-entropy positions whose entropy sum minus the largest stays within the bound.
    # (The reference compares with a Python float, which torch rounds to the tensor's fp32 first.)
    bounds = torch.tensor([r.entropy_bound for r in rows], device=device, dtype=cumulative.dtype).view(n, 1)
    sorted_accept = cumulative - sorted_entropy <= bounds
    accept = torch.scatter(torch.zeros_like(sorted_accept), dim=-1, index=order, src=sorted_accept)
    next_canvas = torch.where(accept, sampled, draws.noise)

    thresholds = torch.tensor([r.confidence_threshold for r in rows], device=device, dtype=entropy.dtype)
    mean_entropy = entropy.mean(dim=-1)
    confident = mean_entropy < thresholds
    # A NaN or +inf logit makes its position's entropy NaN, hence the row mean: such a row's outputs are
    # garbage (the reference's multinomial would raise) and the caller fails it; rows never mix.
    usable = torch.isfinite(mean_entropy)
    # every position is re-decided each step: accepted positions take the sample, the rest fresh noise
    return TileResult(next_canvas=next_canvas, argmax=argmax, confident=confident, scaled_logits=scaled, probs=probs,
                      usable=usable)
