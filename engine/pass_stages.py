"""The named stages of a pass, as ranges for torch's profiler: ``bench.profile_engine
--device-profile`` splits a pass's kernel time by them. Outside a profiler a range costs a few
microseconds, a handful of times a pass."""

from __future__ import annotations

import time

import torch
from torch.profiler import record_function

ENCODER = "engine.encoder"  # prompt prefill and commits into the KV cache
DECODER = "engine.decoder"  # the decoder layers over the canvases, to the final norm
SAMPLER = "engine.sampler"  # from the final hidden states to the next canvases (the lm head included)
LM_HEAD = "engine.lm_head"  # the lm head's products, inside SAMPLER
STAGES = (ENCODER, DECODER, LM_HEAD, SAMPLER)

stage = record_function  # ``with stage(DECODER): ...``


_synced: torch.device | None = None  # the CUDA device ``clock`` waits for, when a profiler asked


def sync_stage_clock(device: torch.device | None) -> None:
    """Make ``clock`` wait for ``device``'s queued kernels (a CUDA device) before it reads the time, or
    stop waiting (``None``). Only for profiling (``bench.profile_engine``): on CUDA the host enqueues
    kernels ahead of the GPU, so without it a stage's time is its launches and the GPU's wait lands in
    whatever synchronizes next; waiting at every stage boundary also stalls that queue."""
    global _synced
    _synced = device if device is not None and device.type == "cuda" else None


def clock() -> float:
    """``time.perf_counter()`` for a pass's stage timings (``forward_seconds``, ``sampling_seconds``),
    after the device's queued work when ``sync_stage_clock`` asked for it."""
    if _synced is not None:
        torch.cuda.synchronize(_synced)
    return time.perf_counter()
