"""Per-request KV in slot buffers, and the batch views the model's attention layers read.

Every layer has one K and one V buffer of shape [rows, kv_heads, capacity, head_dim]. A running
request owns one row (its slot) and keeps its tokens left-aligned in it: full-attention layers keep
every committed token, sliding-window layers only the last ``window - 1`` (what transformers'
``DynamicSlidingWindowLayer`` keeps, so a canvas attends to the same keys as in ``model.generate``).

Slots are compact: the running requests hold slots 0..n-1, so the decoder's view of the whole batch
is a slice of the buffers, with no copy (rows are right-padded to the longest and masked). The
buffers are sized for the running set's eventual needs: ``slot_rows(n)`` rows (the next power of
two) of the longest reservation (prompt + every canvas but the last, which is never encoded), which
is exactly what the scheduler budgets (both follow ``engine.kv_budget``); they are reallocated only
when that shape changes.

A view exposes the two things the DiffusionGemma attention layers use on ``past_key_values``:
``update`` (encoder: remember the new K/V and return [past ; new]) and ``layers[i].keys/values``
(decoder: read-only).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .kv_budget import slot_buffer_shape


@dataclass
class RequestKV:
    """One request's place in the buffers. ``total_len`` counts every token ever encoded (its next position)."""

    slot: int
    reservation: int  # most tokens it will ever store: prompt + every canvas but the last
    total_len: int = 0
    stored: dict[str, int] = field(default_factory=dict)  # tokens held per layer type


@dataclass
class _LayerView:
    keys: torch.Tensor  # [batch, kv_heads, padded_len, head_dim]
    values: torch.Tensor


class _GatheredLayers:
    """The layers of a view over rows that are not consecutive slots: each layer's rows are copied out of the
    buffers only when attention asks for it, so at most one layer's copy is alive at a time."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], index: torch.Tensor, widths: list[int]):
        self._keys, self._values, self._index, self._widths = keys, values, index, widths

    def __len__(self) -> int:
        return len(self._keys)

    def __getitem__(self, idx: int) -> _LayerView:
        width = self._widths[idx]
        return _LayerView(self._keys[idx][:, :, :width].index_select(0, self._index),
                          self._values[idx][:, :, :width].index_select(0, self._index))


@dataclass
class BatchKVView:
    """Right-padded KV of several requests, layer by layer, shaped like a transformers cache.

    ``valid[layer_type]`` is a [batch, padded_len] bool of real (non-padding) slots and
    ``positions[layer_type]`` their absolute positions.
    """

    layers: list[_LayerView] | _GatheredLayers
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


def _flat_ranges(lengths: list[int], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Ranges of ``lengths[i]`` elements laid end to end: (i of each element, its offset in its range).
    Range i starting at s_i is then ``s[which] + within``."""
    n = torch.tensor(lengths, dtype=torch.long, device=device)
    which = torch.repeat_interleave(torch.arange(len(lengths), device=device), n)
    first = torch.cumsum(n, 0) - n
    within = torch.arange(sum(lengths), device=device) - first[which]
    return which, within


