"""The CPU decoder pass as a TorchScript trace: the eager modules' own operators, without Python between them.

A decoder pass through transformers' modules runs a few hundred small operators, and Python holds
the GIL between each two. Row groups (``EngineSettings.forward_threads``) run side by side in
threads, so they take turns there. TorchScript's interpreter runs a traced graph without the GIL:
the same aten operators in the same order, on the same tensors, so the results are bitwise those of
the eager pass (``tests/test_traced_decoder.py`` compares them), and two groups no longer wait for
each other.

A trace records what ran, so only operators whose sequence does not depend on the data may be in it.
The decoder satisfies that on CPU with batch invariance on: the row-wise attention over padded rows
is a call to a TorchScript function, recorded with its loop (``engine.rowwise_sdpa``); while tracing,
the MoE loop visits every expert (``engine.rowwise_experts``); and every other branch depends only on
the model's config, on which layer types have a mask, on whether rows are padded and on the inputs'
dtypes. Those are the trace's key; the batch size, the KV lengths, the masks, the rotary embeddings
and the KV themselves are its inputs. A graph is traced the first time its key is seen (that pass
runs the forward twice) and then replayed for every batch.

Guards: the tracer warns where Python reads a tensor's value or size as a constant. Only transformers'
SDPA function may do so (it checks head sizes and the canvas length, the model's constants); any other
such warning, or an error while tracing, leaves the pass eager with a warning (a key whose tracing
failed ``MAX_TRACE_ATTEMPTS`` times stays eager). Traces and the scripted attention run without
TorchScript's optimizing executor: the recorded operators, as recorded.
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

# (a mask per layer type, rows padded, the inputs' dtypes)
_Key = tuple[tuple[bool, ...], bool, tuple[torch.dtype, ...]]

MAX_TRACE_ATTEMPTS = 3

# where the tracer may meet a constant: transformers' SDPA function's checks of the model's shapes
_CONSTANT_CHECKS = ("transformers/integrations/sdpa_attention.py",)

# warnings' filters are process-wide: one trace at a time records them
_TRACING = threading.Lock()


class _Pass(torch.nn.Module):
    """``forward`` over flat tensors, the shape a trace takes: the inputs are rebuilt from them in the
    order ``TracedDecoder._flatten`` lays them out."""

    def __init__(self, forward: Callable[[DecoderInputs], torch.Tensor], key: _Key, types: list[str],
                 layer_types: list[str]):
        super().__init__()
        self._forward, self._key = forward, key
        self._types, self._layer_types = types, layer_types  # sorted unique, and one per layer

    def forward(self, canvas, soft, positions, *rest):
        masked, padded, _ = self._key
        rest = list(rest)
        take = lambda: rest.pop(0)  # noqa: E731
        rotary, masks, keys_valid = {}, {}, {}
        for lt, has_mask in zip(self._types, masked):
            rotary[lt] = (take(), take())
            masks[lt] = take() if has_mask else None
            if padded:
                keys_valid[lt] = take()
        # the attention layers read only the layers' keys and values
        view = BatchKVView([_LayerView(take(), take()) for _ in self._layer_types], self._layer_types, {}, {})
        inputs = DecoderInputs(canvas, soft, positions, rotary, masks, view)
        with batch_layout(BatchLayout(None, keys_valid) if padded else None):
            return self._forward(inputs)


class TracedDecoder:
    """Replays ``forward`` (the runner's eager decoder pass) as TorchScript traces, one per key; safe to
    call from several row groups at once."""

    def __init__(self, forward: Callable[[DecoderInputs], torch.Tensor], layer_types: list[str]):
        """``layer_types``: one per decoder layer that ``forward`` runs."""
        self._forward = forward
        self._types = sorted(set(layer_types))
        self._layer_types = list(layer_types)
        self._traces: dict[_Key, torch.jit.ScriptModule | None] = {}  # None: stays eager
        self._attempts: dict[_Key, int] = {}
        self._lock = threading.Lock()

    @property
    def keys(self) -> list[_Key]:
        """The keys traced so far: (a mask per layer type, in sorted order; rows padded; input dtypes)."""
        return [key for key, trace in self._traces.items() if trace is not None]

    @property
    def failed_keys(self) -> list[_Key]:
        """Keys whose tracing failed at least once (their passes ran eagerly meanwhile)."""
        return list(self._attempts)

    @staticmethod
    def covers(inputs: DecoderInputs, layout: BatchLayout | None) -> bool:
        """Whether this pass can replay a trace: its KV view must be slices of the slot buffers (the decoder's
        rows are consecutive slots), not the encoder's lazily gathered layers, and every query real."""
        return isinstance(inputs.view.layers, list) and (layout is None or layout.queries is None)

    def run(self, inputs: DecoderInputs, layout: BatchLayout | None) -> torch.Tensor:
        """The decoder pass over ``inputs``: [B, C, hidden], bitwise the eager pass's."""
        args = self._flatten(inputs, layout)
        key: _Key = (tuple(inputs.masks[lt] is not None for lt in self._types), layout is not None,
                     tuple(a.dtype for a in args))
        trace = self._traces[key] if key in self._traces else self._trace(key, args)
        if trace is None:  # tracing failed: this pass runs eagerly
            with batch_layout(layout):
                return self._forward(inputs)
        with torch.jit.optimized_execution(False):  # thread-local: the recorded operators as recorded
            return trace(*args)

    def _flatten(self, inputs: DecoderInputs, layout: BatchLayout | None) -> tuple[torch.Tensor, ...]:
        flat = [inputs.canvas, inputs.soft, inputs.positions]
        for lt in self._types:
            flat.extend(inputs.rotary[lt])
            if inputs.masks[lt] is not None:
                flat.append(inputs.masks[lt])
            if layout is not None:
                flat.append(layout.keys[lt])
        for layer in inputs.view.layers:
            flat.extend((layer.keys, layer.values))
        return tuple(flat)

    def _trace(self, key: _Key, args: tuple[torch.Tensor, ...]) -> torch.jit.ScriptModule | None:
        """Trace the pass for ``key``; None (and a warning) where tracing fails, and the pass runs eagerly."""
        with self._lock:  # one trace per key, even when two row groups meet a new key together
            if key in self._traces:
                return self._traces[key]
            # the tracer tells inputs apart by identity: a tensor passed twice would become one input
            seen: set[int] = set()
            distinct = []
            for a in args:
                distinct.append(a.clone() if id(a) in seen else a)
                seen.add(id(a))
            try:
                trace = self._record(_Pass(self._forward, key, self._types, self._layer_types), tuple(distinct))
            except Exception as exc:
                attempts = self._attempts[key] = self._attempts.get(key, 0) + 1
                if attempts >= MAX_TRACE_ATTEMPTS:
                    self._traces[key] = None
                logger.warning("tracing the decoder pass failed (%s, attempt %d of %d): %s; it runs eagerly",
                               key, attempts, MAX_TRACE_ATTEMPTS, exc)
                return None
            self._traces[key] = trace
            logger.debug("traced the decoder pass for %s", key)
        return trace

    @staticmethod
    def _record(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> torch.jit.ScriptModule:
        """``torch.jit.trace`` of ``module``, refused where the tracer met a constant outside
        ``_CONSTANT_CHECKS``. TorchScript is deprecated in favour of torch.compile, whose generated
        kernels would not give the eager pass's bits."""
        with _TRACING, warnings.catch_warnings(record=True) as seen, torch.jit.optimized_execution(False):
            warnings.simplefilter("always", torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", message=".*torch.jit.trace", category=DeprecationWarning)
            # _store_inputs=False: the example inputs (this pass's KV views) must not outlive the pass
            trace = torch.jit.trace(module, args, check_trace=False, _store_inputs=False)
        for w in seen:  # the others, as they would have been shown
            if not issubclass(w.category, torch.jit.TracerWarning):
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        baked = [w for w in seen if issubclass(w.category, torch.jit.TracerWarning)
                 and not w.filename.replace("\\", "/").endswith(_CONSTANT_CHECKS)]
        if baked:
            w = baked[0]
            raise RuntimeError(f"the trace would freeze a value read at {w.filename}:{w.lineno} ({w.message})")
        return trace
