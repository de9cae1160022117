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
    """At most ``concurrency`` jobs at once; the others wait for a turn. Once the drain's time is up
    (``abort``), a request that waits for its turn or its job is answered at once (503
    ``request_aborted``, as every request the drain aborts); the job itself runs on to its end in its
    thread, which no one can stop."""

    def __init__(self, concurrency: int, own_threads: str | None = None):
        """``own_threads``: run the jobs in a pool of ``concurrency`` threads of that name, not the event
        loop's default executor, so that a job that runs on after its request was cancelled still holds a
        thread: at most ``concurrency`` such jobs run at once, whatever clients do."""
        self._turns = asyncio.Semaphore(concurrency)
        self._aborted = asyncio.Event()
        self._pool = ThreadPoolExecutor(concurrency, thread_name_prefix=own_threads) if own_threads else None

    def abort(self) -> None:
        self._aborted.set()

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

    async def _in_turn(self, work: Callable[[], T]) -> T:
        async with self._turns:
            if self._pool is None:
                return await asyncio.to_thread(work)
            return await asyncio.get_running_loop().run_in_executor(self._pool, work)
