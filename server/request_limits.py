"""The per-request limits the server's settings impose (docs/reliability.md): a request over any of
them gets a 400 ``limit_exceeded`` naming the setting; nothing is clamped.

Checked in rounds, each as soon as its inputs exist: the body's size and values before it is parsed
(``bodies.scan``), ``check_request`` before any prompt is tokenized, ``PromptLimit`` on each prompt's
characters (before tokenizing it) and tokens (right after), ``check_resolved`` on the sampling
parameters once the checkpoint's defaults are filled in.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.errors import ContextLengthError
from engine.sampling_params import SamplingParams

from . import errors
from .prompt_bounds import TokenBound
from .protocol import CommonFields


LIMIT_EXCEEDED = "limit_exceeded"  # a request over one of the settings
CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"  # OpenAI's code: prompt and max_tokens over the context


def limit_error(message: str, param: str | None) -> errors.APIError:
    return errors.bad_request(message, param, LIMIT_EXCEEDED)


def check_request(settings, req: CommonFields, num_prompts: int, max_tokens: int | None, max_tokens_param: str) -> None:
    """The limits that need no tokenization, and the cross-field checks."""
    if req.stream_options is not None and not req.stream:
        raise errors.bad_request("stream_options is only allowed when stream is true.", "stream_options")
    if req.n > settings.max_n:
        raise limit_error(f"n must be at most {settings.max_n} on this server (setting max_n), got {req.n}.", "n")
    if num_prompts > settings.max_prompts_per_request:
        raise limit_error(
            f"Too many prompts: {num_prompts} in one request, the limit is {settings.max_prompts_per_request} "
            "(setting max_prompts_per_request).", "prompt",
        )
    if num_prompts * req.n > settings.max_choices_per_request:
        raise limit_error(
            f"Too many choices: {num_prompts} prompts x n={req.n} is over the limit of "
            f"{settings.max_choices_per_request} (setting max_choices_per_request).", "n",
        )
    for s in req.stop_tuple():
        if len(s) > settings.max_stop_length:
            raise limit_error(
                f"A stop sequence is {len(s)} characters long, the limit is {settings.max_stop_length} "
                "(setting max_stop_length).", "stop",
            )
    if req.logit_bias and len(req.logit_bias) > settings.max_logit_bias:
        raise limit_error(
            f"logit_bias has {len(req.logit_bias)} entries, the limit is {settings.max_logit_bias} "
            "(setting max_logit_bias).", "logit_bias",
        )
    if max_tokens is not None:
        _check_max_tokens(settings, max_tokens, max_tokens_param)
    if req.max_denoising_steps is not None:
        _check_max_denoising_steps(settings, req.max_denoising_steps)


@dataclass(frozen=True)
class PromptLimit:
    """The most tokens one prompt may have: ``max_prompt_tokens``, and at most the context length
    less one (a completion needs a token), whichever is smaller; ``bound`` refuses a text that cannot
    fit before it is tokenized."""

    tokens: int
    max_model_len: int
    from_setting: bool  # max_prompt_tokens is the bound (else the context length)
    bound: TokenBound | None = None
    canvas_length: int | None = None  # an infill's suffix must leave a free position in one canvas

    @classmethod
    def of(cls, settings, max_model_len: int, bound: TokenBound | None,
           canvas_length: int | None = None) -> "PromptLimit":
        context = max_model_len - 1
        setting = settings.max_prompt_tokens
        if setting is not None and setting <= context:
            return cls(setting, max_model_len, True, bound, canvas_length)
        return cls(context, max_model_len, False, bound, canvas_length)

    def why(self) -> str:
        """What sets the limit, ending a refusal's sentence."""
        if self.from_setting:
            return f"the limit is {self.tokens} (setting max_prompt_tokens)"
        return (f"this model's maximum context length is {self.max_model_len} tokens, prompt and completion together, "
                f"so a prompt may have at most {self.tokens}")

    @property
    def code(self) -> str:
        """The error code of a prompt over this limit."""
        return LIMIT_EXCEEDED if self.from_setting else CONTEXT_LENGTH_EXCEEDED

    def _error(self, message: str, param: str) -> errors.APIError:
        return errors.bad_request(message, param, self.code)

    def check_text(self, text: str, param: str, where: str) -> None:
        """Before tokenizing: refuse a text whose characters alone prove it has too many tokens."""
        found = None if self.bound is None else self.bound.at_least(text, self.tokens)
        if found is not None:
            at_least, why = found
            raise self._error(f"{where} has at least {at_least} tokens ({len(text)} characters: {why}); {self.why()}.",
                              param)

    def check_suffix_text(self, text: str) -> None:
        """Before tokenizing: refuse an infill suffix whose characters alone prove it cannot fit in a canvas
        beside one free position (the engine checks its tokens, ``engine.request_rules``)."""
        if self.bound is None or self.canvas_length is None:
            return
        found = self.bound.at_least(text, self.canvas_length - 1)
        if found is not None:
            at_least, why = found
            raise errors.bad_request(
                f"the suffix has at least {at_least} tokens ({len(text)} characters: {why}): an infill is written in "
                f"one canvas of {self.canvas_length} tokens and needs at least one free position before its suffix.",
                "suffix")

    def check_tokens(self, count: int, param: str, where: str) -> None:
        """A tokenized (or token-id) prompt's length."""
        if count > self.tokens:
            raise self._error(f"{where} has {count} tokens; {self.why()}.", param)


