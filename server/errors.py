"""OpenAI-shaped errors: ``{"error": {"message", "type", "param", "code"}}`` for every failure.

Every error the server returns goes through ``APIError`` (or ``error_response``), including
FastAPI's schema errors (400, never a bare 422), unknown routes (404), engine failures
(``from_engine``) and internal faults (500, without a stack trace in the body).
"""

from __future__ import annotations

import json
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response

from engine.errors import EngineDeadError, InvalidRequestError, QueueFullError
from engine.outputs import RequestOutput

logger = logging.getLogger("server")

# Seconds a client should wait before retrying, sent as ``Retry-After``.
RETRY_AFTER_QUEUE_FULL = 1
RETRY_AFTER_UNAVAILABLE = 5


class APIError(Exception):
    """An error with an HTTP status and an OpenAI error body."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | int | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


class ClientDisconnected(Exception):
    """The client went away before its answer: nobody reads the response."""


async def wait_for_disconnect(receive) -> None:
    """Return when the client has gone (call it once the body has been read)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


def error_body(message: str, type: str, param: str | None = None, code: str | int | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def error_bytes(err: APIError) -> bytes:
    return json.dumps(err.body()).encode()


# Constructors for the errors the contract names.


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, "invalid_request_error", param, code)


def unauthorized() -> APIError:
    return APIError(
        401,
        "Invalid or missing API key. Send it as 'Authorization: Bearer <key>'.",
        "invalid_request_error",
        None,
        "invalid_api_key",
        {"WWW-Authenticate": "Bearer"},
    )


def model_not_found(model: str, available: list[str]) -> APIError:
    return APIError(
        404,
        f"The model '{model}' does not exist. Available: {', '.join(available) or '(none)'}.",
        "invalid_request_error",
        "model",
        "model_not_found",
    )


def body_too_large(limit: int) -> APIError:
    return APIError(
        413,
        f"Request body too large: the limit is {limit} bytes (setting max_request_body_bytes).",
        "invalid_request_error",
        None,
        "request_too_large",
    )


def body_timeout(seconds: float) -> APIError:
    return APIError(
        408,
        f"The request body did not arrive within {seconds:g} seconds (setting request_body_timeout_seconds).",
        "invalid_request_error",
        None,
        "request_timeout",
        {"Connection": "close"},
    )


def bodies_full(limit: int) -> APIError:
    return APIError(
        429,
        f"The server holds {limit} bytes of request bodies at once (setting max_body_bytes_in_flight) and this "
        "one would pass that. Retry later.",
        "rate_limit_error",
        None,
        "server_busy",
        {"Retry-After": str(RETRY_AFTER_QUEUE_FULL), "Connection": "close"},
    )


def queue_full() -> APIError:
    return APIError(
        429,
        "The server is at capacity: the request queue is full. Retry later.",
        "rate_limit_error",
        None,
        "queue_full",
        {"Retry-After": str(RETRY_AFTER_QUEUE_FULL)},
    )


SHUTTING_DOWN = "the server is shutting down"


def request_aborted(detail: str = SHUTTING_DOWN) -> APIError:
    """A request ended by the server, not by its client (503 ``request_aborted``)."""
    return unavailable(f"The request was aborted: {detail}.", "request_aborted")


def unavailable(message: str, code: str) -> APIError:
    return APIError(503, message, "server_error", None, code, {"Retry-After": str(RETRY_AFTER_UNAVAILABLE)})


def internal_error(message: str = "The server had an internal error while processing the request.") -> APIError:
    return APIError(500, message, "server_error", None, "internal_error")


def from_engine(failure) -> APIError | None:
    """The HTTP error an engine failure stands for: the one mapping from engine to HTTP.

    ``failure`` is an exception the engine raised (``engine.errors``), or a finished
    ``RequestOutput`` (its ``finish_reason`` "error" or a server-side "abort"); any other output
    maps to ``None``. An unknown exception is an internal fault (500, details logged, not sent).
    """
    if isinstance(failure, RequestOutput):
        if not failure.finished:
            return None
        if failure.finish_reason == "error":
            detail = f": {failure.error}" if failure.error else ""
            return internal_error(f"The engine failed while generating{detail}")
        if failure.finish_reason == "abort":  # not by this request's client: the engine shut down or stopped
            return request_aborted(failure.error or SHUTTING_DOWN)
        return None
    if isinstance(failure, APIError):
        return failure
    if isinstance(failure, QueueFullError):
        return queue_full()
    if isinstance(failure, EngineDeadError):
        return unavailable("The engine has stopped; the server needs a restart.", "engine_dead")
    if isinstance(failure, InvalidRequestError):
        return bad_request(failure.message, failure.param, failure.code)
    logger.error("engine failure: %r", failure)
    return internal_error()


def _loc_to_param(loc) -> str | None:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    # pydantic unions add the member type names ("str", "list[int]") to the location: drop them.
    parts = [p for p in parts if not (p.startswith(("list[", "dict[")) or p in ("str", "int", "float", "bool"))]
    if not parts:
        return None
    out = parts[0]
    for p in parts[1:]:
        out += f"[{p}]" if p.isdigit() else f".{p}"
    return out


def validation_error(exc: RequestValidationError) -> APIError:
    errors = exc.errors()
    if not errors:
        return bad_request("Invalid request.")
    first = errors[0]
    if first.get("type") == "json_invalid":
        return bad_request(f"The request body is not valid JSON: {first.get('msg')}.", None, "invalid_json")
    param = _loc_to_param(first.get("loc", ()))
    msgs = []
    for e in errors[:5]:
        p = _loc_to_param(e.get("loc", ()))
        msgs.append(f"{p}: {e.get('msg')}" if p else str(e.get("msg")))
    more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
    return bad_request("Invalid request: " + "; ".join(msgs) + more, param)


def install_error_handlers(app: FastAPI, on_error=None) -> None:
    """Route every exception to an OpenAI-shaped JSON body. ``on_error(status)`` counts them."""

    def respond(err: APIError) -> JSONResponse:
        if on_error is not None:
            on_error(err.status)
        return error_response(err)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return respond(exc)

    @app.exception_handler(ClientDisconnected)
    async def _gone(request: Request, exc: ClientDisconnected):  # nobody reads it
        return Response(status_code=499)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        return respond(validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 404:
            err = APIError(404, f"Unknown route: {request.method} {request.url.path}", "invalid_request_error", None, "not_found")
        elif exc.status_code == 405:
            err = APIError(405, f"Method {request.method} not allowed on {request.url.path}", "invalid_request_error", None, "method_not_allowed")
        else:
            err = APIError(exc.status_code, str(exc.detail), "invalid_request_error" if exc.status_code < 500 else "server_error")
        err.headers.update(dict(exc.headers or {}))
        return respond(err)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        logger.exception("internal error on %s %s", request.method, request.url.path)
        err = internal_error()
        # Starlette re-raises the exception after this response, and uvicorn then closes the connection
        err.headers["Connection"] = "close"
        return respond(err)
