"""A fixed, seeded workload: prompt token ids, output lengths and diffusion parameters per request."""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class WorkItem:
    prompt_ids: tuple[int, ...]
    max_tokens: int  # whole canvases or not; outputs are fixed-length (eos ignored)
    seed: int
    max_denoising_steps: int


def make_workload(n: int, *, seed: int, vocab_low: int, vocab_high: int, canvas_length: int,
                  prompt_len: tuple[int, int] = (8, 64), canvases: tuple[int, int] = (1, 4),
                  max_denoising_steps: int = 8) -> list[WorkItem]:
    """``n`` requests; prompt lengths and output canvases drawn uniformly from the given ranges."""
    rng = random.Random(seed)
    items = []
    for i in range(n):
        length = rng.randint(*prompt_len)
        prompt = tuple(rng.randint(vocab_low, vocab_high - 1) for _ in range(length))
        items.append(WorkItem(prompt, canvas_length * rng.randint(*canvases), seed * 100_003 + i, max_denoising_steps))
    return items


def sudoku_workload(n: int, *, seed: int, tokenizer, max_tokens: int, max_denoising_steps: int) -> list[WorkItem]:
    """``n`` held-out Sudoku puzzles (tools.sudoku, the embedded model's task), the four buckets of
    givens interleaved: canvases converge after very different step counts. One canvas each."""
    from tools.sudoku.common import EVAL_SEED, eval_set

    per_bucket = -(-n // 4)
    buckets = list(eval_set(per_bucket, seed=EVAL_SEED + seed).values())
    puzzles = [bucket[i][0] for i in range(per_bucket) for bucket in buckets][:n]
    return [WorkItem(tuple(tokenizer(p).input_ids), max_tokens, seed * 100_003 + i, max_denoising_steps)
            for i, p in enumerate(puzzles)]
