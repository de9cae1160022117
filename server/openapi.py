"""The server's OpenAPI document (``GET /openapi.json``), with what the handlers cannot declare.

The completion handlers read and validate their bodies themselves (to answer OpenAI-shaped 400s,
never FastAPI's 422), so FastAPI sees no body parameter. This adds the request bodies (from the
pydantic models in ``protocol.py``) and every documented error status with the OpenAI error shape,
so schema-driven fuzzers (schemathesis, see docs/reliability.md) can check the live server.
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from .protocol import ChatCompletionRequest, CompletionRequest

ERROR_SCHEMA = {
    "type": "object",
    "required": ["error"],
    "additionalProperties": False,
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "additionalProperties": False,
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "integer", "null"]},
            },
        }
    },
}

ERROR_STATUSES = {
    "400": "Invalid request (schema, parameter or limit), or a malformed HTTP request.",
    "401": "Missing or wrong API key.",
    "403": "Sent by a web page of an origin the server does not allow (setting cors_allow_origins).",
    "404": "Unknown model or route.",
    "405": "A route called with the wrong method.",
    "408": "The request's head or body arrived too slowly.",
    "413": "Request body too large.",
    "429": "The waiting queue is full (`queue_full`), or the server holds all the large request bodies it may "
           "(`server_busy`); Retry-After.",
    "431": "The request line and headers are too large.",
    "500": "Internal fault (no stack trace).",
    "503": "Loading, draining, a dead engine, or every connection busy (Retry-After).",
}

# The 200 bodies (not streamed) as OpenAI's SDK reads them; fields beyond these (usage's denoising_steps, ...)
# are extensions.
USAGE = {
    "type": "object",
    "required": ["prompt_tokens", "completion_tokens", "total_tokens"],
    "properties": {name: {"type": "integer", "minimum": 0}
                   for name in ("prompt_tokens", "completion_tokens", "total_tokens")},
}
FINISH_REASON = {"enum": ["stop", "length", "tool_calls"]}
COMPLETION_CHOICE = {
    "type": "object",
    "required": ["index", "text", "logprobs", "finish_reason"],
    "properties": {"index": {"type": "integer", "minimum": 0}, "text": {"type": "string"},
                   "logprobs": {"type": ["object", "null"]}, "finish_reason": FINISH_REASON},
}
CHAT_CHOICE = {
    "type": "object",
    "required": ["index", "message", "logprobs", "finish_reason"],
    "properties": {
        "index": {"type": "integer", "minimum": 0},
        "message": {"type": "object", "required": ["role", "content"],
                    "properties": {"role": {"const": "assistant"}, "content": {"type": ["string", "null"]},
                                   "tool_calls": {"type": "array", "items": {"type": "object"}}}},
        "logprobs": {"type": ["object", "null"]},
        "finish_reason": FINISH_REASON,
    },
}


def completion_response(object_name: str, choice: dict) -> dict:
    """The schema of a 200 body whose ``object`` is ``object_name`` and whose choices are ``choice``."""
    return {
        "type": "object",
        "required": ["id", "object", "created", "model", "choices", "usage"],
        "properties": {
            "id": {"type": "string"},
            "object": {"const": object_name},
            "created": {"type": "integer"},
            "model": {"type": "string"},
            "choices": {"type": "array", "minItems": 1, "items": choice},
            "usage": USAGE,
        },
    }


RESPONSES = {"/v1/completions": completion_response("text_completion", COMPLETION_CHOICE),
             "/v1/chat/completions": completion_response("chat.completion", CHAT_CHOICE)}


# One server-sent event (``data: {json chunk}`` or ``data: [DONE]``), as event-stream validators see it.
SSE_EVENT = {"type": "object", "required": ["data"], "properties": {"data": {"type": "string"}, "event": {"type": "string"}}}


def _error_responses(statuses) -> dict:
    ref = {"$ref": "#/components/schemas/ErrorResponse"}
    return {s: {"description": ERROR_STATUSES[s], "content": {"application/json": {"schema": ref}}} for s in statuses}


def _body_schema(model, components: dict) -> dict:
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    components.update(schema.pop("$defs", {}))
    components[model.__name__] = schema
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def install_openapi(app: FastAPI) -> None:
    def openapi() -> dict:
        if app.openapi_schema is not None:
            return app.openapi_schema
        doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        components = doc.setdefault("components", {}).setdefault("schemas", {})
        components["ErrorResponse"] = ERROR_SCHEMA
        paths = doc.get("paths", {})
        for path, model in (("/v1/completions", CompletionRequest), ("/v1/chat/completions", ChatCompletionRequest)):
            op = paths.get(path, {}).get("post")
            if op is None:
                continue
            op["requestBody"] = {"required": True, "content": {"application/json": {"schema": _body_schema(model, components)}}}
            op["responses"] = {
                "200": {
                    "description": "A completion (JSON), or server-sent events when stream is true.",
                    "content": {"application/json": {"schema": RESPONSES[path]},
                                "text/event-stream": {"schema": SSE_EVENT}},
                },
                **_error_responses(["400", "401", "403", "404", "413", "429", "500", "503"]),
            }
        for path, statuses in (("/v1/models", ["401"]), ("/v1/models/{model_id}", ["401", "404"])):
            op = paths.get(path, {}).get("get")
            if op is not None:
                op["responses"].pop("422", None)
                op["responses"].update(_error_responses(statuses))
        health = paths.get("/health", {}).get("get")
        if health is not None:
            status_schema = {"type": "object", "required": ["status"], "properties": {"status": {"type": "string"}}}
            health["responses"] = {
                "200": {"description": "Serving.", "content": {"application/json": {"schema": status_schema}}},
                "503": {"description": "Loading, draining or dead.", "content": {"application/json": {"schema": status_schema}}},
            }
        metrics = paths.get("/metrics", {}).get("get")
        if metrics is not None:
            metrics["responses"] = {"200": {"description": "Prometheus text format.", "content": {"text/plain": {"schema": {"type": "string"}}}}}
        components.pop("HTTPValidationError", None)
        components.pop("ValidationError", None)
        app.openapi_schema = doc
        return doc

    app.openapi = openapi
