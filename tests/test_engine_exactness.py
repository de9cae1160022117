"""A request with seed s yields exactly what transformers' generate gives at batch 1 (CPU, float64)."""

from __future__ import annotations

import pytest
import torch

from engine import SamplingParams
from tools.tiny_checkpoint import TinySpec, build_tiny_checkpoint
from tests.engine_helpers import DecoderOutputs, make_core, reference_model, reference_tokens, run_to_completion


@pytest.fixture(scope="module")
def core(tmp_path_factory):
    path = build_tiny_checkpoint(tmp_path_factory.mktemp("tiny64"), TinySpec(dtype=torch.float64))
    return make_core(path, max_num_seqs=8)


@pytest.fixture(scope="module")
def tok(core):
    return core.loaded.tokenizer


PROMPTS = [
    "hello world",
    "a",
    "The quick brown fox jumps over the lazy dog; the sliding window is 24 tokens wide.",  # longer than the window
]

PARAMS = [
    SamplingParams(max_tokens=16),  # exactly one canvas, checkpoint defaults
    SamplingParams(max_tokens=40),  # three canvases, the last trimmed
    SamplingParams(max_tokens=53, max_denoising_steps=5, entropy_bound=0.5, t_min=0.2, t_max=1.5),
    # early stopping: a lax confidence threshold lets stable canvases leave before N steps
    # (near-greedy temperatures make the random model's drafts settle; see test_early_stopping_really_happens)
    SamplingParams(max_tokens=48, max_denoising_steps=12, stability_threshold=1, confidence_threshold=100.0,
                   entropy_bound=1000.0, t_min=0.01, t_max=0.02),
    SamplingParams(max_tokens=33, max_denoising_steps=6, stability_threshold=0, confidence_threshold=100.0),
    SamplingParams(max_tokens=35, max_denoising_steps=16, stability_threshold=2, confidence_threshold=100.0,
                   entropy_bound=1000.0, t_min=0.005, t_max=0.01),
]


@pytest.mark.parametrize("params", PARAMS, ids=lambda p: f"max{p.max_tokens}-N{p.max_denoising_steps}")
@pytest.mark.parametrize("prompt", PROMPTS, ids=["short", "one-token", "long"])
@pytest.mark.parametrize("seed", [0, 7])
def test_matches_generate_at_batch_one(core, tok, prompt, params, seed):
    prompt_ids = tok(prompt).input_ids
    with DecoderOutputs(core, reference_model(core)) as outputs:  # and every decoder pass's output, bitwise
        expected = reference_tokens(reference_model(core), prompt_ids, seed, core.resolve(prompt_ids, params))
        got = run_to_completion(core, [("r", prompt_ids, SamplingParams(**{**params.__dict__, "seed": seed}))])["r"]
    assert got["tokens"] == expected
    assert not outputs.differing_passes(), outputs.differing_passes()
    assert got["finish_reason"] == ("stop" if len(expected) < params.max_tokens else "length")


