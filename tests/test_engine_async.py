"""The asyncio face: streamed outputs, drafts, stop strings, abort on close, queue limits."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch

from engine import AsyncEngine, EngineSettings, QueueFullError, SamplingParams
from tools.tiny_checkpoint import TinySpec, build_tiny_checkpoint


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    path = build_tiny_checkpoint(tmp_path_factory.mktemp("tiny64"), TinySpec(dtype=torch.float64))
    eng = AsyncEngine(EngineSettings(model=str(path), dtype="float64", max_num_seqs=4, max_waiting=4))
    eng.start()
    yield eng
    eng.shutdown()


async def _collect(engine, prompt_ids, params, rid):
    return [out async for out in engine.generate(prompt_ids, params, rid)]


async def eventually(condition, what: str, timeout: float = 60.0) -> None:
    """Until ``condition()`` holds. The step-loop thread frees an aborted request at its next pass and
    offers no event to wait on from outside, so this polls; it returns as soon as the condition holds,
    and the timeout only bounds a hang (it is no claim about speed)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


def test_stream_text_drafts_and_counts(engine):
    tok = engine.tokenizer
    prompt = tok("hello").input_ids
    params = SamplingParams(max_tokens=40, seed=11, max_denoising_steps=4, ignore_eos=True, stream_drafts=True)
    outs = asyncio.run(_collect(engine, prompt, params, "s1"))
    tokens = [t for o in outs for t in o.token_ids]
    assert len(tokens) == 40 and outs[-1].finish_reason == "length"
    assert "".join(o.text for o in outs) == tok.decode(tokens, skip_special_tokens=True)
    drafts = [o.draft for o in outs if o.draft is not None]
    assert [(d.canvas, d.step) for d in drafts] == [(c, s) for c in range(3) for s in range(1, 5)]
    # the last draft of each canvas is what it commits (before the length trim)
    commits = [o.token_ids for o in outs if o.token_ids]
    for canvas, committed in enumerate(commits):
        last = [d for d in drafts if d.canvas == canvas][-1]
        assert last.token_ids[: len(committed)] == committed
    # `changed` lists exactly the positions that differ from the previous draft
    for prev, cur in zip(drafts, drafts[1:]):
        if cur.canvas == prev.canvas:
            assert cur.changed == tuple(i for i in range(16) if cur.token_ids[i] != prev.token_ids[i])
    assert outs[-1].num_generated_tokens == 40 and outs[-1].num_canvases == 3


def test_stop_string_cuts_text_and_counts_tokens(engine):
    tok = engine.tokenizer
    prompt = tok("stop here").input_ids
    base = SamplingParams(max_tokens=32, seed=5, max_denoising_steps=3, ignore_eos=True)
    full = asyncio.run(_collect(engine, prompt, base, "free"))
    text = "".join(o.text for o in full)
    tokens = [t for o in full for t in o.token_ids]
    stop = text[20:22]
    assert stop and text.find(stop) >= 1
    cut = text.find(stop)
    outs = asyncio.run(_collect(engine, prompt, SamplingParams(**{**base.__dict__, "stop": (stop,)}), "stopped"))
    assert "".join(o.text for o in outs) == text[:cut]
    assert outs[-1].finish_reason == "stop"
    n = outs[-1].num_generated_tokens
    assert stop in tok.decode(tokens[:n]) and stop not in tok.decode(tokens[: n - 1])


def test_closing_the_stream_aborts_the_request(engine):
    tok = engine.tokenizer
    prompt = tok("long one").input_ids
    params = SamplingParams(max_tokens=160, seed=1, max_denoising_steps=8, ignore_eos=True, stream_drafts=True)

    async def first_then_leave():
        gen = engine.generate(prompt, params, "leaver")
        first = await gen.__anext__()
        await gen.aclose()
        return first

    first = asyncio.run(first_then_leave())
    assert first.draft is not None

    asyncio.run(eventually(lambda: engine.num_live_states() == 0, "the aborted request's state to be freed"))


def test_queue_full_is_raised_before_any_output(engine):
    tok = engine.tokenizer
    prompt = tok("q").input_ids
    params = SamplingParams(max_tokens=64, max_denoising_steps=8, ignore_eos=True)

    async def flood():
        tasks = [asyncio.create_task(_collect(engine, prompt, params, f"f{i}")) for i in range(12)]
        return await asyncio.gather(*tasks, return_exceptions=True)

    results = asyncio.run(flood())
    rejected = [r for r in results if isinstance(r, QueueFullError)]
    served = [r for r in results if isinstance(r, list)]
    assert len(rejected) == 4 and len(served) == 8  # 4 running + 4 waiting
    assert [(r[-1].finish_reason, r[-1].num_generated_tokens) for r in served] == [("length", 64)] * 8


def test_the_queue_bound_is_checked_at_the_front_door(engine):
    """The engine's one queue bound: with max_num_seqs + max_waiting (4 + 4) requests unfinished, the
    next ``generate`` raises QueueFullError at once; closing a stream frees its place at once."""
    prompt = engine.tokenizer("q").input_ids
    params = SamplingParams(max_tokens=64, max_denoising_steps=8, ignore_eos=True)

    async def scenario():
        streams = [engine.generate(prompt, params, f"b{i}") for i in range(8)]
        with pytest.raises(QueueFullError):
            engine.generate(prompt, params, "b8")
        await streams[0].aclose()
        streams.append(engine.generate(prompt, params, "b8"))
        for stream in streams[1:]:
            await stream.aclose()
        await eventually(lambda: engine.num_live_states() == 0 and engine.kv_usage == 0.0,
                         "every closed stream's state and KV to be freed")

    asyncio.run(scenario())