def context_length_error(exc: ContextLengthError, max_tokens_param: str, max_tokens_given: bool,
                         prompt_param: str, which: str, longest: int) -> errors.APIError:
    """The engine's context-length refusal of prompt ``which`` (``where``), worded for what the request
    sent: the field it set, or the default a request that set none got (the refusal then names the
    prompt, as OpenAI's does, and the most max_tokens may be beside the ``longest`` of its prompts)."""
    total = exc.prompt_len + exc.max_tokens
    head = f"This model's maximum context length is {exc.max_model_len} tokens, but {which} has {exc.prompt_len} tokens"
    if max_tokens_given:
        return errors.bad_request(f"{head} and {max_tokens_param} is {exc.max_tokens} ({total} in total); reduce the "
                                  f"prompt or {max_tokens_param}.", max_tokens_param, CONTEXT_LENGTH_EXCEEDED)
    return errors.bad_request(
        f"{head} and {max_tokens_param}, which this request does not set, defaults to {exc.max_tokens} ({total} in "
        f"total); set {max_tokens_param} to at most {exc.max_model_len - longest}, or shorten the prompt.",
        prompt_param, CONTEXT_LENGTH_EXCEEDED)


def where(index: int, count: int) -> str:
    """How a refusal names prompt ``index`` of ``count``."""
    return f"prompt {index}" if count > 1 else "the prompt"


def check_resolved(settings, params: SamplingParams, *, num_prompts: int, n: int, max_tokens_given: bool,
                   max_tokens_param: str, alternatives_param: str = "logprobs") -> None:
    """The limits on values the checkpoint may have filled in (``params`` as resolved for every choice);
    ``alternatives_param``: the field that asks for alternatives (chat's ``top_logprobs``)."""
    if not max_tokens_given:  # the checkpoint's default: the same limit applies
        _check_max_tokens(settings, params.max_tokens, max_tokens_param, default=True)
    _check_max_denoising_steps(settings, params.max_denoising_steps, default=True)  # a value sent passed already
    total = num_prompts * n * params.max_tokens
    if total > settings.max_request_tokens:
        param = "n" if n > 1 else ("prompt" if num_prompts > 1 else max_tokens_param)
        raise limit_error(
            f"This request asks for up to {total} completion tokens in all ({num_prompts} prompts x n={n} x "
            f"{max_tokens_param}={params.max_tokens}); the limit is {settings.max_request_tokens} "
            "(setting max_request_tokens).", param,
        )
    if params.logprobs is not None and total * (1 + params.logprobs) > settings.max_logprob_entries:
        raise limit_error(
            f"This request asks for up to {total * (1 + params.logprobs)} log-probability entries ({total} completion "
            f"tokens x {1 + params.logprobs}: each token and {params.logprobs} alternatives); the limit is "
            f"{settings.max_logprob_entries} (setting max_logprob_entries).",
            alternatives_param if params.logprobs else "logprobs",
        )


def _check_max_tokens(settings, max_tokens: int, param: str, default: bool = False) -> None:
    _check_at_most(param, max_tokens, settings.max_completion_tokens, "max_completion_tokens", default)


def _check_max_denoising_steps(settings, steps: int, default: bool = False) -> None:
    _check_at_most("max_denoising_steps", steps, settings.max_request_denoising_steps, "max_request_denoising_steps",
                   default)


def _check_at_most(param: str, value: int, limit: int | None, setting_name: str, default: bool) -> None:
    """``value`` of ``param`` within ``limit`` (None: none); ``default``: the checkpoint's, which the request
    did not set (the refusal says so, and what to send)."""
    if limit is None or value <= limit:
        return
    if default:
        raise limit_error(
            f"{param}, which this request does not set, defaults to {value} (the model's generation config), more "
            f"than the {limit} this server allows (setting {setting_name}): set {param} to at most {limit}.", param)
    raise limit_error(f"{param} must be at most {limit} on this server (setting {setting_name}), got {value}.", param)