def test_early_stopping_really_happens(core, tok):
    """The early-stopping parameter sets above do stop canvases early (so the exactness test covers it)."""
    prompt_ids = tok("hello world").input_ids
    for params in (PARAMS[3], PARAMS[4], PARAMS[5]):
        got = run_to_completion(core, [("r", prompt_ids, SamplingParams(**{**params.__dict__, "seed": 0, "ignore_eos": True}))])["r"]
        last = got["outputs"][-1]
        canvases = -(-params.max_tokens // 16)
        assert last.num_canvases == canvases
        assert last.num_denoising_steps < canvases * params.max_denoising_steps
        # stability k needs k+1 equal drafts in a row
        assert last.num_denoising_steps >= canvases * (params.stability_threshold + 1)


def test_eos_inside_a_canvas(core, tok):
    """Pick a token the reference emits mid-way through the second canvas and make it the eos."""
    prompt_ids = tok("hello world").input_ids
    base = SamplingParams(max_tokens=48, eos_token_ids=(1,), seed=3)
    free_run = reference_tokens(reference_model(core), prompt_ids, 3, core.resolve(prompt_ids, base))
    assert len(free_run) == 48
    position = next(i for i in range(20, 28) if free_run[i] not in free_run[:i])
    params = SamplingParams(max_tokens=48, eos_token_ids=(free_run[position],), seed=3)
    expected = reference_tokens(reference_model(core), prompt_ids, 3, core.resolve(prompt_ids, params))
    assert len(expected) == position + 1
    got = run_to_completion(core, [("r", prompt_ids, params)])["r"]
    assert got["tokens"] == expected
    assert got["finish_reason"] == "stop"
    assert got["outputs"][-1].num_canvases == 2


def test_max_tokens_not_a_multiple_of_the_canvas(core, tok):
    prompt_ids = tok("hello").input_ids
    got = run_to_completion(core, [("r", prompt_ids, SamplingParams(max_tokens=21, seed=5, ignore_eos=True))])["r"]
    assert len(got["tokens"]) == 21
    assert got["finish_reason"] == "length"
    assert got["outputs"][-1].num_generated_tokens == 21


# an entropy bound that accepts a few positions per step, so the entropies decide the tokens (in the
# sets above the bound accepts one position or all of them, and scaling every entropy changes nothing)
ENTROPY_BOUND_PARAMS = SamplingParams(max_tokens=40, max_denoising_steps=6, entropy_bound=8.0)


@pytest.mark.parametrize("overlap", [True, False], ids=["entropy-on-worker", "entropy-inline"])
@pytest.mark.parametrize("params", [ENTROPY_BOUND_PARAMS, PARAMS[2]], ids=["max40-N6-bound8", "max53-N5"])
def test_entropies_match_generate_on_either_thread(core, tok, params, overlap):
    """On CPU each chunk's entropies are computed on the worker thread beside the draw; CUDA computes
    them after the draw on the engine's own thread. Both give generate's tokens."""
    default = core.runner.sampler.overlap_entropy
    core.runner.sampler.overlap_entropy = overlap
    try:
        prompt_ids = tok(PROMPTS[2]).input_ids
        for seed in (0, 7):
            expected = reference_tokens(reference_model(core), prompt_ids, seed, core.resolve(prompt_ids, params))
            got = run_to_completion(core, [("r", prompt_ids, SamplingParams(**{**params.__dict__, "seed": seed}))])["r"]
            assert got["tokens"] == expected
    finally:
        core.runner.sampler.overlap_entropy = default


def test_cpu_thread_defaults_follow_the_cores(core):
    """On CPU with one intra-op thread (the server's default) and two cores the worker computes the
    entropies. With --num-threads above 1 it would run its own parallel kernels beside the engine
    thread's and oversubscribe the cores, and on one core the two would only take turns: there the
    entropies are computed after the draw instead. The decoder's row groups default to the usable
    CPUs divided by the intra-op threads."""
    import os

    from engine.model_runner import ModelRunner

    if not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs two CPUs and an OS with CPU affinity (Linux)")
    threads, cpus = torch.get_num_threads(), os.sched_getaffinity(0)
    placements = {}
    try:
        for n_threads, n_cpus in ((1, 2), (2, 2), (1, 1)):
            torch.set_num_threads(n_threads)
            os.sched_setaffinity(0, sorted(cpus)[:n_cpus])
            runner = ModelRunner(core.loaded, max_num_seqs=2, sampling_tile_bytes=None,
                                 max_encoder_tokens=core.settings.max_encoder_tokens, cuda_graph_max_batch=None,
                                 sampler="reference", forward_threads=None, trace_decoder=None)
            placements[n_threads, n_cpus] = runner.sampler.overlap_entropy, runner.forward_threads
            runner.close()
    finally:
        torch.set_num_threads(threads)
        os.sched_setaffinity(0, cpus)
    assert placements == {(1, 2): (True, 2), (2, 2): (False, 1), (1, 1): (False, 1)}
