"""The Sudoku trainer: a few steps on a micro model, resume, export, and the evaluators."""

import asyncio
import json
import math

import httpx
import pytest
import torch

from tests.conftest import REPO_ROOT
from tools.sudoku import evaluate_http, evaluate_local, train
from tools.sudoku.common import eval_set
from tools.sudoku.model import BOS_ID, CANVAS_LENGTH, EOS_ID, PAD_ID, VOCAB_SIZE, build_tokenizer

MICRO = ["--size", "micro", "--batch-size", "4", "--pool-size", "12", "--pool-givens", "30", "30",
         "--no-progress", "--log-every", "1", "--save-every", "2", "--warmup", "2"]


def _log(workdir):
    return [json.loads(line) for line in (workdir / "loss_log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("sudoku_run")
    train.main(["--workdir", str(workdir), "--steps", "5", "--max-steps-this-run", "3", *MICRO])
    return workdir


def test_three_steps_give_a_finite_loss(trained):
    log = _log(trained)
    assert [r["step"] for r in log] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["decoder_loss"]) for r in log)
    state = torch.load(trained / "checkpoint.pt", weights_only=False)
    assert state["step"] == 3


def test_resume_continues_from_the_checkpoint(trained, tmp_path):
    import shutil

    workdir = tmp_path / "resumed"
    shutil.copytree(trained, workdir)
    train.main(["--workdir", str(workdir), "--steps", "5", *MICRO])
    steps = [r["step"] for r in _log(workdir)]
    assert steps == [1, 2, 3, 4, 5]
    assert torch.load(workdir / "checkpoint.pt", weights_only=False)["step"] == 5

    # resuming reproduces an uninterrupted run (RNG state and optimizer are restored)
    straight = tmp_path / "straight"
    train.main(["--workdir", str(straight), "--steps", "5", *MICRO])
    a = torch.load(workdir / "checkpoint.pt", weights_only=False)["model"]
    b = torch.load(straight / "checkpoint.pt", weights_only=False)["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


def test_new_phase_restarts_the_schedule_at_the_resumed_step(trained, tmp_path):
    """--new-phase: warmup and cosine count from the resumed step to --steps (without it, a resumed
    run continues the schedule that began at step 0), and the phase's start is saved."""
    import shutil

    workdir = tmp_path / "phase"
    shutil.copytree(trained, workdir)
    train.main(["--workdir", str(workdir), "--steps", "7", "--new-phase", "--lr", "1e-3", *MICRO])
    new = [r for r in _log(workdir) if r["step"] > 3]
    assert [r["step"] for r in new] == [4, 5, 6, 7]
    # warmup 2 from step 3: 1/2 and 2/2 of the peak; then the cosine over the phase's 4 steps starts
    # at the peak, and halfway through it is at min_lr_ratio + (1 - min_lr_ratio) / 2 of the peak
    assert [r["lr"] for r in new] == pytest.approx([0.5e-3, 1e-3, 1e-3, 1e-3 * (0.05 + 0.95 * 0.5)])
    state = torch.load(workdir / "checkpoint.pt", weights_only=False)
    assert (state["step"], state["phase"]["step"]) == (7, 3)
    # each command that trained it is recorded, and the export carries the record
    assert [(run["start_step"], run["flags"]["new_phase"], run["flags"]["steps"]) for run in state["runs"]] == [
        (0, False, 5), (3, True, 7)]
    assert state["runs"][1]["flags"]["lr"] == 1e-3 and state["runs"][0]["flags"]["seed"] == 1234
    train.main(["--workdir", str(workdir), "--size", "micro", "--export", str(tmp_path / "export")])
    info = json.loads((tmp_path / "export" / "training_info.json").read_text())
    assert (info["step"], info["size"], info["runs"]) == (7, "micro", json.loads(json.dumps(state["runs"])))
    # a --new-phase command stopped early (here after one step) and rerun goes on with its phase, also
    # with flags that change how it runs (saving, threads), not what it trains
    again = ["--workdir", str(workdir), "--steps", "10", "--new-phase", "--max-steps-this-run", "1", *MICRO]
    train.main(again)
    train.main(again + ["--save-every", "3"])
    state = torch.load(workdir / "checkpoint.pt", weights_only=False)
    assert (state["step"], state["phase"]["step"]) == (9, 7)
    # ... but another schedule is a new phase
    train.main(again + ["--lr", "2e-3"])
    state = torch.load(workdir / "checkpoint.pt", weights_only=False)
    assert (state["step"], state["phase"]["step"]) == (10, 9)
    assert [run["start_step"] for run in state["runs"]] == [0, 3, 7, 8, 9]


def test_batches_match_the_prompt_contract():
    import numpy as np

    args = train.parse_args(["--batch-size", "6", "--bos-prob", "0"])
    from tools.sudoku import generator

    pairs = generator.generate(0, 6, 30, unique=True)
    puzzles = np.array([[int(c) for c in p] for p, _ in pairs], dtype=np.uint8)
    sols = np.array([[int(c) for c in s] for _, s in pairs], dtype=np.uint8)
    prompt, canvas, _ = train.make_batch((puzzles, sols), 0, args, np.random.default_rng(0))
    tok = build_tokenizer()
    assert prompt.shape == (6, 81) and canvas.shape == (6, CANVAS_LENGTH)
    assert (canvas[:, 81] == EOS_ID).all() and (canvas[:, 82:] == PAD_ID).all()
    for row in range(6):
        p = tok.decode(prompt[row].tolist())
        s = tok.decode(canvas[row, :81].tolist())
        assert generator.is_solved(s, p)
        assert tok(p).input_ids == prompt[row].tolist()
        assert tok(p.replace("0", ".")).input_ids == prompt[row].tolist()
    assert prompt.max() < VOCAB_SIZE and BOS_ID not in prompt


def test_export_loads_with_from_pretrained(trained, tmp_path):
    from transformers import AutoTokenizer, DiffusionGemmaForBlockDiffusion

    out = tmp_path / "export"
    train.main(["--workdir", str(trained), "--size", "micro", "--export", str(out)])
    model = DiffusionGemmaForBlockDiffusion.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert model.dtype == torch.float32
    assert model.config.canvas_length == CANVAS_LENGTH
    gc = model.generation_config
    assert gc.pad_token_id == PAD_ID and EOS_ID in gc.eos_token_id
    assert gc.max_new_tokens == CANVAS_LENGTH
    assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id) == (PAD_ID, EOS_ID, BOS_ID)
    puzzle = "53..7....6..195....98....6.8...6...34..8.3..17...2...6.6....28....419..5....8..79"
    ids = tok(puzzle).input_ids
    assert len(ids) == 81
    chat = tok.apply_chat_template([{"role": "user", "content": puzzle}], add_generation_prompt=True, tokenize=False)
    assert tok(chat).input_ids == ids
    torch.manual_seed(0)
    out_ids = model.generate(torch.tensor([ids]), max_denoising_steps=2)
    assert out_ids.sequences.shape == (1, 81 + CANVAS_LENGTH)
    # the export's tokenizer, chat template and generation defaults are the shipped model's, byte for byte
    shipped = REPO_ROOT / "engine" / "default_model"
    for name in ("chat_template.jinja", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / name).read_bytes() == (shipped / name).read_bytes(), name

    # the local evaluator runs end to end on the export
    args = evaluate_local.parse_args(["--model", str(out), "--per-bucket", "1", "--buckets", "30-35",
                                      "--max-denoising-steps", "2"])
    stats = evaluate_local.run(args)
    assert stats["30-35"].n == 1 and stats["30-35"].steps[0] <= 2


