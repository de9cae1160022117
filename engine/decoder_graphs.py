"""CUDA graphs of the decoder pass for small decoder batches.

A small batch on a GPU is launch-bound: the decoder pass is hundreds of small kernels, and the host
takes longer to queue them than the GPU to run them. Replaying a captured ``torch.cuda.CUDAGraph``
queues the whole pass at once; the gain shrinks as the batch grows and the kernels themselves take
over (``python -m bench.cuda_graph_check`` measures it; the results are in the docs).

A graph replays fixed kernels on fixed addresses, so one graph serves one decoder batch size over
one set of KV buffers. Its inputs (canvas tokens, self-conditioning embeddings, positions and their
rotary embeddings, attention masks) are static tensors that each pass copies into. It reads the KV
through a full-width view (every layer's whole buffer capacity, the unused part masked), whose
tensors change only when the buffers are reallocated. A reallocation drops every graph; the next
pass of each batch size captures its graph again. The graphs of one generation share one memory
pool: they never run at the same time, and each keeps only its static inputs and output alive.

Capture needs a pass with no host synchronisation. The MoE experts have one only through
``grouped_mm``'s bf16 kernel on compute capability 9.x/10.x: torch's grouped_mm for other dtypes and
GPUs, transformers' eager expert loop and ``batched_mm``'s weight gather either read the routing on
the host or do not fit. Quantized experts (dequantized inside the pass) are not captured until that
is checked on a GPU. ``capture_blocker`` names what stands in the way, and the runner stays eager
then.

Without ``capture`` (CPU) the same static path runs eagerly, which is how the CPU tests check that
the full-width view and its masks give the tokens of the ordinary pass.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch

from .kv_cache import BatchKVView

logger = logging.getLogger("engine")

# Graphs for decoder batches of 1..4 canvases unless the settings say otherwise: the small batches
# are the launch-bound ones, and graphs for larger batches gave no more throughput (the GPU results
# are in the docs).
AUTO_CUDA_GRAPH_MAX_BATCH = 4


def graph_max_batch(setting: int | None, max_num_seqs: int, blocker: str | None) -> tuple[int, str | None]:
    """The largest decoder batch to capture (0: none) for the ``cuda_graph_max_batch`` ``setting``, and
    the warning to log, if any. ``None`` means AUTO_CUDA_GRAPH_MAX_BATCH (at most ``max_num_seqs``)
    where capture works (``blocker`` is None) and nothing, silently, elsewhere; a number given is
    used as is, or ignored with a warning naming the ``blocker``."""
    if setting is None:
        return (min(AUTO_CUDA_GRAPH_MAX_BATCH, max_num_seqs) if blocker is None else 0), None
    if setting and blocker is not None:
        return 0, f"cuda_graph_max_batch={setting} ignored, every decoder pass runs eagerly: {blocker}"
    return setting, None


def capture_blocker(model, dtype: torch.dtype, quantization: str, device: torch.device) -> str | None:
    """Why the decoder pass of ``model`` cannot be captured on ``device``, or None when it can."""
    if quantization != "none":
        return f"{quantization} experts are dequantized inside the pass, which has not been checked under capture yet"
    experts = getattr(model.config.get_text_config(), "_experts_implementation", None)
    if experts != "grouped_mm":
        return f"the MoE experts run {experts!r}; only grouped_mm can be captured"
    if dtype != torch.bfloat16:
        return f"grouped_mm's kernel for {str(dtype).removeprefix('torch.')} reads the routing offsets on the host; use bfloat16"
    if device.type != "cuda":
        return "CUDA graphs need a CUDA device"
    major, minor = torch.cuda.get_device_capability(device)
    if major not in (9, 10):
        return f"grouped_mm's bf16 kernel needs compute capability 9.x or 10.x (this GPU is {major}.{minor})"
    return None


@dataclass
class DecoderInputs:
    """What the decoder pass reads. ``masks`` maps each layer type to its attention mask."""

    canvas: torch.Tensor  # [B, C] token ids
    soft: torch.Tensor  # [B, C, hidden] self-conditioning embeddings
    positions: torch.Tensor  # [B, C] int32
    rotary: dict[str, tuple[torch.Tensor, torch.Tensor]]  # per layer type: (cos, sin) of the positions
    masks: dict[str, torch.Tensor]  # per layer type: [B, 1, C, capacity + C]
    view: BatchKVView  # full width: fixed tensors while the buffers live


@dataclass
class _Entry:
    inputs: DecoderInputs  # the static copies the graph reads
    graph: torch.cuda.CUDAGraph | None
    output: torch.Tensor | None = None  # [B, C, hidden], overwritten by every replay


class DecoderGraphs:
    """One captured decoder pass per batch size up to ``max_batch``, for one generation of KV buffers.

    ``forward(inputs) -> hidden [B, C, hidden]`` is the eager pass; it must not change any state
    outside its output (it is run a few times to warm up, then captured). ``run`` returns a tensor
    that the next ``run`` overwrites: use it before then.
    """

    WARMUP_RUNS = 2  # eager runs on a side stream before a capture (lazy initialisation, autotuning)

    def __init__(self, forward: Callable[[DecoderInputs], torch.Tensor], max_batch: int, capture: bool):
        self.forward = forward
        self.max_batch = max_batch
        self.capture = capture
        self._generation: object = None
        self._entries: dict[int, _Entry] = {}
        self._pool = None
        self.captures = 0  # graphs captured so far (all generations)
        self.passes = 0  # decoder passes served (replays, or eager static runs without capture)

    def covers(self, batch: int) -> bool:
        return 0 < batch <= self.max_batch

    @property
    def captured_batches(self) -> tuple[int, ...]:
        """Batch sizes with a graph (or, without capture, static buffers) over the current KV buffers."""
        return tuple(sorted(self._entries))

    def clear(self) -> None:
        """Drop every graph and its static inputs (and so their references to the KV buffers)."""
        self._entries.clear()
        self._pool = None

    def run(self, generation: object, inputs: DecoderInputs) -> torch.Tensor:
        """The decoder pass over ``inputs``; ``generation`` names the KV buffers ``inputs.view`` slices
        (a new value drops every graph)."""
        if generation != self._generation:
            self.clear()
            self._generation = generation
        batch = inputs.canvas.shape[0]
        entry = self._entries.get(batch)
        if entry is None:
            try:
                entry = self._entries[batch] = self._new_entry(inputs)
            except Exception:  # a host sync the capture_blocker did not foresee: stay eager from now on
                logger.exception("CUDA graph capture failed at decoder batch %d; every pass runs eagerly now", batch)
                self.max_batch = 0
                self.clear()
                return self.forward(inputs)
        else:
            _copy_inputs(entry.inputs, inputs)
        self.passes += 1
        if entry.graph is None:
            entry.output = self.forward(entry.inputs)
        else:
            with torch.cuda.device(entry.output.device):  # replay on the current stream of the graph's device
                entry.graph.replay()
        return entry.output

    def _new_entry(self, inputs: DecoderInputs) -> _Entry:
        static = DecoderInputs(
            canvas=inputs.canvas.clone(),
            soft=inputs.soft.clone(),
            positions=inputs.positions.clone(),
            rotary={lt: (cos.clone(), sin.clone()) for lt, (cos, sin) in inputs.rotary.items()},
            masks={lt: m.clone() for lt, m in inputs.masks.items()},
            view=inputs.view,
        )
        if not self.capture:
            return _Entry(static, None)
        # on the inputs' device (cuda:N need not be the current device): the side stream, the pool and
        # the capture stream must all be that device's, or the capture records nothing
        with torch.cuda.device(static.canvas.device):
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(self.WARMUP_RUNS):
                    self.forward(static)
            torch.cuda.current_stream().wait_stream(side)
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                output = self.forward(static)
        self.captures += 1
        return _Entry(static, graph, output)


def _copy_inputs(static: DecoderInputs, new: DecoderInputs) -> None:
    static.canvas.copy_(new.canvas)
    static.soft.copy_(new.soft)
    static.positions.copy_(new.positions)
    for lt, (cos, sin) in new.rotary.items():
        static.rotary[lt][0].copy_(cos)
        static.rotary[lt][1].copy_(sin)
    for lt, mask in new.masks.items():
        static.masks[lt].copy_(mask)
