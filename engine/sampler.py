"""One entropy-bounded denoising step over a tile of canvases (DiffusionGemma's sampler).

Mirrors transformers' ``EntropyBoundSampler``, ``LinearTemperatureScheduleLogitsProcessor`` and
``StableAndConfidentStoppingCriteria`` op for op, so that a request with seed s draws exactly what
``model.generate`` draws at batch 1 after ``torch.manual_seed(s)``. Each row has its own
``torch.Generator``; a row's draws never depend on the other rows of the tile.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .work import DecodeWork


# Peak fp32 [rows, canvas, vocab] copies alive in one tile: the logits, the scaled logits, the
# probabilities, and inside Categorical.entropy its normalised logits, probabilities, clamped logits
# and their product (the self-conditioning softmax comes after those are freed).
SAMPLING_FP32_COPIES = 7


def tile_rows_for(budget_bytes: int, canvas_length: int, vocab_size: int) -> int:
    """Rows per sampling tile so that the fp32 [rows, canvas, vocab] transient stays within budget."""
    per_row = SAMPLING_FP32_COPIES * canvas_length * vocab_size * 4
    return max(1, budget_bytes // per_row)


def step_temperature(t_min: float, t_max: float, cur_step: int, max_steps: int, device) -> torch.Tensor:
    """Temperature at step ``cur_step`` (N..1, steps *remaining*), computed as transformers does (fp32)."""
    step = torch.tensor(cur_step, device=device, dtype=torch.int32)
    return t_min + ((t_max - t_min) * (step / max_steps))


@dataclass
class TileResult:
    next_canvas: torch.Tensor  # [n, C] the renoised canvas fed to the next step
    argmax: torch.Tensor  # [n, C] draft: argmax of the scaled logits
    confident: torch.Tensor  # [n] bool: mean entropy below the threshold
    scaled_logits: torch.Tensor  # [n, C, V] fp32, for self-conditioning


def denoise_tile(
    logits: torch.Tensor,  # [n, C, V] fp32, soft-capped
    rows: list[DecodeWork],  # per row: cur_step, max_steps, t_min, t_max, entropy_bound, confidence_threshold
    generators: list[torch.Generator],
) -> TileResult:
    n, canvas_len, vocab = logits.shape
    device = logits.device
    temps = torch.stack(
        [step_temperature(r.t_min, r.t_max, r.cur_step, r.max_steps, device) for r in rows]
    ).view(n, 1, 1)
    scaled = logits / temps
    probs = torch.softmax(scaled, dim=-1, dtype=torch.float32)
    # One multinomial per row with that row's generator (== the reference's draw at batch 1).
    sampled = torch.stack(
        [torch.multinomial(probs[i].view(-1, vocab), num_samples=1, generator=g).view(canvas_len) for i, g in enumerate(generators)]
    )
    argmax = torch.argmax(scaled, dim=-1)

    entropy = torch.distributions.Categorical(logits=scaled).entropy()  # [n, C]
    sorted_entropy, order = torch.sort(entropy, dim=-1, descending=False)
    cumulative = torch.cumsum(sorted_entropy, dim=-1)
    # Accept the k lowest-entropy positions whose entropy sum minus the largest stays within the bound.
    # (The reference compares with a Python float, which torch rounds to the tensor's fp32 first.)
    bounds = torch.tensor([r.entropy_bound for r in rows], device=device, dtype=cumulative.dtype).view(n, 1)
    sorted_accept = cumulative - sorted_entropy <= bounds
    accept = torch.scatter(torch.zeros_like(sorted_accept), dim=-1, index=order, src=sorted_accept)

    noise = torch.stack(
        [torch.randint(0, vocab, (1, canvas_len), device=device, generator=g).view(canvas_len) for g in generators]
    )
    next_canvas = torch.where(accept, sampled, noise)

    thresholds = torch.tensor([r.confidence_threshold for r in rows], device=device, dtype=entropy.dtype)
    confident = entropy.mean(dim=-1) < thresholds
    # every position is re-decided each step: accepted positions take the sample, the rest fresh noise
    return TileResult(next_canvas=next_canvas, argmax=argmax, confident=confident, scaled_logits=scaled)
