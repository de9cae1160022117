"""CUDA checks: run only where a GPU is present (skipped in CI)."""

from __future__ import annotations

import gc

import pytest
import torch

from engine import EngineCore, EngineSettings, SamplingParams
from engine.loader import load_model
from tools.tiny_checkpoint import TinySpec, build_tiny_checkpoint
from tests.engine_helpers import run_to_completion

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), TinySpec())


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_engine_runs_on_cuda_and_is_reproducible(checkpoint, dtype):
    settings = EngineSettings(model=str(checkpoint), device="cuda", dtype=dtype, max_num_seqs=8)
    core = EngineCore(load_model(settings), settings)
    tok = core.loaded.tokenizer
    reqs = [(f"r{i}", tok(f"prompt {i}").input_ids, SamplingParams(max_tokens=40, seed=i, ignore_eos=True)) for i in range(6)]
    first = run_to_completion(core, reqs)
    second = run_to_completion(core, reqs)
    assert all(len(r["tokens"]) == 40 and r["finish_reason"] == "length" for r in first.values())
    assert {k: v["tokens"] for k, v in first.items()} == {k: v["tokens"] for k, v in second.items()}
    assert core.num_live_states() == 0


def test_cuda_float32_matches_generate_at_batch_one(checkpoint):
    """On CUDA in fp32 the engine alone should still draw what generate draws (same ops, same generator):
    with the reference sampler (CUDA's default, the fast one, draws its own random numbers)."""
    from tests.engine_helpers import reference_tokens

    settings = EngineSettings(model=str(checkpoint), device="cuda", dtype="float32", sampler="reference")
    core = EngineCore(load_model(settings), settings)
    tok = core.loaded.tokenizer
    prompt = tok("hello world").input_ids
    params = SamplingParams(max_tokens=40, seed=3)
    model = core.loaded.model
    torch.cuda.manual_seed(3)
    expected = reference_tokens(model, prompt, 3, core.resolve(prompt, params))
    got = run_to_completion(core, [("r", prompt, params)])["r"]["tokens"]
    assert got == expected


def test_cuda_chunked_sampling_gives_the_same_tokens(checkpoint):
    """Tiles of one row in chunks of four positions (CUDA draws inline) give the tokens of whole tiles."""
    whole = EngineSettings(model=str(checkpoint), device="cuda", dtype="float32", max_num_seqs=4, sampler="reference")
    tiny = EngineSettings(model=str(checkpoint), device="cuda", dtype="float32", max_num_seqs=4, sampler="reference",
                          sampling_tile_bytes=1)
    results = []
    for settings in (whole, tiny):
        core = EngineCore(load_model(settings), settings)
        tok = core.loaded.tokenizer
        reqs = [(f"r{i}", tok(f"prompt {i}").input_ids, SamplingParams(max_tokens=40, seed=i)) for i in range(3)]
        results.append({rid: r["tokens"] for rid, r in run_to_completion(core, reqs).items()})
    assert results[0] == results[1]


@pytest.mark.parametrize("method", ["fp8-experts", "int8-experts"])
def test_cuda_quantized_experts_match_generate_at_batch_one(tmp_path_factory, method):
    """--quantization on CUDA: the engine draws what generate draws on the same quantized bf16 model."""
    pytest.importorskip("torchao")
    from tests.engine_helpers import reference_tokens

    path = build_tiny_checkpoint(tmp_path_factory.mktemp("tiny_bf16"), TinySpec(dtype=torch.bfloat16, hidden_size=64))
    settings = EngineSettings(model=str(path), device="cuda", dtype="bfloat16", quantization=method, sampler="reference")
    core = EngineCore(load_model(settings), settings)
    assert type(core.loaded.model.model.decoder.layers[0].experts.gate_up_proj).__name__ in ("Float8Tensor", "Int8Tensor")
    tok = core.loaded.tokenizer
    prompt = tok("hello world").input_ids
    params = SamplingParams(max_tokens=40, seed=3)
    expected = reference_tokens(core.loaded.model, prompt, 3, core.resolve(prompt, params))
    assert run_to_completion(core, [("r", prompt, params)])["r"]["tokens"] == expected



def _graph_core(checkpoint, dtype, max_batch):
    settings = EngineSettings(model=str(checkpoint), device="cuda", dtype=dtype, max_num_seqs=4,
                              cuda_graph_max_batch=max_batch)
    return EngineCore(load_model(settings), settings)


@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.get_device_capability()[0] not in (9, 10),
                    reason="grouped_mm's bf16 kernel (the only capturable MoE path) needs compute capability 9.x/10.x")
def test_cuda_graphs_replay_the_static_decoder_pass(checkpoint):
    """bf16 batches of 1-4 canvases replayed from captured graphs (two in one memory pool, the first
    replayed after the second was captured, then recaptured over new KV buffers) give the tokens of
    the same static pass run eagerly."""
    from engine.decoder_graphs import DecoderGraphs
    from tests.test_decoder_graphs import FIXED_SCHEDULE_TRACE, fixed_schedule, run_with_trace

    graphed, static = _graph_core(checkpoint, "bfloat16", 4), _graph_core(checkpoint, "bfloat16", 0)
    static.runner.graphs = DecoderGraphs(static.runner._decoder_forward, 4, capture=False)
    requests, arrivals = fixed_schedule(graphed.loaded.tokenizer)
    got, trace = run_with_trace(graphed, requests, arrivals)
    assert trace[:-1] == FIXED_SCHEDULE_TRACE and graphed.runner.graphs.captures == 4
    assert got == run_with_trace(static, requests, arrivals)[0]
    assert graphed.num_live_states() == 0


