"""Server-sent events with OpenAI's framing: ``data: {json}\\n\\n`` frames, then ``data: [DONE]``.

Every byte of a stream goes through here: ``chunk`` frames a JSON object, ``done`` ends the stream,
and ``SSEResponse`` sends them (with keep-alive comments at a fixed interval) and always runs its
cleanup, however the stream ends.
"""

from __future__ import annotations

import json

from sse_starlette import EventSourceResponse, ServerSentEvent

DONE = "[DONE]"
NO_PING_SECONDS = 365 * 24 * 3600.0  # the ping interval that stands for "no keep-alive comments"


# Characters that Python's str.splitlines (so httpx's and requests' iter_lines) takes for line ends and
# that JSON may carry raw: escaped, so that any line-based reader sees one frame as one line.
_LINE_ENDS = (("\x85", "\\u0085"), ("\u2028", "\\u2028"), ("\u2029", "\\u2029"))


def json_text(obj: dict) -> str:
    """Compact JSON on one line: non-ASCII text kept as is, but for the line ends above."""
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    if not text.isascii():
        for raw, escaped in _LINE_ENDS:
            text = text.replace(raw, escaped)
    return text


def chunk(obj: dict) -> ServerSentEvent:
    """One ``data: {json}`` frame."""
    return ServerSentEvent(data=json_text(obj), sep="\n")


def done() -> ServerSentEvent:
    """The ``data: [DONE]`` frame that ends every stream."""
    return ServerSentEvent(data=DONE, sep="\n")


class SSEResponse(EventSourceResponse):
    """``EventSourceResponse`` with OpenAI's framing (``data: ...\\n\\n``) and a guaranteed cleanup.

    ``on_close`` runs however the response ends (finished, client gone, server shutting down), even
    when the body iterator never started, so the engine requests are always released.
    """

    def __init__(self, content, on_close, ping_seconds: float = 15.0, **kwargs):
        # 0 disables the comments: a ping task that never wakes (sse-starlette releases before the fix
        # of sysid/sse-starlette#206 take an interval of 0 literally and flood the stream)
        super().__init__(content, sep="\n", ping=ping_seconds or NO_PING_SECONDS, **kwargs)
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()
