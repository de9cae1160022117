"""One engine against engine replicas in processes (``--data-parallel-size``), in process, no HTTP.

    python -m bench.replicas --model engine/default_model --replicas 2 --rounds 2

Runs the held-out Sudoku puzzles (``bench.workload.sudoku_workload``) at a fixed concurrency through
``AsyncEngine`` and through ``ReplicatedEngine``, round after round, and prints committed tok/s and
the CPU time each process used (the front's own, then each replica's): replicas that use the cores
fully show about one CPU-second per second each.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time

from engine import AsyncEngine, EngineSettings, SamplingParams
from engine.replicas import ReplicatedEngine

from .workload import sudoku_workload


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(") ", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def run_round(engine, items, concurrency: int, tag: str) -> tuple[float, float]:
    """(committed tokens, seconds) of all ``items`` at ``concurrency``."""
    gate = asyncio.Semaphore(concurrency)

    async def one(i, item):
        params = SamplingParams(max_tokens=item.max_tokens, seed=item.seed, max_denoising_steps=item.max_denoising_steps)
        async with gate:
            return sum([len(o.token_ids) async for o in engine.generate(list(item.prompt_ids), params, f"{tag}-{i}")])

    t0 = time.perf_counter()
    tokens = sum(await asyncio.gather(*(one(i, item) for i, item in enumerate(items))))
    return tokens, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="engine/default_model")
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--steps", type=int, default=32, help="max_denoising_steps of every request")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args(argv)
    for replicas in (1, args.replicas):
        settings = EngineSettings(model=args.model, num_threads=1, data_parallel_size=replicas)
        engine = ReplicatedEngine(settings) if replicas > 1 else AsyncEngine(settings)
        engine.start()
        try:
            items = sudoku_workload(args.requests, seed=0, tokenizer=engine.tokenizer, max_tokens=engine.canvas_length,
                                    max_denoising_steps=args.steps)
            pids = [os.getpid(), *(p.pid for p in getattr(engine, "_procs", []))]
            for r in range(args.rounds):
                before = [cpu_seconds(p) for p in pids]
                tokens, seconds = asyncio.run(run_round(engine, items, args.concurrency, f"r{r}"))
                used = [cpu_seconds(p) - b for p, b in zip(pids, before)]
                print(f"replicas {replicas}, round {r + 1}: {tokens / seconds:.0f} committed tok/s in {seconds:.2f} s; "
                      f"CPU seconds per process {', '.join(f'{u:.2f}' for u in used)}", flush=True)
        finally:
            engine.shutdown()
    return 0


if __name__ == "__main__":  # the replicas are spawned: they import this module without running it
    raise SystemExit(main())
