"""The per-request limits the server's settings impose (docs/reliability.md): a request over any of
them gets a 400 ``limit_exceeded`` naming the setting; nothing is clamped.

Checked in three rounds, each as soon as its inputs exist: ``check_request`` before any prompt is
tokenized, ``check_prompts`` on the token ids, ``check_resolved`` on the sampling parameters once
the checkpoint's defaults are filled in.
"""

from __future__ import annotations

from engine.sampling_params import SamplingParams

from . import errors
from .protocol import CommonFields

# A request's choices (prompts x n), each one engine request.
MAX_CHOICES = 256


def limit_error(message: str, param: str | None) -> errors.APIError:
    return errors.bad_request(message, param, "limit_exceeded")


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
    if num_prompts * req.n > MAX_CHOICES:
        raise errors.bad_request(
            f"Too many choices: {num_prompts} prompts x n={req.n} is over the limit of {MAX_CHOICES}.", "n"
        )
    for s in req.stop_tuple():
        if len(s) > settings.max_stop_length:
            raise limit_error(
                f"A stop sequence is {len(s)} characters long, the limit is {settings.max_stop_length} "
                "(setting max_stop_length).", "stop",
            )
    if max_tokens is not None:
        _check_max_tokens(settings, max_tokens, max_tokens_param)
    if req.max_denoising_steps is not None:
        _check_max_denoising_steps(settings, req.max_denoising_steps)


def check_prompts(settings, prompts: list[list[int]], param: str) -> None:
    """Each prompt's token count against ``max_prompt_tokens``."""
    limit = settings.max_prompt_tokens
    if limit is None:
        return
    for i, p in enumerate(prompts):
        if len(p) > limit:
            where = f"prompt {i}" if len(prompts) > 1 else "the prompt"
            raise limit_error(f"{where} has {len(p)} tokens, the limit is {limit} (setting max_prompt_tokens).", param)


def check_resolved(settings, params: SamplingParams, *, num_prompts: int, n: int, max_tokens_given: bool,
                   max_tokens_param: str) -> None:
    """The limits on values the checkpoint may have filled in (``params`` as resolved for every choice)."""
    if not max_tokens_given:  # the checkpoint's default: the same limit applies
        _check_max_tokens(settings, params.max_tokens, max_tokens_param)
    _check_max_denoising_steps(settings, params.max_denoising_steps)
    total = num_prompts * n * params.max_tokens
    if total > settings.max_request_tokens:
        param = "n" if n > 1 else ("prompt" if num_prompts > 1 else max_tokens_param)
        raise limit_error(
            f"This request asks for up to {total} completion tokens in all ({num_prompts} prompts x n={n} x "
            f"{max_tokens_param}={params.max_tokens}); the limit is {settings.max_request_tokens} "
            "(setting max_request_tokens).", param,
        )


def _check_max_tokens(settings, max_tokens: int, param: str) -> None:
    limit = settings.max_completion_tokens
    if limit is not None and max_tokens > limit:
        raise limit_error(
            f"{param} must be at most {limit} on this server (setting max_completion_tokens), got {max_tokens}.", param
        )


def _check_max_denoising_steps(settings, steps: int) -> None:
    if steps > settings.max_request_denoising_steps:
        raise limit_error(
            f"max_denoising_steps must be at most {settings.max_request_denoising_steps} on this server "
            f"(setting max_request_denoising_steps), got {steps}.", "max_denoising_steps",
        )
