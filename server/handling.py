"""What both endpoints share: body parsing, model check, sampling parameters, usage, request log."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError

from engine.sampling_params import InvalidRequestError, SamplingParams

from . import errors
from .protocol import CommonFields, CompletionRequest
from .errors import APIError
from .streaming import DONE, ChoiceResult, ChoiceSet, ChoiceSpec, draft_extension, failure_for, json_chunk, sse

logger = logging.getLogger("server.requests")

# A request's choices: prompts x n. Each is one engine request.
MAX_CHOICES = 256
LOG_TEXT_LIMIT = 2000


# Bodies larger than this are parsed and checked in a worker thread (the event loop stays free).
PARSE_IN_THREAD_BYTES = 1 << 20


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a valid JSON value")


def _finite_float(text: str) -> float:
    value = float(text)
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"the number {text[:40]} is out of range")
    return value


def _too_deep(max_depth: int) -> errors.APIError:
    return errors.bad_request(
        f"The request body nests arrays and objects more than {max_depth} levels deep (setting max_json_depth).",
        None, "json_too_deep",
    )


def _check_string(s: str) -> None:
    if not s.isascii():
        try:
            s.encode("utf-8")
        except UnicodeEncodeError:
            raise errors.bad_request(
                "The request body is not valid JSON: a string contains an unpaired UTF-16 surrogate escape.",
                None, "invalid_json",
            ) from None


def check_json_value(data, max_depth: int) -> None:
    """Depth of nesting (the body itself is level 1) and well-formed strings, without recursion."""
    stack = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > max_depth:
            raise _too_deep(max_depth)
        items = value.values() if isinstance(value, dict) else value
        if isinstance(value, dict):
            for key in value:
                _check_string(key)
        for item in items:
            kind = type(item)
            if kind is int or kind is float or kind is bool or item is None:
                continue
            if kind is str:
                _check_string(item)
            elif isinstance(item, (dict, list)):
                stack.append((item, depth + 1))


def load_json(raw: bytes, max_depth: int):
    """Strict JSON (no NaN, Infinity or numbers that overflow to them), at most ``max_depth`` deep."""
    try:
        data = json.loads(raw, parse_constant=_reject_constant, parse_float=_finite_float)
    except RecursionError:
        raise _too_deep(max_depth) from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise errors.bad_request(f"The request body is not valid JSON: {exc}", None, "invalid_json") from None
    if not isinstance(data, dict):
        raise errors.bad_request("The request body must be a JSON object.", None, "invalid_json")
    check_json_value(data, max_depth)
    return data


async def parse_body(request: Request, model: type[BaseModel], max_depth: int = 32):
    """Parse the body as JSON whatever the Content-Type says (curl's -d sends form encoding)."""
    raw = await request.body()
    if len(raw) > PARSE_IN_THREAD_BYTES:
        data = await asyncio.to_thread(load_json, raw, max_depth)
    else:
        data = load_json(raw, max_depth)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise errors.validation_error(RequestValidationError(exc.errors())) from None


def new_request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def request_ids(request: Request, prefix: str) -> tuple[str, str]:
    """(response id, prefix of the engine request ids) for this HTTP request.

    The response id comes from ``RequestIdMiddleware`` (``<prefix>-<X-Request-Id>`` when the client
    sent a sane one). Engine ids must be unique while a client may reuse its X-Request-Id, so a
    client-chosen id gets a random suffix there.
    """
    state = request.scope.get("state") or {}
    rid = state.get("request_id")
    if not rid:
        rid = new_request_id(prefix)
        return rid, rid
    if state.get("request_id_from_client"):
        return rid, f"{rid}-{uuid.uuid4().hex[:8]}"
    return rid, rid


def limit_error(message: str, param: str | None) -> errors.APIError:
    return errors.bad_request(message, param, "limit_exceeded")


def check_request_limits(settings, req: CommonFields, num_prompts: int, max_tokens: int | None,
                         max_tokens_param: str = "max_tokens") -> None:
    """The limits that need no tokenization (settings ``max_n``, ``max_prompts_per_request``, ...) and
    the cross-field checks."""
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
        check_max_tokens(settings, max_tokens, max_tokens_param)
    if req.max_denoising_steps is not None:
        check_max_denoising_steps(settings, req.max_denoising_steps)


def check_max_tokens(settings, max_tokens: int, param: str) -> None:
    limit = settings.max_completion_tokens
    if limit is not None and max_tokens > limit:
        raise limit_error(
            f"{param} must be at most {limit} on this server (setting max_completion_tokens), got {max_tokens}.", param
        )


def check_prompt_lengths(settings, prompts: list[list[int]], param: str) -> None:
    limit = settings.max_prompt_tokens
    if limit is None:
        return
    for i, p in enumerate(prompts):
        if len(p) > limit:
            where = f"prompt {i}" if len(prompts) > 1 else "the prompt"
            raise limit_error(
                f"{where} has {len(p)} tokens, the limit is {limit} (setting max_prompt_tokens).", param
            )


def diffusion_kwargs(req: CommonFields) -> dict:
    return dict(
        max_denoising_steps=req.max_denoising_steps,
        entropy_bound=req.entropy_bound,
        t_min=req.t_min,
        t_max=req.t_max,
        stability_threshold=req.stability_threshold,
        confidence_threshold=req.confidence_threshold,
    )


def make_specs(engine, prompts: list[list[int]], req: CommonFields, max_tokens: int | None, request_id: str,
               settings=None) -> list[ChoiceSpec]:
    """One resolved engine request per choice. Choice ``i`` (prompt ``i // n``) gets ``seed + i``.

    Raises a 400 ``APIError`` for any parameter the engine refuses (context length included) or a
    request limit (``settings``) forbids, before anything is submitted. ``request_id`` prefixes the
    engine request ids.
    """
    n = req.n
    max_tokens_param = "max_completion_tokens" if getattr(req, "max_completion_tokens", None) is not None else "max_tokens"
    if settings is not None:
        check_request_limits(settings, req, len(prompts), max_tokens, max_tokens_param)
        check_prompt_lengths(settings, prompts, "prompt" if isinstance(req, CompletionRequest) else "messages")
    elif len(prompts) * n > MAX_CHOICES:
        raise errors.bad_request(
            f"Too many choices: {len(prompts)} prompts x n={n} is over the limit of {MAX_CHOICES}.", "n"
        )
    stop = req.stop_tuple()
    specs = []
    for p, prompt_ids in enumerate(prompts):
        for j in range(n):
            index = p * n + j
            params = SamplingParams(
                max_tokens=max_tokens,
                stop=stop,
                ignore_eos=req.ignore_eos,
                seed=None if req.seed is None else req.seed + index,
                stream_drafts=bool(req.stream_drafts and req.stream),
                **diffusion_kwargs(req),
            )
            try:
                # the prompt's tokens are checked once, not once per choice
                resolved = engine.resolve(prompt_ids, params, prompt_checked=j > 0)
            except InvalidRequestError as exc:
                param = exc.param
                if param == "max_tokens":
                    param = max_tokens_param
                raise errors.bad_request(exc.message, param) from None
            specs.append(ChoiceSpec(index, p, list(prompt_ids), resolved, f"{request_id}-{index}"))
    if settings is not None and specs:
        if max_tokens is None:  # the checkpoint's default: the same limit applies
            check_max_tokens(settings, specs[0].params.max_tokens, max_tokens_param)
        check_max_denoising_steps(settings, specs[0].params.max_denoising_steps)
        total = sum(s.params.max_tokens for s in specs)
        if total > settings.max_request_tokens:
            param = "n" if n > 1 else ("prompt" if len(prompts) > 1 else max_tokens_param)
            raise limit_error(
                f"This request asks for up to {total} completion tokens in all ({len(prompts)} prompts x n={n} x "
                f"{max_tokens_param}={specs[0].params.max_tokens}); the limit is {settings.max_request_tokens} "
                "(setting max_request_tokens).", param,
            )
    return specs


def check_max_denoising_steps(settings, steps: int) -> None:
    if steps > settings.max_request_denoising_steps:
        raise limit_error(
            f"max_denoising_steps must be at most {settings.max_request_denoising_steps} on this server "
            f"(setting max_request_denoising_steps), got {steps}.", "max_denoising_steps",
        )


def usage(specs: list[ChoiceSpec], results: dict[int, ChoiceResult]) -> dict:
    """Exact counts: each prompt once (however large ``n``), every choice's committed tokens."""
    prompt_tokens = {}
    for s in specs:
        prompt_tokens[s.prompt_index] = len(s.prompt_ids)
    prompt = sum(prompt_tokens.values())
    completion = sum(r.num_generated_tokens for r in results.values())
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "denoising_steps": sum(r.num_denoising_steps for r in results.values()),
        "canvases": sum(r.num_canvases for r in results.values()),
    }


