"""What a request constrains in its canvas's step, for both samplers: a logit bias (OpenAI's
``logit_bias``) and pinned positions (an infill suffix, never renoised).

- Bias: added to the soft-capped logits before the temperature, s = (softcap(z) + bias) / T, so the
  biased distribution is what the draft, the sample, the entropies and the soft embeddings see (as
  a ``LogitsProcessor`` given to transformers' ``generate`` would).
- Pins: a pinned position holds its token in the draft and in every canvas fed to the decoder; its
  entropy counts as 0 in the acceptance (it spends none of the entropy bound) and it is left out of
  the mean entropy that decides confidence.

Rows without constraints go through exactly the unconstrained operations.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..work import DecodeWork


def bias_matrix(rows: list[DecodeWork], vocab_size: int, device) -> torch.Tensor | None:
    """[n, V] fp32 additive logit bias of each row, or None when no row has one."""
    if not any(r.logit_bias for r in rows):
        return None
    bias = torch.zeros(len(rows), vocab_size, dtype=torch.float32)
    for i, r in enumerate(rows):
        if r.logit_bias:
            ids, values = zip(*r.logit_bias)
            bias[i, list(ids)] = torch.tensor(values, dtype=torch.float32)
    return bias.to(device)


def add_bias(logits: torch.Tensor, bias: torch.Tensor | None, v0: int = 0) -> torch.Tensor:
    """In place: logits [n * c, w] (c positions of each of n rows, tokens v0 .. v0 + w) += their rows' bias."""
    if bias is not None:
        logits.unflatten(0, (bias.shape[0], -1)).add_(bias[:, None, v0:v0 + logits.shape[-1]])
    return logits


def pin_row(canvas: torch.Tensor, row: DecodeWork) -> torch.Tensor:
    """[C] canvas with the row's pinned tokens in place (in place; returned)."""
    if row.pinned:
        start = row.pinned_start
        canvas[start:start + len(row.pinned)] = torch.tensor(row.pinned, dtype=canvas.dtype, device=canvas.device)
    return canvas


@dataclass
class Pins:
    """The pinned positions of a tile of rows."""

    mask: torch.Tensor  # [n, C] bool
    tokens: torch.Tensor  # [n, C] long (meaningful where ``mask``)
    rows: torch.Tensor  # [n] bool: the row has pins

    def apply(self, canvas: torch.Tensor) -> torch.Tensor:
        """[n, C] tokens with the pinned ones in place."""
        return torch.where(self.mask, self.tokens, canvas)


def pins(rows: list[DecodeWork], canvas_length: int, device) -> Pins | None:
    """The tile's pins, or None when no row has any."""
    if not any(r.pinned for r in rows):
        return None
    mask = torch.zeros(len(rows), canvas_length, dtype=torch.bool)
    tokens = torch.zeros(len(rows), canvas_length, dtype=torch.long)
    for i, r in enumerate(rows):
        if r.pinned:
            span = slice(r.pinned_start, r.pinned_start + len(r.pinned))
            mask[i, span] = True
            tokens[i, span] = torch.tensor(r.pinned, dtype=torch.long)
    return Pins(mask.to(device), tokens.to(device), mask.any(dim=1).to(device))


def acceptance_entropy(entropy: torch.Tensor, pins: Pins | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(entropies the acceptance sorts [n, C], the mean entropy confidence compares [n]): unchanged for
    rows without pins; pinned positions count 0 and are left out of the mean."""
    mean = entropy.mean(dim=-1)
    if pins is None:
        return entropy, mean
    free = entropy.masked_fill(pins.mask, 0.0)
    free_mean = free.sum(dim=-1) / (~pins.mask).sum(dim=-1).clamp(min=1)
    return free, torch.where(pins.rows, free_mean, mean)
