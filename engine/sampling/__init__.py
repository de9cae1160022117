"""Sampling: one denoising step's sampler, from the decoder's final hidden states to the next canvas.

The runner hands a ``Sampler`` the hidden states [B, C, hidden] of a decoder batch and each row's
step (the scheduler's ``DecodeWork``: canvas index, step, schedule, bounds), and gets back ``SampleResult``: per row the draft (argmax canvas), the
next (renoised) canvas, whether the row is confident and usable, and the self-conditioning soft
embeddings. The lm head, soft-capping, the temperature schedule, entropy-bound acceptance, renoising,
tiling and random draws all live inside the implementation. Two implementations
(``EngineSettings.sampler``):

- ``reference`` (``reference.py``): transformers' sampler op for op; a seeded request equals
  ``model.generate`` at batch 1 (per-row ``torch.Generator``s, a [canvas, vocab] draw per step).
- ``fast`` (``fast.py``): the same rule with Gumbel-max sampling and counter-based random numbers
  (a pure function of seed, canvas, step, position and token), in one pass over vocabulary chunks
  with online statistics; no [rows, canvas, vocab] tensor is ever whole, and a row's results do not
  depend on the rest of the batch.

Stopping (stable drafts and confidence) is decided on the scheduler side (``engine.request``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from ..settings import SAMPLERS  # noqa: F401 - the names, where the settings validate them
from ..work import DecodeWork
from .logprobs import LogprobTensors


@dataclass
class SampleResult:
    """Per row of a decoder batch, on the device."""

    draft: torch.Tensor  # [B, C] long: argmax of the scaled logits (what the canvas would commit now)
    next_canvas: torch.Tensor  # [B, C] long: accepted positions keep the sample, the rest fresh noise
    confident: torch.Tensor  # [B] bool: mean entropy below the row's confidence threshold
    usable: torch.Tensor  # [B] bool: no NaN or +inf logit in the row (-inf is allowed)
    soft: torch.Tensor  # [B, C, hidden]: softmax(scaled logits) @ E * embed_scale, the next step's input
    logprobs: "LogprobTensors | None" = None  # when a row asked (``logprobs.py``), for every row


class Sampler(Protocol):
    name: str
    sampling_seconds: float  # the last ``sample``'s own math and draws (not the lm head or the soft embeddings)

    def add(self, request_id: str, seed: int) -> None:
        """Start tracking a request's random state."""

    def free(self, request_id: str) -> None:
        """Forget a request."""

    def num_live_states(self) -> int:
        """Requests whose random state is held (0 when idle)."""

    def initial_canvas(self, row: DecodeWork) -> torch.Tensor:
        """[C] long: the uniform random canvas a new canvas starts from."""

    def begin(self, rows: list[DecodeWork]) -> None:
        """Called before the decoder's forward for ``rows`` (in the order ``sample`` will get them):
        an implementation may draw ahead while the forward runs."""

    def sample(self, hidden: torch.Tensor, rows: list[DecodeWork]) -> SampleResult:
        """One step for every row: ``hidden`` is the decoder's output after its final norm."""

    def end(self) -> None:
        """The pass is over (also when it failed): nothing may still be drawing."""

    def transient_bytes(self, rows: int) -> int:
        """The most memory one ``sample`` call over ``rows`` rows takes beyond its inputs and outputs."""

    def close(self) -> None:
        """Release worker threads."""


def _triton_block_stats():
    """The Triton kernel for the fast sampler's statistics, or None (the PyTorch version) without Triton."""
    try:
        from .triton_stats import triton_block_stats
    except ImportError:
        return None
    return triton_block_stats


def default_sampler(device: torch.device) -> str:
    """The sampler when the setting leaves it unset: ``fast`` on CUDA, ``reference`` elsewhere."""
    return "fast" if device.type == "cuda" else "reference"


def make_sampler(name: str | None, model, device: torch.device, *, tile_bytes: int, threaded: bool,
                 max_num_seqs: int) -> Sampler:
    """The sampler ``name`` (one of ``SAMPLERS``; ``None``: ``default_sampler``) over ``model``'s lm
    head and tied embedding."""
    name = name or default_sampler(device)
    if name == "reference":
        from .reference import ReferenceSampler

        return ReferenceSampler(model, device, tile_bytes=tile_bytes, threaded=threaded)
    if name == "fast":
        from .fast import FastSampler

        return FastSampler(model, device, tile_bytes=tile_bytes, max_num_seqs=max_num_seqs,
                           stats=_triton_block_stats() if device.type == "cuda" else None)
    raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)} (got {name!r})")
