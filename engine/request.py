"""A request's CPU-side bookkeeping, with an explicit status. No tensors live here, but for a prompt's
image inputs (CPU tensors), held only until its encode is scheduled."""

from __future__ import annotations

import enum
import functools
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .kv_budget import kv_reservation
from .sampling_params import SamplingParams

if TYPE_CHECKING:  # no torch here
    from .multimodal import ImageInputs


class RequestStatus(enum.Enum):
    WAITING = "waiting"  # queued, not admitted
    ENCODING = "encoding"  # admitted; its prompt or last committed canvas is encoded this pass
    DENOISING = "denoising"  # its canvas is in the decoder batch
    FINISHED_STOPPED = "stop"  # eos (or stop string, decided by the caller)
    FINISHED_LENGTH = "length"  # max_tokens reached
    FINISHED_ABORTED = "abort"
    FINISHED_ERROR = "error"

    @property
    def finished(self) -> bool:
        return self in _FINISHED


_FINISHED = {
    RequestStatus.FINISHED_STOPPED,
    RequestStatus.FINISHED_LENGTH,
    RequestStatus.FINISHED_ABORTED,
    RequestStatus.FINISHED_ERROR,
}


@dataclass
class Request:
    request_id: str
    prompt_ids: tuple[int, ...]
    params: SamplingParams  # resolved: no None diffusion fields
    seed: int
    canvas_length: int
    arrival_time: float = field(default_factory=time.monotonic)
    status: RequestStatus = RequestStatus.WAITING
    pending_encode: tuple[int, ...] = ()  # tokens to encode at the next pass
    step: int = 0  # denoising steps done on the current canvas
    canvas_index: int = 0  # canvases committed so far
    output_ids: list[int] = field(default_factory=list)  # committed tokens (a final eos included)
    num_denoising_steps: int = 0
    last_draft: tuple[int, ...] | None = None  # the previous draft of this canvas streamed (stream_drafts)
    # this canvas's latest draft and how many drafts in a row ended with it (constant memory, whatever k)
    repeated_draft: tuple[int, ...] | None = None
    repeats: int = 0
    scheduled_time: float | None = None
    canvas_start_time: float | None = None
    first_draft_time: float | None = None
    first_token_time: float | None = None
    error: str | None = None
    images: ImageInputs | None = None  # the prompt's images, until its encode is scheduled

    @functools.cached_property
    def prompt_hash(self) -> int:
        """``hash(prompt_ids)``, computed once (the scheduler groups the choices of one prompt by it)."""
        return hash(self.prompt_ids)

    @property
    def kv_reservation(self) -> int:
        """Full-attention KV tokens this request may hold at most (``kv_budget.kv_reservation``)."""
        return kv_reservation(len(self.prompt_ids), self.params.max_tokens, self.canvas_length)

    def converged(self, draft: tuple[int, ...], confident: bool) -> bool:
        """DiffusionGemma's stopping rule for the current canvas after a step that produced ``draft``:
        the last k = ``stability_threshold`` drafts before it equal it (k+1 equal drafts in a row) and
        the step was confident. Records the draft either way."""
        if draft == self.repeated_draft:
            stable = self.repeats >= self.params.stability_threshold
            self.repeats += 1
        else:
            stable = self.params.stability_threshold == 0
            self.repeated_draft, self.repeats = draft, 1
        return stable and confident

    def new_canvas(self) -> None:
        """Forget the finished canvas's drafts."""
        self.step = 0
        self.last_draft = None
        self.repeated_draft, self.repeats = None, 0

    @property
    def remaining_tokens(self) -> int:
        return self.params.max_tokens - len(self.output_ids)
