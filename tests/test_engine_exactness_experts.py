"""The engine's CPU experts (engine.rowwise_experts) give generate's bits in float32, pass by pass.

A tiny model with 16 experts and top-4 routing: a token's sum of four expert outputs depends on its order,
and a 16-token canvas often gives an expert 1-3 tokens, which generate's grouped_mm runs on exactly those
rows (another matrix kernel on CPU than the many-row one). Prompts of 1-3 tokens are encoded alone and
unpadded, as generate encodes them. Tokens often survive last-bit differences on a near-flat random model,
so each decoder pass's final hidden states (the sampler's input) are compared with generate's, bitwise.
"""

from __future__ import annotations

import pytest
import torch

from engine import EngineCore, EngineSettings, SamplingParams
from engine.loader import load_model
from tests.engine_helpers import DecoderOutputs, reference_model, reference_run, run_to_completion
from tools.tiny_checkpoint import TinySpec, build_tiny_checkpoint

PARAMS = SamplingParams(max_tokens=32, max_denoising_steps=4)


@pytest.fixture(scope="module")
def core(tmp_path_factory):
    path = build_tiny_checkpoint(tmp_path_factory.mktemp("e16k4"), TinySpec(num_experts=16, top_k_experts=4))
    settings = EngineSettings(model=str(path), max_num_seqs=4)  # defaults: float32, traced, batch invariant
    core = EngineCore(load_model(settings), settings)
    assert core.loaded.dtype == torch.float32 and core.runner.traced is not None
    yield core
    core.close()


def _prompt(length: int, seed: int) -> list[int]:
    return torch.randint(5, 250, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def _passes(core, prompt: list[int], seed: int):
    """(engine tokens, generate tokens, the passes whose decoder outputs differ)."""
    ref = reference_model(core)
    params = SamplingParams(**{**PARAMS.__dict__, "seed": seed})
    with DecoderOutputs(core, ref) as outputs:
        expected, _ = reference_run(ref, prompt, seed, core.resolve(prompt, params))
        got = run_to_completion(core, [("r", prompt, params)])["r"]["tokens"]
    assert outputs.engine  # passes were recorded
    return got, expected, outputs.differing_passes()


@pytest.fixture(scope="module", params=["bfloat16", "float16"])
def half_core(request, tmp_path_factory):
    path = build_tiny_checkpoint(tmp_path_factory.mktemp("e16k4-half"), TinySpec(num_experts=16, top_k_experts=4))
    settings = EngineSettings(model=str(path), max_num_seqs=4, dtype=request.param)
    core = EngineCore(load_model(settings), settings)
    yield core
    core.close()


def test_half_precision_passes_are_eager_generates_bitwise(half_core):
    """In bfloat16 and float16 the reference is generate with eager experts (reference_model), which sums a
    token's top-4 expert outputs in expert order: every decoder pass bitwise."""
    assert reference_model(half_core).config._experts_implementation == "eager"
    for length, seed in ((3, 0), (12, 1)):
        got, expected, differing = _passes(half_core, _prompt(length, seed), seed)
        assert got == expected
        assert not differing, f"prompt of {length}, seed {seed}: passes {differing} differ"


@pytest.mark.parametrize("length", [1, 2, 3, 12])
def test_every_decoder_pass_is_generates_bitwise(core, length):
    for seed in (0, 1):
        prompt = _prompt(length, seed)
        got, expected, differing = _passes(core, prompt, seed)
        assert got == expected
        assert not differing, f"prompt of {length}, seed {seed}: passes {differing} differ"


def test_batched_requests_keep_their_solo_tokens(core):
    """Short and long prompts sharing passes (expert groups pooled across canvases, 1-3 token prompts
    encoded alone) give each request its solo tokens."""
    requests = [(f"r{n}", _prompt(n, n), SamplingParams(**{**PARAMS.__dict__, "seed": n})) for n in (1, 3, 7, 12)]
    alone = {rid: run_to_completion(core, [(rid, p, sp)])[rid]["tokens"] for rid, p, sp in requests}
    together = run_to_completion(core, requests, arrivals={"r3": 1})
    assert {rid: r["tokens"] for rid, r in together.items()} == alone


@pytest.fixture(scope="module")
def real_structure_core(tmp_path_factory):
    """DiffusionGemma's layer structure in small: full-attention layers with wider heads and fewer KV heads
    than the sliding ones (and keys as values, no v_proj), 16 experts routed top-8."""
    spec = TinySpec(num_layers=3, num_heads=4, num_kv_heads=2, global_head_dim=32, num_global_kv_heads=1,
                    num_experts=16, top_k_experts=8)
    settings = EngineSettings(model=str(build_tiny_checkpoint(tmp_path_factory.mktemp("real"), spec)), max_num_seqs=4)
    core = EngineCore(load_model(settings), settings)
    full = core.loaded.model.model.decoder.layers[-1].self_attn
    assert (full.head_dim, full.v_proj) == (32, None)  # the structure is really there
    yield core
    core.close()


def test_the_real_layer_structure_matches_generate_pass_by_pass(real_structure_core):
    core = real_structure_core
    for length, seed in ((2, 0), (30, 1)):  # a prompt encoded alone, and one past the sliding window
        got, expected, differing = _passes(core, _prompt(length, seed), seed)
        assert got == expected and not differing, (length, differing)
    requests = [(f"r{n}", _prompt(n, n), SamplingParams(**{**PARAMS.__dict__, "seed": n})) for n in (2, 9, 30)]
    alone = {rid: run_to_completion(core, [(rid, p, sp)])[rid]["tokens"] for rid, p, sp in requests}
    together = run_to_completion(core, requests, arrivals={"r9": 1})
    assert {rid: r["tokens"] for rid, r in together.items()} == alone
