"""Engine settings: every budget and limit the engine enforces, with its default."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class EngineSettings:
    """Settings of one engine instance.

    model: local folder or hub id of a ``DiffusionGemmaForBlockDiffusion`` checkpoint.
    dtype: "auto" (bf16 on CUDA, fp32 on CPU), "float32", "bfloat16", "float16" or "float64".
    device: "auto" (cuda when available, else cpu), "cpu", "cuda", "cuda:N".
    max_num_seqs: canvases in one decoder pass (running requests).
    max_waiting: requests queued beyond the running ones; past it ``submit`` raises ``QueueFullError``.
    max_model_len: prompt + max_tokens limit; ``None`` uses the model's ``max_position_embeddings``.
    max_num_kv_tokens: KV token slots (full-attention layers) for all running requests together:
        the slot buffers hold ``slot_rows(n)`` rows (the next power of two of the running count, at
        most ``max_num_seqs``) of the longest reservation (prompt + every canvas but the last).
        ``None`` derives it from free memory at start-up (``memory_fraction`` of it).
    max_encoder_tokens: padded tokens in one batched encoder call (prefill and commits): requests are
        grouped under it, and a longer prompt is prefilled in chunks of this size.
    sampling_tile_bytes: bound on the sampling transient: canvases are put through the lm head and
        the sampler in tiles of as many rows as fit (``engine.sampler.sampling_tiles``), and one row
        in chunks of canvas positions when a whole row does not fit (its whole-row exponential draws
        must, plus one position). ``None`` picks it at start-up (``engine.memory.auto_sampling_tile_bytes``):
        10% of the memory free after the weights, between 512 MiB and 8 GiB.
    cuda_graph_max_batch: on CUDA, decoder batches of at most this many canvases run as captured CUDA
        graphs (``engine.decoder_graphs``), one per batch size, recaptured when the KV buffers are
        reallocated; 0 runs every pass eagerly. It needs bf16 weights, unquantized experts on
        grouped_mm and compute capability 9.x/10.x (``capture_blocker``); elsewhere, CPU included, a
        value given is ignored with a warning. ``None`` (the default) means
        ``AUTO_CUDA_GRAPH_MAX_BATCH`` (4, at most ``max_num_seqs``) where capture works and eager
        passes, without a warning, elsewhere. The graphs keep about one eager decoder pass's
        activations at that batch size allocated beside the KV budget.
    num_threads: torch intra-op threads on CPU; ``None`` leaves torch's default.
    quantization: "none", or weight-only quantization of the MoE experts at load time through torchao:
        "fp8-experts" or "int8-experts" (see ``engine.quantization``); the other weights stay in ``dtype``.
    """

    model: str
    dtype: str = "auto"
    device: str = "auto"
    max_num_seqs: int = 16
    max_waiting: int = 256
    max_model_len: int | None = None
    max_num_kv_tokens: int | None = None
    memory_fraction: float = 0.8
    max_encoder_tokens: int = 2048
    sampling_tile_bytes: int | None = None
    cuda_graph_max_batch: int | None = None
    num_threads: int | None = None
    quantization: str = "none"
    # None: grouped_mm (eager for float64; engine.quantization.DEQUANTIZED_EXPERTS for quantized experts)
    experts_implementation: str | None = None

    def validate(self) -> None:
        """Raise ``ValueError`` with a clear message for any setting the engine cannot use."""
        from .loader import DTYPE_NAMES
        from .quantization import QUANTIZATION_METHODS

        if not isinstance(self.model, str) or not self.model:
            raise ValueError("model must be a local folder or a hub id")
        if self.dtype not in ("auto", *DTYPE_NAMES):
            raise ValueError(f"dtype must be one of auto, {', '.join(DTYPE_NAMES)} (got {self.dtype!r})")
        if not (self.device in ("auto", "cpu", "cuda") or (self.device.startswith("cuda:") and self.device[5:].isdigit())):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N (got {self.device!r})")
        positive = {
            "max_num_seqs": self.max_num_seqs,
            "max_encoder_tokens": self.max_encoder_tokens,
            "sampling_tile_bytes": self.sampling_tile_bytes,
            "max_model_len": self.max_model_len,
            "max_num_kv_tokens": self.max_num_kv_tokens,
            "num_threads": self.num_threads,
        }
        for name, value in positive.items():
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"{name} must be a positive integer (got {value!r})")
        if self.quantization not in QUANTIZATION_METHODS:
            raise ValueError(f"quantization must be one of {', '.join(QUANTIZATION_METHODS)} (got {self.quantization!r})")
        if self.quantization != "none" and self.dtype not in ("auto", "bfloat16", "float32"):
            raise ValueError(f"quantization {self.quantization} needs dtype auto, bfloat16 or float32 (got {self.dtype!r})")
        if self.cuda_graph_max_batch is not None and (
                not isinstance(self.cuda_graph_max_batch, int) or isinstance(self.cuda_graph_max_batch, bool)
                or not 0 <= self.cuda_graph_max_batch <= self.max_num_seqs):
            raise ValueError(f"cuda_graph_max_batch must be an integer from 0 to max_num_seqs ({self.max_num_seqs}) "
                             f"(got {self.cuda_graph_max_batch!r})")
        if not isinstance(self.max_waiting, int) or self.max_waiting < 0:
            raise ValueError(f"max_waiting must be an integer >= 0 (got {self.max_waiting!r})")
        if not (isinstance(self.memory_fraction, (int, float)) and 0 < self.memory_fraction <= 1):
            raise ValueError(f"memory_fraction must be in (0, 1] (got {self.memory_fraction!r})")
