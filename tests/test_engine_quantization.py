"""--quantization: the MoE experts load as torchao 8-bit tensors, the byte arithmetic the presets use
matches the loaded model, and the engine still gives exactly what generate gives on that model. That
generate runs the engine's loaded model, whose experts are the engine's dequantizing product
(engine/quantization.py): it checks the schedule, sampling and batching around that product, and the
product itself is checked against the eager experts within the dtype's tolerance below."""

from __future__ import annotations

import pytest
import torch

from engine import EngineSettings, SamplingParams
from engine.core import EngineCore
from engine.loader import load_model
from engine.quantization import quantized_weight_bytes
from tests import peak_rss
from tests.engine_helpers import reference_tokens, run_to_completion
from tools.tiny_checkpoint import TinySpec, build_tiny_checkpoint

pytest.importorskip("torchao")

# (method, load dtype, storage dtype of the expert weights, inner tensors)
CASES = [
    ("fp8-experts", "bfloat16", torch.float8_e4m3fn, ["qdata", "scale"]),
    ("int8-experts", "float32", torch.int8, ["qdata", "scale", "zero_point"]),
]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return {
        dtype: build_tiny_checkpoint(tmp_path_factory.mktemp(dtype), TinySpec(dtype=getattr(torch, dtype), hidden_size=64))
        for dtype in ("bfloat16", "float32")
    }


