"""Engine replicas in processes of their own (``--data-parallel-size``, CPU): same tokens as one
engine, requests spread over the replicas, one shared queue bound, and a replica's death or the
front's exit handled (no request left hanging, no process left behind)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch

from engine import AsyncEngine, EngineDeadError, EngineSettings, QueueFullError, SamplingParams
from engine.replicas import ReplicatedEngine
from tests.processes import alive, kill_all, wait_gone
from tools.tiny_checkpoint import TinySpec, build_tiny_checkpoint

REPO_ROOT = Path(__file__).resolve().parents[1]
PARAMS = dict(max_tokens=40, max_denoising_steps=6, ignore_eos=True)
SHORT = SamplingParams(max_tokens=8, max_denoising_steps=2, ignore_eos=True)
ENDLESS = SamplingParams(max_tokens=4000, max_denoising_steps=6, ignore_eos=True)  # runs until aborted


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    # random weights in float32, the CPU default: near-flat distributions expose any last-bit difference
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny32"), TinySpec(dtype=torch.float32, seed=5))


@pytest.fixture(scope="module")
def replicated(checkpoint):
    eng = ReplicatedEngine(EngineSettings(model=str(checkpoint), data_parallel_size=2, max_num_seqs=4, max_waiting=2,
                                          num_threads=1))
    eng.start()
    yield eng
    eng.shutdown()


def _prompts(tokenizer) -> list[list[int]]:
    texts = ["a", "hello there", "the quick brown fox jumps", "0123456789 " * 3, "zz", "replicas"]
    return [tokenizer(t).input_ids for t in texts]


def _params(i: int, stop: tuple[str, ...] = ()) -> SamplingParams:
    """Mixed parameters: temperatures, logprobs, a logit bias, drafts; ``stop`` for request 5."""
    return SamplingParams(seed=100 + i, t_max=0.8 if i % 2 else None, logprobs=2 if i == 2 else None,
                          logit_bias=((70, 2.0),) if i == 3 else (), stream_drafts=i == 4,
                          stop=stop if i == 5 else (), **PARAMS)


async def _run_all(engine, prompts: list[tuple[int, list[int]]], tag: str,
                   stop: tuple[str, ...] = ()) -> dict[str, tuple[int, ...]]:
    async def one(i, prompt):
        outs = [o async for o in engine.generate(prompt, _params(i, stop), f"{tag}{i}")]
        assert outs[-1].finished and outs[-1].error is None, outs[-1]
        return (tuple(t for o in outs for t in o.token_ids), tuple(lp for o in outs for lp in o.logprobs or ()),
                len([o for o in outs if o.draft is not None]), "".join(o.text for o in outs), outs[-1].finish_reason)

    results = await asyncio.gather(*(one(i, p) for i, p in prompts))
    return {f"r{i}": r for (i, _), r in zip(prompts, results)}


def test_replicas_give_the_tokens_of_one_engine_alone(checkpoint, replicated):
    """Six seeded requests of different lengths and parameters at once over two replicas: each gets
    exactly the tokens, log-probabilities, drafts, text and finish reason (one stops at a string) it
    gets alone from an in-process engine (float32, random weights)."""
    prompts = list(enumerate(_prompts(replicated.tokenizer)))
    single = AsyncEngine(EngineSettings(model=str(checkpoint), max_num_seqs=1, num_threads=1))
    single.start()
    try:
        # request 5 stops at a string its text holds (a stop string cuts text the replica produced)
        text = asyncio.run(_run_all(single, [prompts[5]], "probe"))["r5"][3]
        stop = (text[20:22],)
        alone = {}
        for indexed in prompts:
            alone.update(asyncio.run(_run_all(single, [indexed], "alone", stop)))
    finally:
        single.shutdown()
    together = asyncio.run(_run_all(replicated, prompts, "together", stop))
    assert together == alone
    assert alone["r5"][4] == "stop" and len(alone["r5"][3]) < len(text)
    _wait_idle(replicated)  # the stop string's abort reaches its replica at that replica's next pass


def _wait_idle(engine, timeout: float = 60.0) -> None:
    """Until the engine holds no state (polls: aborts are freed at a replica's next pass; the timeout
    only bounds a hang)."""
    deadline = time.monotonic() + timeout
    while engine.num_live_states() or engine.num_running or engine.num_waiting:
        assert time.monotonic() < deadline, (engine.num_live_states(), engine.num_running, engine.num_waiting)
        time.sleep(0.02)


def test_requests_go_to_the_replica_with_fewest_unfinished(replicated):
    """Four requests in a row alternate between the two replicas; the queue bound counts both
    replicas' batches (2 x max_num_seqs 4) and max_waiting (2): 10 unfinished at most."""
    async def main():
        prompt = replicated.tokenizer("x").input_ids
        long = SamplingParams(max_tokens=400, max_denoising_steps=6, ignore_eos=True, seed=1)
        streams = [replicated.generate(prompt, long, f"spread{i}") for i in range(4)]
        assert sorted(replicated._replica_of[f"spread{i}"] for i in range(4)) == [0, 0, 1, 1]
        assert replicated.queue_bound() == 10
        more = [replicated.generate(prompt, long, f"more{i}") for i in range(6)]
        with pytest.raises(QueueFullError):
            replicated.generate(prompt, long, "one too many")
        for s in streams + more:
            await s.aclose()

    asyncio.run(main())
    _wait_idle(replicated)


