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
    max_num_kv_tokens: KV tokens (full-attention layers) reserved by all running requests together;
        ``None`` derives it from free memory at start-up (``memory_fraction`` of it).
    max_encoder_tokens: padded tokens in one batched encoder call (prefill and commits); larger work is split.
    sampling_tile_bytes: bound on the sampling transient: canvases are put through the lm head and
        the sampler in tiles of as many rows as fit (about 5 fp32 copies of [rows, canvas, vocab]);
        at least one row per tile.
    num_threads: torch intra-op threads on CPU; ``None`` leaves torch's default.
    """

    model: str
    dtype: str = "auto"
    device: str = "auto"
    max_num_seqs: int = 16
    max_waiting: int = 256
    max_model_len: int | None = None
    max_num_kv_tokens: int | None = None
    memory_fraction: float = 0.8
    max_encoder_tokens: int = 8192
    sampling_tile_bytes: int = 512 * 2**20
    num_threads: int | None = None
    experts_implementation: str | None = None  # None: transformers' default (eager for float64)
