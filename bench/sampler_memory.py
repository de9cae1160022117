"""Peak memory of one sampler step for one canvas row, at DiffusionGemma's vocabulary (262,144) and
hidden size (2816), measured on CPU as the growth of the process's peak RSS over the step.
On Linux the peak is reset to the current RSS just before the step (``/proc/self/clear_refs``), so
neither an earlier transient nor pages the kernel reclaimed since can hide the step's own growth.

Each sampler runs in a fresh process: the lm head's weights (float32, tied with the embedding) are
allocated and touched first, so the growth is the step's transient alone.

    python -m bench.sampler_memory                       # both samplers, canvas 256 (about a minute)
    python -m bench.sampler_memory --sampler fast --canvas 32 --json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

from bench.rss import proc_status, reset_peak

VOCAB, HIDDEN = 262144, 2816


def _model(canvas: int):
    """The parts of a DiffusionGemma model a sampler reads, at the real vocabulary and hidden size."""
    from types import SimpleNamespace

    import torch

    pattern = torch.randn(1024, HIDDEN) * 0.02
    weight = pattern.repeat(VOCAB // 1024, 1)  # touched: every page is resident before the step
    lm_head = torch.nn.Linear(HIDDEN, VOCAB, bias=False, device="meta")
    lm_head.weight = torch.nn.Parameter(weight, requires_grad=False)
    embed = SimpleNamespace(weight=weight, embed_scale=torch.tensor(HIDDEN ** 0.5))
    text = SimpleNamespace(vocab_size=VOCAB, hidden_size=HIDDEN, final_logit_softcapping=30.0)
    return SimpleNamespace(config=SimpleNamespace(canvas_length=canvas, text_config=text), lm_head=lm_head,
                           model=SimpleNamespace(decoder=SimpleNamespace(embed_tokens=embed)))


def _reset_peak_rss() -> int:
    """Reset the peak RSS to the current RSS where Linux allows it; returns the baseline in bytes."""
    try:
        reset_peak()
        return proc_status()["VmRSS"]
    except OSError:
        return _peak_rss()


def _peak_rss() -> int:
    try:
        return proc_status()["VmHWM"]
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure(sampler: str, canvas: int) -> dict:
    """Run one step of ``sampler`` over one row in this process; returns the peak RSS growth."""
    import torch

    from engine.sampling import make_sampler
    from engine.work import DecodeWork

    model = _model(canvas)
    s = make_sampler(sampler, model, torch.device("cpu"), tile_bytes=1 << 40, threaded=True, max_num_seqs=1)
    s.add("row", 1)
    row = [DecodeWork("row", False, 0, 10, 32, 0.4, 0.8, 0.1, 0.005)]
    hidden = torch.randn(1, canvas, HIDDEN)
    s.initial_canvas(row[0])
    before = _reset_peak_rss()
    t0 = time.perf_counter()
    with torch.inference_mode():
        s.begin(row)
        s.sample(hidden, row)
        s.end()
    seconds = time.perf_counter() - t0
    peak = _peak_rss()
    s.close()
    return {"sampler": sampler, "canvas": canvas, "vocab": VOCAB, "hidden": HIDDEN,
            "peak_bytes": peak - before, "planned_bytes": s.transient_bytes(1), "seconds": seconds}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sampler", choices=["reference", "fast"], action="append")
    ap.add_argument("--canvas", type=int, default=256)
    ap.add_argument("--json", action="store_true", help="one JSON object per sampler (in this process)")
    args = ap.parse_args(argv)
    samplers = args.sampler or ["reference", "fast"]
    if args.json:
        for name in samplers:
            print(json.dumps(measure(name, args.canvas)))
        return 0
    print(f"one canvas row: canvas {args.canvas}, vocabulary {VOCAB}, hidden {HIDDEN}, float32, CPU")
    print(f"{'sampler':>10} {'peak MiB':>10} {'planned MiB':>12} {'seconds':>8}")
    for name in samplers:  # a fresh process each: the peak RSS is a high-water mark
        out = subprocess.run([sys.executable, "-m", "bench.sampler_memory", "--json", "--sampler", name,
                              "--canvas", str(args.canvas)], capture_output=True, text=True, check=True,
                             env=dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1")))
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{name:>10} {r['peak_bytes'] / 2**20:>10.1f} {r['planned_bytes'] / 2**20:>12.1f} {r['seconds']:>8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