def test_a_request_waits_for_whichever_replica_frees_a_place_first(checkpoint):
    """One waiting queue: with a place per replica, a long request on replica 0 and a short one on
    replica 1, a third request waits in the front and goes to replica 1 once the short one is done; in a
    replica's own queue it would wait for the long one. A request aborted while it waits there ends at
    once (counted as aborted), and an id aborted twice stays held until its replica dropped it."""
    sink = _Finished()
    eng = ReplicatedEngine(EngineSettings(model=str(checkpoint), data_parallel_size=2, max_num_seqs=1,
                                          num_threads=1), stats_sink=sink)
    finished: list[str] = []
    eng.start()
    try:
        async def main():
            prompt = eng.tokenizer("x").input_ids
            short, endless = SHORT, ENDLESS

            async def run(rid, params):
                outs = [o async for o in eng.generate(prompt, params, rid)]
                finished.append(rid)
                return outs[-1]

            long = asyncio.create_task(run("long", endless))
            await asyncio.sleep(0)
            first = asyncio.create_task(run("short1", short))
            await asyncio.sleep(0)
            assert (eng._replica_of, len(eng._waiting)) == ({"long": 0, "short1": 1}, 0)  # the front's queue
            gone = eng.generate(prompt, short, "gone")  # waits in the front: no replica has a place
            second = asyncio.create_task(run("short2", short))
            await asyncio.sleep(0)
            assert len(eng._waiting) == 2
            await gone.aclose()  # its client left while it waited
            assert sink.reasons.get("gone") == "abort" and "gone" not in eng._replica_of
            assert (await second).finish_reason == "length" and (await first).finish_reason == "length"
            assert eng._replica_of == {"long": 0}  # short2 ran on replica 1, beside the long request
            stream = eng.generate(prompt, endless, "twice")
            assert not (await stream.__anext__()).finished
            await stream.aclose()
            eng.abort("twice")  # a second abort while the first is on its way: the id stays held
            with pytest.raises(ValueError, match="still being dropped"):
                eng.generate(prompt, short, "twice")
            long.cancel()
            await asyncio.gather(long, return_exceptions=True)

        asyncio.run(main())
        assert finished == ["short1", "short2"]
        _wait_idle(eng)
    finally:
        eng.shutdown()


