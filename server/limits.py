"""Request body size limit (setting ``max_request_body_bytes``): larger bodies get 413.

The body is read here (it would be read anyway) and replayed to the app. A body over the limit
is drained without being stored, so the client gets a 413 response rather than a broken pipe.
"""

from __future__ import annotations

from typing import Callable

from .errors import body_too_large, error_response

# Past this many bytes of an oversized body, stop draining and answer at once.
DRAIN_LIMIT = 256 * 1024 * 1024


class BodyLimitMiddleware:
    def __init__(self, app, max_bytes: int, on_reject: Callable[[int], None] | None = None):
        self.app = app
        self.max_bytes = max_bytes
        self.on_reject = on_reject

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        declared = None
        for name, value in scope.get("headers", []):
            if name.lower() == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = None
        too_large = declared is not None and declared > self.max_bytes
        chunks: list[bytes] = []
        total = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body = message.get("body", b"")
            total += len(body)
            if total > self.max_bytes:
                too_large = True
            if not too_large:
                chunks.append(body)
            if not message.get("more_body", False) or total > DRAIN_LIMIT:
                break
        if too_large:
            if self.on_reject is not None:
                self.on_reject(413)
            response = error_response(body_too_large(self.max_bytes))
            response.headers["Connection"] = "close"
            await response(scope, receive, send)
            return

        replayed = False
        full = b"".join(chunks)

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": full, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
