"""The CPU decoder pass as a TorchScript trace: the eager modules' own operators, without Python between them.

A decoder pass through transformers' modules runs a few hundred small operators, and Python holds
the GIL between each two. Row groups (``EngineSettings.forward_threads``) run side by side in
threads, so they take turns there. TorchScript's interpreter runs a traced graph without the GIL:
the same aten operators in the same order, on the same tensors, so the results are bitwise those of
the eager pass (``tests/test_traced_decoder.py`` compares them), and two groups no longer wait for
each other.

A trace records what ran, so only operators whose sequence does not depend on the data may be in it.
The decoder satisfies that on CPU with batch invariance on: the row-wise attention over padded rows
is one operator (``rowwise_attention.rowwise_sdpa``), the MoE loop visits every expert
(``rowwise_experts``), and every other branch depends only on the model's config, on which layer
types have a mask and on whether rows are padded. Those are the trace's key; the batch size, the KV
lengths, the masks, the rotary embeddings and the KV themselves are its inputs. A graph is traced the
first time its key is seen (one extra pass) and then replayed for every batch. Traces run without
TorchScript's optimization passes, which could reorder arithmetic.
"""

from __future__ import annotations

import logging
import threading
import warnings
from typing import Callable

import torch

from .decoder_graphs import DecoderInputs
from .kv_cache import BatchKVView, _LayerView
from .rowwise_attention import BatchLayout, batch_layout

logger = logging.getLogger(__name__)

_Key = tuple[tuple[bool, ...], bool, bool]  # (a mask per layer type, rows padded, queries padded)


class _Pass(torch.nn.Module):
    """``forward`` over flat tensors, the shape a trace takes: the inputs are rebuilt from them in the
    order ``TracedDecoder._flatten`` lays them out."""

    def __init__(self, forward: Callable[[DecoderInputs], torch.Tensor], key: _Key, types: list[str],
                 layer_types: list[str]):
        super().__init__()
        self._forward, self._key = forward, key
        self._types, self._layer_types = types, layer_types  # sorted unique, and one per layer

    def forward(self, canvas, soft, positions, *rest):
        masked, padded, queries_padded = self._key
        rest = list(rest)
        take = lambda: rest.pop(0)  # noqa: E731
        rotary, masks, keys_valid = {}, {}, {}
        for lt, has_mask in zip(self._types, masked):
            rotary[lt] = (take(), take())
            masks[lt] = take() if has_mask else None
            if padded:
                keys_valid[lt] = take()
        queries = take() if queries_padded else None
        # the attention layers read only the layers' keys and values
        view = BatchKVView([_LayerView(take(), take()) for _ in self._layer_types], self._layer_types, {}, {})
        inputs = DecoderInputs(canvas, soft, positions, rotary, masks, view)
        with batch_layout(BatchLayout(queries, keys_valid) if padded else None):
            return self._forward(inputs)


class TracedDecoder:
    """Replays ``forward`` (the runner's eager decoder pass) as TorchScript traces, one per key; safe to
    call from several row groups at once."""

    def __init__(self, forward: Callable[[DecoderInputs], torch.Tensor], layer_types: list[str]):
        """``layer_types``: one per decoder layer that ``forward`` runs."""
        self._forward = forward
        self._types = sorted(set(layer_types))
        self._layer_types = list(layer_types)
        self._traces: dict[_Key, torch.jit.ScriptModule] = {}
        self._lock = threading.Lock()

    @property
    def keys(self) -> list[_Key]:
        """The keys traced so far: (a mask per layer type, in sorted order; rows padded; queries padded)."""
        return [key for key, trace in self._traces.items() if trace is not None]

    @staticmethod
    def covers(inputs: DecoderInputs) -> bool:
        """Whether this pass can replay a trace: its KV view must be slices of the slot buffers (the decoder's
        rows are consecutive slots), not the encoder's lazily gathered layers."""
        return isinstance(inputs.view.layers, list)

    def run(self, inputs: DecoderInputs, layout: BatchLayout | None) -> torch.Tensor:
        """The decoder pass over ``inputs``: [B, C, hidden], bitwise the eager pass's."""
        key: _Key = (tuple(inputs.masks[lt] is not None for lt in self._types), layout is not None,
                     layout is not None and layout.queries is not None)
        args = self._flatten(inputs, layout, key)
        trace = self._traces[key] if key in self._traces else self._trace(key, args)
        if trace is None:  # tracing failed: this key runs eagerly
            with batch_layout(layout):
                return self._forward(inputs)
        with torch.jit.optimized_execution(False):  # thread-local: no graph passes, the recorded operators as is
            return trace(*args)

    def _flatten(self, inputs: DecoderInputs, layout: BatchLayout | None, key: _Key) -> tuple[torch.Tensor, ...]:
        flat = [inputs.canvas, inputs.soft, inputs.positions]
        for lt, has_mask in zip(self._types, key[0]):
            flat.extend(inputs.rotary[lt])
            if has_mask:
                flat.append(inputs.masks[lt])
            if layout is not None:
                flat.append(layout.keys[lt])
        if key[2]:
            flat.append(layout.queries)
        for layer in inputs.view.layers:
            flat.extend((layer.keys, layer.values))
        return tuple(flat)

    def _trace(self, key: _Key, args: tuple[torch.Tensor, ...]) -> torch.jit.ScriptModule | None:
        """Trace the pass for ``key`` (None, and a warning, where tracing fails: that key stays eager)."""
        with self._lock:  # one trace per key, even when two row groups meet a new key together
            if key in self._traces:
                return self._traces[key]
            module = _Pass(self._forward, key, self._types, self._layer_types)
            trace = None
            with warnings.catch_warnings():
                # the tracer flags every Python bool it sees; those left (transformers' SDPA checks of head
                # sizes and the canvas length) are the model's constants. TorchScript is deprecated in
                # favour of torch.compile, whose generated kernels would not give the eager pass's bits.
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                warnings.filterwarnings("ignore", message=".*torch.jit.trace", category=DeprecationWarning)
                try:
                    trace = torch.jit.trace(module, args, check_trace=False)
                except Exception:
                    logger.warning("tracing the decoder pass failed (%s); these passes run eagerly", key, exc_info=True)
            self._traces[key] = trace
            logger.debug("traced the decoder pass for %s", key)
        return trace
