"""Engine overhead per pass, in process: time outside the model's forward calls at a fixed concurrency.

    python -m bench.profile_engine --concurrency 16

"Forward" is the time inside the encoder, the decoder layers and the lm head (what transformers'
``generate`` spends in ``model.forward``); everything else in a pass (scheduling, KV views,
sampling, bookkeeping) is overhead. Prints the split, the top functions by own time and the
engine's own functions by cumulative time.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time
from pathlib import Path

import torch

from engine import EngineCore, EngineSettings, SamplingParams
from engine.loader import load_model

from .run import BENCH_SPEC, build_bench_model
from .workload import make_workload


class _PassTimer:
    def __init__(self):
        self.passes = self.seconds = self.forward = self.sampling = 0.0
        self.batch = 0

    def on_pass(self, s):
        self.passes += 1
        self.seconds += s.seconds
        self.forward += s.forward_seconds
        self.sampling += s.sampling_seconds
        self.batch += s.decoder_batch_size

    def on_canvas(self, s):
        pass

    def on_request_finished(self, s):
        pass


def run(model: str, concurrency: int, requests: int, steps: int, threads: int, profile: bool) -> dict:
    torch.set_num_threads(threads)
    settings = EngineSettings(model=model, max_num_seqs=concurrency)
    loaded = load_model(settings)
    timer = _PassTimer()
    core = EngineCore(loaded, settings, timer)
    cfg = loaded.model.config
    items = make_workload(requests, seed=1, vocab_low=5, vocab_high=260, canvas_length=cfg.canvas_length,
                          max_denoising_steps=steps)
    pending = list(items)
    prof = cProfile.Profile() if profile else None
    t0 = time.perf_counter()
    if prof:
        prof.enable()
    n = 0
    while pending or core.has_work():
        while pending and core.num_running + core.num_waiting < concurrency:  # closed loop
            it = pending.pop(0)
            params = SamplingParams(max_tokens=it.max_tokens, seed=it.seed, max_denoising_steps=it.max_denoising_steps,
                                    ignore_eos=True)
            core.add_request(f"r{n}", list(it.prompt_ids), core.resolve(list(it.prompt_ids), params))
            n += 1
        core.step()
    if prof:
        prof.disable()
    wall = time.perf_counter() - t0
    tokens = sum(it.max_tokens for it in items)
    out = {
        "concurrency": concurrency,
        "passes": int(timer.passes),
        "mean_decoder_batch": timer.batch / max(1, timer.passes),
        "wall_s": wall,
        "tokens_per_s": tokens / wall,
        "pass_ms": 1000 * timer.seconds / max(1, timer.passes),
        "forward_ms": 1000 * timer.forward / max(1, timer.passes),
        "sampling_ms": 1000 * timer.sampling / max(1, timer.passes),
        "overhead_fraction": 1 - timer.forward / max(1e-9, timer.seconds),
        "bookkeeping_fraction": 1 - (timer.forward + timer.sampling) / max(1e-9, timer.seconds),
    }
    if prof:
        buf = io.StringIO()
        stats = pstats.Stats(prof, stream=buf)
        stats.sort_stats("tottime").print_stats(15)
        # the engine's own functions by cumulative time: where the time outside the forward goes
        # (cProfile's per-call cost inflates these Python-heavy pieces somewhat)
        stats.sort_stats("cumulative").print_stats(r"/engine/", 30)
        out["profile"] = buf.getvalue()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-profile", action="store_true")
    args = ap.parse_args(argv)
    model = args.model or str(build_bench_model(Path("runs/bench-model")))
    res = run(model, args.concurrency, args.requests, args.steps, args.threads, not args.no_profile)
    print(f"model {model} ({BENCH_SPEC if args.model is None else ''}), concurrency {res['concurrency']}, "
          f"{res['passes']} passes, mean decoder batch {res['mean_decoder_batch']:.1f}")
    book = res["pass_ms"] - res["forward_ms"] - res["sampling_ms"]
    print(f"pass {res['pass_ms']:.2f} ms = forward {res['forward_ms']:.2f} ms + sampling {res['sampling_ms']:.2f} ms "
          f"+ engine bookkeeping {book:.2f} ms")
    print(f"outside forward: {res['overhead_fraction']:.1%} of the pass; bookkeeping alone: "
          f"{res['bookkeeping_fraction']:.1%}; {res['tokens_per_s']:.0f} committed tok/s")
    if "profile" in res:
        print(res["profile"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
