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


class BiasRows:
    """Each biased request's [V] fp32 logit bias on the device, built at its first step and kept until
    it is freed: a step stacks its tile's rows (zeros for rows without a bias) without a host copy."""

    def __init__(self, vocab_size: int, device):
        self.vocab_size = vocab_size
        self.device = device
        self._rows: dict[str, torch.Tensor] = {}
        self._zero: torch.Tensor | None = None

    def matrix(self, rows: list[DecodeWork]) -> torch.Tensor | None:
        """[n, V] additive bias of the tile's rows, or None when no row has one."""
        if not any(r.logit_bias for r in rows):
            return None
        return torch.stack([self._row(r) for r in rows])

    def _row(self, r: DecodeWork) -> torch.Tensor:
        if not r.logit_bias:
            if self._zero is None:
                self._zero = torch.zeros(self.vocab_size, dtype=torch.float32, device=self.device)
            return self._zero
        row = self._rows.get(r.request_id)
        if row is None:
            ids, values = zip(*r.logit_bias)
            row = torch.zeros(self.vocab_size, dtype=torch.float32)
            row[list(ids)] = torch.tensor(values, dtype=torch.float32)
            row = self._rows[r.request_id] = row.to(self.device)
        return row

    def free(self, request_id: str) -> None:
        self._rows.pop(request_id, None)


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
