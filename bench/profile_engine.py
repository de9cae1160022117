"""Engine overhead per pass, in process: time outside the model's forward calls at a fixed concurrency.

    python -m bench.profile_engine --concurrency 16
    python -m bench.profile_engine --no-profile --rounds 4 --compare-sequential

"Forward" is the time inside the encoder, the decoder layers and the lm head (what transformers'
``generate`` spends in ``model.forward``); everything else in a pass (scheduling, KV views,
sampling, bookkeeping) is overhead. Prints the split, the top functions by own time and the
engine's own functions by cumulative time.

On CUDA the stage times wait for their kernels (``engine.pass_stages.sync_stage_clock``), so the
forward and the sampler include the GPU's time; the waits keep the host from running ahead, so a
pass here takes longer than served.

``--device-profile`` takes torch's profiler instead of cProfile: it reports how much of each pass the
GPU spends in kernels, how that kernel time splits over the pass's stages (``engine.pass_stages``:
encoder, decoder, lm head, the rest of the sampler; on CPU the stages' wall time) and which kernels
those are.

``--compare-sequential`` alternates, pass by pass, between the CPU worker computing the entropies
beside the draw (the default) and the entropies computed after the draw on the engine's thread
(what CUDA does): the baseline in the same run, on the same requests (the tokens do not depend on it).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import time
from pathlib import Path

import torch

from engine import EngineCore, EngineSettings, SamplingParams
from engine.cpu_threads import usable_cpus
from engine.loader import load_model
from engine.pass_stages import sync_stage_clock
from engine.request import RequestStatus

from .run import BENCH_SPEC, build_bench_model
from .thread_cpu import busy_shares, describe, thread_cpu_seconds
from .workload import make_workload, sudoku_workload


class _PassTimer:
    """Sums the engine's pass statistics, separately for each value of ``mode`` (set between passes)."""

    def __init__(self):
        self.mode = True
        self.totals: dict[bool, dict[str, float]] = {}

    def on_pass(self, s):
        t = self.totals.setdefault(self.mode, dict(passes=0, seconds=0.0, forward=0.0, sampling=0.0, batch=0,
                                                             by_encoder={True: [], False: []}))
        t["passes"] += 1
        t["by_encoder"][s.encoder_tokens > 0].append(s.seconds)
        t["seconds"] += s.seconds
        t["forward"] += s.forward_seconds
        t["sampling"] += s.sampling_seconds
        t["batch"] += s.decoder_batch_size

    def on_canvas(self, s):
        pass

    def on_request_finished(self, s):
        pass


