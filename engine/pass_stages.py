"""The named stages of a pass, as ranges for torch's profiler: ``bench.profile_engine
--device-profile`` splits a pass's kernel time by them. Outside a profiler a range costs a few
microseconds, a handful of times a pass."""

from __future__ import annotations

from torch.profiler import record_function

ENCODER = "engine.encoder"  # prompt prefill and commits into the KV cache
DECODER = "engine.decoder"  # the decoder layers over the canvases, to the final norm
SAMPLER = "engine.sampler"  # from the final hidden states to the next canvases (the lm head included)
LM_HEAD = "engine.lm_head"  # the lm head's products, inside SAMPLER
STAGES = (ENCODER, DECODER, LM_HEAD, SAMPLER)

stage = record_function  # ``with stage(DECODER): ...``
