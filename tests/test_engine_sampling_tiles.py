"""The sampling tile geometry keeps the fp32 transient within sampling_tile_bytes, down to a chunk of
positions of one row (whose whole-row exponential draws must stay alive)."""

from __future__ import annotations

import pytest

from engine.sampler import CHUNK_FP32_COPIES, sampling_tiles

MIB = 2**20


@pytest.mark.parametrize("budget,canvas,vocab,in_flight,expected", [
    (512 * MIB, 32, 261, 2, (512 * MIB // (4 * 261 * (2 * 32 + CHUNK_FP32_COPIES * 32)), 32)),  # many whole rows
    (512 * MIB, 256, 262144, 1, (1, 51)),  # DiffusionGemma on CUDA: one row, 51-position chunks
    (512 * MIB, 256, 262144, 2, (1, 1)),  # the same on CPU: two rows of draws fill the budget, one position at a time
    (1, 16, 261, 2, (1, 1)),
])
def test_tiles_fit_the_budget(budget, canvas, vocab, in_flight, expected):
    tiles = sampling_tiles(budget, canvas, vocab, in_flight)
    assert (tiles.rows, tiles.positions) == expected
    smallest = 4 * vocab * (in_flight * canvas + CHUNK_FP32_COPIES)  # one position of one row and its draws
    assert tiles.transient_bytes(canvas, vocab) <= max(budget, smallest)
    if tiles.positions < canvas:  # one more position would not fit
        bigger = type(tiles)(1, tiles.positions + 1, in_flight)
        assert bigger.transient_bytes(canvas, vocab) > budget
