"""Plain data crossing between the scheduler (CPU bookkeeping) and the model runner (tensors)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the scheduler's side imports no torch
    from .multimodal import ImageInputs


@dataclass(frozen=True)
class NewRow:
    """A request the runner must start tracking (allocate KV, seed its sampler state)."""

    request_id: str
    seed: int
    kv_tokens: int  # most tokens its KV will hold: prompt + every canvas but the last (sizes its slot)


@dataclass(frozen=True)
class EncodeWork:
    """Tokens to run through the encoder and append to the request's KV (prompt or committed canvas)."""

    request_id: str
    token_ids: tuple[int, ...]
    images: ImageInputs | None = None  # the prompt's images, whose features fill its image placeholders
    # another request of this pass whose tokens before and in this chunk are the same (a choice of the
    # same prompt): its K/V is copied, not computed again (batch-invariant, a row's K/V depends on its own
    # tokens only; otherwise the copy is one of the last-bit variants the row could get)
    same_as: str | None = None


@dataclass(frozen=True)
class DecodeWork:
    """One denoising step of one request's canvas."""

    request_id: str
    new_canvas: bool  # draw a fresh random canvas first (first step of a canvas)
    canvas_index: int  # canvases the request committed before this one
    cur_step: int  # steps remaining, N..1 (transformers' convention)
    max_steps: int
    t_min: float
    t_max: float
    entropy_bound: float
    confidence_threshold: float
    logprobs: int | None = None  # report the draft's log-probabilities with this many top alternatives
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias) added to the soft-capped logits
    pinned_start: int = 0  # canvas position of the first pinned token
    pinned: tuple[int, ...] = ()  # tokens fixed at pinned_start.. (an infill suffix): never renoised


@dataclass
class StepPlan:
    """What one scheduler pass asks of the runner, in order: free, add, encode, decode."""

    free: list[str] = field(default_factory=list)
    new: list[NewRow] = field(default_factory=list)
    encode: list[EncodeWork] = field(default_factory=list)
    decode: list[DecodeWork] = field(default_factory=list)

    def is_empty(self) -> bool:
        return not (self.free or self.new or self.encode or self.decode)


@dataclass(frozen=True)
class CanvasLogprobs:
    """Per position of a step's draft: the draft token's log-probability under the step's
    temperature-scaled distribution, and the top alternatives as (token id, log-probability), best first."""

    chosen: tuple[float, ...]
    top: tuple[tuple[tuple[int, float], ...], ...]


@dataclass(frozen=True)
class DecodeResult:
    request_id: str
    draft: tuple[int, ...]  # argmax canvas after this step
    confident: bool  # mean entropy below the confidence threshold (the scheduler decides convergence)
    error: str | None = None  # this row failed (e.g. non-finite logits); the request ends with an error
    logprobs: CanvasLogprobs | None = None  # when the row asked for them


@dataclass
class StepResult:
    decode: list[DecodeResult] = field(default_factory=list)
    encoder_tokens: int = 0
    forward_seconds: float = 0.0  # encoder, decoder layers, lm head, self-conditioning product
    sampling_seconds: float = 0.0  # the sampler's own math and random draws (generate() does the same)


def fault_name(exc: BaseException) -> str:
    """What a client is told of an internal exception: its type only (its text may carry tensor shapes,
    paths or another request's data, and goes to the log instead)."""
    return type(exc).__name__


def pass_error(exc: BaseException) -> str:
    """The error a request is failed with when the model pass (or its encoder group) raised."""
    return f"internal error in the model pass: {fault_name(exc)}"
