"""The FP8 compute path of compressed-tensors FP8-dynamic checkpoints (engine.fp8_compute) against the
dequantized reference, on a GPU with row-wise FP8 GEMMs (compute capability 9.0 or 10.x). Skipped
elsewhere; ``bash bench/gpu_check.sh ct-fp8`` runs it on a lent GPU.

Tolerance: both GEMMs quantize their activations to float8 e4m3 per token (3 mantissa bits, a relative
rounding error of at most 2^-4 per element), where the reference multiplies unquantized activations by
the same dequantized weights in float32. Over sums of many terms those errors mostly cancel; the tests
allow a relative error (Frobenius norm) of 5% for one GEMM and 8% for the experts' two in a row.
"""

from __future__ import annotations

import pytest
import torch

from engine import EngineCore, EngineSettings, SamplingParams
from engine.loader import load_model
from tests.engine_helpers import run_to_completion

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.fixture(autouse=True)
def fp8_gpu():
    from engine.fp8_compute import unsupported_reason

    reason = unsupported_reason(torch.device("cuda"))
    if reason is not None:
        pytest.skip(reason)


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).norm() / want.float().norm())


def test_scaled_mm_linear_matches_the_dequantized_reference():
    from engine.fp8_compute import fp8_linear
    from tools.quantized_checkpoint import quantize_fp8

    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(384, 512, generator=gen) / 512**0.5
    t = quantize_fp8(weight)
    x = torch.randn(37, 512, generator=gen).to(torch.bfloat16)
    q, scale = t["weight"].cuda(), t["weight_scale"].float().cuda()
    got = fp8_linear(x.cuda(), q, scale)
    want = x.float().cuda() @ (q.float() * scale).t()
    assert got.dtype == torch.bfloat16 and got.shape == (37, 384)
    assert _relative_error(got, want) < 0.05


def test_grouped_fp8_experts_match_the_dequantized_reference(tmp_path):
    from transformers.models.diffusion_gemma.modeling_diffusion_gemma import DiffusionGemmaTextExperts

    from engine.compressed_tensors import _DequantizedView
    from engine.fp8_compute import fp8_experts_forward
    from tools.quantized_checkpoint import write_quantized_checkpoint
    from tools.tiny_checkpoint import TinySpec, build_tiny_checkpoint

    src = build_tiny_checkpoint(tmp_path / "plain", TinySpec(hidden_size=128, num_experts=8, top_k_experts=2))
    folder = write_quantized_checkpoint(src, tmp_path / "fp8", "fp8")
    model = load_model(EngineSettings(model=str(folder), device="cuda", dtype="bfloat16")).model
    experts = model.model.decoder.layers[0].experts
    gen = torch.Generator().manual_seed(1)
    tokens = 300
    hidden = torch.randn(tokens, experts.hidden_dim, generator=gen).to(torch.bfloat16).cuda()
    index = torch.stack([torch.randperm(experts.num_experts, generator=gen)[:2] for _ in range(tokens)])
    index[:40] = torch.tensor([0, 1])  # uneven groups, and an expert no token picks
    index[index == 7] = 6
    index = index.cuda()
    weights = torch.softmax(torch.randn(tokens, 2, generator=gen), dim=-1).to(torch.bfloat16).cuda()
    with torch.inference_mode():
        got = fp8_experts_forward(experts, hidden, index, weights)
        want = DiffusionGemmaTextExperts.forward(_DequantizedView(experts, torch.float32), hidden.float(), index,
                                                 weights.float())
        routed = experts(hidden, index, weights)  # the module's own forward takes the FP8 path on this GPU
    assert _relative_error(got, want) < 0.08
    assert torch.equal(routed, got)


