"""Request bodies: strict JSON, bounded in depth, validated into the endpoint's pydantic model.

The body is parsed whatever the Content-Type says (curl's ``-d`` sends form encoding). JSON
errors, nesting deeper than ``max_json_depth`` and schema errors are OpenAI-shaped 400s.
"""

from __future__ import annotations

import asyncio
import json

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError

from . import errors

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


async def parse_body(request: Request, model: type[BaseModel], max_depth: int):
    """The body as an instance of ``model``; large bodies are parsed off the event loop."""
    raw = await request.body()
    if len(raw) > PARSE_IN_THREAD_BYTES:
        data = await asyncio.to_thread(load_json, raw, max_depth)
    else:
        data = load_json(raw, max_depth)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise errors.validation_error(RequestValidationError(exc.errors())) from None
