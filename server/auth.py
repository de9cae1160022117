"""Optional bearer-key authentication for /v1/* (pure ASGI, so streaming is untouched).

Keys are compared in constant time (``hmac.compare_digest``) against every configured key.
/health and /metrics stay open.
"""

from __future__ import annotations

import hmac
from typing import Callable

from .errors import error_response, unauthorized

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
        if scope["type"] != "http" or not self.keys or not scope["path"].startswith(PROTECTED_PREFIX):
            await self.app(scope, receive, send)
            return
        if key_matches(bearer_token(scope.get("headers", [])), self.keys):
            await self.app(scope, receive, send)
            return
        if self.on_reject is not None:
            self.on_reject(401)
        await error_response(unauthorized())(scope, receive, send)
