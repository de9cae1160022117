"""Plain data the engine hands to its callers: one ``RequestOutput`` per event of one request."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Draft:
    """One refinement step of one canvas.

    ``token_ids`` is the argmax canvas after the step (what the canvas would commit now);
    ``changed`` lists the canvas positions whose token differs from the previous draft of the
    same canvas (all positions for the first step).
    """

    canvas: int  # 0-based canvas index within the request
    step: int  # 1-based count of denoising steps done on this canvas
    max_steps: int
    token_ids: tuple[int, ...]
    changed: tuple[int, ...]


@dataclass(frozen=True)
class TokenLogprob:
    """A committed token's log-probability: under the temperature-scaled distribution of the
    denoising step whose draft committed it, with the ``top`` alternatives (token id, log-probability)
    of that distribution, best first."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class RequestOutput:
    """What changed for one request since its previous output.

    ``token_ids`` and ``text`` are the newly committed tokens and their text delta (incrementally
    detokenized, stop strings cut). ``finish_reason`` is set on the last output:
    ``"stop"`` (eos or a stop string), ``"length"`` (max_tokens), ``"abort"`` or ``"error"``.
    """

    request_id: str
    token_ids: tuple[int, ...] = ()
    text: str = ""
    draft: Draft | None = None
    logprobs: tuple[TokenLogprob, ...] | None = None  # one per ``token_ids`` entry, when the request asked
    finished: bool = False
    finish_reason: str | None = None
    error: str | None = None
    num_prompt_tokens: int = 0
    num_generated_tokens: int = 0  # committed so far, including a final eos token
    num_denoising_steps: int = 0  # decoder steps run for this request so far
    num_canvases: int = 0  # canvases committed so far