def test_engine_serves_an_fp8_checkpoint_on_the_gpu(tmp_path):
    from tools.quantized_checkpoint import write_quantized_checkpoint
    from tools.tiny_checkpoint import TinySpec, build_tiny_checkpoint

    src = build_tiny_checkpoint(tmp_path / "plain", TinySpec(hidden_size=64))
    folder = write_quantized_checkpoint(src, tmp_path / "fp8", "fp8")
    settings = EngineSettings(model=str(folder), device="cuda", dtype="bfloat16", max_num_seqs=4)
    core = EngineCore(load_model(settings), settings)
    assert core.loaded.quantization == "compressed-tensors-fp8"
    # the experts run the FP8 grouped GEMM: the memory plan reserves no layer dequantized whole
    assert not core.loaded.dequantized_experts
    requests = [(f"r{i}", [2] + [5 + b for b in f"prompt {i}".encode()],
                 SamplingParams(max_tokens=32, seed=i, ignore_eos=True)) for i in range(4)]
    first = run_to_completion(core, requests)
    second = run_to_completion(core, requests)
    assert all(len(r["tokens"]) == 32 for r in first.values())
    assert {k: v["tokens"] for k, v in first.items()} == {k: v["tokens"] for k, v in second.items()}


def test_no_fp8_gemm_dequantizes_and_plans_for_it(tmp_path):
    """--no-fp8-gemm on an FP8 GPU runs (and plans memory for) the path of a GPU without FP8 GEMMs."""
    from tools.quantized_checkpoint import write_quantized_checkpoint
    from tools.tiny_checkpoint import TinySpec, build_tiny_checkpoint

    src = build_tiny_checkpoint(tmp_path / "plain", TinySpec(hidden_size=64))
    folder = write_quantized_checkpoint(src, tmp_path / "fp8", "fp8")
    cores = {}
    for fp8_gemm in (True, False):
        settings = EngineSettings(model=str(folder), device="cuda", dtype="bfloat16", max_num_seqs=4,
                                  fp8_gemm=fp8_gemm)
        cores[fp8_gemm] = EngineCore(load_model(settings), settings)
        assert cores[fp8_gemm].loaded.dequantized_experts is not fp8_gemm
    requests = [(f"r{i}", [2] + [5 + b for b in f"prompt {i}".encode()],
                 SamplingParams(max_tokens=32, seed=i, ignore_eos=True)) for i in range(4)]
    assert all(len(r["tokens"]) == 32 for r in run_to_completion(cores[False], requests).values())
    # the layer dequantized whole is planned beside the KV
    assert cores[True].memory_plan.expert_dequant_bytes == 0 < cores[False].memory_plan.expert_dequant_bytes


def test_fp8_experts_stay_within_the_planned_activations():
    """The FP8 experts' transients (the gathered rows, the float32 copies of per-token quantization, the
    grouped GEMMs' outputs) at DiffusionGemma 26B's per-token sizes peak within the activations the
    memory plan sets aside for a MoE layer's tokens (``engine.memory.activation_bytes_per_token``)."""
    from types import SimpleNamespace

    from transformers import DiffusionGemmaTextConfig

    from engine.fp8_compute import FP8, fp8_experts_forward
    from engine.memory import activation_bytes_per_token

    config = DiffusionGemmaTextConfig(hidden_size=2816, intermediate_size=2112, moe_intermediate_size=704,
                                      num_experts=16, top_k_experts=8)
    hidden, inter, n, tokens = config.hidden_size, config.moe_intermediate_size, config.num_experts, 512
    gen = torch.Generator(device="cuda").manual_seed(0)

    def fp8_weight(*shape):
        return (torch.randn(*shape, generator=gen, device="cuda") * 0.1).to(FP8)

    experts = SimpleNamespace(
        num_experts=n, act_fn=torch.nn.functional.gelu,
        gate_up_proj=fp8_weight(n, 2 * inter, hidden), gate_up_proj_scale=torch.full((n, 2 * inter, 1), 0.01, device="cuda"),
        down_proj=fp8_weight(n, hidden, inter), down_proj_scale=torch.full((n, hidden, 1), 0.01, device="cuda"))
    states = torch.randn(tokens, hidden, generator=gen, device="cuda").to(torch.bfloat16)
    index = torch.stack([torch.randperm(n, generator=gen, device="cuda")[:8] for _ in range(tokens)])
    routing = torch.full((tokens, 8), 1 / 8, dtype=torch.bfloat16, device="cuda")
    with torch.inference_mode():
        fp8_experts_forward(experts, states, index, routing)  # kernels and workspaces loaded
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = fp8_experts_forward(experts, states, index, routing)
        torch.cuda.synchronize()
    assert out.shape == (tokens, hidden) and torch.isfinite(out).all()
    assert torch.cuda.max_memory_allocated() - base <= tokens * activation_bytes_per_token(config, 2)