def run(model: str, concurrency: int, requests: int, steps: int, threads: int, profile: bool,
        compare_sequential: bool = False, device_profile: bool = False, warmup: int = 0,
        cuda_graph_max_batch: int | None = None, quantization: str = "none",
        experts_implementation: str | None = None, sampler: str | None = None, load_format: str = "auto",
        workload: str = "random", forward_threads: int | None = None, min_group_work: int | None = None,
        batch_invariant: bool | None = None, trace_decoder: bool | None = None) -> dict:
    """One closed-loop run: its wall time and throughput, and a pass split per entropy placement
    (``placements``: two when ``compare_sequential``, where passes alternate between them so that both
    see the same mix of batches, encoder work and machine state; the throughput covers both)."""
    torch.set_num_threads(threads)
    settings = EngineSettings(model=model, max_num_seqs=concurrency, cuda_graph_max_batch=cuda_graph_max_batch,
                              quantization=quantization, experts_implementation=experts_implementation,
                              sampler=sampler, load_format=load_format, forward_threads=forward_threads,
                              batch_invariant=batch_invariant, trace_decoder=trace_decoder)
    if device_profile and torch.cuda.is_available():
        # graphs captured before the profiler starts and replayed under it need this first (torch#100441)
        from torch.profiler._utils import _init_for_cuda_graphs

        _init_for_cuda_graphs()
    timer = _PassTimer()
    core = EngineCore(load_model(settings), settings, timer)
    if min_group_work is not None:  # engine.cpu_threads.min_group_work, for this run
        core.runner.min_group_work = min_group_work
    # on CUDA each stage's time waits for its kernels, or the GPU's time would count as bookkeeping
    sync_stage_clock(core.runner.device)
    # False where there is no worker thread (CUDA), and for the fast sampler (nothing to overlap)
    overlap = getattr(core.runner.sampler, "overlap_entropy", False)
    cfg = core.loaded.model.config

    def items_for(n: int, seed: int):
        if workload == "sudoku":  # the embedded model's held-out puzzles, one canvas each
            return sudoku_workload(n, seed=seed - 1, tokenizer=core.loaded.tokenizer, max_tokens=cfg.canvas_length,
                                   max_denoising_steps=steps)
        return make_workload(n, seed=seed, vocab_low=5, vocab_high=260, canvas_length=cfg.canvas_length,
                             max_denoising_steps=steps)

    items = items_for(requests, 1)
    warmup_s = None
    if warmup:  # untimed requests first (CUDA's first kernels and allocations take seconds)
        t0 = time.perf_counter()
        _drive(core, items_for(warmup, 2), concurrency, timer, overlap, False, prefix="warmup")
        warmup_s = time.perf_counter() - t0
        timer.totals.clear()
    prof = cProfile.Profile() if profile and not device_profile else None
    tprof = _torch_profiler(core.runner.device) if device_profile else None
    cpu_before = thread_cpu_seconds()
    t0 = time.perf_counter()
    if prof:
        prof.enable()
    if tprof:
        tprof.start()
    _drive(core, items, concurrency, timer, overlap, compare_sequential)
    if core.runner.device.type == "cuda":
        torch.cuda.synchronize(core.runner.device)
    wall = time.perf_counter() - t0  # before the profilers' own processing
    threads_busy = busy_shares(cpu_before, thread_cpu_seconds(), wall)
    if tprof:
        tprof.stop()
    if prof:
        prof.disable()
    core.close()
    sync_stage_clock(None)
    tokens = sum(it.max_tokens for it in items)
    out = {"concurrency": concurrency, "wall_s": wall, "tokens_per_s": tokens / wall, "placements": [],
           "threads_busy": threads_busy, "cores": usable_cpus(),
           "warmup": {"requests": warmup, "seconds": warmup_s} if warmup else None,
           "cuda_graph_max_batch": core.runner.graphs.max_batch if core.runner.graphs else 0}
    for mode, t in sorted(timer.totals.items(), reverse=True):
        out["placements"].append({
            "overlap_entropy": mode,
            "passes": int(t["passes"]),
            "encoder_passes": len(t["by_encoder"][True]),
            "mean_decoder_batch": t["batch"] / max(1, t["passes"]),
            "pass_ms": 1000 * t["seconds"] / max(1, t["passes"]),
            # median pass, with and without encoder work (prompts, commits)
            "median_pass_ms": {kind: 1000 * statistics.median(v) if v else None for kind, v in
                               (("with_encoder", t["by_encoder"][True]), ("without_encoder", t["by_encoder"][False]))},
            "forward_ms": 1000 * t["forward"] / max(1, t["passes"]),
            "sampling_ms": 1000 * t["sampling"] / max(1, t["passes"]),
            "overhead_fraction": 1 - t["forward"] / max(1e-9, t["seconds"]),
            "bookkeeping_fraction": 1 - (t["forward"] + t["sampling"]) / max(1e-9, t["seconds"]),
        })
    if prof:
        buf = io.StringIO()
        stats = pstats.Stats(prof, stream=buf)
        stats.sort_stats("tottime").print_stats(15)
        # the engine's own functions by cumulative time: where the time outside the forward goes
        # (cProfile's per-call cost inflates these Python-heavy pieces somewhat)
        stats.sort_stats("cumulative").print_stats(r"/engine/", 30)
        out["profile"] = buf.getvalue()
    if tprof:
        passes = sum(int(t["passes"]) for t in timer.totals.values())
        out["profile"] = _device_report(tprof, sum(t["seconds"] for t in timer.totals.values()), passes)
    return out


