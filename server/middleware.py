"""Pure ASGI middleware (streaming untouched): request ids and the in-flight count used by the drain.

``RequestIdMiddleware``: every response carries ``X-Request-Id``. A client's own id is echoed when
it is sane (1-128 characters of ``A-Z a-z 0-9 . _ : -``); otherwise the server makes one. The
completion endpoints use it as the response id (``cmpl-<id>`` / ``chatcmpl-<id>``) and in their log
line; a generated id is the whole response id, so the header and the body's ``id`` are equal.

``InFlightMiddleware``: counts the /v1 requests inside the app (a stream counts until its last
byte), so a SIGTERM drain knows when nothing is left to finish.

``HeadAsGetMiddleware``: a HEAD request is routed as the GET it stands for (uvicorn sends no body for
a HEAD), so monitors that probe with HEAD see what GET answers.
"""

from __future__ import annotations

import re
import uuid

# requests that only read (no body, no work): the origin guard, the body limits and the key check on paths
# outside /v1 let them through
READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})

REQUEST_ID_HEADER = b"x-request-id"
MAX_REQUEST_ID_LENGTH = 128
_SAFE_ID = re.compile(rb"[A-Za-z0-9._:\-]{1,%d}" % MAX_REQUEST_ID_LENGTH)

ID_PREFIXES = {"/v1/completions": "cmpl", "/v1/chat/completions": "chatcmpl"}


class HeadAsGetMiddleware:
    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] == "HEAD":
            scope = {**scope, "method": "GET"}  # uvicorn's own scope still says HEAD: it sends no body
        await self.app(scope, receive, send)


def client_request_id(headers) -> str | None:
    """The client's X-Request-Id if it is sane, else None."""
    for name, value in headers:
        if name.lower() == REQUEST_ID_HEADER:
            value = value.strip()
            return value.decode("ascii") if _SAFE_ID.fullmatch(value) else None
    return None


def new_request_id(prefix: str = "req") -> str:
    """A server-made request id (``<prefix>-<32 hex digits>``)."""
    return f"{prefix}-{uuid.uuid4().hex}"


class RequestIdMiddleware:
    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        prefix = ID_PREFIXES.get(scope["path"].rstrip("/"), "req")
        client_id = client_request_id(scope.get("headers", []))
        if client_id is not None:
            response_id, header = f"{prefix}-{client_id}", client_id
        else:
            response_id = header = new_request_id(prefix)
        state = scope.setdefault("state", {})
        state["request_id"] = response_id
        state["request_id_from_client"] = client_id is not None
        header_bytes = header.encode("ascii")

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != REQUEST_ID_HEADER]
                headers.append((REQUEST_ID_HEADER, header_bytes))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_id)


class InFlight:
    """Shared between the middleware and ``ServerState``."""

    def __init__(self):
        self.count = 0


class InFlightMiddleware:
    PREFIX = "/v1/"

    def __init__(self, app, inflight: InFlight):
        self.app = app
        self.inflight = inflight

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].startswith(self.PREFIX):
            await self.app(scope, receive, send)
            return
        self.inflight.count += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.inflight.count -= 1