def test_http_evaluator_takes_a_server_without_the_extension_fields():
    """The evaluator also scores other OpenAI-compatible servers (vLLM): a stand-in for one whose usage may
    lack the diffusion fields. Against this project's own server it runs in test_default_model.py."""
    answers = {p: s for pairs in eval_set(2).values() for p, s in pairs}
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"object": "list", "data": [{"id": "sudoku", "object": "model"}]})
        body = json.loads(request.content)
        seen.append(body)
        assert request.url.path == "/v1/completions" and body["max_tokens"] == 81
        text = answers[body["prompt"]]
        usage = {"prompt_tokens": 81, "completion_tokens": 82, "total_tokens": 163, "denoising_steps": 6,
                 "canvases": 1}
        if body["seed"] % 2:
            usage = {"prompt_tokens": 81}  # the extension fields are optional
        return httpx.Response(200, json={"choices": [{"index": 0, "text": text, "finish_reason": "stop"}],
                                         "usage": usage})

    args = evaluate_http.parse_args(["--per-bucket", "2", "--concurrency", "3"])
    stats, model = asyncio.run(evaluate_http.run(args, transport=httpx.MockTransport(handler)))
    assert model == "sudoku" and len(seen) == 8
    assert all(s.solved == 2 and s.steps == [6.0] for s in stats.values())
    # one bucket alone is sent with the seeds it has in the full table, so its row can be rerun by itself
    full = {body["prompt"]: body["seed"] for body in seen}
    seen.clear()
    args = evaluate_http.parse_args(["--per-bucket", "2", "--buckets", "30-35"])
    asyncio.run(evaluate_http.run(args, transport=httpx.MockTransport(handler)))
    assert len(seen) == 2 and all(full[body["prompt"]] == body["seed"] for body in seen)
    assert sorted(body["seed"] for body in seen) == [4, 5]  # the third bucket's, as in the full table


@pytest.mark.parametrize("argv, message", [
    (["--log-every", "0"], "invalid positive_int value: '0'"),
    (["--batch-size", "0"], "invalid positive_int value: '0'"),
    (["--threads", "0"], "invalid positive_int value: '0'"),
    (["--pool-givens", "26", "24"], "--pool-givens must be two counts from 17 to 80, the first the lower"),
    (["--givens-start", "61"], "--givens-start (61) must be from the pool's lowest count (24) to --givens-max (60)"),
])
def test_the_trainer_refuses_bad_arguments_before_any_work(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        train.parse_args(argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--buckets", "45+"], "invalid choice: '45+'"),
    (["--concurrency", "0"], "invalid positive_int value: '0'"),
    (["--per-bucket", "-1"], "invalid positive_int value: '-1'"),
])
def test_evaluators_refuse_bad_arguments(argv, message, capsys):
    for evaluator in (evaluate_http, evaluate_local):
        if "--concurrency" in argv and evaluator is evaluate_local:
            continue
        with pytest.raises(SystemExit) as exc:
            evaluator.parse_args(argv)
        assert exc.value.code == 2 and message in capsys.readouterr().err
