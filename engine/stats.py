"""Plain statistics the engine reports; the server turns them into Prometheus metrics.

The engine calls a ``StatsSink`` from its step-loop thread; sinks must be thread-safe and cheap.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class PassStats:
    """One scheduler pass."""

    decoder_batch_size: int  # canvases in this pass's decoder batch (0 if none)
    encoder_tokens: int  # tokens encoded in this pass (prefill + commits, unpadded)
    num_running: int
    num_waiting: int
    seconds: float  # wall time of the whole pass
    forward_seconds: float  # wall time inside model forward calls
    sampling_seconds: float = 0.0  # wall time in the sampler (softmax, draws, entropy, acceptance)


@dataclass(frozen=True)
class CanvasStats:
    """One canvas that left the decoder batch (converged or ran out of steps)."""

    denoising_steps: int
    committed_tokens: int  # tokens of this canvas that count towards the output (after eos/length trim)
    seconds: float  # from the canvas's first decoder step to its commit


@dataclass(frozen=True)
class RequestStats:
    """One request that finished, for whatever reason. Times are ``time.monotonic()`` seconds."""

    request_id: str
    arrival_time: float
    scheduled_time: float | None  # admitted to the running batch
    first_draft_time: float | None  # first decoder step done
    first_token_time: float | None  # first committed token
    finished_time: float
    num_prompt_tokens: int
    num_generated_tokens: int
    num_denoising_steps: int
    num_canvases: int
    finish_reason: str


class StatsSink(Protocol):
    def on_pass(self, stats: PassStats) -> None: ...

    def on_canvas(self, stats: CanvasStats) -> None: ...

    def on_request_finished(self, stats: RequestStats) -> None: ...


class NullStatsSink:
    """Discards everything."""

    def on_pass(self, stats: PassStats) -> None:
        pass

    def on_canvas(self, stats: CanvasStats) -> None:
        pass

    def on_request_finished(self, stats: RequestStats) -> None:
        pass
