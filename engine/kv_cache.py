"""Per-request KV storage and the padded batch views the model's attention layers read.

Each request owns, per layer, K and V of shape [kv_heads, length, head_dim]. Full-attention
layers keep every committed token; sliding-window layers keep only the last ``window - 1``
(exactly what transformers' ``DynamicSlidingWindowLayer`` keeps, so a canvas attends to the same
keys as in ``model.generate``).

A batch view pads the rows' KV on the left to a common length and exposes the two methods the
DiffusionGemma attention layers call on ``past_key_values``: ``update`` (encoder: append new K/V
and return [past ; new]) and ``layers[i].keys/values`` (decoder: read-only).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class LayerKV:
    keys: torch.Tensor  # [kv_heads, length, head_dim]
    values: torch.Tensor  # [kv_heads, length, head_dim]


@dataclass
class RequestKV:
    """One request's cache. ``total_len`` counts every token ever encoded (its next position)."""

    layers: list[LayerKV | None]
    total_len: int = 0

    def stored_len(self, layer_idx: int) -> int:
        layer = self.layers[layer_idx]
        return 0 if layer is None else layer.keys.shape[1]

    def nbytes(self) -> int:
        return sum(l.keys.nbytes + l.values.nbytes for l in self.layers if l is not None)


@dataclass
class _PaddedLayer:
    keys: torch.Tensor  # [batch, kv_heads, padded_len, head_dim]
    values: torch.Tensor


@dataclass
class BatchKVView:
    """Left-padded KV of several requests, layer by layer, shaped like a transformers cache.

    ``past_len[layer_type]`` is the padded past length, ``valid[layer_type]`` a [batch, padded_len]
    bool of real (non-padding) slots and ``positions[layer_type]`` their absolute positions.
    """

    layers: list[_PaddedLayer]
    layer_types: list[str]
    valid: dict[str, torch.Tensor]
    positions: dict[str, torch.Tensor]
    new_keys: list[torch.Tensor | None] = field(default_factory=list)
    new_values: list[torch.Tensor | None] = field(default_factory=list)
    is_compileable: bool = False

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Encoder path: remember the new K/V of this layer and return [past ; new] for attention."""
        self.new_keys[layer_idx] = key_states
        self.new_values[layer_idx] = value_states
        past = self.layers[layer_idx]
        return torch.cat([past.keys, key_states], dim=-2), torch.cat([past.values, value_states], dim=-2)


class KVCacheManager:
    """Owns every request's KV tensors and builds batch views over them."""

    def __init__(self, layer_types: list[str], sliding_window: int, device: torch.device, dtype: torch.dtype):
        self.layer_types = list(layer_types)
        self.sliding_window = sliding_window
        self.device = device
        self.dtype = dtype
        self._caches: dict[str, RequestKV] = {}

    # -- bookkeeping -------------------------------------------------------------------------
    def allocate(self, request_id: str) -> RequestKV:
        kv = RequestKV(layers=[None] * len(self.layer_types))
        self._caches[request_id] = kv
        return kv

    def get(self, request_id: str) -> RequestKV:
        return self._caches[request_id]

    def free(self, request_id: str) -> None:
        self._caches.pop(request_id, None)

    def __len__(self) -> int:
        return len(self._caches)

    def nbytes(self) -> int:
        return sum(kv.nbytes() for kv in self._caches.values())

    def _first_layer(self, layer_type: str) -> int:
        return self.layer_types.index(layer_type)

    # -- views -------------------------------------------------------------------------------
    def build_view(self, request_ids: list[str], template: list[tuple[int, int]]) -> BatchKVView:
        """Left-pad the requests' KV into one batch.

        ``template`` gives (kv_heads, head_dim) per layer, used for requests that have no KV yet.
        """
        caches = [self._caches[rid] for rid in request_ids]
        batch = len(caches)
        layers: list[_PaddedLayer] = []
        valid: dict[str, torch.Tensor] = {}
        positions: dict[str, torch.Tensor] = {}
        for layer_type in set(self.layer_types):
            ref = self._first_layer(layer_type)
            lengths = [kv.stored_len(ref) for kv in caches]
            padded = max(lengths, default=0)
            slot = torch.arange(padded, device=self.device)
            lens = torch.tensor(lengths, device=self.device)
            starts = torch.tensor([kv.total_len for kv in caches], device=self.device) - lens
            # slot j of row r holds position starts[r] + (j - (padded - lens[r])) when valid
            offset = slot[None, :] - (padded - lens)[:, None]
            valid[layer_type] = offset >= 0
            positions[layer_type] = starts[:, None] + offset
        for idx in range(len(self.layer_types)):
            heads, dim = template[idx]
            padded = valid[self.layer_types[idx]].shape[1]
            keys = torch.zeros(batch, heads, padded, dim, device=self.device, dtype=self.dtype)
            values = torch.zeros_like(keys)
            for row, kv in enumerate(caches):
                layer = kv.layers[idx]
                if layer is not None and layer.keys.shape[1]:
                    n = layer.keys.shape[1]
                    keys[row, :, padded - n :] = layer.keys
                    values[row, :, padded - n :] = layer.values
            layers.append(_PaddedLayer(keys, values))
        return BatchKVView(
            layers=layers,
            layer_types=self.layer_types,
            valid=valid,
            positions=positions,
            new_keys=[None] * len(self.layer_types),
            new_values=[None] * len(self.layer_types),
        )

    def append_from_view(self, request_ids: list[str], view: BatchKVView, new_valid: torch.Tensor) -> None:
        """Store the K/V the encoder wrote into ``view`` (rows' real new tokens are where ``new_valid``)."""
        for row, rid in enumerate(request_ids):
            kv = self._caches[rid]
            mask = new_valid[row]
            n_new = int(mask.sum())
            for idx, layer_type in enumerate(self.layer_types):
                k_new = view.new_keys[idx][row][:, mask]
                v_new = view.new_values[idx][row][:, mask]
                old = kv.layers[idx]
                if old is not None:
                    k_new = torch.cat([old.keys, k_new], dim=1)
                    v_new = torch.cat([old.values, v_new], dim=1)
                if layer_type == "sliding_attention":
                    keep = self.sliding_window - 1
                    k_new = k_new[:, -keep:] if keep > 0 else k_new[:, :0]
                    v_new = v_new[:, -keep:] if keep > 0 else v_new[:, :0]
                kv.layers[idx] = LayerKV(k_new.contiguous(), v_new.contiguous())
            kv.total_len += n_new
