"""Log-probabilities of a step's draft, for the rows that ask (OpenAI's ``logprobs``).

Definition: a committed token's log-probability is log softmax(s)[token] at its position, where s
are the temperature-scaled (and biased) logits of the denoising step whose argmax draft was
committed, s = (softcap(z) + bias) / T(step); the top alternatives are the k most probable tokens
of the same distribution. Both samplers compute them on the device, per row only [C] and [C, k]
values leave it. A row's alternatives come from a top-k with its own k, never another row's: which of
several tokens of equal probability a top-k lists depends on k, and a request's answer must not depend
on what the others of its pass ask for.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..work import CanvasLogprobs, DecodeWork


@dataclass
class LogprobTensors:
    """A tile's log-probabilities, on the device."""

    chosen: torch.Tensor  # [n, C] fp32: the draft token's
    top_ids: torch.Tensor  # [n, C, k] long, best first
    top_values: torch.Tensor  # [n, C, k] fp32


def top_count(rows: list[DecodeWork]) -> int | None:
    """The most alternatives any row asks for, or None when no row wants log-probabilities."""
    wanted = [r.logprobs for r in rows if r.logprobs is not None]
    return max(wanted) if wanted else None


def asking(rows: list[DecodeWork]) -> list[int]:
    """The indices of the rows that want log-probabilities: only theirs are computed."""
    return [i for i, r in enumerate(rows) if r.logprobs is not None]


def by_count(rows: list[DecodeWork], wanted: list[int]) -> dict[int, list[int]]:
    """The asking rows (``wanted``) by the number of alternatives each computes, its own k (at least one: the
    best gives the draft's value), in row order."""
    groups: dict[int, list[int]] = {}
    for i in wanted:
        groups.setdefault(max(rows[i].logprobs, 1), []).append(i)
    return groups


def fit(t: LogprobTensors, k: int) -> LogprobTensors:
    """``t`` with its alternatives cut or padded with zeros to ``k`` (the pass's largest: every part of a
    pass has the same shape; ``to_host`` reads only each row's own)."""
    have = t.top_ids.shape[-1]
    if have >= k:
        return LogprobTensors(t.chosen, t.top_ids[..., :k], t.top_values[..., :k])
    pad = (0, k - have)
    return LogprobTensors(t.chosen, torch.nn.functional.pad(t.top_ids, pad), torch.nn.functional.pad(t.top_values, pad))


def spread(part: LogprobTensors | None, rows: list[int], n: int, positions: int, k: int,
           device) -> LogprobTensors:
    """A tile's log-probabilities, [n, positions, ...], from ``part``, those of its asking ``rows`` in that
    order (None when none asks); the other rows' values are zeros, which ``to_host`` never reads."""
    if part is not None and rows == list(range(n)):
        return part
    out = LogprobTensors(torch.zeros((n, positions), dtype=torch.float32, device=device),
                         torch.zeros((n, positions, k), dtype=torch.int64, device=device),
                         torch.zeros((n, positions, k), dtype=torch.float32, device=device))
    if part is not None:
        index = torch.tensor(rows, device=device)
        for name in ("chosen", "top_ids", "top_values"):
            getattr(out, name).index_copy_(0, index, getattr(part, name))
    return out


def rows_from_probs(rows: list[int], counts: list[int], probs: torch.Tensor, scaled: torch.Tensor,
                    draft: torch.Tensor, k: int) -> LogprobTensors:
    """``from_probs`` of the asking ``rows`` of a chunk, each with its own number of alternatives ``counts``
    (over a view of the row: no copy of the [n, c, V] tensors), spread over the chunk's rows with ``k``
    (the largest) alternatives each."""
    n, c = draft.shape
    if len(rows) == n and len(set(counts)) == 1:  # one top-k with the rows' own k (a tile's may be below k)
        return fit(from_probs(probs, scaled, draft, counts[0]), k)
    parts = [fit(from_probs(probs[i:i + 1], scaled[i:i + 1], draft[i:i + 1], own), k) for i, own in zip(rows, counts)]
    return spread(concat(parts, dim=0), rows, n, c, k, draft.device)


def from_probs(probs: torch.Tensor, scaled: torch.Tensor, draft: torch.Tensor, k: int) -> LogprobTensors:
    """From the step's scaled logits s [n, c, V], their fp32 softmax and the draft [n, c]: log softmax(s)_v
    = s_v - m + log p_max, where m is the largest s and p_max its probability (at least 1/V, so its log
    is finite and precise), for the draft and the k largest s. Finite whatever the spread of s (the
    log of a probability that underflows to 0 would not be)."""
    m, top = scaled.max(dim=-1, keepdim=True)
    shift = probs.gather(-1, top).log() - m  # [n, c, 1]
    chosen = (scaled.gather(-1, draft[..., None]) + shift).squeeze(-1)
    values, ids = scaled.topk(k, dim=-1) if k else (scaled.new_empty(*scaled.shape[:-1], 0),
                                                    draft.new_empty(*draft.shape, 0))
    return LogprobTensors(chosen, ids, values + shift)


def concat(parts: list[LogprobTensors] | None, dim: int) -> LogprobTensors | None:
    """Log-probabilities of position chunks (``dim`` 1) or of tiles (``dim`` 0) joined; None when the
    pass computes none (every part has the same k: the pass's ``top_count``)."""
    if not parts or parts[0] is None:
        return None
    if len(parts) == 1:
        return parts[0]
    return LogprobTensors(*(torch.cat([getattr(p, f) for p in parts], dim=dim)
                            for f in ("chosen", "top_ids", "top_values")))


def to_host(tensors: LogprobTensors, rows: list[DecodeWork]) -> list[CanvasLogprobs | None]:
    """Per row (None for rows that did not ask): its canvas's values, each row's own top k. One transfer."""
    wanted = [i for i, r in enumerate(rows) if r.logprobs is not None]
    if not wanted:
        return [None] * len(rows)
    index = torch.tensor(wanted, device=tensors.chosen.device)
    chosen = tensors.chosen.index_select(0, index).tolist()
    ids = tensors.top_ids.index_select(0, index).tolist()
    values = tensors.top_values.index_select(0, index).tolist()
    out: list[CanvasLogprobs | None] = [None] * len(rows)
    for j, i in enumerate(wanted):
        k = rows[i].logprobs
        out[i] = CanvasLogprobs(tuple(chosen[j]), tuple(tuple(zip(ids_p[:k], vals_p[:k]))
                                                        for ids_p, vals_p in zip(ids[j], values[j])))
    return out
