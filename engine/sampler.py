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

from .work import DecodeWork


# fp32 [rows, positions, vocab] copies the sampler keeps alive for one chunk of positions: the lm
# head's output before the cast and soft-capping, the (scaled in place) logits, the probabilities,
# and the entropy's normalised logits and p*log(p).
CHUNK_FP32_COPIES = 5


@dataclass(frozen=True)
class SamplingTiles:
    """How the lm head and the sampler walk a decoder batch: tiles of ``rows`` canvases, each in
    chunks of ``positions`` canvas positions (all of them unless one row alone exceeds the budget).
    Each row's exponential draws are whole [canvas, vocab] tensors (the reference draws them in one
    call), ``draws_in_flight`` tiles at a time (2 on CPU, where the next tile is drawn ahead)."""

    rows: int
    positions: int
    draws_in_flight: int

    def transient_bytes(self, canvas_length: int, vocab_size: int) -> int:
        return 4 * vocab_size * self.rows * (self.draws_in_flight * canvas_length + CHUNK_FP32_COPIES * self.positions)


def sampling_tiles(budget_bytes: int, canvas_length: int, vocab_size: int, draws_in_flight: int) -> SamplingTiles:
    """The largest tiles whose fp32 transient stays within ``budget_bytes`` (at least one position of
    one row, plus that row's draws)."""
    per_row = SamplingTiles(1, canvas_length, draws_in_flight).transient_bytes(canvas_length, vocab_size)
    if budget_bytes >= per_row:
        return SamplingTiles(budget_bytes // per_row, canvas_length, draws_in_flight)
    spare = budget_bytes - 4 * vocab_size * draws_in_flight * canvas_length
    positions = max(1, spare // (4 * vocab_size * CHUNK_FP32_COPIES))
    return SamplingTiles(1, min(canvas_length, positions), draws_in_flight)


@functools.lru_cache(maxsize=4096)
def step_temperature(t_min: float, t_max: float, cur_step: int, max_steps: int, device: str) -> float:
    """Temperature at step ``cur_step`` (N..1, steps *remaining*), computed as transformers does: fp32
    tensor ops on the model's device (CUDA divides by a Python int as a multiply by its reciprocal, so
    the device matters to the last bit). Returned as the exact fp32 value and cached: requests share few
    parameter sets, and a cached value costs no device round trip."""
    step = torch.tensor(cur_step, dtype=torch.int32, device=device)
    return float(t_min + ((t_max - t_min) * (step / max_steps)))


@dataclass
class PositionsDraw:
    """The draw and the draft for a chunk of positions of a tile's rows."""

    sampled: torch.Tensor  # [n, c] the multinomial draw
    argmax: torch.Tensor  # [n, c] draft: argmax of the scaled logits
    probs: torch.Tensor  # [n, c, V] fp32 softmax of the scaled logits (== the self-conditioning softmax in fp32)


@dataclass
class AcceptResult:
    next_canvas: torch.Tensor  # [n, C] the renoised canvas fed to the next step
    confident: torch.Tensor  # [n] bool: mean entropy below the threshold
    usable: torch.Tensor  # [n] bool: no NaN or +inf logit in the row (its entropies are finite); -inf is allowed


def row_parameters(rows: list[DecodeWork], device) -> torch.Tensor:
    """[n, 3] fp32, one row per canvas: its temperature at its current step, its entropy bound and its
    confidence threshold (one host-to-device copy for the three). fp32 is what the reference compares
    in: it divides by an fp32 temperature and compares fp32 entropies with Python floats, which torch
    rounds to the tensor's dtype first."""
    return torch.tensor(
        [(step_temperature(r.t_min, r.t_max, r.cur_step, r.max_steps, str(device)), r.entropy_bound,
          r.confidence_threshold) for r in rows],
        dtype=torch.float32, device=device,
    )


def temperatures(params: torch.Tensor) -> torch.Tensor:
    """[n, 1, 1]: the temperature column of ``row_parameters``, shaped to divide [n, c, V] logits."""
    return params[:, 0].view(-1, 1, 1)


def scale_logits(logits: torch.Tensor, temps: torch.Tensor) -> torch.Tensor:
    """[n, c, V] fp32 soft-capped logits divided, in place, by ``temps`` [n, 1, 1] (``temperatures``)."""
    return logits.div_(temps)


def draw_positions(scaled: torch.Tensor, exponentials: torch.Tensor) -> PositionsDraw:
    """The multinomial draw and the draft from [n, c, V] scaled logits; ``exponentials`` are these
    positions' Exp(1) draws (random_draws), overwritten. Only reads ``scaled``."""
    probs = torch.softmax(scaled, dim=-1, dtype=torch.float32)
    # torch.multinomial(probs[i], 1, generator=g) is argmax(probs[i] / q) with q ~ Exp(1) from g;
    # q was drawn ahead (random_draws), so this is the reference's draw, position for position.
    # torch.max(dim).indices is argmax (the first maximal index; NaN counts as maximal) in less time
    # on CPU, where this inner-dimension reduction is not vectorized
    sampled = torch.max(torch.div(probs, exponentials, out=exponentials), dim=-1).indices
    argmax = torch.max(scaled, dim=-1).indices
    return PositionsDraw(sampled=sampled, argmax=argmax, probs=probs)


def positions_entropy(scaled: torch.Tensor) -> torch.Tensor:
    """[n, c]: ``Categorical(logits=scaled).entropy()`` op for op, without the distribution object's
    overhead. Only reads ``scaled`` (so it may run beside ``draw_positions``)."""
    normalized = scaled - scaled.logsumexp(dim=-1, keepdim=True)
    p_log_p = torch.softmax(normalized, dim=-1)
    p_log_p.mul_(normalized.clamp_(min=torch.finfo(normalized.dtype).min))
    del normalized
    return -p_log_p.sum(-1)


def accept(entropy: torch.Tensor, sampled: torch.Tensor, noise: torch.Tensor, params: torch.Tensor) -> AcceptResult:
    """The entropy-bounded acceptance over whole canvases ([n, C] each) and the renoise; ``params`` is
    ``row_parameters`` of the same rows."""
    sorted_entropy, order = torch.sort(entropy, dim=-1, descending=False)
    cumulative = torch.cumsum(sorted_entropy, dim=-1)
    # Accept the k lowest-entropy positions whose entropy sum minus the largest stays within the bound.
    sorted_accept = cumulative - sorted_entropy <= params[:, 1:2]
    accepted = torch.scatter(torch.zeros_like(sorted_accept), dim=-1, index=order, src=sorted_accept)
    # every position is re-decided each step: accepted positions take the sample, the rest fresh noise
    next_canvas = torch.where(accepted, sampled, noise)
    mean_entropy = entropy.mean(dim=-1)
    # A NaN or +inf logit makes its position's entropy NaN, hence the row mean: such a row's outputs are
    # garbage (the reference's multinomial would raise) and the caller fails it; rows never mix.
    return AcceptResult(next_canvas=next_canvas, confident=mean_entropy < params[:, 2], usable=torch.isfinite(mean_entropy))
