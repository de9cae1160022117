"""Batch-invariant MoE experts for CPU that give transformers' own experts' bits for a request run alone.

What it guarantees, per token (``tests/test_rowwise_experts.py``, ``tests/test_engine_exactness_experts.py``):

- Batch invariance: a token's output depends only on its own request's tokens, never on the other
  requests of the call. On CPU a linear layer's row is bitwise the same for any number of rows from
  four up, but not for one to three rows (a different kernel). So each (request, expert) group of
  fewer than ``ALONE_BELOW`` tokens runs on exactly its own rows, and every other token of the expert
  runs in one pooled group, padded with zero rows to at least ``MIN_ROWS`` (the many-row kernel).
- Generate's bits: a request alone (``model.generate`` at batch 1) runs each expert group of 1-3 tokens
  on exactly those rows and every larger one on the many-row kernel, as above. A token's weighted expert
  outputs are summed as transformers sums them: in float32 as its default ``grouped_mm_experts_forward``
  does, in top-k order over a ``[T, k, H]`` buffer (``.sum(dim=1)``); in bfloat16, float16 and float64,
  whose reference is ``eager`` (no float64 grouped_mm; its half-precision products round otherwise), in
  expert order with ``index_add_``, as the eager loop does. For top-k <= 2 the two orders agree.

Which request a token belongs to comes from ``request_rows`` (the runner sets it around its encoder and
decoder calls); outside one the whole call is one request, as in ``generate``. On CUDA (``--batch-invariant``)
every group is pooled: the batch-invariant products give a row the same bits for any number of rows.

While a TorchScript trace of the decoder records it (``engine.traced_decoder``), the loop visits every
expert, and the data-dependent grouping is TorchScript functions (``_alone``, ``_grouped_linear``),
recorded with its branches and loop: the trace replays the experts for any routing and any number of canvases.
No ``from __future__ import annotations`` here: TorchScript reads the annotations.
"""

from typing import Union

import torch
import torch.nn.functional as F

from .thread_value import ThreadValue

ROWWISE_EXPERTS = "engine_rowwise_experts"
MIN_ROWS = 16
# a linear layer's row has the many-row kernel's bits from this many rows up
ALONE_BELOW = 4

_REQUESTS: ThreadValue[Union[int, torch.Tensor]] = ThreadValue()


def request_rows(rows: Union[int, torch.Tensor, None]):
    """Within, say which request each token of an experts call belongs to: an int ``n`` (every ``n``
    consecutive tokens are one request: the decoder's canvases), or a ``[T]`` long tensor of request
    indices with -1 for padding tokens (which belong to no request: the encoder's left-padded rows).
    None: the whole call is one request."""
    return _REQUESTS.set(rows)


@torch.jit.script
def _consecutive(hidden_states: torch.Tensor, block: int) -> torch.Tensor:
    """[T, H] -> [T]: each token's request, ``block`` consecutive tokens per request (0: all one request)."""
    tokens = torch.arange(hidden_states.shape[0], device=hidden_states.device)
    if block <= 0:
        return torch.zeros_like(tokens)
    return torch.div(tokens, block, rounding_mode="floor")


@torch.jit.script
def _alone(requests: torch.Tensor, top_k_index: torch.Tensor, num_experts: int, alone_below: int) -> torch.Tensor:
    """requests [T] (-1: none), top_k_index [T, k] -> [T, k] bool: whether the token's group at that expert,
    its request's tokens there, has fewer than ``alone_below`` tokens (and so runs alone)."""
    group = (requests[:, None] + 1) * num_experts + top_k_index  # (request, expert); no request: the first
    counts = torch.bincount(group.flatten())
    return (counts[group] < alone_below) & (requests[:, None] >= 0)


@torch.jit.script
def _pooled_linear(x: torch.Tensor, weight: torch.Tensor, min_rows: int) -> torch.Tensor:
    """``F.linear(x, weight)`` over [n, in] rows padded with zero rows to at least ``min_rows``. -> [n, out]."""
    n = x.shape[0]
    if n < min_rows:
        x = torch.cat([x, x.new_zeros((min_rows - n, x.shape[1]))])
    return F.linear(x, weight)[:n]