def check_unsupported(**fields) -> None:
    for name, (value, message) in fields.items():
        if value:
            raise errors.bad_request(message, name, "unsupported_parameter")


class RequestLog:
    """Writes one line per HTTP request when it ends."""

    def __init__(self, request_id: str, endpoint: str, log_prompts: bool):
        self.request_id = request_id
        self.endpoint = endpoint
        self.log_prompts = log_prompts
        self.start = time.monotonic()
        self.prompt_text: str | None = None
        self._done = False

    def finish(self, status: int | str, specs=(), results: dict | None = None, note: str = "") -> None:
        if self._done:
            return
        self._done = True
        results = results or {}
        u = usage(list(specs), results) if specs else {}
        reasons = sorted({r.finish_reason or "-" for r in results.values()}) or ["-"]
        line = (
            f"{self.request_id} {self.endpoint} status={status} choices={len(results)} "
            f"prompt_tokens={u.get('prompt_tokens', 0)} completion_tokens={u.get('completion_tokens', 0)} "
            f"denoising_steps={u.get('denoising_steps', 0)} canvases={u.get('canvases', 0)} "
            f"latency={time.monotonic() - self.start:.3f}s finish={','.join(reasons)}"
        )
        if note:
            line += f" note={note}"
        if self.log_prompts:
            prompt = (self.prompt_text or "")[:LOG_TEXT_LIMIT]
            outputs = [results[i].text[:LOG_TEXT_LIMIT] for i in sorted(results)]
            line += f" prompt={prompt!r} outputs={outputs!r}"
        logger.info(line)


