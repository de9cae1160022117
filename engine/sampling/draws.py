"""The reference sampler's random numbers of one denoising step, drawn ahead of the logits that use them.

A step takes from each request's ``torch.Generator``, in this order, exactly what transformers'
sampler takes at batch 1: the exponentials behind ``torch.multinomial(probs, 1)`` (which draws
``q ~ Exp(1)`` shaped like ``probs`` and returns ``argmax(probs / q)``), then the renoise tokens
(``torch.randint(0, vocab, (1, C))``). None of them depends on the logits, so on CPU they are drawn
on a worker thread while the decoder's forward runs, and the sampler only divides and takes argmax.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch


@dataclass
class TileDraws:
    exponentials: torch.Tensor  # [n, C, V] fp32 ~ Exp(1): multinomial's draw for each row
    noise: torch.Tensor  # [n, C] long: renoise tokens for each row


def draw_tile(generators: list[torch.Generator], canvas_length: int, vocab_size: int, device) -> TileDraws:
    """One step's draws for each row, from that row's generator (the reference's order and shapes),
    in two tensor calls per row (on CPU this Python loop runs beside the forward and shares its GIL)."""
    n = len(generators)
    exponentials = torch.empty((n, canvas_length, vocab_size), dtype=torch.float32, device=device)
    noise = torch.empty((n, 1, canvas_length), dtype=torch.long, device=device)
    for row_exponentials, row_noise, g in zip(exponentials.unbind(0), noise.unbind(0), generators):
        row_exponentials.exponential_(1, generator=g)  # == empty_like(probs[i]).exponential_ inside multinomial
        torch.randint(0, vocab_size, (1, canvas_length), generator=g, out=row_noise)  # == randint(..., (1, C))
    return TileDraws(exponentials, noise.view(n, canvas_length))


class DrawPrefetcher:
    """Draws tiles of a pass in order, one tile ahead of the sampler.

    ``start`` submits the first tile (call it before the forward); ``take(i)`` returns tile ``i``
    and ``prefetch(i + 1)`` submits the next one while tile ``i`` is sampled (the caller picks the
    moment: work it queues on the same executor before that runs first), so at most two tiles of
    draws are alive. ``wait`` must be called before the generators are used again (also when the pass
    fails). Without an ``executor`` (CUDA, where the draws are asynchronous kernels anyway) the draws
    run inline when taken.
    """

    def __init__(self, canvas_length: int, vocab_size: int, device, executor: ThreadPoolExecutor | None):
        self.canvas_length = canvas_length
        self.vocab_size = vocab_size
        self.device = device
        self._pool = executor
        self._tiles: list[list[torch.Generator]] = []
        self._futures: dict[int, Future] = {}
        self._started: set[int] = set()  # tiles submitted this pass (taken or not)

    def prefetch(self, index: int) -> None:
        """Start drawing tile ``index`` on the executor (no-op inline, past the last tile, or if started)."""
        if self._pool is not None and index < len(self._tiles) and index not in self._started:
            self._started.add(index)
            self._futures[index] = self._pool.submit(
                draw_tile, self._tiles[index], self.canvas_length, self.vocab_size, self.device
            )

    def start(self, tiles: list[list[torch.Generator]]) -> None:
        self.wait()
        self._tiles = tiles
        self.prefetch(0)

    def take(self, index: int) -> TileDraws:
        """Tile ``index``'s draws: the prefetched ones, or drawn now if it was never prefetched."""
        future = self._futures.pop(index, None)
        if future is None:
            self._started.add(index)
            return draw_tile(self._tiles[index], self.canvas_length, self.vocab_size, self.device)
        return future.result()

    def wait(self) -> None:
        """Block until no draw is in flight; drop drawn tiles nobody took."""
        for future in self._futures.values():
            future.exception()  # waits; an error here already failed the pass that took it
        self._futures.clear()
        self._started.clear()
        self._tiles = []

