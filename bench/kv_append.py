"""Micro-benchmark of the KV cache's append after an encoder call (``KVCacheManager.append_from_view``).

    python -m bench.kv_append                                  # the current engine/kv_cache.py
    git show REV:engine/kv_cache.py > /tmp/kv_old.py
    python -m bench.kv_append --module /tmp/kv_old.py          # another version of the module, same workload

A group of ``--rows`` requests appends ``--tokens`` new tokens each into 3 sliding-window layers
(window 64) and 1 full-attention layer, from an empty cache and, with sliding-window overflow,
after 40 stored tokens. Prints the median milliseconds per call over ``--repeats`` calls.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time

import torch

LAYER_TYPES = ["sliding_attention"] * 3 + ["full_attention"]
WINDOW = 64
HEADS, HEAD_DIM = 2, 16


def load_module(path: str | None):
    if path is None:
        from engine import kv_cache

        return kv_cache
    spec = importlib.util.spec_from_file_location("kv_cache_under_test", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def one_call_seconds(kv_cache, rows: int, tokens: int, stored: int) -> float:
    manager = kv_cache.KVCacheManager(LAYER_TYPES, WINDOW, [(HEADS, HEAD_DIM)] * len(LAYER_TYPES), 16,
                                      torch.device("cpu"), torch.float32)
    ids = [f"r{i}" for i in range(rows)]
    for rid in ids:
        manager.allocate(rid, 40 + stored + tokens)
    manager.sync()
    for rid in ids:  # pretend `stored` tokens are already cached
        kv = manager.get(rid)
        kv.total_len = stored
        kv.stored = {t: min(stored, WINDOW - 1 if t == "sliding_attention" else stored) for t in set(LAYER_TYPES)}
    view = manager.view(ids)
    view.new_keys = [torch.randn(rows, HEADS, tokens, HEAD_DIM) for _ in LAYER_TYPES]
    view.new_values = [torch.randn(rows, HEADS, tokens, HEAD_DIM) for _ in LAYER_TYPES]
    valid = torch.ones(rows, tokens, dtype=torch.bool)
    t0 = time.perf_counter()
    manager.append_from_view(ids, view, valid)
    return time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--module", default=None, help="a kv_cache.py file to time (default: engine.kv_cache)")
    ap.add_argument("--rows", type=int, default=12)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=200)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    kv_cache = load_module(args.module)
    for stored, label in ((0, "no overflow"), (40, "sliding-window overflow")):
        times = [one_call_seconds(kv_cache, args.rows, args.tokens, stored) for _ in range(args.repeats)]
        print(f"{label}: {1000 * statistics.median(times):.3f} ms per call "
              f"({args.rows} rows x {args.tokens} tokens x {len(LAYER_TYPES)} layers)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
