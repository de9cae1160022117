"""The diffusion engine: a step-level block scheduler over DiffusionGemma checkpoints."""

import logging as _logging

import torch as _torch

if not _torch.cuda.is_available():
    # torchao (for --quantization), which transformers imports whenever it is installed, warns at import
    # that its CUDA-only kernels did not load, and about enum registrations: noise on a CPU host
    for _name in ("torchao", "torch.utils._pytree"):
        _logging.getLogger(_name).setLevel(_logging.ERROR)

from .async_engine import AsyncEngine, EngineDeadError
from .core import EngineCore
from .outputs import Draft, RequestOutput
from .sampling_params import InvalidRequestError, SamplingParams
from .scheduler import QueueFullError
from .settings import EngineSettings

__all__ = [
    "AsyncEngine",
    "Draft",
    "EngineDeadError",
    "EngineCore",
    "EngineSettings",
    "InvalidRequestError",
    "QueueFullError",
    "RequestOutput",
    "SamplingParams",
]