class KVCacheManager:
    """Owns the slot buffers and every running request's slot."""

    def __init__(self, layer_types: list[str], sliding_window: int, template: list[tuple[int, int]], max_rows: int,
                 device: torch.device, dtype: torch.dtype):
        self.layer_types = list(layer_types)
        self.sliding_window = sliding_window
        self.template = template  # (kv_heads, head_dim) per layer
        self.max_rows = max_rows
        self.device = device
        self.dtype = dtype
        self._caches: dict[str, RequestKV] = {}
        self._order: list[str] = []  # slot i -> request id
        # no rows yet: sync() sizes them for the running set
        self._keys: list[torch.Tensor] = [torch.empty(0, device=device, dtype=dtype)] * len(self.layer_types)
        self._values: list[torch.Tensor] = [torch.empty(0, device=device, dtype=dtype)] * len(self.layer_types)
        self._shape: tuple[int, dict[str, int]] = (0, {})  # rows, capacity per layer type
        self._target: tuple[int, dict[str, int]] | None = None  # _target_shape(), until the next allocate or free
        self._unzeroed: set[str] = set()  # allocated requests whose rows sync() has not cleaned yet
        self.reallocations = 0

    # -- bookkeeping -------------------------------------------------------------------------
    def allocate(self, request_id: str, reservation: int) -> RequestKV:
        kv = RequestKV(slot=len(self._order), reservation=reservation, stored={t: 0 for t in self.layer_types})
        self._caches[request_id] = kv
        self._order.append(request_id)
        self._target = None
        self._unzeroed.add(request_id)
        return kv

    def get(self, request_id: str) -> RequestKV:
        return self._caches[request_id]

    def free(self, request_id: str) -> None:
        """Release a slot; the last slot's request moves into it, so slots stay 0..n-1."""
        kv = self._caches.pop(request_id, None)
        if kv is None:
            return
        self._target = None
        self._unzeroed.discard(request_id)
        last_id = self._order.pop()
        if last_id != request_id:
            moved = self._caches[last_id]
            self._order[kv.slot] = last_id
            if moved.slot < self._shape[0]:  # its data is in the buffers: copy the row
                for buf in (*self._keys, *self._values):
                    buf[kv.slot].copy_(buf[moved.slot])
            moved.slot = kv.slot

    def __len__(self) -> int:
        return len(self._caches)

    def nbytes(self) -> int:
        return sum(t.nbytes for t in (*self._keys, *self._values))

    def _capacity(self, layer_type: str, longest: int) -> int:
        if layer_type == "sliding_attention":
            return min(longest, max(0, self.sliding_window - 1))
        return longest

    def _target_shape(self) -> tuple[int, dict[str, int]]:
        """(rows, capacity per layer type) the running set needs (computed once per change of that set)."""
        if self._target is None:
            rows, longest = slot_buffer_shape((kv.reservation for kv in self._caches.values()), self.max_rows)
            self._target = rows, ({t: self._capacity(t, longest) for t in set(self.layer_types)} if rows else {})
        return self._target

    def needs_reallocation(self) -> bool:
        """Whether the next ``sync`` replaces the buffers (drop views of them first: ``sync`` frees each old
        layer as it goes only when nothing else holds it)."""
        return self._target_shape() != self._shape

    def sync(self) -> None:
        """Size the buffers for the running set (after frees and allocations): ``slot_rows(n)`` rows of
        the longest reservation. Reallocates (copying the stored tokens) only when that shape changes;
        a request's row is zeroed when it is new, so padding never holds another request's values."""
        rows, caps = self._target_shape()
        old_rows = self._shape[0]
        if (rows, caps) != self._shape:
            # layer by layer, dropping each old buffer before the next layer's new one: the peak is
            # the buffers plus one layer, not two full sets
            try:
                for idx, layer_type in enumerate(self.layer_types):
                    heads, dim = self.template[idx]
                    shape = (rows, heads, caps.get(layer_type, 0), dim)
                    for bufs in (self._keys, self._values):
                        new = torch.zeros(shape, device=self.device, dtype=self.dtype)
                        for kv in self._caches.values():
                            length = kv.stored[layer_type]
                            if length and kv.slot < old_rows:
                                new[kv.slot, :, :length] = bufs[idx][kv.slot, :, :length]
                        bufs[idx] = new
            except BaseException:
                # some layers have the new shape and some the old: the next sync replaces every layer,
                # keeping no row (the pass fails, and with it every request that had one)
                self._shape = (-1, {})
                self.reallocations += 1
                raise
            self._shape = (rows, caps)
            self.reallocations += 1
        # new requests' rows start clean (a freed slot may hold old values)
        if rows:
            for request_id in self._unzeroed:
                slot = self._caches[request_id].slot
                for buf in (*self._keys, *self._values):
                    buf[slot].zero_()
            self._unzeroed.clear()

    # -- views -------------------------------------------------------------------------------
    def leads(self, request_ids: list[str]) -> bool:
        """Whether the requests hold slots 0..n-1, in order (what a full-width view needs)."""
        return [self._caches[rid].slot for rid in request_ids] == list(range(len(request_ids)))

    def view(self, request_ids: list[str], full_width: bool = False) -> BatchKVView:
        """The requests' KV as one batch. When ``request_ids`` are consecutive slots in order (the decoder's
        batch, or a group of its rows) the layers are slices of the buffers, with no copy; otherwise
        (encoder groups) each layer's rows are gathered when the encoder's attention reaches that layer.

        ``full_width`` (slots 0..n-1 only): every layer spans its buffer's whole capacity, not the
        longest row, so the view's tensors stay the same until the buffers are reallocated (what a
        captured CUDA graph needs); the padding is marked invalid as usual."""
        caches = [self._caches[rid] for rid in request_ids]
        slots = [kv.slot for kv in caches]
        first = slots[0] if slots else 0
        in_place = slots == list(range(first, first + len(slots)))
        if full_width and not (in_place and first == 0):
            raise ValueError("a full-width view needs the requests of slots 0..n-1, in order")
        valid: dict[str, torch.Tensor] = {}
        positions: dict[str, torch.Tensor] = {}
        padded: dict[str, int] = {}
        for layer_type in set(self.layer_types):
            lens = [kv.stored[layer_type] for kv in caches]
            padded[layer_type] = self._shape[1].get(layer_type, 0) if full_width else max(lens, default=0)
            slot = torch.arange(padded[layer_type], device=self.device)
            lengths = torch.tensor(lens, device=self.device)
            starts = torch.tensor([kv.total_len for kv in caches], device=self.device) - lengths
            valid[layer_type] = slot[None, :] < lengths[:, None]
            positions[layer_type] = starts[:, None] + slot[None, :]
        widths = [padded[t] for t in self.layer_types]
        if in_place:  # slices of the buffers, no copy
            layers = [_LayerView(k[first: first + len(slots), :, :w], v[first: first + len(slots), :, :w])
                      for k, v, w in zip(self._keys, self._values, widths)]
        else:
            layers = _GatheredLayers(self._keys, self._values, torch.tensor(slots, device=self.device), widths)
        return BatchKVView(
            layers=layers,
            layer_types=self.layer_types,
            valid=valid,
            positions=positions,
            new_keys=[None] * len(self.layer_types),
            new_values=[None] * len(self.layer_types),
        )

    def append_from_view(self, request_ids: list[str], view: BatchKVView, new_valid: torch.Tensor,
                         rows: list[int] | None = None) -> None:
        """Store the K/V the encoder wrote into ``view``. ``new_valid`` [rows, width] marks each row's
        real new tokens, which are its last positions (the encoder pads on the left). ``rows``: the view's
        row of each request (default: in order); a request may take another's row, as a copy.

        Per layer type, every row keeps the last ``capacity`` tokens of [stored ; new]: the tokens it
        keeps move to the front of its slot (only when a sliding window overflows) and the new ones
        follow. Both moves are one indexed copy per layer for all rows together."""
        rows = list(range(len(request_ids))) if rows is None else rows
        per_row = new_valid.sum(dim=1).tolist()
        counts = [per_row[r] for r in rows]
        width = new_valid.shape[1]
        caches = [self._caches[rid] for rid in request_ids]
        slots = torch.tensor([kv.slot for kv in caches], device=self.device)
        view_rows = torch.tensor(rows, device=self.device)
        for layer_type in set(self.layer_types):
            layers = [i for i, t in enumerate(self.layer_types) if t == layer_type]
            capacity = self._keys[layers[0]].shape[2]
            stored = [kv.stored[layer_type] for kv in caches]
            written = [min(n, capacity) for n in counts]  # new tokens that land in the slot
            kept = [min(length, capacity - w) for length, w in zip(stored, written)]  # stored tokens that stay
            # new tokens: row r's last written[r] positions -> its slot at kept[r]..
            row, within = _flat_ranges(written, self.device)
            src_pos = torch.tensor([width - w for w in written], device=self.device)[row] + within
            dst_pos = torch.tensor(kept, device=self.device)[row] + within
            new_src, new_dst = (view_rows[row], slice(None), src_pos), (slots[row], slice(None), dst_pos)
            # sliding-window overflow: the kept tokens move from the end of the stored ones to the front
            moved = [r for r in range(len(caches)) if 0 < kept[r] < stored[r]]
            shift = None
            if moved:
                which, to_pos = _flat_ranges([kept[r] for r in moved], self.device)
                from_pos = torch.tensor([stored[r] - kept[r] for r in moved], device=self.device)[which] + to_pos
                moved_slots = slots[torch.tensor(moved, device=self.device)][which]
                shift = (moved_slots, slice(None), from_pos), (moved_slots, slice(None), to_pos)
            for idx in layers:
                for bufs, new in ((self._keys, view.new_keys), (self._values, view.new_values)):
                    if shift is not None:
                        bufs[idx][shift[1]] = bufs[idx][shift[0]]  # the gather copies before the scatter
                    bufs[idx][new_dst] = new[idx][new_src]  # [tokens, heads, dim]
            for kv, k, w in zip(caches, kept, written):
                kv.stored[layer_type] = k + w
        for kv, n_new in zip(caches, counts):
            kv.total_len += n_new
