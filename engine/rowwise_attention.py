"""Batch-invariant attention: each row of a batch attends over its own unpadded keys.

A batched call of ``scaled_dot_product_attention`` over rows padded to a common key length does not
reduce a row in the order it would alone: the padding changes the blocking, and the row's outputs
move in the last bits. Over a near-flat distribution that flips samples, so a seeded request's text
would depend on who shared its passes. Here each row is cut to its valid queries and keys and goes
through what transformers' SDPA function does for a batch of one (the same shapes, the same mask or
none, the same call), and its output is written back in place.

The model runs with the attention implementation ``ROWWISE_SDPA`` (registered by ``register``). The
runner says which queries and keys of its batch are real with ``batch_layout`` whenever rows are
padded; outside one (rows without padding, ``model.generate``) the call is transformers' SDPA unchanged.
The per-row loop is a TorchScript function (``engine.rowwise_sdpa``), so that a trace of the decoder
(``engine.traced_decoder``) records the loop, not one batch's rows and masks, and runs it without the GIL.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .rowwise_sdpa import rowwise_sdpa
from .thread_value import ThreadValue

ROWWISE_SDPA = "engine_rowwise_sdpa"


@dataclass(frozen=True)
class BatchLayout:
    """Which positions of a padded batch are real: ``queries`` [B, Q] (None: all) and, per layer type,
    the keys [B, K] (the cached keys and then the new ones, as the attention layer concatenates them)."""

    queries: torch.Tensor | None
    keys: dict[str, torch.Tensor]


_LAYOUT: ThreadValue[BatchLayout] = ThreadValue()


def batch_layout(layout: BatchLayout | None):
    """Run the enclosed forward with ``layout`` (None: every row is attended whole, as given)."""
    return _LAYOUT.set(layout)


def rowwise_sdpa_forward(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         attention_mask: torch.Tensor | None, **kwargs):
    """transformers' attention interface: query [B, H, Q, D], key/value [B, Hkv, K, D], a boolean mask
    [B, 1, Q, K] or None; returns ([B, Q, H, D], None)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    layout = _LAYOUT.get()
    if layout is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    is_causal = kwargs.get("is_causal")
    with torch.jit.optimized_execution(False):  # the recorded operators, eagerly as in a trace (thread-local)
        out = rowwise_sdpa(query, key, value, attention_mask, layout.keys[module.layer_type], layout.queries,
                           getattr(module, "num_key_value_groups", 1), kwargs.get("scaling"),
                           bool(getattr(module, "is_causal", True) if is_causal is None else is_causal),
                           os.environ.get("TRANSFORMERS_SDPA_FORCE_GQA", "0") == "1")
    return out, None


def register() -> None:
    """Make ``ROWWISE_SDPA`` an attention implementation (and give it SDPA's mask format)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(ROWWISE_SDPA, rowwise_sdpa_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ROWWISE_SDPA, sdpa_mask)
