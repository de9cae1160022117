"""The prefetched draws are exactly torch.multinomial's and torch.randint's from the same generator."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from engine.sampling.draws import DrawPrefetcher


@pytest.mark.parametrize("threaded", [True, False], ids=["worker-thread", "inline"])
def test_prefetched_draws_equal_multinomial_then_randint(threaded):
    rows, canvas, vocab = 5, 7, 13
    probs = torch.softmax(torch.randn(rows, canvas, vocab, generator=torch.Generator().manual_seed(0)) * 4, dim=-1)
    probs[0, 0] = 0.0
    probs[0, 0, 3] = 1.0  # a one-hot row: only index 3 can be drawn
    prefetcher = DrawPrefetcher(canvas, vocab, torch.device("cpu"), ThreadPoolExecutor(1) if threaded else None)
    try:
        for step in range(3):  # consecutive steps keep consuming each generator in order
            ours = [torch.Generator().manual_seed(100 + i) for i in range(rows)]
            theirs = [torch.Generator().manual_seed(100 + i) for i in range(rows)]
            for _ in range(step):  # advance both to the step's state the reference way
                for g_ours, g_theirs in zip(ours, theirs):
                    for g in (g_ours, g_theirs):
                        torch.multinomial(probs[0], 1, generator=g)
                        torch.randint(0, vocab, (1, canvas), generator=g)
            prefetcher.start([ours[:2], ours[2:4], ours[4:]])  # three tiles
            draws = []
            for i in range(3):  # as the runner does: take a tile, then start the next one
                draws.append(prefetcher.take(i))
                prefetcher.prefetch(i + 1)
            prefetcher.wait()
            sampled = torch.cat([torch.argmax(torch.div(probs[i:i + len(d.noise)], d.exponentials), dim=-1)
                                 for i, d in zip((0, 2, 4), draws)])
            noise = torch.cat([d.noise for d in draws])
            for i, g in enumerate(theirs):
                assert torch.equal(sampled[i], torch.multinomial(probs[i], 1, generator=g).view(canvas))
                assert torch.equal(noise[i], torch.randint(0, vocab, (1, canvas), generator=g).view(canvas))
            assert sampled[0, 0] == 3
    finally:
        prefetcher.wait()


def test_a_pass_that_fails_leaves_no_draw_in_flight():
    """``wait`` after a failure returns only when the worker no longer touches the generators."""
    prefetcher = DrawPrefetcher(64, 512, torch.device("cpu"), ThreadPoolExecutor(1))
    gens = [torch.Generator().manual_seed(i) for i in range(8)]
    prefetcher.start([gens[:4], gens[4:]])
    prefetcher.wait()  # the pass failed before taking any tile
    states = [g.get_state() for g in gens]
    reference = [torch.Generator().manual_seed(i) for i in range(8)]
    for g in reference[:4]:  # only the first tile was submitted before the sampler asked for it
        torch.empty(64, 512).exponential_(1, generator=g)
        torch.randint(0, 512, (1, 64), generator=g)
    assert all(torch.equal(s, r.get_state()) for s, r in zip(states, reference))
    prefetcher.wait()


@pytest.mark.parametrize("threaded", [True, False], ids=["worker-thread", "inline"])
def test_a_tile_is_drawn_once_per_pass(threaded):
    """Prefetching a tile that was already taken (or is in flight) draws nothing more."""
    prefetcher = DrawPrefetcher(8, 16, torch.device("cpu"), ThreadPoolExecutor(1) if threaded else None)
    gens = [torch.Generator().manual_seed(i) for i in range(4)]
    prefetcher.start([gens[:2], gens[2:]])
    prefetcher.take(0)
    prefetcher.prefetch(1)
    prefetcher.prefetch(1)
    prefetcher.take(1)
    prefetcher.prefetch(0)
    prefetcher.prefetch(1)
    prefetcher.wait()
    reference = [torch.Generator().manual_seed(i) for i in range(4)]
    for g in reference:  # one step's draws each
        torch.empty(8, 16).exponential_(1, generator=g)
        torch.randint(0, 16, (1, 8), generator=g)
    assert all(torch.equal(g.get_state(), r.get_state()) for g, r in zip(gens, reference))
