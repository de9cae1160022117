"""Exactness against transformers' generate in the dtype users run (float32 on CPU, the default), on
models sharp enough that the entropy bound and the stopping rule decide the tokens.

test_engine_exactness.py checks float64 on the random tiny model, whose near-flat logits let several
parameter sets accept one position or all of them whatever the entropies are. Here:

- a tiny model with its tied embedding scaled by 40 (logits 40 times sharper): the parameter sets
  below each change generate's tokens or pass count when one of the bound, k or the confidence
  threshold changes (``test_the_parameters_decide_on_the_sharp_model``), and the engine matches
  generate's tokens and its number of decoder passes under every one of them;
- the embedded Sudoku model (trained, sharp), with its own defaults: canvases stop early on
  stability and confidence, with generate's tokens and pass counts;
- the random tiny model in float32 (what the server tests serve).
"""

from __future__ import annotations

import json

import pytest
import torch

from engine import EngineCore, EngineSettings, SamplingParams
from engine.loader import load_model
from tests.engine_helpers import DecoderOutputs, reference_model, reference_run, run_to_completion
from tools.tiny_checkpoint import TinySpec, build_tiny_checkpoint

SHARPNESS = 40.0


def make_default_core(path, **overrides) -> EngineCore:
    """An engine with the default settings (dtype auto: float32 on CPU)."""
    settings = EngineSettings(model=str(path), **overrides)
    assert settings.dtype == "auto"
    core = EngineCore(load_model(settings), settings)
    assert core.loaded.dtype == torch.float32
    assert core.runner.sampler.name == "reference"  # the CPU default, the sampler the README says equals generate
    return core


def check_against_generate(core, prompt, params: SamplingParams, seed: int, bitwise: bool = True) -> dict:
    """The engine's tokens and decoder passes for one request equal generate's, and so does every pass's
    decoder output, bitwise (unless not ``bitwise``); returns the engine's result. ``generate`` is given the
    fields the request set and ``max_tokens``: the checkpoint's generation config decides the rest for it, as
    the engine's reading of that config does for the engine."""
    resolved = core.resolve(prompt, params)
    request = SamplingParams(**{**params.__dict__, "max_tokens": resolved.max_tokens})
    with DecoderOutputs(core, reference_model(core)) as outputs:
        expected, passes = reference_run(reference_model(core), prompt, seed, request)
        got = run_to_completion(core, [("r", prompt, SamplingParams(**{**params.__dict__, "seed": seed}))])["r"]
    assert got["tokens"] == expected
    assert not bitwise or not outputs.differing_passes(), outputs.differing_passes()
    assert got["outputs"][-1].num_denoising_steps == passes
    ends_in_eos = bool(expected) and expected[-1] in set(resolved.eos_token_ids or ())
    assert got["finish_reason"] == ("stop" if ends_in_eos else "length")
    return got


# -- a sharp tiny model -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sharp_core(tmp_path_factory):
    from safetensors.torch import load_file, save_file

    path = build_tiny_checkpoint(tmp_path_factory.mktemp("sharp32"), TinySpec())
    weights = load_file(path / "model.safetensors")
    weights["model.decoder.embed_tokens.weight"] *= SHARPNESS  # tied: the lm head's logits too
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    return make_default_core(path, max_num_seqs=4)


# near-greedy temperatures let drafts settle, so stability (k) and confidence both decide when a canvas stops
SETTLING = dict(max_tokens=40, max_denoising_steps=12, t_max=0.05, t_min=0.02)
SHARP_PARAMS = {
    "defaults": SamplingParams(max_tokens=40),
    "k1-conf0.005-bound0.1": SamplingParams(**SETTLING, stability_threshold=1, confidence_threshold=0.005,
                                            entropy_bound=0.1),
    "k1-conf0.1-bound2": SamplingParams(**SETTLING, stability_threshold=1, confidence_threshold=0.1, entropy_bound=2.0),
    "k2-conf0.1-warmer": SamplingParams(max_tokens=40, max_denoising_steps=12, t_max=0.2, t_min=0.1,
                                        stability_threshold=2, confidence_threshold=0.1, entropy_bound=0.1),
    "k0-conf0.5-bound8": SamplingParams(max_tokens=40, max_denoising_steps=12, stability_threshold=0,
                                        confidence_threshold=0.5, entropy_bound=8.0),
}
PROMPTS = {"short": "hello world",
           "long": "The quick brown fox jumps over the lazy dog; the sliding window is 24 tokens wide."}