def _drive(core, items, concurrency: int, timer, overlap: bool, compare_sequential: bool, prefix: str = "r") -> None:
    """Closed loop: keep ``concurrency`` requests in the engine until every item is done."""
    pending = list(items)
    n = 0
    turns = {False: 0, True: 0}
    while pending or core.has_work():
        while pending and core.num_running + core.num_waiting < concurrency:  # closed loop
            it = pending.pop(0)
            params = SamplingParams(max_tokens=it.max_tokens, seed=it.seed, max_denoising_steps=it.max_denoising_steps,
                                    ignore_eos=True)
            core.add_request(f"{prefix}{n}", list(it.prompt_ids), core.resolve(list(it.prompt_ids), params))
            n += 1
        # alternate separately among passes with encoder work and passes without (they differ in cost)
        encodes = bool(core.scheduler.waiting) or any(r.status is RequestStatus.ENCODING for r in core.scheduler.running)
        sequential = compare_sequential and turns[encodes] % 2 == 1
        turns[encodes] += 1
        timer.mode = core.runner.sampler.overlap_entropy = overlap and not sequential
        core.step()
    timer.mode = core.runner.sampler.overlap_entropy = overlap


def _torch_profiler(device: torch.device):
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    return profile(activities=activities)


def _device_report(tprof, pass_seconds: float, passes: int) -> str:
    """Kernel time against the passes' wall time (``pass_seconds``, all passes together; the profiler's
    processing after the run is not in it), and the top operators (by device time on CUDA)."""
    from torch.autograd import DeviceType

    averages = tprof.key_averages()
    # the kernels themselves (an operator's "self device time" repeats its kernels' time, so only these add up)
    kernels = [a for a in averages if a.device_type == DeviceType.CUDA and not getattr(a, "is_user_annotation", False)]
    lines = []
    if kernels:
        busy_ms = sum(a.self_device_time_total for a in kernels) / 1000
        launches = sum(a.count for a in kernels)
        per = max(1, passes)
        lines.append(f"device: {busy_ms / per:.2f} ms of kernels per pass against {1000 * pass_seconds / per:.2f} ms "
                     f"wall per pass ({busy_ms / (1000 * pass_seconds):.1%} busy), {launches / per:.0f} kernels per "
                     f"pass, {passes} passes (under the profiler, whose recording slows the host)")
    lines.append(_stage_split(tprof.events(), bool(kernels), busy_ms * 1000 if kernels else 1e6 * pass_seconds,
                              max(1, passes)))
    sort = "self_device_time_total" if kernels else "self_cpu_time_total"
    lines.append(averages.table(sort_by=sort, row_limit=25, max_name_column_width=60))
    return "\n".join(lines)


