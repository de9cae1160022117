"""Evaluate the Sudoku model through the server's OpenAI-compatible HTTP API.

Sends each held-out puzzle as ``POST {base_url}/v1/completions`` with
``{"model": ..., "prompt": <81 chars>, "max_tokens": 81, "seed": k}`` at the given concurrency,
reads ``choices[0].text`` (its first 81 characters are the solved grid) and, when the server
returns them, the extension fields ``usage.denoising_steps`` and ``usage.canvases``. Prints the
same table as ``evaluate_local``.

    python -m tools.sudoku.evaluate_http --base-url http://127.0.0.1:8000 --per-bucket 50 --concurrency 8
    python -m tools.sudoku.evaluate_http --chat   # /v1/chat/completions instead
"""

from __future__ import annotations

import argparse
import asyncio
import time

from tools.sudoku.common import BUCKET_NAMES, EVAL_SEED, BucketStats, eval_set, format_table, positive_int


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-url", default="http://127.0.0.1:8000")
    ap.add_argument("--model", default=None, help="model name (default: the first one /v1/models lists)")
    ap.add_argument("--per-bucket", type=positive_int, default=50)
    ap.add_argument("--buckets", nargs="*", default=None, choices=BUCKET_NAMES,
                    help="bucket names to run (default: all)")
    ap.add_argument("--seed", type=int, default=EVAL_SEED, help="puzzle seed (held out from training)")
    ap.add_argument("--concurrency", type=positive_int, default=8)
    ap.add_argument("--blank", default="0", choices=["0", "."])
    ap.add_argument("--chat", action="store_true", help="use /v1/chat/completions with the grid as user message")
    ap.add_argument("--timeout", type=float, default=300.0)
    ap.add_argument("--api-key", default=None)
    return ap.parse_args(argv)


def _steps_per_canvas(usage: dict | None) -> tuple[float | None, int | None]:
    if not isinstance(usage, dict):
        return None, None
    steps = usage.get("denoising_steps")
    canvases = usage.get("canvases")
    try:
        canvases = int(canvases) if canvases is not None else None
    except (TypeError, ValueError):
        canvases = None
    if steps is None:
        return None, canvases
    try:
        steps = float(steps)
    except (TypeError, ValueError):
        return None, canvases
    return steps / max(1, canvases or 1), canvases


async def _one(client, args, model: str, puzzle: str, seed: int) -> tuple[str, dict | None]:
    if args.chat:
        body = {"model": model, "messages": [{"role": "user", "content": puzzle}], "max_tokens": 81, "seed": seed}
        r = await client.post("/v1/chat/completions", json=body)
        r.raise_for_status()
        data = r.json()
        return data["choices"][0]["message"]["content"] or "", data.get("usage")
    body = {"model": model, "prompt": puzzle, "max_tokens": 81, "seed": seed}
    r = await client.post("/v1/completions", json=body)
    r.raise_for_status()
    data = r.json()
    return data["choices"][0]["text"] or "", data.get("usage")


async def run(args, transport=None) -> tuple[dict[str, BucketStats], str]:
    import httpx

    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=args.concurrency, max_keepalive_connections=args.concurrency)
    async with httpx.AsyncClient(base_url=args.base_url.rstrip("/"), timeout=args.timeout, headers=headers,
                                 limits=limits, transport=transport) as client:
        model = args.model
        if model is None:
            r = await client.get("/v1/models")
            r.raise_for_status()
            model = r.json()["data"][0]["id"]
        sets = eval_set(args.per_bucket, seed=args.seed, blank=args.blank)
        wanted = args.buckets or BUCKET_NAMES
        stats = {name: BucketStats() for name in wanted}
        sem = asyncio.Semaphore(args.concurrency)
        # a puzzle's sampling seed follows its place in the full table, whichever buckets run
        jobs = [(name, puzzle, solution, BUCKET_NAMES.index(name) * args.per_bucket + i)
                for name in wanted for i, (puzzle, solution) in enumerate(sets[name])]

        async def worker(name, puzzle, solution, seed):
            async with sem:
                try:
                    text, usage = await _one(client, args, model, puzzle, seed)
                except (httpx.HTTPError, KeyError, IndexError, ValueError) as exc:
                    stats[name].errors += 1
                    stats[name].add(puzzle, solution, "", None, None)
                    print(f"request failed ({name}, seed {seed}): {exc!r}")
                    return
                steps, canvases = _steps_per_canvas(usage)
                stats[name].add(puzzle, solution, text, steps, canvases)

        await asyncio.gather(*(worker(*j) for j in jobs))
        return stats, model


def main(argv=None):
    args = parse_args(argv)
    t0 = time.time()
    stats, model = asyncio.run(run(args))
    dt = time.time() - t0
    n = sum(s.n for s in stats.values())
    print(f"base_url={args.base_url} model={model} per_bucket={args.per_bucket} seed={args.seed} "
          f"concurrency={args.concurrency} chat={args.chat} blank={args.blank!r} "
          f"({dt:.1f}s, {n / dt:.2f} puzzles/s)")
    print(format_table(stats))


if __name__ == "__main__":
    main()
