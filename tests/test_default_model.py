"""The shipped Sudoku checkpoint: served by the default path, it solves easy puzzles over HTTP.

A regression guard for the engine (masks, positions, sampling, stopping) on a trained model, not a
timed test: fixed puzzles and seeds, so the outcome is deterministic on a given CPU.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx

from server.default_model import EMBEDDED_SERVED_NAME, embedded_model_dir
from tools.sudoku import generator
from tools.sudoku.common import BUCKETS, EVAL_SEED, eval_set

MIN_SOLVED = 18  # 20 of 20 measured with the shipped checkpoint (30,871 steps, 32-step cap)


def test_the_embedded_model_ships_with_the_package():
    assert (embedded_model_dir() / "config.json").is_file()
    assert (embedded_model_dir() / "model.safetensors").is_file()
    assert (embedded_model_dir() / "tokenizer.json").is_file()


def test_default_server_solves_easy_puzzles(server_launcher):
    srv = server_launcher([], model_name=EMBEDDED_SERVED_NAME)  # no --model: the embedded checkpoint
    models = httpx.get(srv.base_url + "/models", timeout=30).json()["data"]
    assert [m["id"] for m in models] == [EMBEDDED_SERVED_NAME]
    puzzles = eval_set(20, seed=EVAL_SEED, buckets=[BUCKETS[0]])[BUCKETS[0][0]]

    def solve(item):
        k, (puzzle, _solution) = item
        r = httpx.post(srv.base_url + "/completions", timeout=300,
                       json={"model": EMBEDDED_SERVED_NAME, "prompt": puzzle, "max_tokens": 82, "seed": k})
        assert r.status_code == 200, r.text
        body = r.json()
        return generator.is_solved(body["choices"][0]["text"][:81], puzzle), body["usage"]

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(solve, enumerate(puzzles)))
    solved = sum(ok for ok, _ in results)
    print(f"solved {solved} of 20 easy puzzles")
    assert solved >= MIN_SOLVED, f"solved {solved} of 20 easy puzzles"
    for _, usage in results:
        assert usage["canvases"] == 1 and usage["denoising_steps"] >= 1
