"""The turns of the work a request needs before the engine sees it, in worker threads: parsing a large
body, rendering and tokenizing a large prompt, formatting a large response's log-probabilities (setting
``preprocess_concurrency``); and, in turns of their own, decoding images (``image_decode_concurrency``)."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Awaitable, Callable
from typing import TypeVar

from . import errors

T = TypeVar("T")


class PreprocessGate:
    """At most ``concurrency`` jobs at once, in a pool of that many threads of its own; the others wait for
    a turn. Once the drain's time is up (``abort``), a request that waits for its turn or its job is
    answered at once (503 ``request_aborted``, as every request the drain aborts); the job itself runs on
    to its end in its thread, which no one can stop. Such a job (its request aborted, cancelled or its
    client gone) still holds its thread: the next job waits for it, so at most ``concurrency`` jobs run
    at once whatever clients do."""

    def __init__(self, concurrency: int, name: str):
        self._turns = asyncio.Semaphore(concurrency)
        self._aborted = asyncio.Event()
        self._pool = ThreadPoolExecutor(concurrency, thread_name_prefix=name)  # threads start on use

    def abort(self) -> None:
        self._aborted.set()

    def for_request(self, receive) -> "RequestTurns":
        """This gate's turns for one request whose body has been read: its waits end when its client goes
        away."""
        return RequestTurns(self, receive)

    @property
    def aborted(self) -> bool:
        return self._aborted.is_set()

    async def run(self, work: Callable[[], T], abortable: bool = True, receive=None) -> T:
        """``work()`` in a worker thread once a turn is free. ``abortable=False``: the drain's abort does not
        answer this request (its answer is ready but for this work). ``receive`` (the request's, its body
        read): a client that goes away meanwhile ends the wait (``errors.ClientDisconnected``), its turn
        given back; a job already running runs on in its thread, its result dropped."""
        if not abortable and receive is None:
            return await self._in_turn(work)
        return await self.unless_aborted(self._in_turn(work), abortable, receive)

    async def unless_aborted(self, step: Awaitable[T], abortable: bool = True, receive=None) -> T:
        """``step``'s result, or 503 ``request_aborted`` as soon as the drain's time is up (``step`` is then
        cancelled: a turn it waits for or holds comes back at once); with ``receive``, also
        ``errors.ClientDisconnected`` as soon as the client has gone."""
        if abortable and self._aborted.is_set():
            if asyncio.iscoroutine(step):
                step.close()  # never started
            raise errors.request_aborted()
        job = asyncio.ensure_future(step)
        aborted = asyncio.ensure_future(self._aborted.wait()) if abortable else None
        gone = asyncio.ensure_future(errors.wait_for_disconnect(receive)) if receive is not None else None
        try:
            await asyncio.wait({f for f in (job, aborted, gone) if f is not None},
                               return_when=asyncio.FIRST_COMPLETED)
            if job.done():
                return job.result()
            if gone is not None and gone.done():
                raise errors.ClientDisconnected()
            raise errors.request_aborted()
        finally:
            for f in (aborted, gone, job):  # the job: nothing when done; else its turn comes back now
                if f is not None:
                    f.cancel()
            # an exception raised here holds this frame: without these references, the job (and through it
            # the caller's frames and their buffers) would wait for the cycle collector
            job = aborted = gone = step = f = None

    async def _in_turn(self, work: Callable[[], T]) -> T:
        async with self._turns:
            return await asyncio.get_running_loop().run_in_executor(self._pool, work)


class RequestTurns:
    """A ``PreprocessGate`` for one request (``PreprocessGate.for_request``): ``run`` as the gate's, and a
    client that goes away meanwhile ends the wait (``errors.ClientDisconnected``)."""

    def __init__(self, gate: PreprocessGate, receive):
        self.gate = gate
        self.receive = receive

    async def run(self, work: Callable[[], T], abortable: bool = True) -> T:
        return await self.gate.run(work, abortable, self.receive)