def test_a_request_goes_where_its_kv_fits_not_behind_a_long_one(checkpoint):
    """Places on both replicas, but a KV budget that holds a long request alone: a short request that
    the least loaded replica by count (the long one's) has no KV room for goes to the other one and
    finishes while the long one runs, rather than waiting in the long one's replica."""
    eng = ReplicatedEngine(EngineSettings(model=str(checkpoint), data_parallel_size=2, max_num_seqs=4,
                                          num_threads=1, max_num_kv_tokens=4000))
    eng.start()
    try:
        async def main():
            prompt = eng.tokenizer("x").input_ids
            short, endless = SHORT, ENDLESS
            long = eng.generate(prompt, endless, "long")
            first = eng.generate(prompt, short, "short1")
            second = eng.generate(prompt, short, "short2")
            assert eng._replica_of == {"long": 0, "short1": 1, "short2": 1}
            for stream in (first, second):
                assert [o async for o in stream][-1].finish_reason == "length"
            assert eng._replica_of == {"long": 0}  # both done while the long one runs
            await long.aclose()

        asyncio.run(main())
        _wait_idle(eng)
    finally:
        eng.shutdown()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="stops a process with SIGSTOP")
def test_a_request_sent_to_a_replica_counts_as_waiting_until_its_pass_takes_it(checkpoint):
    """As with one engine, a request is waiting from its submission: one sent to a replica that has not
    yet read it (stopped here, as in a long pass) counts, and stops counting once the replica runs it."""
    eng = ReplicatedEngine(EngineSettings(model=str(checkpoint), data_parallel_size=2, max_num_seqs=2, num_threads=1))
    eng.start()
    try:
        async def main():
            for pid in (p.pid for p in eng._procs):
                os.kill(pid, signal.SIGSTOP)
            try:
                stream = eng.generate(eng.tokenizer("x").input_ids, ENDLESS, "sent")
                assert (eng._replica_of, eng.num_waiting) == ({"sent": 0}, 1)
            finally:
                for pid in (p.pid for p in eng._procs):
                    os.kill(pid, signal.SIGCONT)
            assert not (await stream.__anext__()).finished  # the replica took it and runs it
            deadline = time.monotonic() + 60  # the gauges come with its next pass; this only bounds a hang
            while (eng.num_running, eng.num_waiting) != (1, 0):
                assert time.monotonic() < deadline, (eng.num_running, eng.num_waiting)
                await asyncio.sleep(0.01)
            await stream.aclose()

        asyncio.run(main())
        _wait_idle(eng)
    finally:
        eng.shutdown()


