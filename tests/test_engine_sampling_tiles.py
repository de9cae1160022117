"""The sampling tile geometry keeps the fp32 transient within sampling_tile_bytes, down to a chunk of
positions of one row (whose whole-row exponential draws must stay alive)."""

from __future__ import annotations

import pytest

from engine.sampling.reference import CHUNK_FP32_COPIES, sampling_tiles

MIB = 2**20


@pytest.mark.parametrize("budget,canvas,vocab,in_flight,expected", [
    # many whole rows: a row of 32 positions over 261 tokens holds 2 canvases of draws and 5 fp32 copies
    # per position, 4 * 261 * (2 * 32 + 5 * 32) = 233,856 bytes, and 512 MiB holds 2,295 of them
    (512 * MIB, 32, 261, 2, (2295, 32)),
    # DiffusionGemma on CUDA: one row, 50-position chunks (51 would leave a last chunk of 1, joined to the one
    # before it: 52 positions, over the budget)
    (512 * MIB, 256, 262144, 1, (1, 50)),
    # the same on CPU: two rows of draws fill the budget, four positions at a time (never fewer: ALONE_BELOW)
    (512 * MIB, 256, 262144, 2, (1, 4)),
    (1, 16, 261, 2, (1, 4)),
])
def test_tiles_fit_the_budget(budget, canvas, vocab, in_flight, expected):
    tiles = sampling_tiles(budget, canvas, vocab, in_flight)
    assert (tiles.rows, tiles.positions) == expected
    smallest = 4 * vocab * (in_flight * canvas + CHUNK_FP32_COPIES * 4)  # four positions of one row, its draws
    assert tiles.transient_bytes(canvas, vocab) <= max(budget, smallest)
    if 4 < tiles.positions < canvas:  # one more position would not fit
        bigger = type(tiles)(1, tiles.positions + 1, in_flight)
        assert bigger.transient_bytes(canvas, vocab) > budget
    else:  # whole rows: one more row would not fit
        bigger = type(tiles)(tiles.rows + 1, canvas, in_flight)
        assert bigger.transient_bytes(canvas, vocab) > budget


GIB = 2**30


@pytest.mark.parametrize("canvas,positions,chunks", [
    (16, 4, [4, 4, 4, 4]), (17, 4, [4, 4, 4, 5]), (19, 4, [4, 4, 4, 7]), (20, 4, [4, 4, 4, 4, 4]),
    (256, 51, [51, 51, 51, 51, 52]), (256, 50, [50, 50, 50, 50, 50, 6]), (16, 16, [16]),
])
def test_no_position_chunk_has_fewer_than_four_rows(canvas, positions, chunks):
    """The lm head and the self-conditioning product run on 1-3 rows with another CPU kernel than generate's
    whole-canvas call: a remainder that short joins the chunk before it."""
    from engine.sampling.reference import SamplingTiles

    got = SamplingTiles(1, positions, 1).chunks(canvas)
    assert [c.stop - c.start for c in got] == chunks
    assert got[0].start == 0 and got[-1].stop == canvas and all(a.stop == b.start for a, b in zip(got, got[1:]))


@pytest.mark.parametrize("free,expected", [
    (2 * GIB, 512 * MIB),  # a nearly full card: the floor
    (33 * GIB, int(3.3 * GIB)),  # 26B-A4B in bf16 on an 80 GiB card: 10% of what the weights leave
    (120 * GIB, 8 * GIB),  # a mostly empty card or a large host: the cap
])
def test_default_tile_budget_follows_free_memory(free, expected):
    from engine.memory import auto_sampling_tile_bytes

    assert auto_sampling_tile_bytes(free) == expected


def test_default_tile_budget_holds_whole_rows_on_a_large_gpu():
    """Position chunks re-read the lm head and the embedding matrix once per chunk; on an 80 GiB card
    beside the 26B weights, the default budget takes DiffusionGemma's canvas rows whole, two at a time."""
    from engine.memory import auto_sampling_tile_bytes

    tiles = sampling_tiles(auto_sampling_tile_bytes(33 * GIB), 256, 262144, 1)
    assert (tiles.rows, tiles.positions) == (2, 256)


def test_engine_default_tile_budget_comes_from_free_memory(tmp_path):
    from engine import EngineCore, EngineSettings
    from engine.loader import load_model
    from engine.memory import SAMPLING_TILE_MAX_BYTES, SAMPLING_TILE_MIN_BYTES
    from tools.tiny_checkpoint import TinySpec, build_tiny_checkpoint

    build_tiny_checkpoint(tmp_path, TinySpec())
    settings = EngineSettings(model=str(tmp_path))
    assert settings.sampling_tile_bytes is None
    core = EngineCore(load_model(settings), settings)
    try:
        assert SAMPLING_TILE_MIN_BYTES <= core.runner.sampling_tile_bytes <= SAMPLING_TILE_MAX_BYTES
        explicit = EngineCore(core.loaded, EngineSettings(model=str(tmp_path), sampling_tile_bytes=12345))
        assert explicit.runner.sampling_tile_bytes == 12345
        explicit.close()
    finally:
        core.close()
