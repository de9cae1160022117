"""The benchmark's own smoke run: a real server on the tiny bench model, two levels, both baselines."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT


def test_bench_run_writes_results_with_ratios(tmp_path):
    out = tmp_path / "bench"
    cmd = [sys.executable, "-m", "bench.run", "--model", str(tmp_path / "model"), "--concurrency", "1,2",
           "--requests-per-level", "3", "--steps", "2", "--canvases", "1,2", "--prompt-len", "4,8",
           "--warmup", "1", "--rounds", "2", "--out", str(out)]
    from bench.run import build_bench_model

    build_bench_model(tmp_path / "model")
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "bench.json").read_text())
    assert [r["concurrency"] for r in result["runs"]] == [1, 2]
    for run in result["runs"]:
        assert (run["requests_ok"], run["errors"]) == (3, [])
        # 1-2 canvases of 32 tokens each, every token committed (fixed-length outputs)
        assert run["tokens"] in range(3 * 32, 3 * 64 + 1) and run["tokens"] % 32 == 0
        assert run["steps_per_canvas"] <= 2
    assert set(result["baselines"]["static_batch"]) == {"2"}
    # each level's baselines ran its own requests (the ratios compare the same work)
    alone = result["baselines"]["one_at_a_time"]
    assert set(alone) == {"1", "2"}
    static_batch = result["baselines"]["static_batch"]
    assert (static_batch["2"]["requests"], static_batch["2"]["batch_size"]) == (3, 2)
    md = (out / "bench.md").read_text()
    for run in result["runs"]:
        level = str(run["concurrency"])
        static = static_batch.get(level, alone[level])  # at concurrency 1 a static batch is one at a time
        assert (alone[level]["requests"], alone[level]["tokens"], static["tokens"]) == (3, run["tokens"], run["tokens"])
        # every throughput is its own measured tokens over its own measured wall time, the fastest of
        # its two rounds (a baseline's: of two rounds at each thread count, 1 and the usable CPUs) ...
        assert len(run["rounds_tokens_per_s"]) == 2
        for baseline in (alone[level], static):
            assert baseline["rounds_threads"] == [t for t in result["baseline_threads"] for _ in range(2)]
            assert baseline["threads"] == baseline["rounds_threads"][
                baseline["rounds_tokens_per_s"].index(baseline["tokens_per_s"])]
        for measured in (run, alone[level], static):
            assert measured["tokens_per_s"] == max(measured["rounds_tokens_per_s"])
            assert measured["seconds"] > 0
            assert measured["tokens_per_s"] == pytest.approx(measured["tokens"] / measured["seconds"], rel=1e-9)
        # ... and each ratio is this run's throughput over its baseline's, for the same requests
        assert run["ratio_vs_one_at_a_time"] == pytest.approx(run["tokens_per_s"] / alone[level]["tokens_per_s"],
                                                              rel=1e-9)
        assert run["ratio_vs_static_batch"] == pytest.approx(run["tokens_per_s"] / static["tokens_per_s"], rel=1e-9)
        # the report prints those numbers
        assert (f"| {run['concurrency']} | 3/3 | {run['tokens_per_s']:.0f} | {run['ratio_vs_one_at_a_time']:.2f}x | "
                f"{run['ratio_vs_static_batch']:.2f}x |") in md
    assert result["runs"][0]["ratio_vs_static_batch"] == result["runs"][0]["ratio_vs_one_at_a_time"]
    # canvas steps: the server takes generate's steps for each request, as generate does alone; a static
    # batch computes each of its rows for as many canvases as its longest request and, on this random
    # model (whose canvases never converge early), for every one of their 2 steps
    from bench.workload import make_workload

    for run in result["runs"]:
        level = run["concurrency"]
        items = make_workload(3, seed=level, vocab_low=5, vocab_high=260, canvas_length=32, prompt_len=(4, 8),
                              canvases=(1, 2), max_denoising_steps=2)
        assert run["canvas_steps"] == alone[str(level)]["canvas_steps"] == sum(2 * it.max_tokens // 32 for it in items)
    batches = [items[:2], items[2:]]
    assert static_batch["2"]["canvas_steps"] == sum(2 * len(b) * max(it.max_tokens for it in b) // 32 for b in batches)
    padding = static_batch["2"]["canvas_steps"] / alone["2"]["canvas_steps"]
    # the server's log goes to a file (an unread pipe filled up after ~340 requests and hung the server)
    # (1 warm-up + two rounds of 3 at each of the two levels + the check's run of concurrency 2 + 3 sent again alone)
    assert (out / "server.log").read_text().count("completions status=200") == 1 + 2 * 3 + 2 * 3 + 3 + 3
    assert result["rounds"] == 2 and "each measurement the fastest of 2 rounds" in md
    # the first 3 requests of concurrency 2, sent again one at a time, get the same tokens and text
    check = result["outputs_alone"]
    assert (check["concurrency"], check["checked"], check["identical"], check["failed"]) == (2, 3, 3, 0)
    # every committed token of the 3 was compared (the same requests as the level's: the same count)
    assert check["tokens"] == result["runs"][1]["tokens"]
    assert "| 2 | 3/3 |" in md
    # baselines: concurrency, requests, one at a time, static batch (none at concurrency 1)
    cell = r"\d+ \(\d+ threads?\)"
    assert re.search(rf"^\| 1 \| 3 \| {cell} \| — \| — \|$", md, re.M)
    assert re.search(rf"^\| 2 \| 3 \| {cell} \| {cell} \| {padding:.2f}x \|$", md, re.M)
    from engine.cpu_threads import usable_cpus

    assert result["baseline_threads"] == sorted({1, usable_cpus()})
    assert ("Outputs at concurrency 2 identical (tokens and text) to the same requests sent alone (same seeds, one "
            "at a time): 3/3.") in md



def test_bench_against_a_dead_url_reports_the_failures(tmp_path):
    """Every request failing (nothing listens there) is reported per level and in the exit status,
    not hidden behind a traceback or a zero exit."""
    with socket.socket() as bound:  # bound and never listening: every connection is refused
        bound.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{bound.getsockname()[1]}/v1"
        cmd = [sys.executable, "-m", "bench.run", "--url", url, "--model-name", "m", "--no-baselines",
               "--concurrency", "2", "--requests-per-level", "3", "--warmup", "0", "--out", str(tmp_path / "bench")]
        proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "concurrency 2: 0 tok/s, 0/3 ok, p50 n/a" in proc.stdout
    assert "  failed: ConnectError" in proc.stdout
    assert "3 of 3 requests failed" in proc.stderr
    assert f"· server: {url} · load generated on: " in proc.stdout  # not this machine's threads
    assert json.loads((tmp_path / "bench" / "bench.json").read_text())["runs"][0]["requests_ok"] == 0

def _round(tokens_per_s: float, ok: int, errors=()) -> dict:
    return dict(requests=4, requests_ok=ok, tokens_per_s=tokens_per_s, errors=list(errors))


def test_a_level_keeps_its_fastest_clean_round_and_reports_every_failure():
    """--rounds: a round with failures is not kept while a clean one exists (failing requests free their
    slots early and can make a round look fast), and failures of any round stay in the report."""
    from bench.report import _requests
    from bench.run import kept_round

    run = kept_round([_round(90.0, 4), _round(120.0, 3, ["503 full"]), _round(100.0, 4)])
    assert (run["tokens_per_s"], run["requests_ok"]) == (100.0, 4)
    assert run["rounds_tokens_per_s"] == [90.0, 120.0, 100.0] and run["rounds_failed"] == [0, 1, 0]
    assert run["errors"] == ["503 full"]
    # the report shows the round kept and the failures of the others
    assert _requests(run) == "4/4 (1 failed in other rounds)"
    assert _requests(kept_round([_round(90.0, 4)])) == "4/4"
    # no clean round: the fastest, with its failures
    run = kept_round([_round(90.0, 2, ["a", "b"]), _round(120.0, 3, ["c"])])
    assert (run["tokens_per_s"], run["rounds_failed"], run["errors"]) == (120.0, [2, 1], ["a", "b", "c"])
    assert _requests(run) == "3/4 (2 failed in other rounds)"


@pytest.mark.parametrize("argv, message", [
    (["--url", "http://127.0.0.1:9/v1", "--no-baselines"], "--url needs --model-name"),
    (["--url", "http://127.0.0.1:9/v1", "--model-name", "m"], "has no checkpoint for the generate baselines"),
    (["--server-arg=--dtype=float64"], "--dtype change the server's arithmetic"),
    (["--variant", "q=--num-threads=1,--quantization=fp8-experts"], "--quantization change the server's arithmetic"),
])
def test_bench_refuses_baselines_that_would_not_compare(argv, message, capsys):
    """Ratios against a model or arithmetic the server does not run are refused before anything starts."""
    from bench import run

    with pytest.raises(SystemExit) as exit_info:
        run.main(argv + ["--out", "/nonexistent/never-written"])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("body, error", [
    ('data: {"choices": [{"text": "ab"}]}\n\n', "the stream ended before [DONE]"),
    ('data: {"choices": [{"text": "ab"}]}\n\ndata: [DONE]\n\n', "the stream carried no usage"),
    ('data: {"choices": [{"text": "ab"}\n\n', "JSONDecodeError"),
])
def test_load_generator_counts_a_broken_stream_as_failed(body, error):
    """A foreign server's stream that stops early, leaves out its usage or sends a malformed event is one
    failed request, not a success with no tokens nor a traceback that ends the level."""
    import asyncio

    import httpx

    from bench.load import _one
    from bench.workload import WorkItem

    async def one():
        transport = httpx.MockTransport(lambda request: httpx.Response(200, text=body))
        async with httpx.AsyncClient(transport=transport) as client:
            return await _one(client, "http://server/v1/completions", "m", WorkItem((5, 6), 32, 7, 2), {}, False)

    result = asyncio.run(one())
    assert not result.ok and error in result.error and result.completion_tokens == 0


def test_load_generator_reads_frames_with_raw_line_separators():
    """A foreign server may send U+0085, U+2028 or U+2029 raw in a frame's JSON (valid SSE: lines end at
    CR or LF only); the load generator reads such a stream as one request with its text and usage."""
    import asyncio

    import httpx

    from bench.load import _one
    from bench.workload import WorkItem

    body = ('data: {"choices": [{"index": 0, "text": "a\u0085b\u2028c\u2029d", "finish_reason": null}]}\r\n\r\n'
            'data: {"choices": [], "usage": {"prompt_tokens": 2, "completion_tokens": 2, "total_tokens": 4}}\n\n'
            'data: [DONE]\n\n')

    async def one():
        transport = httpx.MockTransport(lambda request: httpx.Response(200, text=body))
        async with httpx.AsyncClient(transport=transport) as client:
            return await _one(client, "http://server/v1/completions", "m", WorkItem((5, 6), 2, 7, 2), {}, False)

    result = asyncio.run(one())
    assert result.ok, result.error
    assert result.completion_tokens == 2


def test_profile_engine_reports_both_entropy_placements(tmp_path, capsys):
    """The in-process overhead profile: with --compare-sequential, one report per entropy placement,
    each a split of the pass that adds up, one throughput for the run, then the engine's own
    functions by cumulative time."""
    from bench import profile_engine
    from bench.run import build_bench_model

    model = build_bench_model(tmp_path / "model")
    assert profile_engine.main(["--model", str(model), "--concurrency", "4", "--requests", "6", "--steps", "2",
                                "--compare-sequential"]) == 0
    out = capsys.readouterr().out
    assert "entropies on the worker thread" in out
    assert "entropies after the draw, on the engine's thread" in out
    splits = [line for line in out.splitlines() if line.startswith("pass ")]
    assert len(splits) == 2
    for line in splits:  # "pass P ms = forward F ms + sampling S ms + engine bookkeeping B ms"
        numbers = [float(w) for w in line.replace("ms", "").split() if w.replace(".", "").isdigit()]
        total, parts = numbers[0], numbers[1:]
        assert len(parts) == 3 and all(p >= 0 for p in parts) and abs(sum(parts) - total) < 0.02
    assert len([line for line in out.splitlines() if line.startswith("run: ")]) == 1
    assert "model_runner.py" in out and "(_decode)" in out
    # the threads' CPU time over the run, as shares of its wall time: the engine steps on the main thread
    (busy,) = [line for line in out.splitlines() if line.startswith("threads busy (CPU time / wall time): ")]
    shares = dict(part.rsplit(" ", 1) for part in busy.split(": ", 1)[1].split("; ")[0].split(", "))
    assert float(shares["MainThread"].rstrip("%")) > 0


def test_profile_engine_device_profile_reports_operators_after_warmup(tmp_path, capsys):
    """--device-profile takes torch's profiler instead of cProfile (on CPU: operators by CPU time and no
    device line), and --warmup runs its requests before the measured run, outside its pass count."""
    from bench import profile_engine
    from bench.run import build_bench_model

    model = build_bench_model(tmp_path / "model")
    args = ["--model", str(model), "--concurrency", "2", "--requests", "2", "--steps", "2"]
    assert profile_engine.main(args + ["--no-profile"]) == 0
    plain = capsys.readouterr().out
    assert profile_engine.main(args + ["--device-profile", "--warmup", "3"]) == 0
    out = capsys.readouterr().out
    passes = [line.split(" passes ")[0].rsplit(" ", 1)[1] for text in (plain, out) for line in text.splitlines()
              if " passes (" in line]
    assert len(passes) == 2 and passes[0] == passes[1]  # the warm-up's passes are not counted
    assert "warm-up: 3 requests in " in out and "warm-up" not in plain
    assert "aten::mm" in out and "Self CPU time total" in out
    assert "device:" not in out and "(_decode)" not in out  # no cProfile report, no kernels on CPU
    # the pass split by engine.pass_stages: each stage took time, and the shares with "other" add up to the pass
    (stages,) = [line for line in out.splitlines() if line.startswith("stages per pass (pass time): ")]
    shares = {part.split()[0]: float(part.rsplit("(", 1)[1].rstrip("%)")) for part in
              stages.split(": ", 1)[1].split("; ")[0].split(", ")}
    assert set(shares) == {"encoder", "decoder", "lm_head", "sampler", "other"}
    assert shares["decoder"] > 0 and shares["encoder"] > 0  # each stage ran (shares are timings: no threshold)
    assert abs(sum(shares.values()) - 100) < 0.5


def test_thread_scaling_reports_products_and_forward(capsys):
    """bench.thread_scaling runs on the embedded model and reports the products, the model's forward and
    the engine's decoder pass, eager and traced."""
    from bench import thread_scaling

    assert thread_scaling.main(["--rows", "2", "--repeat", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == ["matrix products", "model forward", "decoder pass, eager",
                                                      "decoder pass, traced"]
    assert all("two halves side by side" in line for line in lines)


def test_replicas_bench_reports_both_setups(capsys):
    """bench.replicas runs the Sudoku puzzles through one engine and through two replicas, and
    reports each replica's CPU time beside the front's."""
    from bench import replicas

    assert replicas.main(["--replicas", "2", "--requests", "4", "--concurrency", "2", "--steps", "4", "--rounds", "1"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("replicas ")]
    assert [line.split(",")[0] for line in lines] == ["replicas 1", "replicas 2"]
    assert [len(line.split("per process ")[1].split(", ")) for line in lines] == [1, 3]
    assert all(" committed tok/s in " in line for line in lines)
