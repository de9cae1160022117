"""Per-request parameters, resolved against the checkpoint's generation config."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from .errors import ContextLengthError, InvalidRequestError  # raised here; server code also imports it from this module


@dataclass(frozen=True)
class SamplingParams:
    """What one request asks of the engine.

    ``None`` means "use the checkpoint's generation config" (see ``resolve``). The diffusion
    fields mirror transformers' ``DiffusionGemmaGenerationConfig``.
    """

    max_tokens: int | None = None
    stop: tuple[str, ...] = ()
    eos_token_ids: tuple[int, ...] | None = None
    ignore_eos: bool = False
    seed: int | None = None
    max_denoising_steps: int | None = None
    entropy_bound: float | None = None
    t_min: float | None = None
    t_max: float | None = None
    stability_threshold: int | None = None
    confidence_threshold: float | None = None
    stream_drafts: bool = False
    # top alternatives per committed token to report with its log-probability (``None``: no logprobs)
    logprobs: int | None = None
    # (token id, bias) pairs added to the soft-capped logits before the temperature (OpenAI's logit_bias)
    logit_bias: tuple[tuple[int, float], ...] = ()
    # infill: tokens pinned right after the ``max_tokens`` free positions of the (single) canvas
    infill_suffix: tuple[int, ...] = ()
    extra: dict = field(default_factory=dict, compare=False)

    def resolve(self, defaults: "SamplingParams") -> "SamplingParams":
        """Fill every ``None`` field from ``defaults`` (the checkpoint's generation config)."""
        values = {}
        for name in (
            "max_tokens",
            "eos_token_ids",
            "seed",
            "max_denoising_steps",
            "entropy_bound",
            "t_min",
            "t_max",
            "stability_threshold",
            "confidence_threshold",
        ):
            if getattr(self, name) is None:
                values[name] = getattr(defaults, name)
        return replace(self, **values)


MIN_TEMPERATURE = 1e-6
# The sampler holds temperatures, the entropy bound and the confidence threshold in float32: every
# float parameter must be a finite float32 (at most FLOAT32_MAX) and, when it must be > 0, a normal one
# (at least FLOAT32_TINY: smaller values would round to 0 or lose their precision).
FLOAT32_MAX = 3.4028234663852886e38
FLOAT32_TINY = 1.1754943508222875e-38


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return (isinstance(x, (int, float)) and not isinstance(x, bool)) and x == x and abs(x) != float("inf")


def _check_float(params: SamplingParams, name: str, *, positive: bool) -> None:
    """A finite number the sampler's float32 can hold: > 0 (and normal) or >= 0, at most FLOAT32_MAX."""
    value = getattr(params, name)
    bound = "> 0" if positive else ">= 0"
    if not _is_number(value) or value < 0 or (positive and value == 0):
        raise InvalidRequestError(f"{name} must be a number {bound}, got {value!r}", name)
    if value > FLOAT32_MAX:
        raise InvalidRequestError(
            f"{name} must be at most {FLOAT32_MAX:.7g} (the largest float32, which the sampler computes in), "
            f"got {value!r}", name)
    if positive and value < FLOAT32_TINY:
        raise InvalidRequestError(
            f"{name} must be at least {FLOAT32_TINY:.7g} (the smallest normal float32, which the sampler "
            f"computes in), got {value!r}", name)


MAX_LOGPROBS = 20  # top alternatives per token at most (OpenAI's chat limit)
MAX_LOGIT_BIAS = 100.0  # |bias| at most, as in OpenAI's API


def validate_resolved(params: SamplingParams, *, vocab_size: int, max_model_len: int, prompt_len: int,
                      canvas_length: int) -> None:
    """Raise ``InvalidRequestError`` for any parameter the engine cannot honour. Runs before any work."""
    if not _is_int(params.max_tokens) or params.max_tokens < 1:
        raise InvalidRequestError(f"max_tokens must be a positive integer, got {params.max_tokens!r}", "max_tokens")
    if prompt_len < 1:
        raise InvalidRequestError("the prompt must contain at least one token", "prompt")
    if prompt_len + params.max_tokens > max_model_len:
        raise ContextLengthError(prompt_len, params.max_tokens, max_model_len)
    if not _is_int(params.max_denoising_steps) or params.max_denoising_steps < 1:
        raise InvalidRequestError(
            f"max_denoising_steps must be a positive integer, got {params.max_denoising_steps!r}", "max_denoising_steps"
        )
    _check_float(params, "entropy_bound", positive=True)
    for name in ("t_min", "t_max"):
        _check_float(params, name, positive=False)
    if params.t_max <= params.t_min:
        raise InvalidRequestError(
            f"t_max must be greater than t_min, got t_max={params.t_max} and t_min={params.t_min}", "t_max"
        )
    # the schedule's temperatures run from t_max down to t_min + (t_max - t_min) / N at the last step
    # (N..1 steps remaining, as transformers counts them): t_min itself is never reached
    lowest = params.t_min + (params.t_max - params.t_min) / params.max_denoising_steps
    if lowest < MIN_TEMPERATURE:
        raise InvalidRequestError(
            f"the last step's temperature, t_min + (t_max - t_min) / max_denoising_steps = {lowest:g}, must be at "
            f"least {MIN_TEMPERATURE}: the step divides the logits by it (smaller ones are already greedy and "
            "overflow to inf)",
            "t_min",
        )
    if not _is_int(params.stability_threshold) or params.stability_threshold < 0:
        raise InvalidRequestError(
            f"stability_threshold must be an integer >= 0, got {params.stability_threshold!r}", "stability_threshold"
        )
    _check_float(params, "confidence_threshold", positive=True)
    if params.seed is not None and (not _is_int(params.seed) or not (-(2**63) <= params.seed < 2**64)):
        raise InvalidRequestError(f"seed must be a 64-bit integer, got {params.seed!r}", "seed")
    for token in params.eos_token_ids or ():
        if not _is_int(token) or not (0 <= token < vocab_size):
            raise InvalidRequestError(f"eos token id {token!r} is outside the vocabulary [0, {vocab_size})", "eos_token_ids")
    for s in params.stop:
        if not isinstance(s, str) or not s:
            raise InvalidRequestError("stop sequences must be non-empty strings", "stop")
    _check_token_options(params, vocab_size, canvas_length)


def _check_token_options(params: SamplingParams, vocab_size: int, canvas_length: int) -> None:
    """logprobs, logit_bias and the infill suffix."""
    if params.logprobs is not None and not (_is_int(params.logprobs) and 0 <= params.logprobs <= MAX_LOGPROBS):
        raise InvalidRequestError(f"logprobs must be an integer in [0, {MAX_LOGPROBS}], got {params.logprobs!r}",
                                  "logprobs")
    for token, bias in params.logit_bias:
        if not _is_int(token) or not (0 <= token < vocab_size):
            raise InvalidRequestError(
                f"logit_bias token id {token!r} is outside the vocabulary [0, {vocab_size})", "logit_bias")
        if not _is_number(bias) or abs(bias) > MAX_LOGIT_BIAS:
            raise InvalidRequestError(
                f"logit_bias values must be numbers in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}], got {bias!r} for "
                f"token {token}", "logit_bias")
    if len({token for token, _ in params.logit_bias}) != len(params.logit_bias):
        raise InvalidRequestError("logit_bias names a token more than once", "logit_bias")
    suffix = params.infill_suffix
    if suffix:
        for token in suffix:
            if not _is_int(token) or not (0 <= token < vocab_size):
                raise InvalidRequestError(f"suffix token id {token!r} is outside the vocabulary [0, {vocab_size})",
                                          "suffix")
        if params.max_tokens + len(suffix) > canvas_length:
            raise InvalidRequestError(
                f"an infill (suffix) is written in one canvas of {canvas_length} tokens: max_tokens "
                f"({params.max_tokens}) plus the suffix's {len(suffix)} tokens must be at most {canvas_length}",
                "suffix")
