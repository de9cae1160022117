"""POST /v1/completions."""

from __future__ import annotations

import asyncio
import logging
import time

from fastapi import Request
from starlette.responses import JSONResponse, Response

from . import errors
from .errors import APIError
from .handling import (
    RequestLog,
    check_request_limits,
    check_unsupported,
    make_specs,
    parse_body,
    request_ids,
    stream_events,
    usage,
)
from .protocol import CompletionRequest
from .streaming import (
    ChoiceSet,
    ClientDisconnected,
    SSEResponse,
    collect_all,
)

logger = logging.getLogger("server")

TOKENIZE_IN_THREAD_CHARS = 20000


def count_prompts(prompt) -> int:
    """Prompts in ``prompt`` (any of OpenAI's four shapes), before tokenization."""
    if isinstance(prompt, str) or not prompt or isinstance(prompt[0], int):
        return 1
    return len(prompt)


async def tokenize_prompts(tokenizer, prompt) -> tuple[list[list[int]], list[str]]:
    """``prompt`` in any of OpenAI's four shapes -> (token id lists, prompt texts for echo)."""
    if isinstance(prompt, str):
        prompt = [prompt]
    if not prompt:
        raise errors.bad_request("prompt must not be empty.", "prompt")
    if isinstance(prompt[0], int):
        prompt = [prompt]
    if isinstance(prompt[0], str):
        texts = list(prompt)

        def encode():
            return [list(tokenizer(t, add_special_tokens=True)["input_ids"]) for t in texts]

        if sum(len(t) for t in texts) > TOKENIZE_IN_THREAD_CHARS:
            ids = await asyncio.to_thread(encode)
        else:
            ids = encode()
        return ids, texts
    ids = [list(p) for p in prompt]
    for i, p in enumerate(ids):
        if not p:
            raise errors.bad_request("prompt token lists must not be empty.", f"prompt[{i}]" if len(ids) > 1 else "prompt")
    return ids, [None] * len(ids)


async def create_completion(request: Request):
    state = request.app.state.server
    request_id, engine_prefix = request_ids(request, "cmpl")
    log = RequestLog(request_id, "completions", state.settings.log_prompts)
    try:
        return await _create_completion(request, state, request_id, engine_prefix, log)
    except APIError as exc:
        log.finish(exc.status, note=exc.code or exc.type)
        raise


async def _create_completion(request: Request, state, request_id: str, engine_prefix: str, log: RequestLog):
    req: CompletionRequest = await parse_body(request, CompletionRequest, state.settings.max_json_depth)
    engine = state.engine_or_503()
    model_name = state.check_model(req.model)
    check_unsupported(
        logprobs=(req.logprobs is not None and req.logprobs > 0, "logprobs are not supported by this server."),
        suffix=(bool(req.suffix), "suffix is not supported by this server."),
        best_of=(req.best_of is not None and req.best_of > 1, "best_of > 1 is not supported; use n."),
    )
    check_request_limits(state.settings, req, count_prompts(req.prompt), req.max_tokens)  # before tokenizing
    prompts, texts = await tokenize_prompts(engine.tokenizer, req.prompt)
    specs = make_specs(engine, prompts, req, req.max_tokens, engine_prefix, state.settings)
    if state.settings.log_prompts:
        log.prompt_text = " | ".join(t if t is not None else str(p) for t, p in zip(texts, prompts))
    echo_texts = {}
    if req.echo:
        for s in specs:
            t = texts[s.prompt_index]
            echo_texts[s.index] = t if t is not None else engine.tokenizer.decode(s.prompt_ids)

    choice_set = ChoiceSet(engine, specs, state.metrics.on_choice_finished, state.live_choice_sets)
    await choice_set.start()
    created = int(time.time())
    base = {"id": request_id, "object": "text_completion", "created": created, "model": model_name}

    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        opening = [_choice(index, text) for index, text in echo_texts.items()]
        stream = stream_events(state, engine, choice_set, base, opening, _choice, include_usage, log, "completion")
        return SSEResponse(stream, on_close=choice_set.cancel, ping_seconds=state.settings.sse_ping_seconds)

    try:
        results = await collect_all(choice_set, request.receive)
    except ClientDisconnected:
        log.finish("client_gone", specs, choice_set.results, "client disconnected")
        return Response(status_code=499)
    except APIError as exc:
        log.finish(exc.status, specs, choice_set.results, exc.code or "")
        raise
    choices = [
        {
            "index": i,
            "text": echo_texts.get(i, "") + results[i].text,
            "logprobs": None,
            "finish_reason": results[i].finish_reason,
        }
        for i in sorted(results)
    ]
    log.finish(200, specs, results)
    return JSONResponse({**base, "choices": choices, "usage": usage(specs, results)})


def _choice(index: int, text: str, finish_reason=None, **extra) -> dict:
    c = {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}
    c.update(extra)
    return c