def test_after_shutdown_generate_refuses_and_nothing_hangs(tmp_path):
    from engine import EngineDeadError

    path = build_tiny_checkpoint(tmp_path / "m", TinySpec())
    eng = AsyncEngine(EngineSettings(model=str(path)))
    eng.start()
    prompt = eng.tokenizer("x").input_ids
    params = SamplingParams(max_tokens=400, max_denoising_steps=8, ignore_eos=True)

    async def scenario():
        running = eng.generate(prompt, params, "inflight")
        first = await running.__anext__()
        eng.shutdown()
        rest = [o async for o in running]  # the in-flight request ends, it does not hang
        with pytest.raises(EngineDeadError):
            eng.generate(prompt, params, "late")
        return first, rest

    first, rest = asyncio.run(scenario())
    assert not eng.healthy
    assert rest and rest[-1].finished and rest[-1].finish_reason == "abort"


def test_an_id_is_not_reused_before_its_abort_is_taken(engine):
    """A stream closed early aborts its request; the id is refused until the passes have dropped that
    request, so a new request under the same id never gets the old one's outputs and is not orphaned."""
    tok = engine.tokenizer
    old = SamplingParams(max_tokens=160, seed=1, max_denoising_steps=8, ignore_eos=True, stream_drafts=True)
    new = SamplingParams(max_tokens=24, seed=2, max_denoising_steps=4, ignore_eos=True)
    prompt = tok("reused").input_ids

    async def scenario():
        alone = [out async for out in engine.generate(prompt, new, "alone")]
        gen = engine.generate(prompt, old, "reused")
        await gen.__anext__()
        with engine._lock:  # holds the step loop back from settling the abort, so the refusal is seen for sure
            await gen.aclose()  # the abort is queued; the old request is still in the engine until a pass takes it
            with pytest.raises(ValueError, match="duplicate request id 'reused'"):
                engine.generate(prompt, new, "reused")
        while True:
            try:
                stream = engine.generate(prompt, new, "reused")
                break
            except ValueError as exc:
                assert "duplicate request id 'reused'" in str(exc)
                await asyncio.sleep(0.001)
        outs = [out async for out in stream]
        return alone, outs

    alone, outs = asyncio.run(scenario())
    assert outs[-1].finish_reason == "length"
    assert [t for o in outs for t in o.token_ids] == [t for o in alone for t in o.token_ids]
    asyncio.run(eventually(lambda: engine.num_live_states() == 0, "every request to be freed"))


def test_an_unknown_abort_reason_is_refused_and_the_engine_goes_on(engine):
    with pytest.raises(ValueError, match="abort reason must be one of abort, stop"):
        engine.abort("anything", "cancelled")
    tok = engine.tokenizer
    outs = asyncio.run(_collect(engine, tok("after").input_ids, SamplingParams(max_tokens=8, seed=1), "after"))
    assert outs[-1].finished and engine.healthy


class _FinishedRequests:
    """A stats sink keeping each finished request's ``RequestStats``."""

    def __init__(self):
        self.requests = {}

    def on_pass(self, stats):
        pass

    def on_canvas(self, stats):
        pass

    def on_request_finished(self, stats):
        self.requests[stats.request_id] = stats


def test_a_request_submitted_during_a_pass_waits_and_is_timed_from_its_submission(tmp_path, monkeypatch):
    """The passes take new requests only between two of them: one submitted during a pass counts as
    waiting at once (the gauges are otherwise published after each pass), and its queue time (and so its
    latencies) starts at its submission, not when the pass ends."""
    path = build_tiny_checkpoint(tmp_path / "tiny", TinySpec(dtype=torch.float64))
    sink = _FinishedRequests()
    eng = AsyncEngine(EngineSettings(model=str(path), dtype="float64", max_num_seqs=2, max_waiting=2), sink)
    in_pass, release = threading.Event(), threading.Event()
    execute = eng.core.runner.execute

    def held_pass(plan):  # the first pass waits for the test
        if not in_pass.is_set():
            in_pass.set()
            assert release.wait(60)
        return execute(plan)

    monkeypatch.setattr(eng.core.runner, "execute", held_pass)
    eng.start()
    params = SamplingParams(max_tokens=8, seed=1, max_denoising_steps=2)
    prompt = eng.tokenizer("timed").input_ids

    async def scenario():
        first = eng.generate(prompt, params, "first")
        assert await asyncio.to_thread(in_pass.wait, 60)
        before = eng.num_waiting
        submitted = time.monotonic()
        second = eng.generate(prompt, params, "second")
        returned = time.monotonic()
        waiting = eng.num_waiting - before
        await asyncio.sleep(0.3)
        release.set()
        for stream in (first, second):
            assert [out async for out in stream][-1].finish_reason == "length"
        return submitted, returned, waiting

    try:
        submitted, returned, waiting = asyncio.run(scenario())
    finally:
        release.set()
        eng.shutdown()
    assert waiting == 1
    stats = sink.requests["second"]
    assert submitted <= stats.arrival_time <= returned
    assert stats.scheduled_time - stats.arrival_time >= 0.3
