"""The diffusion engine: a step-level block scheduler over DiffusionGemma checkpoints.

Importing ``engine`` loads nothing heavy: each public name is imported from its module on first
access (``AsyncEngine`` and ``EngineCore`` bring torch and the model runner; the scheduler, the
request and the errors do not).
"""

from __future__ import annotations

import importlib

# public name -> the module that defines it
_EXPORTS = {
    "AsyncEngine": ".async_engine",
    "Draft": ".outputs",
    "EngineCore": ".core",
    "EngineDeadError": ".errors",
    "EngineSettings": ".settings",
    "InvalidRequestError": ".errors",
    "QueueFullError": ".errors",
    "RequestOutput": ".outputs",
    "SamplingParams": ".sampling_params",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
