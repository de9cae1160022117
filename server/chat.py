"""POST /v1/chat/completions."""

from __future__ import annotations

import asyncio
import logging
import time

from fastapi import Request
from starlette.responses import JSONResponse, Response

from . import errors
from .errors import APIError
from .handling import RequestLog, check_unsupported, make_specs, parse_body, request_ids, stream_events, usage
from .protocol import ChatCompletionRequest
from .streaming import (
    ChoiceSet,
    ClientDisconnected,
    SSEResponse,
    collect_all,
)

logger = logging.getLogger("server")


def messages_as_dicts(req: ChatCompletionRequest) -> list[dict]:
    out = []
    for i, m in enumerate(req.messages):
        if m.content is None:
            content = ""
        elif isinstance(m.content, str):
            content = m.content
        else:
            pieces = []
            for part in m.content:
                if part.type != "text" or part.text is None:
                    raise errors.bad_request(
                        f"Only text content parts are supported, got type '{part.type}'.", f"messages[{i}].content"
                    )
                pieces.append(part.text)
            content = "\n".join(pieces)
        d = {"role": m.role, "content": content}
        if m.name:
            d["name"] = m.name
        out.append(d)
    return out


# Keys of apply_chat_template that would let a client swap the template (arbitrary Jinja: a CPU and
# memory bomb) or change what the server renders; anything else is passed to the checkpoint's template.
RESERVED_TEMPLATE_KWARGS = frozenset({
    "chat_template", "tokenize", "return_dict", "return_tensors", "return_assistant_tokens_mask",
    "add_generation_prompt", "continue_final_message", "conversation", "messages", "tools", "documents",
    "padding", "truncation", "max_length", "tokenizer_kwargs",
})


def template_kwargs(raw: dict | None) -> dict:
    """Extra variables for the checkpoint's own chat template: plain scalars only, no reserved keys."""
    kwargs = dict(raw or {})
    for key, value in kwargs.items():
        if key in RESERVED_TEMPLATE_KWARGS:
            raise errors.bad_request(f"chat_template_kwargs may not set '{key}'.", "chat_template_kwargs")
        if not (value is None or isinstance(value, (str, int, float, bool))) or (isinstance(value, str) and len(value) > 1024):
            raise errors.bad_request(
                f"chat_template_kwargs['{key}'] must be a string (at most 1024 characters), number, boolean or null.",
                "chat_template_kwargs",
            )
    return kwargs


def apply_template(tokenizer, req: ChatCompletionRequest) -> tuple[list[int], str]:
    messages = messages_as_dicts(req)
    if req.continue_final_message and messages[-1]["role"] != "assistant":
        raise errors.bad_request("continue_final_message needs the last message to be from the assistant.", "messages")
    kwargs = template_kwargs(req.chat_template_kwargs)
    try:
        text = tokenizer.apply_chat_template(
            messages,
            tokenize=False,
            add_generation_prompt=req.add_generation_prompt and not req.continue_final_message,
            continue_final_message=req.continue_final_message,
            **kwargs,
        )
    except Exception as exc:  # jinja2 errors, a template that raises on a role, missing template
        raise errors.bad_request(f"The chat template could not render these messages: {exc}", "messages") from None
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return ids, text


async def create_chat_completion(request: Request):
    state = request.app.state.server
    request_id, engine_prefix = request_ids(request, "chatcmpl")
    log = RequestLog(request_id, "chat", state.settings.log_prompts)
    try:
        return await _create_chat_completion(request, state, request_id, engine_prefix, log)
    except APIError as exc:
        log.finish(exc.status, note=exc.code or exc.type)
        raise


async def _create_chat_completion(request: Request, state, request_id: str, engine_prefix: str, log: RequestLog):
    req: ChatCompletionRequest = await parse_body(request, ChatCompletionRequest, state.settings.max_json_depth)
    engine = state.engine_or_503()
    model_name = state.check_model(req.model)
    rf_type = (req.response_format or {}).get("type", "text")
    check_unsupported(
        logprobs=(bool(req.logprobs) or bool(req.top_logprobs), "logprobs are not supported by this server."),
        tools=(bool(req.tools), "tools (function calling) are not supported by this server."),
        response_format=(rf_type != "text", f"response_format type '{rf_type}' is not supported; only 'text'."),
    )
    # rendering and tokenizing can take a while on large bodies: never on the event loop
    prompt_ids, prompt_text = await asyncio.to_thread(apply_template, engine.tokenizer, req)
    log.prompt_text = prompt_text if state.settings.log_prompts else None
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    specs = make_specs(engine, [prompt_ids], req, max_tokens, engine_prefix, state.settings)

    choice_set = ChoiceSet(engine, specs, state.metrics.on_choice_finished, state.live_choice_sets)
    await choice_set.start()
    created = int(time.time())
    base = {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model_name}

    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        opening = [_choice(spec.index, "", delta={"role": "assistant", "content": ""}) for spec in choice_set.specs]
        stream = stream_events(state, engine, choice_set, base, opening, _choice, include_usage, log, "chat")
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
            "message": {"role": "assistant", "content": results[i].text},
            "logprobs": None,
            "finish_reason": results[i].finish_reason,
        }
        for i in sorted(results)
    ]
    log.finish(200, specs, results)
    body = {**base, "object": "chat.completion", "choices": choices, "usage": usage(specs, results)}
    return JSONResponse(body)


def _choice(index: int, text: str, finish_reason=None, delta: dict | None = None, **extra) -> dict:
    """A chat chunk choice: ``text`` becomes ``delta.content`` (an empty delta when there is none)."""
    if delta is None:
        delta = {"content": text} if text else {}
    c = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
    c.update(extra)
    return c
