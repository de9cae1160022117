"""The shipped Sudoku checkpoint: served by the default path, it solves easy puzzles over HTTP.

A regression guard for the engine (masks, positions, sampling, stopping) on a trained model, not a
timed test: fixed puzzles and seeds, so the outcome is deterministic on a given CPU.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from server.default_model import EMBEDDED_SERVED_NAME, embedded_model_dir
from tests.test_server_metrics import wait_for
from tools.sudoku import generator
from tools.sudoku.common import BUCKETS, EVAL_SEED, eval_set

MIN_SOLVED = 18  # 20 of 20 measured with the shipped checkpoint (30,871 steps, 32-step cap)


def test_the_embedded_model_ships_with_the_package(tmp_path):
    """The embedded model and the page's assets are package data: a wheel holds them, so a non-editable
    ``pip install .`` finds them too (README)."""
    import shutil
    import subprocess
    import sys
    import zipfile
    from importlib.metadata import PackageNotFoundError, version
    from pathlib import Path

    for name in ("config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"):
        assert (embedded_model_dir() / name).is_file(), name
    root = Path(__file__).resolve().parents[1]
    # a clean copy of what the build reads: a build/ or *.egg-info left in the tree would be reused
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(root / name, source / name)
    for package in ("engine", "server", "tools"):
        shutil.copytree(root / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    # the installed setuptools where it meets pyproject's requirement (no index needed), else pip's
    # isolated build, which fetches one
    try:
        recent = int(version("setuptools").split(".")[0]) >= 77
    except PackageNotFoundError:
        recent = False
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--quiet",
                    *(["--no-build-isolation"] if recent else []), "-w", str(tmp_path / "dist")],
                   check=True, capture_output=True, timeout=600)
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    model = {f"engine/default_model/{p.name}" for p in embedded_model_dir().iterdir() if p.is_file()}
    static = {f"server/static/{p.name}" for p in (root / "server" / "static").iterdir() if p.is_file()}
    assert model and static and (model | static) <= names, sorted((model | static) - names)


@pytest.fixture(scope="module")
def default_server(server_launcher):
    return server_launcher([], model_name=EMBEDDED_SERVED_NAME)  # no --model: the embedded checkpoint


def test_default_server_solves_easy_puzzles(default_server):
    srv = default_server
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


def test_chat_takes_the_grid_as_nine_lines(default_server):
    """The chat endpoint takes the grid in a user message with its whitespace stripped: nine lines of
    nine digits, spaced out, give exactly the completion of the 81-character prompt (same seed)."""
    puzzle, _solution = eval_set(1, seed=EVAL_SEED, buckets=[BUCKETS[0]])[BUCKETS[0][0]][0]
    lines = "\n".join(" ".join(puzzle[9 * r: 9 * r + 9]) for r in range(9)) + "\n"
    assert len(lines) > 81 and lines.split() != [puzzle]
    chat = httpx.post(default_server.base_url + "/chat/completions", timeout=300, json={
        "model": EMBEDDED_SERVED_NAME, "messages": [{"role": "user", "content": lines}], "max_tokens": 82, "seed": 3})
    completion = httpx.post(default_server.base_url + "/completions", timeout=300, json={
        "model": EMBEDDED_SERVED_NAME, "prompt": puzzle, "max_tokens": 82, "seed": 3})
    assert chat.status_code == 200 and completion.status_code == 200, (chat.text, completion.text)
    answer = chat.json()["choices"][0]["message"]["content"]
    assert answer == completion.json()["choices"][0]["text"]
    assert chat.json()["usage"]["prompt_tokens"] == completion.json()["usage"]["prompt_tokens"]
    assert generator.is_solved(answer[:81], puzzle)  # an easy puzzle: the grid was read, not noise


def test_chat_text_the_template_leaves_out_does_not_count_against_the_context(default_server):
    """The embedded template writes only the last user message, without whitespace: a long system prompt
    and blank lines beside the grid leave an 81-token prompt, which is served (the count of the rendered
    prompt decides, not the characters of the request)."""
    puzzle, _solution = eval_set(1, seed=EVAL_SEED, buckets=[BUCKETS[0]])[BUCKETS[0][0]][0]
    limit = 1024  # the checkpoint's max_position_embeddings: 81 + 82 fit, 1,100 characters would not
    for messages in ([{"role": "system", "content": "x" * 1015}, {"role": "user", "content": puzzle}],
                     [{"role": "user", "content": puzzle + "\n" * 1000}]):
        assert sum(len(m["content"]) for m in messages) + 82 > limit
        r = httpx.post(default_server.base_url + "/chat/completions", timeout=300, json={
            "model": EMBEDDED_SERVED_NAME, "messages": messages, "max_completion_tokens": 82, "seed": 3})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["prompt_tokens"] == 81
    # 1022 characters are 1022 tokens here: with one more to generate they fit (the tools JSON used to add 2)
    r = httpx.post(default_server.base_url + "/chat/completions", timeout=300, json={
        "model": EMBEDDED_SERVED_NAME, "messages": [{"role": "user", "content": "1" * 1022}],
        "max_completion_tokens": 1, "seed": 3})
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == 1022, r.text


def test_a_long_history_the_template_drops_is_served(default_server):
    """260 earlier turns (over 20,000 characters) before the puzzle: the template keeps the last user
    message, so the prompt is the puzzle's 81 tokens and is served (counting the request's characters got
    such a conversation refused as "at least" thousands of tokens). A conversation the template renders to
    nothing names messages."""
    puzzle, _solution = eval_set(1, seed=EVAL_SEED, buckets=[BUCKETS[0]])[BUCKETS[0][0]][0]
    history = [{"role": "user" if i % 2 == 0 else "assistant", "content": puzzle} for i in range(260)]
    assert sum(len(m["content"]) for m in history) > 20_000
    r = httpx.post(default_server.base_url + "/chat/completions", timeout=300, json={
        "model": EMBEDDED_SERVED_NAME, "messages": history + [{"role": "user", "content": puzzle}],
        "max_completion_tokens": 82, "seed": 3})
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == 81, r.text[:300]
    r = httpx.post(default_server.base_url + "/chat/completions", timeout=60, json={
        "model": EMBEDDED_SERVED_NAME, "messages": [{"role": "user", "content": " "}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages", r.text


def _infill(srv, puzzle: str, suffix: str, seed: int) -> dict:
    r = httpx.post(srv.base_url + "/completions", timeout=300, json={
        "model": EMBEDDED_SERVED_NAME, "prompt": puzzle, "suffix": suffix, "max_tokens": 81 - len(suffix), "seed": seed})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]


def test_suffix_infill_completes_easy_puzzles(default_server):
    """Infill: the last 41 cells of the solution as the suffix, 40 free cells before it; the filled text
    plus the suffix is the solution."""
    puzzles = eval_set(20, seed=EVAL_SEED, buckets=[BUCKETS[0]])[BUCKETS[0][0]]
    with ThreadPoolExecutor(4) as pool:
        choices = list(pool.map(lambda k: _infill(default_server, puzzles[k][0], puzzles[k][1][40:], k), range(20)))
    assert all(len(c["text"]) == 40 and c["finish_reason"] == "stop" for c in choices)
    solved = sum(generator.is_solved(c["text"] + solution[40:], puzzle) for c, (puzzle, solution) in zip(choices, puzzles))
    assert solved >= MIN_SOLVED, f"infilled {solved} of 20 easy puzzles"


def test_infill_usage_counts_the_suffix_as_prompt(default_server):
    """The suffix is model input (pinned in the canvas, read at every step): usage counts it with the
    prompt, as OpenAI does."""
    puzzle, solution = eval_set(1, seed=EVAL_SEED, buckets=[BUCKETS[0]])[BUCKETS[0][0]][0]
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir())
    suffix = solution[40:]
    plain = httpx.post(default_server.base_url + "/completions", timeout=300, json={
        "model": EMBEDDED_SERVED_NAME, "prompt": puzzle, "max_tokens": 40, "seed": 1}).json()["usage"]
    before = default_server.wait_idle()
    infill = httpx.post(default_server.base_url + "/completions", timeout=300, json={
        "model": EMBEDDED_SERVED_NAME, "prompt": puzzle, "suffix": suffix, "max_tokens": 40, "seed": 1}).json()["usage"]
    suffix_tokens = len(tokenizer(suffix, add_special_tokens=False).input_ids)
    assert suffix_tokens > 0 and infill["prompt_tokens"] == plain["prompt_tokens"] + suffix_tokens
    assert infill["total_tokens"] == infill["prompt_tokens"] + infill["completion_tokens"]
    # the metrics count the same prompt tokens as usage, once the choice's count has arrived
    count = ("diffusion_server:request_prompt_tokens_count", frozenset())
    after = wait_for(default_server, count, before[count] + 1)
    for name in ("diffusion_server:prompt_tokens_total", "diffusion_server:request_prompt_tokens_sum"):
        assert after[(name, frozenset())] - before[(name, frozenset())] == infill["prompt_tokens"], name


def test_suffix_decides_an_ambiguous_infill(default_server):
    """Puzzles with 30 givens have many solutions: the model's own completions end differently from a
    given solution, yet with that solution's last 41 cells pinned as the suffix its fill completes it."""
    import random

    rng = random.Random(5)
    puzzles = [generator.make_puzzle(rng, 30) for _ in range(20)]
    assert all(generator.count_solutions(p, 2) == 2 for p, _ in puzzles)

    def run(k):
        puzzle, solution = puzzles[k]
        free = httpx.post(default_server.base_url + "/completions", timeout=300, json={
            "model": EMBEDDED_SERVED_NAME, "prompt": puzzle, "max_tokens": 81, "seed": k}).json()["choices"][0]["text"]
        filled = _infill(default_server, puzzle, solution[40:], k)["text"]
        return free[40:81] != solution[40:], generator.is_solved(filled + solution[40:], puzzle)

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(run, range(20)))
    differs = sum(d for d, _ in results)
    infilled = sum(ok for _, ok in results)
    assert differs >= 15, f"only {differs} of 20 free completions differ from the given solution"
    assert infilled >= 15, f"infilled {infilled} of 20 ambiguous puzzles"


@pytest.mark.parametrize("chat", [False, True], ids=["completions", "chat"])
def test_the_http_evaluator_reads_the_real_server(default_server, chat):
    """tools/sudoku/evaluate_http, which makes the README's quality table over HTTP, against the embedded
    server itself: every bucket's puzzle is answered and scored, with the server's steps per canvas."""
    import asyncio

    from tools.sudoku import evaluate_http

    args = evaluate_http.parse_args(["--base-url", default_server.url, "--per-bucket", "1", "--concurrency", "4",
                                     *(["--chat"] if chat else [])])
    stats, model = asyncio.run(evaluate_http.run(args))
    assert model == EMBEDDED_SERVED_NAME and list(stats) == [b[0] for b in BUCKETS]
    for name, s in stats.items():
        assert (s.n, s.errors, s.canvases) == (1, 0, [1]), name
        assert len(s.steps) == 1 and 1 <= s.steps[0] <= 32, name
        assert s.cells_total > 0 and s.cells_right > 0, name
    assert stats[BUCKETS[0][0]].solved == 1  # the easiest bucket's puzzle