@pytest.mark.parametrize("name", list(SHARP_PARAMS))
@pytest.mark.parametrize("prompt", list(PROMPTS))
@pytest.mark.parametrize("seed", [0, 1])
def test_sharp_model_matches_generate(sharp_core, name, prompt, seed):
    prompt_ids = sharp_core.loaded.tokenizer(PROMPTS[prompt]).input_ids
    check_against_generate(sharp_core, prompt_ids, SHARP_PARAMS[name], seed)


def _generate(core, params: SamplingParams, seed: int):
    prompt = core.loaded.tokenizer(PROMPTS["short"]).input_ids
    tokens, passes = reference_run(reference_model(core), prompt, seed, core.resolve(prompt, params))
    return tokens, passes


def test_the_parameters_decide_on_the_sharp_model(sharp_core):
    """On this model a wrong entropy or stopping rule would show: changing only the entropy bound, only
    k, or only the confidence threshold changes generate's tokens or pass count for some seed, and
    canvases stop before max_denoising_steps."""
    base = SHARP_PARAMS["k1-conf0.005-bound0.1"]
    seeds = (0, 1, 2)
    runs = {seed: _generate(sharp_core, base, seed) for seed in seeds}
    for change in (dict(entropy_bound=2.0), dict(stability_threshold=2), dict(confidence_threshold=0.1)):
        changed = SamplingParams(**{**base.__dict__, **change})
        assert any(_generate(sharp_core, changed, seed) != runs[seed] for seed in seeds), change
    canvases = 3  # 40 tokens in canvases of 16
    assert all(passes < canvases * base.max_denoising_steps for _, passes in runs.values()), runs
    # and the bound is not all-or-nothing here: four bounds, four different outputs
    outputs = {bound: _generate(sharp_core, SamplingParams(**{**base.__dict__, "entropy_bound": bound}), 0)[0]
               for bound in (0.01, 0.1, 1.0, 4.0)}
    assert len({tuple(v) for v in outputs.values()}) == 4, outputs


def test_sharp_model_batched_gives_the_solo_tokens(sharp_core):
    """Batch invariance in float32: every parameter set and prompt in one batch, staggered."""
    tok = sharp_core.loaded.tokenizer
    requests = [(f"{name}/{prompt}", tok(text).input_ids, SamplingParams(**{**params.__dict__, "seed": 3}))
                for name, params in SHARP_PARAMS.items() for prompt, text in PROMPTS.items()]
    alone = {rid: run_to_completion(sharp_core, [(rid, p, sp)])[rid]["tokens"] for rid, p, sp in requests}
    mixed = run_to_completion(sharp_core, requests, arrivals={rid: i % 4 for i, (rid, _, _) in enumerate(requests)})
    assert {rid: r["tokens"] for rid, r in mixed.items()} == alone


# -- the random tiny model, float32 -----------------------------------------------------------------

@pytest.mark.parametrize("params", [
    SamplingParams(max_tokens=16),
    SamplingParams(max_tokens=53, max_denoising_steps=5, entropy_bound=0.5, t_min=0.2, t_max=1.5),
    SamplingParams(max_tokens=33, max_denoising_steps=6, stability_threshold=0, confidence_threshold=100.0),
], ids=["max16", "max53-N5", "max33-k0"])
def test_random_tiny_model_in_float32_matches_generate(tiny32_core, params):
    for seed in (0, 7):
        check_against_generate(tiny32_core, tiny32_core.loaded.tokenizer(PROMPTS["long"]).input_ids, params, seed)


def test_random_tiny_model_in_bfloat16_matches_generate_with_eager_experts(tiny32_path):
    """``--dtype bfloat16`` on CPU: generate's tokens, against transformers' ``eager`` experts (its default
    ``grouped_mm`` rounds a bfloat16 product otherwise; docs/configuration.md, ``--sampler``)."""
    settings = EngineSettings(model=str(tiny32_path), dtype="bfloat16")
    core = EngineCore(load_model(settings), settings)
    assert core.loaded.dtype == torch.bfloat16 and core.runner.sampler.name == "reference"
    assert reference_model(core).config._experts_implementation == "eager"
    prompt = core.loaded.tokenizer(PROMPTS["long"]).input_ids
    for params in (SamplingParams(max_tokens=16),
                   SamplingParams(max_tokens=40, max_denoising_steps=5, entropy_bound=0.5, t_min=0.2, t_max=1.5)):
        for seed in (0, 1, 2):
            check_against_generate(core, prompt, params, seed)