def _bytes(t: torch.Tensor) -> int:
    """Storage of a plain tensor, or of a torchao tensor's inner tensors."""
    if type(t) not in (torch.Tensor, torch.nn.Parameter):
        names, _ = t.__tensor_flatten__()
        return sum(_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


@pytest.mark.parametrize("method,dtype,storage,inner", CASES, ids=[c[0] for c in CASES])
def test_experts_are_stored_in_8_bits_and_the_arithmetic_matches(checkpoints, method, dtype, storage, inner):
    from transformers import DiffusionGemmaForBlockDiffusion

    plain = load_model(EngineSettings(model=str(checkpoints[dtype]), dtype=dtype)).model
    loaded = load_model(EngineSettings(model=str(checkpoints[dtype]), dtype=dtype, quantization=method)).model
    for layer in (loaded.model.encoder.language_model.layers[0], loaded.model.decoder.layers[-1]):
        for name in ("gate_up_proj", "down_proj"):
            weight = getattr(layer.experts, name)
            assert weight.__tensor_flatten__()[0] == inner
            assert weight.qdata.dtype == storage
    # the rest keeps the load dtype
    assert loaded.model.decoder.layers[0].self_attn.q_proj.weight.dtype == getattr(torch, dtype)
    assert type(loaded.model.decoder.layers[0].self_attn.q_proj.weight) is torch.nn.Parameter

    with torch.device("meta"):
        meta = DiffusionGemmaForBlockDiffusion(loaded.config)
    elem = torch.finfo(getattr(torch, dtype)).bits // 8
    actual = sum(_bytes(p) for p in loaded.parameters())
    assert actual == quantized_weight_bytes(meta, method, elem)
    assert sum(_bytes(p) for p in plain.parameters()) == quantized_weight_bytes(meta, "none", elem)
    assert actual < sum(_bytes(p) for p in plain.parameters())


@pytest.mark.parametrize("method,dtype,storage,inner", CASES, ids=[c[0] for c in CASES])
def test_engine_matches_generate_on_the_quantized_model(checkpoints, method, dtype, storage, inner):
    settings = EngineSettings(model=str(checkpoints[dtype]), dtype=dtype, quantization=method, max_num_seqs=4)
    core = EngineCore(load_model(settings), settings)
    tok = core.loaded.tokenizer
    requests = [(f"r{seed}", tok(text).input_ids, SamplingParams(max_tokens=40, seed=seed))
                for seed, text in ((0, "hello world"), (5, "a longer prompt, batched with the first"))]
    for rid, prompt, params in requests:  # at batch 1 (in bf16 a batch changes rounding, as in transformers)
        expected = reference_tokens(core.loaded.model, prompt, params.seed, core.resolve(prompt, params))
        got = run_to_completion(core, [(rid, prompt, params)])[rid]["tokens"]
        assert got == expected and len(expected) > 0


def test_row_groups_each_get_room_for_a_layer_of_dequantized_experts(checkpoints):
    """On CPU each row group running side by side dequantizes the current layer's experts for itself:
    the KV budget sets aside one copy per group."""
    from engine.memory import plan_memory

    settings = EngineSettings(model=str(checkpoints["float32"]), dtype="float32", quantization="int8-experts",
                              max_num_seqs=4, forward_threads=3)
    core = EngineCore(load_model(settings), settings)
    text = core.loaded.model.config.get_text_config()
    one = plan_memory(text, core.canvas_length, torch.float32, sampling_transient_bytes=0, max_num_seqs=4,
                      dequantized_experts=True).expert_dequant_bytes
    assert core.loaded.dequantized_experts and core.runner.forward_threads == 3
    assert one > 0 and core.memory_plan.expert_dequant_bytes == 3 * one
    core.close()


@pytest.mark.parametrize("overrides,fragment", [
    ({"quantization": "int4"}, "quantization must be one of none, fp8-experts, int8-experts"),
    ({"quantization": "fp8-experts", "dtype": "float64"}, "needs dtype auto, bfloat16 or float32"),
])
def test_bad_quantization_settings_are_refused(overrides, fragment):
    with pytest.raises(ValueError) as info:
        EngineSettings(model="m", **overrides).validate()
    assert fragment in str(info.value)


def test_server_flag_serves_the_quantized_model(server_launcher, server_tiny_checkpoint):
    """--quantization over HTTP: the completion is generate's output on the quantized model."""
    import httpx

    server = server_launcher(["--model", str(server_tiny_checkpoint), "--quantization", "int8-experts"])
    prompt = [5 + b for b in b"hello world"]  # byte tokenizer: id = byte + 5
    r = httpx.post(f"{server.url}/v1/completions", timeout=60,
                   json={"model": str(server_tiny_checkpoint), "prompt": prompt, "max_tokens": 32, "seed": 3,
                         "ignore_eos": True})
    assert r.status_code == 200, r.text
    settings = EngineSettings(model=str(server_tiny_checkpoint), quantization="int8-experts")
    core = EngineCore(load_model(settings), settings)
    params = core.resolve(prompt, SamplingParams(max_tokens=32, seed=3, ignore_eos=True))
    expected = reference_tokens(core.loaded.model, prompt, 3, params)
    assert r.json()["choices"][0]["text"] == bytes(t - 5 for t in expected if t >= 5).decode("utf-8", errors="replace")


@pytest.mark.parametrize("method,dtype,storage,inner", CASES, ids=[c[0] for c in CASES])
def test_dequantized_experts_compute_what_the_eager_loop_computes(checkpoints, method, dtype, storage, inner):
    """Quantized experts run grouped_mm over each layer's experts dequantized whole; per token that is
    the product transformers' eager loop takes with each expert's weights dequantized inside linear."""
    from engine.quantization import DEQUANTIZED_EXPERTS

    model = load_model(EngineSettings(model=str(checkpoints[dtype]), dtype=dtype, quantization=method)).model
    experts = model.model.decoder.layers[0].experts
    assert experts.config._experts_implementation == DEQUANTIZED_EXPERTS
    gen = torch.Generator().manual_seed(0)
    tokens, top_k = 40, model.config.get_text_config().top_k_experts
    hidden = torch.randn(tokens, experts.hidden_dim, generator=gen).to(getattr(torch, dtype))
    index = torch.stack([torch.randperm(experts.num_experts, generator=gen)[:top_k] for _ in range(tokens)])
    weights = torch.softmax(torch.randn(tokens, top_k, generator=gen), dim=-1).to(getattr(torch, dtype))
    with torch.no_grad():
        got = experts(hidden, index, weights)
        eager = type(experts).forward.__wrapped__(experts, hidden, index, weights)  # transformers' loop
    torch.testing.assert_close(got, eager)  # the dtype's default tolerance: the sums run in another order
    assert got.abs().max() > 1e-3  # a real product, not zeros (the tiny model's weights are small)

    # the transient the KV budget sets aside covers one layer's dequantized experts (the peak is
    # measured in test_dequantized_experts_stay_within_the_planned_transient)
    from engine.memory import plan_memory

    text = model.config.get_text_config()
    dequantized = experts.gate_up_proj.dequantize().nbytes + experts.down_proj.dequantize().nbytes
    plan = plan_memory(text, model.config.canvas_length, getattr(torch, dtype), sampling_transient_bytes=0,
                       max_num_seqs=4, dequantized_experts=True)
    assert dequantized <= plan.expert_dequant_bytes <= 2 * dequantized  # plus two 4-byte chunk temporaries
    assert plan_memory(text, model.config.canvas_length, getattr(torch, dtype), sampling_transient_bytes=0,
                       max_num_seqs=4).expert_dequant_bytes == 0


_PEAK_SCRIPT = r"""
import sys, torch
from torchao.quantization import Float8WeightOnlyConfig, FqnToConfig, Int8WeightOnlyConfig, quantize_
from transformers import DiffusionGemmaTextConfig
from transformers.models.diffusion_gemma.modeling_diffusion_gemma import DiffusionGemmaTextExperts
from engine.quantization import dequantized_experts_forward, expert_dequant_bytes

method, dtype = sys.argv[1], getattr(torch, sys.argv[2])
config = DiffusionGemmaTextConfig(hidden_size=1024, moe_intermediate_size=512, num_experts=64, top_k_experts=4)
config._experts_implementation = "grouped_mm"
experts = DiffusionGemmaTextExperts(config).to(dtype)
for p in experts.parameters():
    torch.nn.init.normal_(p, std=0.02)
weights = Float8WeightOnlyConfig() if method == "fp8-experts" else Int8WeightOnlyConfig()
quantize_(experts, FqnToConfig({"gate_up_proj": weights, "down_proj": weights}), filter_fn=None)
tokens = torch.randn(8, 1024, dtype=dtype)
index = torch.stack([torch.randperm(64)[:4] for _ in range(8)])
routing = torch.full((8, 4), 0.25, dtype=dtype)
grew = peak_growth(lambda: dequantized_experts_forward(experts, tokens, index, routing))
print(grew, expert_dequant_bytes(config, torch.finfo(dtype).bits // 8))
"""


@pytest.mark.skipif(not peak_rss.SUPPORTED, reason="needs Linux's peak-RSS reset")
@pytest.mark.parametrize("method,dtype", [("fp8-experts", "bfloat16"), ("int8-experts", "float32")])
def test_dequantized_experts_stay_within_the_planned_transient(method, dtype):
    """The memory plan reserves expert_dequant_bytes for one layer's dequantized experts; a forward's
    peak (a fresh process, the peak resident set reset before it) stays within it. torchao's own
    dequantize() of the same weights peaks at about 5x the result in bf16, 2x in fp32."""
    grew, planned = peak_rss.growth_and_plan(_PEAK_SCRIPT, method, dtype)
    dequantized = 64 * 3 * 512 * 1024 * torch.finfo(getattr(torch, dtype)).bits // 8
    assert dequantized <= planned < 1.2 * dequantized
    # Why the 8 MiB slack is safe on a loaded machine: the peak is the subprocess's own resident set
    # (VmHWM, reset after a warm-up forward that already paged in the kernels and the allocator's
    # arenas), which other processes' load does not move, and no timing is involved. Besides the
    # dequantized weights the forward allocates only activations of 8 tokens (under 1 MiB at hidden
    # 1024, 64 experts, top 4) and malloc's page rounding.
    assert grew <= planned + 8 * 2**20


_ACTIVATIONS_SCRIPT = r"""
import sys, torch
from transformers import DiffusionGemmaTextConfig
from transformers.models.diffusion_gemma.modeling_diffusion_gemma import DiffusionGemmaTextExperts
from engine.memory import activation_bytes_per_token

dtype, tokens = getattr(torch, sys.argv[1]), 2048
config = DiffusionGemmaTextConfig(hidden_size=1024, moe_intermediate_size=512, num_experts=64, top_k_experts=8)
config._experts_implementation = "grouped_mm"
experts = DiffusionGemmaTextExperts(config).to(dtype)
hidden = torch.randn(tokens, 1024, dtype=dtype)
index = torch.stack([torch.randperm(64)[:8] for _ in range(tokens)])
routing = torch.full((tokens, 8), 0.125)  # float32, as the router's softmax gives them
grew = peak_growth(lambda: experts(hidden, index, routing))
print(grew, tokens * activation_bytes_per_token(config, torch.finfo(dtype).bits // 8))
"""


@pytest.mark.skipif(not peak_rss.SUPPORTED, reason="needs Linux's peak-RSS reset")
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_a_moe_layer_stays_within_the_planned_activations(dtype):
    """The memory plan's activations per token cover transformers' grouped_mm experts over a batch: the
    peak of one call (a fresh process, the peak resident set reset before it) over 2048 tokens at top 8,
    where each token holds its experts' inputs and outputs and two float32 weighted copies."""
    grew, planned = peak_rss.growth_and_plan(_ACTIVATIONS_SCRIPT, dtype)
    # the same slack as the dequantized experts' test: malloc's page rounding, no timing involved
    assert 0.5 * planned < grew <= planned + 8 * 2**20, (grew, planned)


def test_fp8_experts_sum_each_tokens_outputs_in_token_order():
    """The FP8 experts' last step (engine.fp8_compute.sum_over_slots, CUDA-only around it): outputs that
    come grouped by expert go back to their (token, slot) places and each token's are summed, one fixed
    order (CUDA's index_add_ adds with atomics). Small integers make every sum exact in bfloat16."""
    from engine.fp8_compute import sum_over_slots

    tokens, top_k, hidden = 5, 3, 4
    gen = torch.Generator().manual_seed(0)
    experts = torch.randint(0, 4, (tokens, top_k), generator=gen)
    per_slot = torch.randint(0, 8, (tokens * top_k, hidden), generator=gen).to(torch.bfloat16)  # (token, slot) order
    order = torch.argsort(experts.reshape(-1), stable=True)  # as fp8_experts_forward groups them
    got = sum_over_slots(per_slot[order], order, tokens, top_k)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, per_slot.view(tokens, top_k, hidden).float().sum(dim=1).to(torch.bfloat16))
