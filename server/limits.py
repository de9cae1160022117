"""Request body limits: larger bodies than ``max_request_body_bytes`` get 413, bodies that have not
arrived ``request_body_timeout_seconds`` after the head get 408 (both close the connection).

The body is read here (it would be read anyway) and replayed to the app. A body over the limit
is drained without being stored, so the client gets a 413 response rather than a broken pipe.
Each chunk's JSON marks are counted as it arrives (``bodies.MarkCounts``, left in the request's
state for ``bodies.read_json``): a body with more than ``max_json_values`` values for certain is
drained without being stored too, and the endpoint refuses it from the counts alone.

After a request with a large body the C allocator is asked to return its free memory to the system
(``trim_memory``): the body, its parsed form and a refused prompt's text are megabytes each, and
glibc otherwise keeps freed blocks of that size for reuse, so the process would stay grown.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
from typing import TYPE_CHECKING, Callable

from .bodies import BODY_HELD, BODY_MARKS, PARSE_IN_THREAD_BYTES, MarkCounts
from .errors import APIError, bodies_full, body_timeout, body_too_large, error_response
from .middleware import READ_METHODS

if TYPE_CHECKING:
    from .preprocess import PreprocessGate

# Past this many bytes of a body over the limit, stop draining it and answer at once.
DRAIN_LIMIT = 256 * 1024 * 1024
# After a request whose body was at least this large, free memory is returned to the system.
TRIM_AFTER_BYTES = 1 << 20
# The first bytes of each body do not count against max_body_bytes_in_flight: a body this small is parsed
# as soon as it has arrived, so stalled large uploads that fill the budget cannot refuse ordinary requests.
FREE_BODY_BYTES = PARSE_IN_THREAD_BYTES


def _malloc_trim():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


_MALLOC_TRIM = _malloc_trim()
_trimming = False


async def trim_memory() -> None:
    """glibc's ``malloc_trim(0)`` in a worker thread (one at a time; nothing elsewhere)."""
    global _trimming
    if _MALLOC_TRIM is None or _trimming:
        return
    _trimming = True
    try:
        await asyncio.to_thread(_MALLOC_TRIM, 0)
    finally:
        _trimming = False


class BodyBudget:
    """The bytes of request bodies held at once, all connections together (``max_body_bytes_in_flight``)."""

    def __init__(self, limit: int | None):
        self.limit = limit  # None: no bound
        self.held = 0

    def take(self, n: int) -> bool:
        if self.limit is not None and self.held + n > self.limit:
            return False
        self.held += n
        return True


class _Held:
    """One request's share of the ``BodyBudget``: the bytes of its body past the first ``FREE_BODY_BYTES``
    (a small body, parsed at once, never waits for the budget). Given back when the request is over, unless
    the body was handed to its parse (``hand_over``, by ``bodies.read_json``): then when the parse ends,
    even after its client has gone (a parse runs on in its thread)."""

    def __init__(self, budget: BodyBudget):
        self.budget = budget
        self.bytes = 0
        self.handed = False  # the parse gives the bytes back (``parsed``)
        self.over = False  # the request is over (answered or its client gone)
        self.large = False  # the body is large enough for the memory to be trimmed after it (set once read)

    def hand_over(self) -> Callable[[], None]:
        """The body is the parse's from now: call the result (on the event loop) when the parse has ended."""
        self.handed = True
        return self.parsed

    def parsed(self) -> None:
        self.release()
        if self.over and self.large:  # a parse that outlived its request: what it held goes back now
            asyncio.ensure_future(trim_memory())

    def request_over(self) -> None:
        self.over = True
        if not self.handed:
            self.release()

    def cover(self, total: int) -> bool:
        """Hold what a body of ``total`` bytes needs (False: the budget has no room for it)."""
        more = max(0, total - FREE_BODY_BYTES) - self.bytes
        if more > 0:
            if not self.budget.take(more):
                return False
            self.bytes += more
        return True

    def release(self) -> None:
        self.budget.held -= self.bytes
        self.bytes = 0