def test_replicas_serve_a_model_in_the_home_folder(tmp_path, monkeypatch):
    """--model ~/...: the front (its tokenizer) and each replica read the same local folder."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    build_tiny_checkpoint(tmp_path / "home" / "models" / "tiny", TinySpec(dtype=torch.float32))
    eng = ReplicatedEngine(EngineSettings(model="~/models/tiny", data_parallel_size=2, max_num_seqs=2, num_threads=1))
    eng.start()
    try:
        async def main():
            outs = [o async for o in eng.generate(eng.tokenizer("home").input_ids, SHORT, "home")]
            assert outs[-1].finish_reason == "length"

        asyncio.run(main())
    finally:
        eng.shutdown()


class _Finished:
    """The finish reason of each request the engine reported finished, by id."""

    def __init__(self):
        self.reasons: dict[str, str] = {}

    def on_pass(self, stats):
        pass

    def on_canvas(self, stats):
        pass

    def on_request_finished(self, stats):
        self.reasons[stats.request_id] = stats.finish_reason


def test_a_killed_replica_fails_open_requests_and_the_engine(checkpoint):
    """SIGKILL on one replica (as the OOM killer would): the request it was serving ends with an
    error naming it, the engine reports unhealthy and refuses new work, and the other replica stops."""
    eng = ReplicatedEngine(EngineSettings(model=str(checkpoint), data_parallel_size=2, num_threads=1))
    deliver = eng._deliver

    def late_closer(out):  # the closing thread falls behind the client it just ended, as under load
        deliver(out)
        if out.finished and out.error:
            time.sleep(0.3)

    eng._deliver = late_closer
    eng.start()
    try:
        async def main():
            prompt = eng.tokenizer("doomed").input_ids
            stream = eng.generate(prompt, SamplingParams(max_tokens=4000, max_denoising_steps=6, ignore_eos=True), "d")
            first = await stream.__anext__()  # it runs
            assert not first.finished
            os.kill(eng._procs[eng._replica_of["d"]].pid, signal.SIGKILL)
            return [o async for o in stream]

        outs = asyncio.run(main())
        assert outs[-1].finished and outs[-1].finish_reason == "abort"
        assert "engine replica" in outs[-1].error and "exited" in outs[-1].error
        # as soon as the stream has ended, the gauges no longer count it
        assert (eng.num_running, eng.num_waiting, eng.kv_usage, eng.num_live_states()) == (0, 0, 0.0, 0)
        assert not eng.healthy
        with pytest.raises(EngineDeadError):
            eng.admit(1)
        for proc in eng._procs:
            proc.join(10)
            assert not proc.is_alive()
        # nothing runs any more, and the gauges say so
        assert (eng.num_running, eng.num_waiting, eng.kv_usage, eng.num_live_states()) == (0, 0, 0.0, 0)
    finally:
        eng.shutdown()


def test_shutdown_ends_open_streams_and_stops_every_replica(checkpoint):
    eng = ReplicatedEngine(EngineSettings(model=str(checkpoint), data_parallel_size=2, num_threads=1))
    eng.start()

    async def main():
        prompt = eng.tokenizer("long").input_ids
        stream = eng.generate(prompt, SamplingParams(max_tokens=4000, max_denoising_steps=6, ignore_eos=True), "s")
        assert not (await stream.__anext__()).finished
        eng.shutdown()
        return [o async for o in stream]

    outs = asyncio.run(main())
    assert outs[-1].finish_reason == "abort" and outs[-1].error == "the engine shut down"
    assert not any(p.is_alive() for p in eng._procs) and not eng.healthy
    assert eng.num_live_states() == 0


def test_requests_that_cannot_cross_to_a_replica_fail_alone(replicated, tmp_path, monkeypatch):
    """A library caller's SamplingParams.extra that does not pickle (a lambda), or whose class exists
    only in the front (a notebook, a plugin): each such request ends with an error, and the engine
    serves the next one."""
    (tmp_path / "front_only.py").write_text("class Marker:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import front_only

    async def main():
        prompt = replicated.tokenizer("x").input_ids
        last = {}
        for name, extra in (("unpicklable", {"callback": lambda: None}), ("front-only", {"marker": front_only.Marker()}),
                            ("after", {})):
            params = SamplingParams(max_tokens=8, ignore_eos=True, extra=extra)
            last[name] = [o async for o in replicated.generate(prompt, params, name)][-1]
        return last

    last = asyncio.run(main())
    assert last["unpicklable"].finish_reason == "error" and "cannot reach an engine replica" in last["unpicklable"].error
    assert last["front-only"].finish_reason == "error" and "ModuleNotFoundError" in last["front-only"].error
    assert last["after"].finish_reason == "length" and replicated.healthy


def test_replicas_ignore_sigterm_so_the_front_can_drain(replicated):
    """A service manager may SIGTERM every process of the service: the replicas keep serving until
    the front stops them."""
    for proc in replicated._procs:
        os.kill(proc.pid, signal.SIGTERM)

    async def main():
        prompt = replicated.tokenizer("still here").input_ids
        return [o async for o in replicated.generate(prompt, SamplingParams(max_tokens=20, ignore_eos=True), "term")]

    assert asyncio.run(main())[-1].finish_reason == "length"
    assert replicated.healthy and all(p.is_alive() for p in replicated._procs)


def test_a_replica_that_cannot_load_raises_its_error(tmp_path):
    """A checkpoint the replicas cannot load: the front raises the replicas' own error, and no
    replica process is left."""
    (tmp_path / "config.json").write_text("{}")
    before = set(_children(os.getpid()))
    with pytest.raises(ValueError):
        ReplicatedEngine(EngineSettings(model=str(tmp_path), data_parallel_size=2))
    time.sleep(0.5)
    assert set(_children(os.getpid())) <= before


def test_a_missing_checkpoint_raises_the_loaders_own_error(tmp_path):
    """The loader's error for a folder that does not exist reaches the caller as it is (not as a replica
    that went away)."""
    from engine.errors import CheckpointError

    with pytest.raises(CheckpointError, match="nowhere: no such folder"):
        ReplicatedEngine(EngineSettings(model=str(tmp_path / "nowhere"), data_parallel_size=2))


EXIT_WITHOUT_SHUTDOWN = """
import sys
from engine import EngineSettings
from engine.replicas import ReplicatedEngine

