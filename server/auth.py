"""Optional bearer-key authentication (pure ASGI, so streaming is untouched): every request to /v1/*, and
every request elsewhere that is not a read (GET, HEAD, OPTIONS), so that a client without a key cannot
make the server read a body (the body limits' buffering) on any path.

Keys are compared in constant time (``hmac.compare_digest``) against every configured key.
/health, /metrics, the page and ``/ui/config`` (which answers ``authorized: false`` itself) stay open.
"""

from __future__ import annotations

import hmac
from typing import Callable

from .errors import error_response, unauthorized
from .middleware import READ_METHODS

PROTECTED_PREFIX = "/v1"


def key_matches(provided: str | None, keys: list[bytes]) -> bool:
    if provided is None:
        return False
    candidate = provided.encode("utf-8", "surrogateescape")
    ok = False
    for key in keys:  # no early exit: the time does not depend on which key matched
        ok |= hmac.compare_digest(candidate, key)
    return ok


def bearer_token(headers: list[tuple[bytes, bytes]]) -> str | None:
    for name, value in headers:
        if name.lower() == b"authorization":
            text = value.decode("latin-1").strip()
            scheme, _, token = text.partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
            return None
    return None


class APIKeyMiddleware:
    def __init__(self, app, api_keys: list[str], on_reject: Callable[[int], None] | None = None):
        self.app = app
        self.keys = [k.encode("utf-8") for k in api_keys if k]
        self.on_reject = on_reject

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not self.keys or (
                scope["method"] in READ_METHODS and not scope["path"].startswith(PROTECTED_PREFIX)):
            await self.app(scope, receive, send)
            return
        if key_matches(bearer_token(scope.get("headers", [])), self.keys):
            await self.app(scope, receive, send)
            return
        if self.on_reject is not None:
            self.on_reject(401)
        await error_response(unauthorized())(scope, receive, send)
