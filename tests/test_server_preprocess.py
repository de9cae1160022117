"""The preprocessing turns (``server.preprocess.PreprocessGate``): at most that many jobs at once; once the
drain's time is up, a request that waits for a turn or for its job is answered at once; a turn comes back
whether the job ended, was aborted or its request went away."""

from __future__ import annotations

import asyncio
import threading

import pytest

from server.errors import APIError, ClientDisconnected
from server.preprocess import PreprocessGate


def test_jobs_take_turns_and_an_abort_answers_the_waiting_at_once():
    release = threading.Event()
    started: list[str] = []

    def job(name: str):
        def work():
            started.append(name)
            release.wait(30)
            return name
        return work

    async def main():
        gate = PreprocessGate(1)
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


def test_a_turn_comes_back_when_its_request_goes_away():
    release = threading.Event()

    def blocked():
        release.wait(30)

    async def main():
        gate = PreprocessGate(1)
        gone = asyncio.create_task(gate.run(blocked))
        await asyncio.sleep(0.05)
        gone.cancel()  # the client went away while its job ran: the job runs on, the turn is free
        with pytest.raises(asyncio.CancelledError):
            await gone
        assert await gate.run(lambda: "next") == "next"
        release.set()

    asyncio.run(asyncio.wait_for(main(), 30))


def test_work_for_a_ready_answer_is_not_aborted():
    """Formatting a finished request's answer (abortable=False) goes on through the drain's abort."""
    release = threading.Event()

    def formatting():
        release.wait(30)
        return "answer"

    async def main():
        gate = PreprocessGate(1)
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

    def job(name: str):
        def work():
            ran.append(name)
            release.wait(30)
            return name
        return work

    async def main():
        gone = asyncio.Event()

        async def receive():  # as uvicorn's, once the body has been read
            await gone.wait()
            return {"type": "http.disconnect"}

        gate = PreprocessGate(1)
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
