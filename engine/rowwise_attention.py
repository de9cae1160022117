"""Batch-invariant attention: each row of a batch attends over its own unpadded keys.

A batched call of ``scaled_dot_product_attention`` over rows padded to a common key length does not
reduce a row in the order it would alone: the padding changes the blocking, and the row's outputs
move in the last bits. Over a near-flat distribution that flips samples, so a seeded request's text
would depend on who shared its passes. Here each row is cut to its valid queries and keys and goes
through transformers' own SDPA function exactly as it would in a batch of one (the same shapes, the
same mask or none), and its output is written back in place.

The model runs with the attention implementation ``ROWWISE_SDPA`` (registered by ``register``). The
runner says which queries and keys of its batch are real with ``batch_layout`` whenever rows are
padded; outside one (rows without padding, ``model.generate``) the call is transformers' SDPA unchanged.
The per-row loop is one operator, ``torch.ops.diffusion_engine.rowwise_sdpa``, so that a TorchScript
trace of the decoder (``engine.traced_decoder``) records the call, not one batch's rows and masks.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass

import torch

ROWWISE_SDPA = "engine_rowwise_sdpa"

_local = threading.local()


@dataclass(frozen=True)
class BatchLayout:
    """Which positions of a padded batch are real: ``queries`` [B, Q] (None: all) and, per layer type,
    the keys [B, K] (the cached keys and then the new ones, as the attention layer concatenates them)."""

    queries: torch.Tensor | None
    keys: dict[str, torch.Tensor]


@contextmanager
def batch_layout(layout: BatchLayout | None):
    """Run the enclosed forward with ``layout`` (None: every row is attended whole, as given)."""
    previous = getattr(_local, "layout", None)
    _local.layout = layout
    try:
        yield
    finally:
        _local.layout = previous


def rowwise_sdpa_forward(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         attention_mask: torch.Tensor | None, **kwargs):
    """transformers' attention interface: query [B, H, Q, D], key/value [B, Hkv, K, D], a boolean mask
    [B, 1, Q, K] or None; returns ([B, Q, H, D], None)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    layout: BatchLayout | None = getattr(_local, "layout", None)
    if layout is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    out = torch.ops.diffusion_engine.rowwise_sdpa(
        query, key, value, attention_mask, layout.keys[module.layer_type], layout.queries,
        getattr(module, "num_key_value_groups", 1), kwargs.get("scaling"), bool(kwargs.get("is_causal", getattr(module, "is_causal", True))))
    return out, None


@dataclass(frozen=True)
class _Heads:
    """What transformers' SDPA function reads from the attention module."""

    num_key_value_groups: int


@torch.library.custom_op("diffusion_engine::rowwise_sdpa", mutates_args=())
def rowwise_sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: torch.Tensor | None,
                 keys_valid: torch.Tensor, queries_valid: torch.Tensor | None, num_key_value_groups: int,
                 scaling: float | None, is_causal: bool) -> torch.Tensor:
    """Each row of the batch through transformers' SDPA function over its own valid queries
    (``queries_valid`` [B, Q], None: all) and keys (``keys_valid`` [B, K]), as in a batch of one.
    Returns [B, Q, H, D]; padding queries get zeros (nothing reads them)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    module = _Heads(num_key_value_groups)
    B, H, Q, D = query.shape
    out = query.new_zeros((B, Q, H, D))
    rows = query.transpose(1, 2)  # [B, Q, H, D], the layout the layer made its queries in
    for b in range(B):
        q_index = None if queries_valid is None else queries_valid[b].nonzero().squeeze(1)
        k_index = keys_valid[b].nonzero().squeeze(1)
        q = rows[b:b + 1] if q_index is None else rows[b:b + 1, q_index]
        mask = None
        if attention_mask is not None:
            mask = attention_mask[b:b + 1]
            if q_index is not None:
                mask = mask[:, :, q_index]
            mask = mask[:, :, :, k_index]
            if bool(mask.all()):
                mask = None  # what a batch of one without padding passes
        row_out, _ = sdpa_attention_forward(module, q.transpose(1, 2), key[b:b + 1, :, k_index],
                                            value[b:b + 1, :, k_index], mask, dropout=0.0, scaling=scaling,
                                            is_causal=is_causal)
        if q_index is None:
            out[b] = row_out[0]
        else:
            out[b, q_index] = row_out[0]
    return out


def register() -> None:
    """Make ``ROWWISE_SDPA`` an attention implementation (and give it SDPA's mask format)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(ROWWISE_SDPA, rowwise_sdpa_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ROWWISE_SDPA, sdpa_mask)
