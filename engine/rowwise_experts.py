"""Batch-invariant MoE experts for CPU: transformers' per-expert loop with every expert's token group
padded to at least ``MIN_ROWS`` rows.

On CPU a linear layer's row is bitwise the same for any number of rows from a few up, but not for
one to three rows (a different kernel): so a token that an expert sees alone in one batch and with
others in another would come out different in the last bits. Padding each group with zero rows to
``MIN_ROWS`` keeps every token on the many-row kernel (``tests/test_engine_batch_invariance.py``
checks the premise on this machine). grouped_mm's result for a token also depends on its group.
Everything else is transformers' eager forward: the same gate/up split, activation, routing weights
and accumulation order.

While a TorchScript trace of the decoder records it (``engine.traced_decoder``), the loop visits every
expert, and the padding is always a slice of ``MIN_ROWS`` zero rows from the group's size on (no
branch): the trace records the sizes as values and replays the loop for any routing.
"""

from __future__ import annotations

import torch

ROWWISE_EXPERTS = "engine_rowwise_experts"
MIN_ROWS = 16


def rowwise_experts_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                            top_k_weights: torch.Tensor) -> torch.Tensor:
    """hidden_states [T, H], top_k_index / top_k_weights [T, k] -> [T, H]."""
    final = torch.zeros_like(hidden_states)
    padding = hidden_states.new_zeros(MIN_ROWS, hidden_states.shape[1])
    with torch.no_grad():
        expert_mask = torch.nn.functional.one_hot(top_k_index, num_classes=self.num_experts + 1).permute(2, 1, 0)
        # the experts with tokens; a trace visits every expert, so that its loop fits any routing (an
        # expert without tokens adds nothing)
        hit = range(self.num_experts) if torch.jit.is_tracing() else \
            torch.greater(expert_mask[: self.num_experts].sum(dim=(-1, -2)), 0).nonzero()[:, 0].tolist()
    for expert in hit:
        top_k_pos, token_idx = torch.where(expert_mask[expert])
        rows = hidden_states[token_idx]  # [n, H]
        n = rows.shape[0]
        if torch.jit.is_tracing() or n < MIN_ROWS:  # traced: always, as a slice that is empty from MIN_ROWS up
            rows = torch.cat([rows, padding[n:]])  # at least MIN_ROWS rows
        gate, up = torch.nn.functional.linear(rows, self.gate_up_proj[expert]).chunk(2, dim=-1)
        out = torch.nn.functional.linear(self.act_fn(gate) * up, self.down_proj[expert])[:n]
        out = out * top_k_weights[token_idx, top_k_pos, None]
        final.index_add_(0, token_idx, out.to(final.dtype))
    return final


def register() -> None:
    """Make ``ROWWISE_EXPERTS`` a valid ``experts_implementation`` (idempotent)."""
    from transformers.integrations.moe import ExpertsInterface

    ExpertsInterface.register(ROWWISE_EXPERTS, rowwise_experts_forward)