@torch.jit.script
def _grouped_linear(x: torch.Tensor, weight: torch.Tensor, requests: torch.Tensor, alone: torch.Tensor,
                    min_rows: int) -> torch.Tensor:
    """``F.linear(x, weight)`` for the [n, in] rows one expert sees, whose requests are ``requests`` [n]:
    the rows marked ``alone`` [n] run one request at a time on exactly its rows, the others together,
    padded with zero rows to at least ``min_rows``. -> [n, out]."""
    n = x.shape[0]
    if not bool(alone.any()):  # the usual case: one pooled group
        return _pooled_linear(x, weight, min_rows)
    out = torch.empty((n, weight.shape[0]), dtype=x.dtype, device=x.device)
    pooled = (~alone).nonzero().squeeze(1)
    if pooled.shape[0] > 0:
        out[pooled] = _pooled_linear(x[pooled], weight, min_rows)
    owners = torch.unique(requests[alone])
    for j in range(owners.shape[0]):
        own = (alone & (requests == owners[j])).nonzero().squeeze(1)
        out[own] = F.linear(x[own], weight)  # exactly its rows, as the request alone runs them
    return out


def rowwise_experts_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                            top_k_weights: torch.Tensor) -> torch.Tensor:
    """transformers' experts interface: hidden_states [T, H], top_k_index / top_k_weights [T, k] -> [T, H]."""
    rows = _REQUESTS.get()
    if rows is None:
        requests = _consecutive(hidden_states, 0)
    elif isinstance(rows, int):
        requests = _consecutive(hidden_states, rows)
    else:
        requests = rows
    top_k = top_k_index.shape[1]
    # float32 sums a token's experts as transformers' default grouped_mm does; the other dtypes as eager
    eager_order = hidden_states.dtype in (torch.bfloat16, torch.float16, torch.float64)
    if eager_order:
        final = torch.zeros_like(hidden_states)
    else:
        slots = hidden_states.new_zeros(hidden_states.shape[0], top_k, hidden_states.shape[1])
    with torch.no_grad():
        expert_mask = torch.nn.functional.one_hot(top_k_index, num_classes=self.num_experts + 1).permute(2, 1, 0)
        # the experts with tokens; a trace visits every expert, so that its loop fits any routing (an
        # expert without tokens adds nothing)
        hit = range(self.num_experts) if torch.jit.is_tracing() else \
            torch.greater(expert_mask[: self.num_experts].sum(dim=(-1, -2)), 0).nonzero()[:, 0].tolist()
    # CPU only: CUDA's batch-invariant products give a row the same bits for any row count (and a split
    # would cost host synchronisations)
    alone = _alone(requests, top_k_index, self.num_experts, ALONE_BELOW) if hidden_states.device.type == "cpu" \
        else None

    def linear(x: torch.Tensor, weight: torch.Tensor, token_idx: torch.Tensor, top_k_pos: torch.Tensor):
        if alone is None:
            return _pooled_linear(x, weight, MIN_ROWS)
        return _grouped_linear(x, weight, requests[token_idx], alone[token_idx, top_k_pos], MIN_ROWS)

    for expert in hit:
        top_k_pos, token_idx = torch.where(expert_mask[expert])
        gate, up = linear(hidden_states[token_idx], self.gate_up_proj[expert], token_idx, top_k_pos).chunk(2, dim=-1)
        out = linear(self.act_fn(gate) * up, self.down_proj[expert], token_idx, top_k_pos)
        out = out * top_k_weights[token_idx, top_k_pos, None]
        if eager_order:
            final.index_add_(0, token_idx, out.to(final.dtype))
        else:
            # index_put_ itself: Python's item assignment would record a view to this call's sizes in a trace
            slots.index_put_((token_idx, top_k_pos), out.to(slots.dtype))
    if eager_order:
        return final
    return slots.sum(dim=1).to(hidden_states.dtype)  # grouped_mm's sum: the token's top-k slots in order


def register() -> None:
    """Make ``ROWWISE_EXPERTS`` a valid ``experts_implementation`` (idempotent)."""
    from transformers.integrations.moe import ExpertsInterface

    ExpertsInterface.register(ROWWISE_EXPERTS, rowwise_experts_forward)