@pytest.fixture(scope="module")
def tiny32_path(tmp_path_factory):
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny32"), TinySpec())


@pytest.fixture(scope="module")
def tiny32_core(tiny32_path):
    return make_default_core(tiny32_path)


def test_eos_inside_a_canvas_in_float32(tiny32_core):
    """A token generate writes mid-way through the second canvas made the eos: the engine stops where
    generate does, with its tokens and passes, in the default dtype."""
    prompt = tiny32_core.loaded.tokenizer("hello world").input_ids
    free_run, _ = reference_run(reference_model(tiny32_core), prompt, 3,
                                SamplingParams(max_tokens=48, eos_token_ids=(1,)))
    assert len(free_run) == 48
    position = next(i for i in range(20, 28) if free_run[i] not in free_run[:i])
    params = SamplingParams(max_tokens=48, eos_token_ids=(free_run[position],))
    got = check_against_generate(tiny32_core, prompt, params, 3)
    assert len(got["tokens"]) == position + 1 and got["finish_reason"] == "stop"
    assert got["outputs"][-1].num_canvases == 2


@pytest.mark.parametrize("overrides, inline_entropy", [
    # DiffusionGemma's own path on CPU: its vocabulary takes a row per tile, in chunks of positions (16 = 4 x 4)
    (dict(sampling_tile_bytes=1), False),
    (dict(max_encoder_tokens=16), False),  # a prompt past max_encoder_tokens, prefilled in chunks
    ({}, True),  # entropies on the engine's thread, as with --num-threads above 1 or one usable CPU
], ids=["tiles-of-position-chunks", "chunked-prefill", "entropy-inline"])
def test_other_cpu_paths_in_float32_match_generate(tiny32_path, overrides, inline_entropy):
    """The ways a CPU pass is cut up other than the tiny model's defaults, in the default dtype: each still
    gives generate's tokens and passes, and its decoder outputs bitwise but for a chunked prefill (its chunks'
    attention reduces over the cached keys in another blocking than generate's one call: README, Exactness)."""
    core = make_default_core(tiny32_path, **overrides)
    if "sampling_tile_bytes" in overrides:
        assert (core.runner.sampler.tiles.rows, core.runner.sampler.tiles.positions) == (1, 4)
    core.runner.sampler.overlap_entropy = core.runner.sampler.overlap_entropy and not inline_entropy
    prompt = core.loaded.tokenizer(PROMPTS["long"] * 3).input_ids
    assert len(prompt) > 3 * 16
    for params in (SamplingParams(max_tokens=40),
                   SamplingParams(max_tokens=53, max_denoising_steps=5, entropy_bound=0.5, t_min=0.2, t_max=1.5)):
        for seed in (0, 7):
            check_against_generate(core, prompt, params, seed, bitwise="max_encoder_tokens" not in overrides)


# -- the embedded Sudoku model ----------------------------------------------------------------------

def test_embedded_model_matches_generate_and_stops_early():
    from server.default_model import embedded_model_dir
    from tools.sudoku.common import BUCKETS, EVAL_SEED, eval_set

    core = make_default_core(embedded_model_dir())
    gen = json.loads((embedded_model_dir() / "generation_config.json").read_text())
    d = core.defaults  # what the engine read, against the file
    assert (d.max_tokens, d.max_denoising_steps, d.entropy_bound, d.t_min, d.t_max, d.stability_threshold,
            d.confidence_threshold) == (gen["max_new_tokens"], gen["max_denoising_steps"],
                                        gen["sampler_config"]["entropy_bound"], gen["t_min"], gen["t_max"],
                                        gen["stability_threshold"], gen["confidence_threshold"])
    puzzles = eval_set(3, seed=EVAL_SEED, buckets=[BUCKETS[1]])[BUCKETS[1][0]]
    steps = []
    for seed, (puzzle, _solution) in enumerate(puzzles):
        prompt = core.loaded.tokenizer(puzzle).input_ids
        got = check_against_generate(core, prompt, SamplingParams(), seed)  # the checkpoint's defaults
        steps.append(got["outputs"][-1].num_denoising_steps)
    # one canvas each, stopped by stability and confidence before the 32-step cap
    assert all(1 < s < core.defaults.max_denoising_steps for s in steps), steps