def _stage_split(events, on_device: bool, total_us: float, passes: int) -> str:
    """Time per pass in each of ``engine.pass_stages``: the kernels launched inside the range on a GPU
    (``on_device``), the range's wall time on a CPU; the sampler without its lm head. ``total_us``: all
    kernel time (GPU) or all pass time (CPU), for the shares."""
    from torch.autograd import DeviceType

    from engine.pass_stages import LM_HEAD, SAMPLER, STAGES

    us = dict.fromkeys(STAGES, 0.0)
    for e in events:
        if e.name in us and e.device_type == DeviceType.CPU:  # the host-side range (a GPU-side twin spans gaps)
            us[e.name] += e.device_time_total if on_device else e.cpu_time_total
    us[SAMPLER] -= us[LM_HEAD]
    us["other"] = max(0.0, total_us - sum(us.values()))
    what = "kernel time" if on_device else "pass time"
    parts = ", ".join(f"{name.removeprefix('engine.')} {v / 1000 / passes:.2f} ms ({v / max(total_us, 1e-9):.1%})"
                      for name, v in us.items())
    head = (us[LM_HEAD] + us[SAMPLER]) / max(total_us, 1e-9)
    return f"stages per pass ({what}): {parts}; lm head + sampler: {head:.1%}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--rounds", type=int, default=1, help="runs, one after the other")
    ap.add_argument("--compare-sequential", action="store_true",
                    help="compute the entropies on the engine's thread after the draw (what CUDA does) in "
                         "every other pass, and report both halves")
    ap.add_argument("--device-profile", action="store_true",
                    help="torch's profiler instead of cProfile: kernel time per pass and the top operators")
    ap.add_argument("--warmup", type=int, default=0, metavar="N",
                    help="run N untimed requests to completion first (use a few on CUDA)")
    ap.add_argument("--cuda-graph-max-batch", type=int, default=None, metavar="N",
                    help="the engine setting (default: the engine's, graphs for batches of up to 4 where capture works)")
    ap.add_argument("--quantization", default="none", help="the engine setting: none, fp8-experts or int8-experts")
    ap.add_argument("--experts-implementation", default=None,
                    help="transformers' MoE experts implementation (eager, grouped_mm, ...; default: the engine's)")
    ap.add_argument("--sampler", default=None, choices=["reference", "fast"], help="the engine setting")
    ap.add_argument("--load-format", default="auto", choices=["auto", "dummy"], help="the engine setting")
    ap.add_argument("--forward-threads", type=int, default=None, help="the engine setting (default: the engine's)")
    ap.add_argument("--workload", default="random", choices=["random", "sudoku"],
                    help="random prompts (the bench model), or held-out puzzles for the embedded Sudoku model")
    ap.add_argument("--min-group-work", type=int, default=None,
                    help="the least work of a decoder row group on CPU (default: engine.cpu_threads.min_group_work)")
    ap.add_argument("--batch-invariant", action=argparse.BooleanOptionalAction, default=None,
                    help="the engine setting (default: the engine's, on on CPU and off on CUDA)")
    ap.add_argument("--trace-decoder", action=argparse.BooleanOptionalAction, default=None,
                    help="the engine setting (default: the engine's, on on CPU with batch invariance)")
    args = ap.parse_args(argv)
    model = args.model or str(build_bench_model(Path("runs/bench-model")))
    for _ in range(args.rounds):
        res = run(model, args.concurrency, args.requests, args.steps, args.threads, not args.no_profile,
                  args.compare_sequential, args.device_profile, args.warmup, args.cuda_graph_max_batch, args.quantization,
                  args.experts_implementation, args.sampler, args.load_format, args.workload, args.forward_threads,
                  args.min_group_work, args.batch_invariant, args.trace_decoder)
        _print(res, model, args.model is None)
    return 0


def _print(res: dict, model: str, bench_model: bool) -> None:
    if res["warmup"]:
        print(f"warm-up: {res['warmup']['requests']} requests in {res['warmup']['seconds']:.2f} s, not counted below")
    if res["cuda_graph_max_batch"]:
        print(f"CUDA graphs for decoder batches of up to {res['cuda_graph_max_batch']}")
    for p in res["placements"]:
        entropy = "on the worker thread" if p["overlap_entropy"] else "after the draw, on the engine's thread"
        print(f"model {model} ({BENCH_SPEC if bench_model else ''}), concurrency {res['concurrency']}, "
              f"{p['passes']} passes ({p['encoder_passes']} with encoder work), mean decoder batch "
              f"{p['mean_decoder_batch']:.1f}, entropies {entropy}")
        book = p["pass_ms"] - p["forward_ms"] - p["sampling_ms"]
        print(f"pass {p['pass_ms']:.2f} ms = forward {p['forward_ms']:.2f} ms + sampling {p['sampling_ms']:.2f} ms "
              f"+ engine bookkeeping {book:.2f} ms")
        print(f"outside forward: {p['overhead_fraction']:.1%} of the pass; bookkeeping alone: "
              f"{p['bookkeeping_fraction']:.1%}")
        median = {k: "-" if v is None else f"{v:.2f} ms" for k, v in p["median_pass_ms"].items()}
        print(f"median pass: {median['with_encoder']} with encoder work, {median['without_encoder']} without")
    both = " (both placements together)" if len(res["placements"]) > 1 else ""
    print(f"run: {res['tokens_per_s']:.0f} committed tok/s in {res['wall_s']:.2f} s{both}")
    if res["threads_busy"]:  # the engine steps on the main thread here
        print(f"threads busy (CPU time / wall time): {describe(res['threads_busy'], res['cores'])}")
    if "profile" in res:
        print(res["profile"])


if __name__ == "__main__":
    raise SystemExit(main())
