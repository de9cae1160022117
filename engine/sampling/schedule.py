"""The temperature schedule both samplers follow, and the per-row parameters on the device."""

from __future__ import annotations

import functools

import torch

from ..work import DecodeWork


@functools.lru_cache(maxsize=4096)
def step_temperature(t_min: float, t_max: float, cur_step: int, max_steps: int, device: str) -> float:
    """Temperature at step ``cur_step`` (N..1, steps *remaining*), computed as transformers does: fp32
    tensor ops on the model's device (CUDA divides by a Python int as a multiply by its reciprocal, so
    the device matters to the last bit). Returned as the exact fp32 value and cached: requests share few
    parameter sets, and a cached value costs no device round trip."""
    step = torch.tensor(cur_step, dtype=torch.int32, device=device)
    return float(t_min + ((t_max - t_min) * (step / max_steps)))


def row_parameters(rows: list[DecodeWork], device) -> torch.Tensor:
    """[n, 3] fp32, one row per canvas: its temperature at its current step, its entropy bound and its
    confidence threshold (one host-to-device copy for the three). fp32 is what the reference compares
    in: it divides by an fp32 temperature and compares fp32 entropies with Python floats, which torch
    rounds to the tensor's dtype first."""
    return torch.tensor(
        [(step_temperature(r.t_min, r.t_max, r.cur_step, r.max_steps, str(device)), r.entropy_bound,
          r.confidence_threshold) for r in rows],
        dtype=torch.float32, device=device,
    )
