"""Randomized schedules (hypothesis, derandomized: the same examples every run): arrivals at random
passes, aborts, stop strings, several canvases, prompt lengths, step counts and a KV budget that
holds only a few requests at once. Every example checks the scheduler's invariants:

- every request finishes exactly once, and nothing arrives for it after that;
- its tokens are its solo run's (a prefix of them when aborted or cut by a stop string, whose text
  is then the solo text up to the stop string);
- first done, first out: a request that runs to its end takes as many passes as it takes alone
  (nobody holds it back), and it leaves the running set in the pass that finishes it;
- a waiting request joins at the next pass unless the batch is full or the KV budget is spent, and
  requests are admitted in arrival order;
- the running set never exceeds max_num_seqs or the KV budget, and nothing is left when all is done.

The engine is driven pass by pass, as AsyncEngine's step loop does; stop strings are found by the
engine's own IncrementalDetokenizer and end the request with ``abort_request(id, "stop")``, as
``RequestStream`` does.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine import EngineCore, EngineSettings, SamplingParams
from engine.detokenizer import IncrementalDetokenizer
from engine.kv_budget import kv_reservation, kv_tokens_needed
from engine.loader import load_model
from tools.tiny_checkpoint import TinySpec, build_tiny_checkpoint

MAX_NUM_SEQS = 4
KV_BUDGET = 160  # token slots: two long requests, or four short ones (slot rows are powers of two)
CANVAS = 16


@pytest.fixture(scope="module")
def core(tmp_path_factory) -> EngineCore:
    path = build_tiny_checkpoint(tmp_path_factory.mktemp("tiny_random_schedules"), TinySpec())
    settings = EngineSettings(model=str(path), max_num_seqs=MAX_NUM_SEQS, max_num_kv_tokens=KV_BUDGET)
    return EngineCore(load_model(settings), settings)


@dataclass
class Spec:
    rid: str
    prompt: list[int]
    params: SamplingParams
    arrival: int  # submitted before this pass (0-based pass count)
    abort_after: int | None  # passes after its submission at which the client hangs up
    stop_at: float | None  # where in its solo text to take a one-character stop string


@dataclass
class Run:
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    finishes: list[str] = field(default_factory=list)  # finish reasons seen (must be exactly one)
    submitted: int | None = None  # passes done when it was submitted
    aborted_before: int | None = None  # passes done when the client hung up (if it did)
    draft_passes: list[int] = field(default_factory=list)  # 1-based passes in which it took a step
    finished_pass: int | None = None
    late_outputs: int = 0  # outputs after its finish


def requests_strategy():
    one = st.fixed_dictionaries({
        "prompt": st.lists(st.integers(5, 260), min_size=1, max_size=40),
        "max_tokens": st.integers(1, 3 * CANVAS),
        "steps": st.integers(1, 4),
        "k": st.integers(0, 2),
        "confidence": st.sampled_from([0.005, 100.0]),
        "ignore_eos": st.booleans(),
        "seed": st.integers(0, 2**31),
        "arrival": st.integers(0, 6),
        "abort_after": st.one_of(st.none(), st.integers(0, 10)),
        "stop_at": st.one_of(st.none(), st.floats(0.0, 1.0)),
    })
    return st.lists(one, min_size=1, max_size=7)


def to_specs(drawn) -> list[Spec]:
    return [Spec(f"r{i}", d["prompt"],
                 SamplingParams(max_tokens=d["max_tokens"], max_denoising_steps=d["steps"], stability_threshold=d["k"],
                                confidence_threshold=d["confidence"], ignore_eos=d["ignore_eos"], seed=d["seed"],
                                stream_drafts=True),
                 d["arrival"], d["abort_after"], d["stop_at"])
            for i, d in enumerate(drawn)]


def drive(core: EngineCore, specs: list[Spec], stops: dict[str, str]) -> tuple[dict[str, Run], int]:
    """Run ``specs`` to the end, checking the per-pass invariants; returns each request's run and the
    number of passes."""
    tok = core.loaded.tokenizer
    runs = {s.rid: Run() for s in specs}
    detoks = {s.rid: IncrementalDetokenizer(tok, (stops[s.rid],) if s.rid in stops else ()) for s in specs}
    pending = sorted(specs, key=lambda s: s.arrival)  # stable: same-pass arrivals in list order
    passes = 0

    def finish(rid: str, reason: str) -> None:
        run = runs[rid]
        run.finishes.append(reason)
        run.finished_pass = passes

    def record(out) -> None:
        run = runs[out.request_id]
        if run.finishes:
            run.late_outputs += 1
            return
        if out.draft is not None:
            run.draft_passes.append(passes)
        run.tokens.extend(out.token_ids)
        detok = detoks[out.request_id]
        if out.token_ids or out.finished:
            run.text += detok.add(out.token_ids, final=out.finished)
        if detok.stopped:  # the caller found a stop string: it ends the request (RequestStream)
            del run.tokens[detok.num_tokens_at_stop:]
            finish(out.request_id, "stop-string")
            confirm = core.abort_request(out.request_id, "stop")
            assert (confirm is None) == out.finished  # still running unless this output finished it
        elif out.finished:
            finish(out.request_id, out.finish_reason)

    while pending or core.has_work():
        while pending and pending[0].arrival <= passes:
            s = pending.pop(0)
            core.add_request(s.rid, s.prompt, core.resolve(s.prompt, s.params))
            runs[s.rid].submitted = passes
        for s in specs:
            run = runs[s.rid]
            if s.abort_after is not None and run.submitted is not None and run.submitted + s.abort_after == passes:
                out = core.abort_request(s.rid)
                if run.finishes:
                    assert out is None  # already finished: aborting again is a no-op
                else:
                    assert out is not None and out.finished and out.finish_reason == "abort"
                    run.aborted_before = passes
                    finish(s.rid, "abort")
        outputs = core.step()
        passes += 1
        for out in outputs:
            record(out)
        sched = core.scheduler
        running = {r.request_id for r in sched.running}
        assert len(running) <= MAX_NUM_SEQS
        assert sched.reserved_kv_tokens <= KV_BUDGET
        for rid, run in runs.items():  # first done, first out: a finished request has left at once
            if run.finishes:
                assert rid not in running and all(r.request_id != rid for r in sched.waiting)
        assert passes < 10_000
    return runs, passes


def solo(core, spec: Spec, cache: dict) -> Run:
    key = (tuple(spec.prompt), spec.params)
    if key not in cache:
        alone = Spec(spec.rid, spec.prompt, spec.params, 0, None, None)
        cache[key] = drive(core, [alone], {})[0][spec.rid]
    return cache[key]


def stop_string(text: str, at: float) -> str | None:
    """A printable ASCII character of ``text`` at or after fraction ``at`` of it (None if there is none)."""
    start = int(at * len(text))
    return next((ch for ch in text[start:] if ch.isascii() and ch.isprintable()), None)


@settings(max_examples=25, derandomize=True, database=None, deadline=None, print_blob=False,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(drawn=requests_strategy())
def test_random_schedules_keep_the_invariants(core, drawn):
    assert not core.has_work() and core.num_live_states() == 0
    specs = to_specs(drawn)
    cache: dict = {}
    alone = {s.rid: solo(core, s, cache) for s in specs}
    stops = {}
    for s in specs:
        if s.stop_at is not None and (ch := stop_string(alone[s.rid].text, s.stop_at)) is not None:
            stops[s.rid] = ch
    runs, passes = drive(core, specs, stops)

    for s in specs:
        run, ref = runs[s.rid], alone[s.rid]
        assert len(run.finishes) == 1 and run.late_outputs == 0, (s.rid, run.finishes, run.late_outputs)
        reason = run.finishes[0]
        assert reason in ("stop", "length", "abort", "stop-string"), reason
        assert run.tokens == ref.tokens[: len(run.tokens)], s.rid  # the solo tokens, or a prefix of them
        if reason == "stop-string":
            assert run.text == ref.text[: ref.text.index(stops[s.rid])], s.rid
        elif reason != "abort":  # ran to its end: all of the solo run, in as many passes as alone
            assert (run.tokens, reason, run.text) == (ref.tokens, ref.finishes[0], ref.text), s.rid
            assert run.finished_pass - run.draft_passes[0] == ref.finished_pass - ref.draft_passes[0], s.rid
        if run.draft_passes:  # a step every pass from admission to its end (no request is paused)
            assert run.draft_passes == list(range(run.draft_passes[0], run.draft_passes[-1] + 1)), s.rid

    # a waiting request joins at the next pass unless the batch is full or the KV budget is spent
    reservation = {s.rid: kv_reservation(len(s.prompt), s.params.max_tokens, CANVAS) for s in specs}
    order = sorted(specs, key=lambda s: (runs[s.rid].submitted, int(s.rid[1:])))
    for k in range(1, passes + 1):
        stepping = [s.rid for s in specs if k in runs[s.rid].draft_passes]
        waiting = [s.rid for s in order
                   if runs[s.rid].submitted < k and not (runs[s.rid].draft_passes and runs[s.rid].draft_passes[0] <= k)
                   and (runs[s.rid].aborted_before is None or runs[s.rid].aborted_before >= k)]
        if waiting:
            head = reservation[waiting[0]]
            assert (len(stepping) == MAX_NUM_SEQS
                    or kv_tokens_needed([reservation[r] for r in stepping] + [head], MAX_NUM_SEQS) > KV_BUDGET), \
                (k, stepping, waiting)
    admitted = [s.rid for s in order if runs[s.rid].draft_passes]
    firsts = [runs[rid].draft_passes[0] for rid in admitted]
    assert firsts == sorted(firsts), "admission in arrival order"

    assert not core.has_work()
    assert core.num_live_states() == 0 and core.scheduler.reserved_kv_tokens == 0
    assert core.runner.kv.nbytes() == 0
