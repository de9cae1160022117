"""The preprocessing turns (``server.preprocess.PreprocessGate``): at most that many jobs at once; once the
drain's time is up, a request that waits for a turn or for its job is answered at once; a turn comes back
whether the job ended, was aborted or its request went away, but a job that runs on keeps its thread."""

from __future__ import annotations

import asyncio
import threading

import pytest

from server.errors import APIError, ClientDisconnected
from server.preprocess import PreprocessGate


def blocking_jobs(release: threading.Event, started: list[str]):
    """``job(name)``: work that notes its name in ``started`` when it starts, then waits for ``release``."""
    def job(name: str):
        def work():
            started.append(name)
            release.wait(30)
            return name
        return work
    return job


def test_jobs_take_turns_and_an_abort_answers_the_waiting_at_once():
    release = threading.Event()
    started: list[str] = []
    job = blocking_jobs(release, started)

    async def main():
        gate = PreprocessGate(1, "test")
        first = asyncio.create_task(gate.run(job("first")))
        second = asyncio.create_task(gate.run(job("second")))
        while not started:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        assert started == ["first"] and not second.done()  # one turn: the second waits for it
        gate.abort()
        results = await asyncio.gather(first, second, return_exceptions=True)
        for result in results:  # the running job's request and the waiting one, both answered now
            assert isinstance(result, APIError) and (result.status, result.code) == (503, "request_aborted")
        assert started == ["first"]  # the waiting job never ran
        with pytest.raises(APIError, match="shutting down"):
            await gate.run(job("late"))
        release.set()

    asyncio.run(asyncio.wait_for(main(), 30))


def test_a_job_whose_request_went_away_keeps_its_thread():
    """The request is cancelled while its job runs: its wait ends at once, but the job runs on in the
    gate's only thread, and the next job starts only when it ends (no more jobs at once than turns)."""
    release = threading.Event()

    def blocked():
        release.wait(30)

    async def main():
        gate = PreprocessGate(1, "test")
        gone = asyncio.create_task(gate.run(blocked))
        await asyncio.sleep(0.05)
        gone.cancel()  # the client went away while its job ran
        with pytest.raises(asyncio.CancelledError):
            await gone
        following = asyncio.create_task(gate.run(lambda: "next"))
        await asyncio.sleep(0.2)
        assert not following.done()  # the thread is still the cancelled job's
        release.set()
        assert await following == "next"

    try:
        asyncio.run(asyncio.wait_for(main(), 30))
    finally:
        release.set()  # no thread left waiting, whatever failed


def test_work_for_a_ready_answer_is_not_aborted():
    """Formatting a finished request's answer (abortable=False) goes on through the drain's abort."""
    release = threading.Event()

    def formatting():
        release.wait(30)
        return "answer"

    async def main():
        gate = PreprocessGate(1, "test")
        answer = asyncio.create_task(gate.run(formatting, abortable=False))
        await asyncio.sleep(0.05)
        gate.abort()
        await asyncio.sleep(0.05)
        assert not answer.done()
        release.set()
        assert await answer == "answer"

    asyncio.run(asyncio.wait_for(main(), 30))


def test_a_request_whose_client_left_while_it_waits_is_dropped():
    """A body waiting for its parse turn, its client gone (the ASGI server's receive says
    http.disconnect): the wait ends at once with ClientDisconnected, and its job never runs."""
    release = threading.Event()
    ran: list[str] = []
    job = blocking_jobs(release, ran)

    async def main():
        gone = asyncio.Event()

        async def receive():  # as uvicorn's, once the body has been read
            await gone.wait()
            return {"type": "http.disconnect"}

        gate = PreprocessGate(1, "test")
        holder = asyncio.create_task(gate.run(job("holder")))
        waiting = asyncio.create_task(gate.run(job("waiting"), receive=receive))
        await asyncio.sleep(0.05)
        assert not waiting.done()
        gone.set()
        with pytest.raises(ClientDisconnected):
            await asyncio.wait_for(waiting, 5)
        release.set()
        assert await holder == "holder"
        assert await gate.run(job("next")) == "next"  # the turn came back
        assert ran == ["holder", "next"]  # the waiting job never ran

    asyncio.run(asyncio.wait_for(main(), 30))