def test_cuda_graphs_stay_off_where_capture_would_sync(checkpoint):
    """fp32 experts go through grouped_mm's host-syncing path: the setting is ignored, passes run eagerly."""
    core = _graph_core(checkpoint, "float32", 4)
    assert core.runner.graphs is None
    tok = core.loaded.tokenizer
    out = run_to_completion(core, [("r", tok("hello").input_ids, SamplingParams(max_tokens=20, seed=1, ignore_eos=True))])
    assert len(out["r"]["tokens"]) == 20


@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.get_device_capability()[0] not in (9, 10),
                    reason="grouped_mm's bf16 kernel (the only capturable MoE path) needs compute capability 9.x/10.x")
@pytest.mark.parametrize("max_num_seqs, expected", [(16, 4), (2, 2)])
def test_cuda_graphs_are_on_by_default_for_small_batches(checkpoint, max_num_seqs, expected):
    """Without the setting, bf16 on a capable GPU replays graphs for batches of up to 4 (or max_num_seqs)."""
    settings = EngineSettings(model=str(checkpoint), device="cuda", dtype="bfloat16", max_num_seqs=max_num_seqs)
    core = EngineCore(load_model(settings), settings)
    assert core.runner.graphs is not None and core.runner.graphs.max_batch == expected
    tok = core.loaded.tokenizer
    out = run_to_completion(core, [("r", tok("hello").input_ids, SamplingParams(max_tokens=20, seed=1, ignore_eos=True))])
    assert len(out["r"]["tokens"]) == 20 and core.runner.graphs.passes > 0


@pytest.mark.parametrize("method", ["fp8-experts", "int8-experts"])
def test_cuda_dequantized_experts_stay_within_the_planned_transient(method):
    """On the GPU too, one layer's dequantized experts (bf16, a forward of 8 tokens) peak within
    expert_dequant_bytes, the transient the KV budget sets aside."""
    pytest.importorskip("torchao")
    from torchao.quantization import Float8WeightOnlyConfig, FqnToConfig, Int8WeightOnlyConfig, quantize_
    from transformers import DiffusionGemmaTextConfig
    from transformers.models.diffusion_gemma.modeling_diffusion_gemma import DiffusionGemmaTextExperts

    from engine.quantization import dequantized_experts_forward, expert_dequant_bytes

    config = DiffusionGemmaTextConfig(hidden_size=1024, moe_intermediate_size=512, num_experts=64, top_k_experts=4)
    config._experts_implementation = "grouped_mm"
    experts = DiffusionGemmaTextExperts(config).to("cuda", torch.bfloat16)
    for p in experts.parameters():  # allocated with torch.empty
        torch.nn.init.normal_(p, std=0.02)
    weights = Float8WeightOnlyConfig() if method == "fp8-experts" else Int8WeightOnlyConfig()
    quantize_(experts, FqnToConfig({"gate_up_proj": weights, "down_proj": weights}), filter_fn=None)
    tokens = torch.randn(8, 1024, dtype=torch.bfloat16, device="cuda")
    index = torch.stack([torch.randperm(64)[:4] for _ in range(8)]).cuda()
    routing = torch.full((8, 4), 0.25, dtype=torch.bfloat16, device="cuda")
    with torch.no_grad():
        dequantized_experts_forward(experts, tokens, index, routing)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = dequantized_experts_forward(experts, tokens, index, routing)
        torch.cuda.synchronize()
    assert out.shape == (8, 1024) and torch.isfinite(out).all()
    assert torch.cuda.max_memory_allocated() - base <= expert_dequant_bytes(config, 2) + 8 * 2**20


def test_a_device_memory_limit_caps_the_process_and_the_plan(checkpoint):
    """--device-memory-limit-gib: the plan sees no more than the cap, and allocations past it fail."""
    from engine.memory import available_bytes

    device = torch.device("cuda")
    gc.collect()
    torch.cuda.empty_cache()  # what earlier tests left cached would count against the cap
    try:
        loaded = load_model(EngineSettings(model=str(checkpoint), device="cuda", device_memory_limit_gib=1.0))
        assert available_bytes(device) <= max(0, 2**30 - torch.cuda.memory_reserved(device))
        with pytest.raises(torch.OutOfMemoryError):
            torch.empty(2**31, dtype=torch.uint8, device=device)
        core = EngineCore(loaded, EngineSettings(model=str(checkpoint), device="cuda", device_memory_limit_gib=1.0))
        out = run_to_completion(core, [("a", [5, 6, 7], SamplingParams(max_tokens=16, seed=1, ignore_eos=True))])
        assert len(out["a"]["tokens"]) == 16
        core.close()
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)
        torch.cuda.empty_cache()