if __name__ == "__main__":
    engine = ReplicatedEngine(EngineSettings(model=sys.argv[1], data_parallel_size=2, num_threads=1))
    engine.start()
    print(" ".join(str(p.pid) for p in engine._procs), flush=True)
"""


def test_a_script_that_exits_without_shutdown_leaves_no_replica(checkpoint, tmp_path):
    """A library script that never calls shutdown(): its exit stops the replicas (which ignore
    SIGTERM) without reporting them dead and without hanging."""
    script = tmp_path / "script.py"
    script.write_text(EXIT_WITHOUT_SHUTDOWN)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT))
    proc = subprocess.run([sys.executable, str(script), str(checkpoint)], capture_output=True, text=True,
                          timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "died" not in proc.stderr and "Bad file descriptor" not in proc.stderr, proc.stderr[-3000:]
    for pid in map(int, proc.stdout.split()):
        assert not alive(pid)


CONSTRUCT_ONLY = """
import sys
from engine import EngineSettings
from engine.replicas import ReplicatedEngine

if __name__ == "__main__":
    ReplicatedEngine(EngineSettings(model=sys.argv[1], data_parallel_size=2, num_threads=1))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_replicas_exit_when_the_front_is_killed_while_they_load(tmp_path):
    """SIGKILL on the front while its replicas load (storage that never answers: the weights file is a
    FIFO no one writes): the replicas exit within seconds, not after a load that could take minutes."""
    from tools.quantized_checkpoint import write_quantized_checkpoint

    # the compressed-tensors loader opens the weights itself (a FIFO's open waits for a writer)
    folder = write_quantized_checkpoint(build_tiny_checkpoint(tmp_path / "plain", TinySpec(hidden_size=64)),
                                        tmp_path / "fp8", "fp8")
    (folder / "model.safetensors").unlink()
    os.mkfifo(folder / "model.safetensors")
    script = tmp_path / "front.py"
    script.write_text(CONSTRUCT_ONLY)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT))
    proc = subprocess.Popen([sys.executable, str(script), str(folder)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    replicas: list[int] = []
    try:
        deadline = time.monotonic() + 120
        # both replicas are in the load, waiting on the FIFO, and nothing else
        while len(replicas) < 2 or not all(_opening_fifo(r) for r in replicas):
            assert time.monotonic() < deadline and proc.poll() is None, replicas
            replicas = _children(proc.pid)
            time.sleep(0.1)
        proc.kill()
        proc.wait(10)
        wait_gone(replicas, 15, "a replica outlived its front")
    finally:
        proc.kill()
        kill_all(replicas)


def _opening_fifo(pid: int) -> bool:
    """Whether a thread of ``pid`` waits in open(2) for a FIFO's writer."""
    try:
        return any((t / "wchan").read_text() == "wait_for_partner" for t in Path(f"/proc/{pid}/task").iterdir())
    except FileNotFoundError:
        return False


def test_replicas_are_refused_on_cuda(checkpoint):
    with pytest.raises(ValueError, match="data_parallel_size applies to CPU serving"):
        ReplicatedEngine(EngineSettings(model=str(checkpoint), data_parallel_size=2, device="cuda"))


def _children(pid: int) -> list[int]:
    """The replica processes ``pid`` started (not multiprocessing's resource tracker)."""
    from bench.run import descendants

    return [c for c in descendants(pid) if "spawn_main" in _cmdline(c)]


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().decode(errors="replace")
    except FileNotFoundError:
        return ""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_server_with_replicas_serves_and_leaves_no_process_behind(server_launcher, server_tiny_checkpoint):
    """``--data-parallel-size 2`` over HTTP: a completion equals the one-engine server's, the
    metrics count both replicas' work; after SIGKILL of the server, its replicas exit on their own."""
    body = {"prompt": "replicated", "max_tokens": 24, "seed": 9, "ignore_eos": True}
    srv = server_launcher(["--model", str(server_tiny_checkpoint), "--data-parallel-size", "2"])
    one = server_launcher(["--model", str(server_tiny_checkpoint), "--data-parallel-size", "1"])
    replicas = _children(srv.proc.pid)
    assert len(replicas) == 2 and not _children(one.proc.pid)
    texts = [httpx.post(s.base_url + "/completions", json=body, timeout=60).json()["choices"][0]["text"]
             for s in (srv, one)]
    assert texts[0] == texts[1]
    # the replicas' statistics reach the front's metrics: the same counts as the one-engine server's
    counted = [("diffusion_server:request_success_total", frozenset({("finished_reason", "length")})),
               ("diffusion_server:denoising_steps_total", frozenset()), ("diffusion_server:canvases_total", frozenset()),
               ("diffusion_server:engine_live_states", frozenset())]
    m, m1 = srv.wait_idle(), one.wait_idle()
    assert [m[k] for k in counted] == [m1[k] for k in counted] and m[counted[0]] == 1 and m[counted[1]] > 0
    srv.proc.kill()
    srv.proc.wait(10)
    wait_gone(replicas, 30, "a replica outlived its server")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_drain_ends_a_request_whose_replica_is_stuck_in_a_pass(server_launcher, server_tiny_checkpoint):
    """SIGTERM past the drain timeout while the replicas are stopped mid-pass (as in a long pass): the
    client still gets the 503 request_aborted body at once, not a cut connection or a bare 500 when
    the server gives up waiting, and the server stops its replicas and exits 0."""
    srv = server_launcher(["--model", str(server_tiny_checkpoint), "--data-parallel-size", "2",
                           "--graceful-shutdown-seconds", "1"])
    replicas = _children(srv.proc.pid)
    slow = {"prompt": "stuck", "max_tokens": 4000, "ignore_eos": True, "max_denoising_steps": 64,
            "stability_threshold": 1000}
    answer: dict = {}
    client = threading.Thread(target=lambda: answer.update(
        r=httpx.post(srv.base_url + "/completions", json=slow, timeout=120)))
    try:
        client.start()
        deadline = time.monotonic() + 60  # only bounds a hang: returns once the request runs
        while srv.metrics()[("diffusion_server:num_requests_running", frozenset())] < 1:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        for pid in replicas:
            os.kill(pid, signal.SIGSTOP)
        srv.proc.send_signal(signal.SIGTERM)
        client.join(120)
        r = answer["r"]
        assert r.status_code == 503 and r.json()["error"]["code"] == "request_aborted", r.text
        assert srv.proc.wait(60) == 0
        wait_gone(replicas, 30, "a stopped replica outlived its server")
    finally:
        kill_all(replicas)