class BodyLimitMiddleware:
    def __init__(self, app, max_bytes: int, timeout_seconds: float = 0.0,
                 on_reject: Callable[[int], None] | None = None, max_json_values: int | None = None,
                 gate: Callable[[], PreprocessGate | None] | None = None, max_bytes_in_flight: int | None = None):
        self.app = app
        self.gate = gate  # the server's preprocessing gate, once it has one: the drain's abort ends a slow body too
        self.max_bytes = max_bytes
        self.max_json_values = max_json_values  # None: no marks are counted
        self.timeout = timeout_seconds  # 0: no timeout
        self.on_reject = on_reject
        self.budget = BodyBudget(max_bytes_in_flight)

    async def _reject(self, err, scope, receive, send) -> None:
        if self.on_reject is not None:
            self.on_reject(err.status)
        response = error_response(err)
        response.headers["Connection"] = "close"
        await response(scope, receive, send)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in READ_METHODS:
            await self.app(scope, receive, send)
            return
        held = _Held(self.budget)
        received = [0]  # the body's bytes, stored or not
        chunks: list[bytes] = []  # the body's stored bytes
        try:
            await self._call(scope, receive, send, held, received, chunks)
        finally:
            chunks.clear()  # on every way out (an exception's traceback would keep them alive past the trim)
            held.request_over()
            if received[0] >= TRIM_AFTER_BYTES:  # whatever the outcome: 408, 413, 429, a client gone, served
                await trim_memory()

    async def _call(self, scope, receive, send, held: _Held, received: list[int], chunks: list[bytes]):
        declared = None
        expects_continue = False
        for name, value in scope.get("headers", []):
            name = name.lower()
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = None
            elif name == b"expect" and value.lower() == b"100-continue":
                expects_continue = True
        too_large = declared is not None and declared > self.max_bytes
        if too_large and expects_continue:  # refused before the client sends a byte of it (no 100 Continue)
            await self._reject(body_too_large(self.max_bytes), scope, receive, send)
            return
        total = 0
        counts = MarkCounts() if self.max_json_values is not None else None
        dropped = False  # too many JSON values for certain: the endpoint refuses it from ``counts``
        over_budget = False  # stored, it would pass max_body_bytes_in_flight: read on, dropped, answered 429
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout if self.timeout > 0 else None
        gate = self.gate() if self.gate is not None else None
        if gate is not None and gate.aborted:  # a request that came after the drain's deadline: the endpoint
            gate = None  # refuses it as it refuses every request while draining (server_draining)

        async def next_message() -> dict:
            if deadline is None:
                return await receive()
            return await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))

        while True:
            try:
                message = await (next_message() if gate is None else gate.unless_aborted(next_message()))
            except asyncio.TimeoutError:
                await self._reject(body_timeout(self.timeout), scope, receive, send)
                return
            except APIError as err:  # the drain's time is up while the body still arrives
                await self._reject(err, scope, receive, send)
                return
            if message["type"] == "http.disconnect":
                return
            body = message.get("body", b"")
            total += len(body)
            received[0] = total
            if total > self.max_bytes:
                too_large = True
            if counts is not None and not too_large:
                counts.feed(body)
                if not dropped and counts.too_many_values(self.max_json_values):
                    dropped = True
                    chunks.clear()
                    held.release()
            if not too_large and not dropped and not over_budget:
                if held.cover(total):
                    chunks.append(body)
                else:
                    over_budget = True
                    chunks.clear()
                    held.release()
            if not message.get("more_body", False) or ((too_large or over_budget) and total > DRAIN_LIMIT):
                break
        if too_large or over_budget:
            chunks.clear()
            held.release()
            err = body_too_large(self.max_bytes) if too_large else bodies_full(self.budget.limit)
            await self._reject(err, scope, receive, send)
            return

        body = [b"".join(chunks)]
        chunks.clear()
        state = scope.setdefault("state", {})
        held.large = total >= TRIM_AFTER_BYTES
        state[BODY_HELD] = held  # read_json takes the bytes over for its parse
        if counts is not None:
            state[BODY_MARKS] = counts

        async def replay():
            if body:
                return {"type": "http.request", "body": body.pop(), "more_body": False}
            return await receive()

        if total < TRIM_AFTER_BYTES:
            await self.app(scope, replay, send)
            return
        # A large body: the response's last message waits until the app has returned (and dropped the
        # body, its parsed form and its prompts) and the memory has gone back to the system.
        last: list[dict] = []

        async def send_all_but_last(message):
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                last.append(message)
            else:
                await send(message)

        try:
            await self.app(scope, replay, send_all_but_last)
        finally:
            received[0] = 0  # trimmed here, before the last message
            held.request_over()
            await trim_memory()
            for message in last:
                await send(message)
