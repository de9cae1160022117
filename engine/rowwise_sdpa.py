"""The row-wise attention loop (``engine.rowwise_attention``) in TorchScript.

Each row of a padded batch is cut to its valid queries and keys and goes through what transformers'
``sdpa_attention_forward`` does for a batch of one on CPU and CUDA: the same GQA choice (SDPA's
``enable_gqa`` without a mask, packed heads for a single query, repeated KV heads otherwise), the same
causal flag and key crop, the same ``scaled_dot_product_attention`` call. A scripted function runs its
loop without Python, so a traced decoder pass (``engine.traced_decoder``) records the call with its
control flow and replays it for any batch, without the GIL. ``tests/test_engine_batch_invariance.py``
compares padded rows with their solo runs, which go through transformers' own function, bit for bit.

No ``from __future__ import annotations`` here: TorchScript reads the annotations.
"""

from typing import Optional

import torch
import torch.nn.functional as F


@torch.jit.script
def _sdpa_one(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: Optional[torch.Tensor],
              groups: int, scaling: Optional[float], is_causal: bool, force_gqa: bool) -> torch.Tensor:
    """transformers' ``sdpa_attention_forward`` for a batch of one: query [1, H, Q, D], key/value
    [1, Hkv, K, D], mask [1, 1, Q, K] or None -> [1, Q, H, D]."""
    q_length = query.shape[2]
    enable_gqa = False
    if groups > 1:
        if force_gqa or (mask is None and key.shape[-1] == value.shape[-1] and value.shape[-1] <= 256):
            enable_gqa = True
        elif q_length == 1:  # pack_gqa: the heads of one KV head become its queries; a [1, 1, ...] mask is shared
            query = query.reshape(query.shape[0], query.shape[1] // groups, groups, query.shape[3])
        else:  # repeat_kv
            b, kv_heads, slen, dim = key.shape
            key = key[:, :, None, :, :].expand(b, kv_heads, groups, slen, dim).reshape(b, kv_heads * groups, slen, dim)
            b, kv_heads, slen, dim = value.shape
            value = value[:, :, None, :, :].expand(b, kv_heads, groups, slen, dim).reshape(b, kv_heads * groups, slen, dim)
    kv_length = key.shape[2]
    causal = q_length > 1 and mask is None and is_causal
    if causal and kv_length > q_length:
        key = key[:, :, :q_length, :]
        value = value[:, :, :q_length, :]
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=0.0, is_causal=causal,
                                         scale=scaling, enable_gqa=enable_gqa)
    out = out.reshape(out.shape[0], -1, q_length, value.shape[-1])
    return out.transpose(1, 2).contiguous()


@torch.jit.script
def rowwise_sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: Optional[torch.Tensor],
                 keys_valid: torch.Tensor, queries_valid: Optional[torch.Tensor], groups: int,
                 scaling: Optional[float], is_causal: bool, force_gqa: bool) -> torch.Tensor:
    """query [B, H, Q, D], key/value [B, Hkv, K, D], a boolean mask [B, 1, Q, K] or None, ``keys_valid``
    [B, K] and ``queries_valid`` [B, Q] (None: all) -> [B, Q, H, D]; padding queries get zeros
    (nothing reads them). ``groups``: query heads per KV head."""
    B, H, Q, D = query.shape
    out = query.new_zeros((B, Q, H, D))
    rows = query.transpose(1, 2)  # [B, Q, H, D], the layout the layer made its queries in
    for b in range(B):
        k_index = keys_valid[b].nonzero().squeeze(1)
        q = rows[b:b + 1]
        q_index = torch.empty(0, dtype=torch.long, device=query.device)
        if queries_valid is not None:
            q_index = queries_valid[b].nonzero().squeeze(1)
            q = q[:, q_index]
        mask: Optional[torch.Tensor] = None
        if attention_mask is not None:
            m = attention_mask[b:b + 1]
            if queries_valid is not None:
                m = m[:, :, q_index]
            m = m[:, :, :, k_index]
            if not bool(m.all()):
                mask = m  # otherwise none, as a batch of one without padding passes
        row_out = _sdpa_one(q.transpose(1, 2), key[b:b + 1, :, k_index], value[b:b + 1, :, k_index], mask, groups,
                            scaling, is_causal, force_gqa)
        if queries_valid is None:
            out[b] = row_out[0]
        else:
            out[b, q_index] = row_out[0]
    return out
