"""Benchmark: committed tokens/s through the HTTP API at several concurrencies, with
transformers' ``generate`` baselines (one at a time, static batches) measured in the same run.

    python -m bench.run                       # tiny CPU model, launches its own server
    python -m bench.run --url http://host:8000/v1 --model-name NAME --no-baselines   # any server

Writes ``<out>/bench.json``, ``<out>/bench.md`` and ``<out>/bench.png``.

``--rounds N`` runs every measurement (each level against each server, each baseline) N times in a
row and keeps the fastest: on a shared machine noise only slows a run, and the static baseline with
several OpenMP threads collapses when anything else takes a core. The baselines are transformers'
``generate`` on the checkpoint as transformers loads it, timed at each ``--baseline-threads`` count
(by default 1 and every usable CPU, as the server uses them all) and keeping the fastest.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from .load import run_load
from .report import markdown, plot
from .workload import make_workload, sudoku_workload

# A tiny DiffusionGemma (about 0.3M parameters), big enough that batching matters on a CPU.
BENCH_SPEC = dict(hidden_size=64, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=16, canvas_length=32,
                  sliding_window=64)


# The widest vector instructions a CPU has, by its /proc/cpuinfo flag: they pick the kernels (oneDNN's,
# OpenBLAS's) and so the speed, for CPUs of the same name
SIMD_FLAGS = (("avx512f", "AVX-512"), ("avx2", "AVX2"), ("avx", "AVX"))


# server flags the generate baselines do not follow (they run the default dtype on the default device)
ARITHMETIC_FLAGS = ("--dtype", "--quantization", "--device")


def machine_description() -> dict:
    cpu, simd = platform.processor() or "cpu", None
    try:
        with open("/proc/cpuinfo") as fh:
            info = fh.read()
        names = re.findall(r"model name\s*:\s*(.*)", info)
        cpu = names[0] if names else cpu
        flags = set(re.findall(r"^flags\s*:\s*(.*)$", info, re.M)[0].split()) if "flags" in info else set()
        simd = next((name for flag, name in SIMD_FLAGS if flag in flags), None)
    except (OSError, IndexError):
        pass
    desc = f"{os.cpu_count()} x {cpu}" + (f" ({simd})" if simd else "")
    gpu = None
    try:
        import torch

        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_name(0)
            desc = f"{gpu} + {desc}"
    except ImportError:
        pass
    return {"description": desc, "cpus": os.cpu_count(), "gpu": gpu}


def build_bench_model(path: Path) -> Path:
    from tools.tiny_checkpoint import TinySpec, build_tiny_checkpoint

    if not (path / "config.json").exists():
        build_tiny_checkpoint(path, TinySpec(**BENCH_SPEC))
    return path


def baseline_thread_counts(spec: str | None) -> list[int]:
    """The torch thread counts generate is timed with: ``spec`` ("1,2"), or 1 and the usable CPUs."""
    if spec:
        counts = [int(x) for x in spec.split(",")]
    else:
        from engine.cpu_threads import usable_cpus

        counts = [1, usable_cpus()]
    return sorted(set(counts))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, port: int, threads: int, max_num_seqs: int, extra: list[str],
                 log_path: Path) -> subprocess.Popen:
    """Start the server and wait until it is healthy. Its output goes to ``log_path`` (a pipe nobody
    reads would fill up with its per-request log lines and block it)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    cmd = [sys.executable, "-m", "server", "--model", model, "--port", str(port), "--num-threads", str(threads),
           "--max-num-seqs", str(max_num_seqs), "--no-access-log", *extra]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {log_path.read_text()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError("server did not become healthy in 300 s")


def rss_peak_mib(pid: int) -> float | None:
    """The server's peak resident memory: each of its processes' peak (VmHWM), the engine replicas'
    (``--data-parallel-size``) included, summed; None where /proc cannot tell."""
    total = None
    for proc in [pid, *descendants(pid)]:
        try:
            with open(f"/proc/{proc}/status") as fh:
                peak = next((int(line.split()[1]) for line in fh if line.startswith("VmHWM:")), None)
        except OSError:
            continue
        if peak is not None:
            total = (total or 0) + peak / 1024
    return total


def descendants(pid: int) -> list[int]:
    """The processes ``pid`` started, and theirs (Linux /proc; [] where it cannot tell)."""
    found = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as fh:
                found += [int(c) for c in fh.read().split()]
    except OSError:
        return []
    return found + [d for c in found for d in descendants(c)]


def gpu_memory_mib(pid: int) -> float | None:
    """GPU memory the process holds now, per ``nvidia-smi`` (CUDA context plus the allocator's reserve;
    PyTorch's allocator keeps what it reserved, so after a level this is the level's peak). None
    without ``nvidia-smi`` or when the process holds no GPU memory."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    for line in out.stdout.splitlines():
        parts = [x.strip() for x in line.split(",")]
        if len(parts) == 2 and parts[0] == str(pid) and parts[1].isdigit():
            return float(parts[1])
    return None


def scrape(base_url: str) -> dict[str, float]:
    """Sums and counts of the server's histograms/counters we report on (empty for foreign servers)."""
    root = base_url.rstrip("/").removesuffix("/v1")
    try:
        text = httpx.get(root + "/metrics", timeout=10).text
    except httpx.HTTPError:
        return {}
    from prometheus_client.parser import text_string_to_metric_families

    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if not sample.labels or set(sample.labels) <= {"le"}:
                if "le" not in sample.labels:
                    values[sample.name] = sample.value
    return values


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    k = max(0, min(len(values) - 1, int(round(q * (len(values) - 1)))))
    return values[k]


def summarize(results, wall, before, after, concurrency, server_pid) -> dict:
    ok = [r for r in results if r.ok]
    tokens = sum(r.completion_tokens for r in ok)
    steps = [r.denoising_steps for r in ok if r.denoising_steps]
    canvases = [r.canvases for r in ok if r.canvases]
    batch_sum = after.get("diffusion_server:decoder_batch_size_sum", 0) - before.get("diffusion_server:decoder_batch_size_sum", 0)
    batch_cnt = after.get("diffusion_server:decoder_batch_size_count", 0) - before.get("diffusion_server:decoder_batch_size_count", 0)
    ttfd = pct([r.ttfd for r in ok if r.ttfd is not None and r.ttfd != r.ttft], 0.5)
    d_sum = after.get("diffusion_server:time_to_first_draft_seconds_sum", 0) - before.get("diffusion_server:time_to_first_draft_seconds_sum", 0)
    d_cnt = after.get("diffusion_server:time_to_first_draft_seconds_count", 0) - before.get("diffusion_server:time_to_first_draft_seconds_count", 0)
    return {
        "concurrency": concurrency,
        "requests": len(results),
        "requests_ok": len(ok),
        "errors": [r.error for r in results if not r.ok][:5],
        "seconds": wall,
        "tokens": tokens,
        "tokens_per_s": tokens / wall,
        "requests_per_s": len(ok) / wall,
        "ttfd_p50": ttfd,
        "ttfd_server_mean": (d_sum / d_cnt) if d_cnt else None,
        "ttft_p50": pct([r.ttft for r in ok if r.ttft is not None], 0.5),
        "latency_p50": pct([r.latency for r in ok], 0.5),
        "latency_p90": pct([r.latency for r in ok], 0.9),
        "latency_p99": pct([r.latency for r in ok], 0.99),
        "canvas_steps": sum(steps) if steps else None,  # the denoising steps of every canvas, summed
        "steps_per_canvas": (sum(steps) / sum(canvases)) if steps and canvases else None,
        "tokens_per_step": (tokens / sum(steps)) if steps else None,
        "decoder_batch_mean": (batch_sum / batch_cnt) if batch_cnt else None,
        "server_rss_peak_mib": rss_peak_mib(server_pid) if server_pid else None,
        "server_gpu_mib": gpu_memory_mib(server_pid) if server_pid else None,
    }


def kept_round(rounds: list[dict]) -> dict:
    """The round of a level that the report shows (``summarize``'s dicts): the fastest in which every
    request succeeded, else the fastest, with every round's tok/s and failed requests and the first
    errors of all rounds (a failure in a round not kept still counts)."""
    clean = [r for r in rounds if r["requests_ok"] == r["requests"]] or rounds
    return dict(max(clean, key=lambda r: r["tokens_per_s"]),
                rounds_tokens_per_s=[r["tokens_per_s"] for r in rounds],
                rounds_failed=[r["requests"] - r["requests_ok"] for r in rounds],
                errors=[e for r in rounds for e in r["errors"]][:5])


def check_outputs_alone(base_url: str, model_name: str, args, level: int, items) -> dict:
    """Run ``level``'s requests again (untimed), the first ``args.check_outputs`` of them asking for
    log-probabilities, then send those again one at a time and compare each one's tokens (as the server
    shows them: a byte or a special token by itself, where the text may not tell them apart) and text
    with what it got under load: on CPU the engine is batch-invariant, so every pair should match; on
    CUDA the matrix kernels are not, so some differ."""
    sample = items[: args.check_outputs]
    seeds = frozenset(it.seed for it in sample)
    loaded, _ = asyncio.run(run_load(base_url, model_name, items, concurrency=level, api_key=args.api_key,
                                     seed=args.seed, drafts=args.drafts, logprobs_for=seeds))
    alone, _ = asyncio.run(run_load(base_url, model_name, sample, concurrency=1, api_key=args.api_key,
                                    seed=args.seed, drafts=args.drafts, logprobs_for=seeds))
    under_load = {r.seed: r for r in loaded if r.ok and r.seed in seeds}
    identical = sum(r.ok and r.seed in under_load and (r.tokens, r.text) ==
                    (under_load[r.seed].tokens, under_load[r.seed].text) for r in alone)
    return {"concurrency": level, "checked": len(sample), "identical": identical,
            "tokens": sum(len(r.tokens or ()) for r in under_load.values()),
            "failed": len(items) - sum(r.ok for r in loaded) + sum(not r.ok for r in alone)}


def serve_levels(args, levels, model, model_name, out, workload, warm, workloads, runs, result, save,
                 variant: tuple[str, list[str]] | None) -> None:
    """Start the server (unless ``--url``) with ``variant``'s extra flags, run every level's workload
    against it (the same workloads for every variant: ``workloads`` keeps them), and stop it. Appends
    to ``runs``."""
    name, extra = variant or (None, [])
    proc = None
    base_url = args.url
    suffix = "-" + re.sub(r"[^A-Za-z0-9._-]+", "-", name) if name else ""  # a file name any tool copies back
    if base_url is None:
        port = free_port()
        server_args = args.server_arg + extra
        server_args += [f"--load-format={args.load_format}"] if args.load_format != "auto" else []
        proc = start_server(model, port, args.threads, max(levels), server_args, out / f"server{suffix}.log")
        base_url = f"http://127.0.0.1:{port}/v1"
    label = f" ({name})" if name else ""
    try:
        if warm:
            asyncio.run(run_load(base_url, model_name, warm, concurrency=1, request_rate=None,
                                 api_key=args.api_key, seed=args.seed, drafts=args.drafts))
        for level in levels:
            if level not in workloads:
                workloads[level] = workload(args.requests_per_level or max(16, args.requests_per_slot * level),
                                            args.seed + level)
            items = workloads[level]
            rounds = []
            for _ in range(args.rounds):  # the fastest round is kept (see the module docstring)
                before = scrape(base_url)
                results, wall = asyncio.run(run_load(base_url, model_name, items, concurrency=level,
                                                     request_rate=args.request_rate, api_key=args.api_key,
                                                     seed=args.seed, drafts=args.drafts))
                after = scrape(base_url)
                rounds.append(summarize(results, wall, before, after, level, proc.pid if proc else None))
            run = kept_round(rounds)
            if name:
                run["variant"] = name
            runs.append(run)
            save()
            p50 = "n/a" if run["latency_p50"] is None else f"{run['latency_p50']:.2f}s"
            failed_rounds = f", failures in the rounds: {run['rounds_failed']}" if any(run["rounds_failed"]) else ""
            print(f"concurrency {level}{label}: {run['tokens_per_s']:.0f} tok/s, {run['requests_ok']}/{run['requests']} "
                  f"ok, p50 {p50}{failed_rounds}", flush=True)
            for error in dict.fromkeys(run["errors"]):  # the first failures, once each
                print(f"  failed: {error}", flush=True)
        if args.check_outputs and any(level > 1 for level in levels):
            check = check_outputs_alone(base_url, model_name, args, max(levels), workloads[max(levels)])
            if name:
                result.setdefault("outputs_alone_by_variant", {})[name] = check
            else:
                result["outputs_alone"] = check
            save()
            print(f"outputs at concurrency {check['concurrency']}{label} identical to the same requests sent alone: "
                  f"{check['identical']}/{check['checked']}", flush=True)
            if check["failed"]:
                print(f"  {check['failed']} requests of that check failed", flush=True)
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint to serve and to run the baselines on (default: the tiny bench model)")
    ap.add_argument("--url", default=None, help="benchmark an already running OpenAI-compatible server (base URL ending in /v1)")
    ap.add_argument("--model-name", default=None, help="model name to send (default: the --model value)")
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--concurrency", default="1,4,16,32", help="comma-separated concurrency levels")
    ap.add_argument("--requests-per-level", type=int, default=0, help="requests per level (default: max(16, --requests-per-slot x concurrency))")
    ap.add_argument("--requests-per-slot", type=int, default=8,
                    help="requests per concurrent client when --requests-per-level is not given: enough that "
                         "the drain at the end of a level, with fewer requests left than clients, weighs little")
    ap.add_argument("--request-rate", type=float, default=None, help="Poisson arrivals at this rate (req/s) instead of a closed loop")
    ap.add_argument("--workload", default="random", choices=["random", "sudoku"],
                    help="random: random prompts and fixed-length outputs (--prompt-len, --canvases); sudoku: "
                         "held-out puzzles of mixed difficulty for the embedded Sudoku model (one canvas each, "
                         "converging after different step counts; use --model engine/default_model --steps 32)")
    ap.add_argument("--steps", type=int, default=8, help="max_denoising_steps of every request")
    ap.add_argument("--canvases", default="1,4", help="min,max output canvases per request")
    ap.add_argument("--prompt-len", default="8,64", help="min,max prompt tokens")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads of the started server (its --num-threads; 1 is its CPU default)")
    ap.add_argument("--baseline-threads", default=None, metavar="N,M",
                    help="torch threads generate is timed with, comma-separated: each baseline keeps its fastest "
                         "(default: 1 and the usable CPUs, so generate has the whole machine as the server does)")
    ap.add_argument("--drafts", action="store_true",
                    help="ask for draft chunks (measures time to first draft client-side; costs server CPU)")
    ap.add_argument("--no-baselines", action="store_true")
    ap.add_argument("--server-arg", action="append", default=[], metavar="ARG",
                    help="extra flag for the started server, repeatable (e.g. --server-arg=--quantization=fp8-experts)")
    ap.add_argument("--load-format", default="auto", choices=["auto", "dummy"],
                    help="the engine setting, for the server and the baselines (dummy: random weights built on the "
                         "device from --model's config; see bench.make_random_model --config-only)")
    ap.add_argument("--sampler", action="append", choices=["reference", "fast"], default=[],
                    help="a variant with the server's --sampler (repeatable): every level runs once per variant, "
                         "on the same workloads, in this invocation")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=FLAGS",
                    help="a variant with these extra server flags, comma-separated (repeatable), e.g. "
                         "'today=--no-batch-invariant'")
    ap.add_argument("--warmup", type=int, default=2,
                    help="untimed requests sent before the first level, and untimed generate calls before each "
                         "baseline (CUDA context, kernels and allocator warm-up stay out of the numbers)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=1, metavar="N",
                    help="run every measurement (server levels and baselines) N times and keep the fastest")
    ap.add_argument("--check-outputs", type=int, default=8, metavar="N",
                    help="send the first N requests of the highest level again, one at a time, and count the "
                         "outputs that are identical to the ones they got under load (0: skip)")
    ap.add_argument("--out", default="bench/results", help="output folder")
    args = ap.parse_args(argv)
    if args.url and args.model is None:  # nothing local to take the shape, the name or the baselines from
        if not args.model_name:
            ap.error("--url needs --model-name (the model the server serves), or --model (its checkpoint here)")
        if not args.no_baselines:
            ap.error("--url without --model has no checkpoint for the generate baselines: add --no-baselines, or "
                     "--model with the served checkpoint")
    server_flags = args.server_arg + [f for spec in args.variant for f in spec.partition("=")[2].split(",")]
    changed = sorted({f.split("=")[0] for f in server_flags if f.split("=")[0] in ARITHMETIC_FLAGS})
    if changed and not args.no_baselines:
        ap.error(f"{', '.join(changed)} change the server's arithmetic, which the generate baselines would not "
                 "share (default dtype and device): add --no-baselines")

    levels = [int(x) for x in args.concurrency.split(",")]
    baseline_threads = baseline_thread_counts(args.baseline_threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = args.model or str(build_bench_model(Path("runs/bench-model")))
    model_name = args.model_name or model
    canvases = tuple(int(x) for x in args.canvases.split(","))
    prompt_len = tuple(int(x) for x in args.prompt_len.split(","))
    if args.rounds < 1:
        ap.error("--rounds must be at least 1")

    tokenizer_vocab, canvas_length, pad_id = 261, 32, 0
    if args.model is not None or args.url is None:  # a local checkpoint: the requests take its shape
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(model)
        canvas_length = cfg.canvas_length
        tokenizer_vocab = cfg.text_config.vocab_size
        pad_id = cfg.text_config.pad_token_id or 0
    low = 5  # skip special tokens
    high = min(tokenizer_vocab - 1, 260)  # keep clear of reserved ids at the top (image token)

    runs = []
    baselines = {}

    def workload(n: int, seed: int):
        if args.workload == "sudoku":
            from transformers import AutoTokenizer

            return sudoku_workload(n, seed=seed, tokenizer=AutoTokenizer.from_pretrained(model),
                                   max_tokens=canvas_length, max_denoising_steps=args.steps)
        return make_workload(n, seed=seed, vocab_low=low, vocab_high=high, canvas_length=canvas_length,
                             prompt_len=prompt_len, canvases=canvases, max_denoising_steps=args.steps)

    # untimed requests of the same shape (their own seed), sent before anything is measured
    warm = workload(args.warmup, args.seed + 10_000) if args.warmup else []
    result = {
        "model": model_name,
        "machine": machine_description(),  # where this command runs (the server's machine unless --url)
        "server_url": args.url,
        "server_threads": None if args.url else args.threads,
        "baseline_threads": baseline_threads,
        "command": "python -m bench.run " + " ".join(argv if argv is not None else sys.argv[1:]),
        "workload": {"kind": args.workload, "steps": args.steps, "canvases": canvases, "prompt_len": prompt_len,
                     "seed": args.seed,
                     "arrival": f"poisson {args.request_rate}/s" if args.request_rate else "closed loop"},
        "rounds": args.rounds,  # each measurement's fastest of this many
        "runs": runs,
        "baselines": baselines,
        "time": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }

    def save() -> None:
        """Write what is measured so far (a run cut short keeps its finished levels)."""
        result["time"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
        (out / "bench.json").write_text(json.dumps(result, indent=2))
        (out / "bench.md").write_text(markdown(result))

    workloads = {}
    variants = [(f"{s} sampler", [f"--sampler={s}"]) for s in args.sampler]
    for spec in args.variant:
        name, _, flags = spec.partition("=")
        variants.append((name, [f for f in flags.split(",") if f]))
    for variant in variants or [None]:  # the same workloads against each variant's server
        serve_levels(args, levels, model, model_name, out, workload, warm, workloads, runs, result, save, variant)

    if not args.no_baselines:
        import torch

        from .baselines import load_baseline_model, one_at_a_time, static_batches

        baseline_model = load_baseline_model(model, args.load_format)
        for threads in baseline_threads:
            torch.set_num_threads(threads)
            if warm:
                one_at_a_time(baseline_model, warm, pad_id)
                static_batches(baseline_model, warm, len(warm), pad_id)
        # each level's ratios compare the same requests: its own workload run by generate, one request
        # at a time and in static batches of the level's size (at concurrency 1 the two are the same)
        baselines["one_at_a_time"] = {}
        baselines["static_batch"] = {}

        def fastest(measure, *args_):  # the fastest of --rounds runs at each thread count (module docstring)
            rounds = []
            for threads in baseline_threads:
                torch.set_num_threads(threads)
                rounds += [dict(measure(baseline_model, *args_), threads=threads) for _ in range(args.rounds)]
            best = max(rounds, key=lambda r: r["tokens_per_s"])
            return dict(best, rounds_tokens_per_s=[r["tokens_per_s"] for r in rounds],
                        rounds_threads=[r["threads"] for r in rounds])

        for level in levels:
            alone = fastest(one_at_a_time, workloads[level], pad_id)
            baselines["one_at_a_time"][str(level)] = alone
            line = f"baseline for concurrency {level}: one at a time {alone['tokens_per_s']:.0f} tok/s"
            static = alone
            if level > 1:
                static = fastest(static_batches, workloads[level], level, pad_id)
                baselines["static_batch"][str(level)] = static
                line += f", static batch {static['tokens_per_s']:.0f} tok/s"
            for run in runs:  # every variant's run of this level
                if run["concurrency"] == level:
                    run["ratio_vs_one_at_a_time"] = run["tokens_per_s"] / alone["tokens_per_s"]
                    run["ratio_vs_static_batch"] = run["tokens_per_s"] / static["tokens_per_s"]
            print(line, flush=True)
            save()  # a run cut short keeps the ratios of its finished levels

    save()
    plotted = plot(result, out / "bench.png")
    print(markdown(result))
    if not plotted:
        print("(matplotlib not installed: no plot written)")
    # every round's failures count, and the outputs check's
    sent = sum(run["requests"] * len(run["rounds_failed"]) for run in runs)
    failed = sum(sum(run["rounds_failed"]) for run in runs)
    checks = [result["outputs_alone"]] if "outputs_alone" in result else []
    check_failed = sum(check["failed"] for check in checks + list(result.get("outputs_alone_by_variant", {}).values()))
    if failed:
        print(f"{failed} of {sent} requests failed", file=sys.stderr)
    if check_failed:
        print(f"{check_failed} requests of the outputs check failed", file=sys.stderr)
    return 1 if failed or check_failed else 0


if __name__ == "__main__":
    sys.exit(main())
