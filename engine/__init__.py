"""The diffusion engine: a step-level block scheduler over DiffusionGemma checkpoints."""

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