async def stream_events(state, engine, choice_set: ChoiceSet, base: dict, opening: list[dict], choice,
                        include_usage: bool, log: RequestLog, kind: str):
    """The SSE frames of one streamed request, for both endpoints.

    ``opening`` are choice objects sent first (chat's role chunks, completions' echo); ``choice(index,
    text, finish_reason=None, **extra)`` builds an endpoint's choice object carrying ``text`` ("" for
    draft and finish chunks). Then drafts, text deltas and finish chunks as the engine produces them,
    the usage chunk when asked, and ``[DONE]``; a failure becomes an error chunk before ``[DONE]``.
    """
    err: APIError | None = None
    completed = False
    try:
        for c in opening:
            yield sse(json_chunk({**base, "choices": [c]}))
        async for index, out in choice_set.events():
            if out.draft is not None:
                ext = draft_extension(out.draft, engine.tokenizer)
                yield sse(json_chunk({**base, "choices": [choice(index, "", diffusion=ext)]}))
            if out.text:
                yield sse(json_chunk({**base, "choices": [choice(index, out.text)]}))
            if out.finished:
                failure = failure_for(out)
                if failure is not None:
                    raise failure
                yield sse(json_chunk({**base, "choices": [choice(index, "", out.finish_reason)]}))
        if include_usage:
            yield sse(json_chunk({**base, "choices": [], "usage": usage(choice_set.specs, choice_set.results)}))
        completed = True
    except APIError as exc:
        err = exc
    except Exception:  # noqa: BLE001
        logger.exception("%s stream %s failed", kind, base["id"])
        err = errors.internal_error()
    finally:
        choice_set.cancel()
        if err is not None:
            log.finish(err.status, choice_set.specs, choice_set.results, err.code or "")
        elif completed:
            log.finish(200, choice_set.specs, choice_set.results)
        else:
            log.finish("client_gone", choice_set.specs, choice_set.results, "client disconnected")
    if err is not None:
        state.metrics.count_error(err.status)
        yield sse(json_chunk(err.body()))
    yield sse(DONE)
