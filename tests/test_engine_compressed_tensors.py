"""Checkpoints in the compressed-tensors layout LLM Compressor publishes (FP8-dynamic and NVFP4) load
with ``--model DIR`` alone, keep their experts in 8 or 4 bits, and give the tokens of the same model
dequantized to float32 and loaded as a plain checkpoint. One that lacks a tensor is refused at start-up."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import httpx
import pytest
import torch

from engine import EngineSettings, SamplingParams
from engine.compressed_tensors import (
    FORMAT_FP8, FORMAT_NVFP4, CheckpointError, Fp8Linear, compressed_experts_class, compressed_weight_bytes,
)
from engine.core import EngineCore
from engine.loader import load_model
from tests import peak_rss
from tests.conftest import REPO_ROOT
from tests.engine_helpers import run_to_completion
from tools.quantized_checkpoint import write_quantized_checkpoint
from tools.tiny_checkpoint import TinySpec, build_tiny_checkpoint

SCHEMES = {"fp8": FORMAT_FP8, "nvfp4": FORMAT_NVFP4}
MISSING = "model.decoder.layers.1.experts.2.up_proj.weight_scale"


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    # hidden 64: a multiple of NVFP4's 16-column groups in every expert and dense layer
    return build_tiny_checkpoint(tmp_path_factory.mktemp("plain"), TinySpec(hidden_size=64))


@pytest.fixture(scope="module")
def checkpoints(source, tmp_path_factory):
    """{scheme: (quantized folder, its dequantized float32 twin as a plain checkpoint)}"""
    out = {}
    for scheme in SCHEMES:
        ref = tmp_path_factory.mktemp(f"{scheme}-reference")
        out[scheme] = (write_quantized_checkpoint(source, tmp_path_factory.mktemp(scheme), scheme, reference=ref), ref)
    return out


def _tokens(path, requests) -> dict:
    settings = EngineSettings(model=str(path), sampler="reference", max_num_seqs=4)
    core = EngineCore(load_model(settings), settings)
    return {rid: r["tokens"] for rid, r in run_to_completion(core, requests).items()}


@pytest.mark.parametrize("scheme", SCHEMES)
def test_the_checkpoint_is_written_in_the_published_layout(checkpoints, scheme):
    from safetensors import safe_open

    folder, _ = checkpoints[scheme]
    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert (qc["quant_method"], qc["config_groups"]["group_0"]["format"]) == ("compressed-tensors", SCHEMES[scheme])
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        layer = "model.decoder.layers.0"
        assert f"{layer}.experts.gate_up_proj" not in keys  # unfused, one linear per expert and projection
        if scheme == "fp8":
            assert f.get_tensor(f"{layer}.experts.3.up_proj.weight").dtype == torch.float8_e4m3fn
            assert f.get_tensor(f"{layer}.experts.3.up_proj.weight_scale").shape == (64, 1)
            assert f.get_tensor(f"{layer}.self_attn.q_proj.weight").dtype == torch.float8_e4m3fn
        else:
            assert f.get_tensor(f"{layer}.experts.3.down_proj.weight_packed").shape == (64, 32)
            assert f.get_tensor(f"{layer}.experts.3.down_proj.weight_scale").dtype == torch.float8_e4m3fn
            assert f.get_tensor(f"{layer}.experts.3.down_proj.weight_global_scale").shape == (1,)
            assert f.get_tensor(f"{layer}.mlp.gate_proj.weight_packed").dtype == torch.uint8
            assert f.get_tensor(f"{layer}.self_attn.q_proj.weight").dtype == torch.float32  # NVFP4 ignores self_attn
        assert f.get_tensor(f"{layer}.router.proj.weight").dtype == torch.float32  # ignored by the recipe


def test_nvfp4_decoding_is_compressed_tensors_own():
    """Pinned to compressed-tensors' definition (its fp4 compressor and dequantization): the even column
    in the low nibble, bit 3 the sign, magnitudes 0 .5 1 1.5 2 3 4 6; weight = e2m1 * scale / global."""
    from engine.compressed_tensors import nvfp4_to_float, unpack_e2m1

    assert unpack_e2m1(torch.tensor([[0xB2, 0x7F]], dtype=torch.uint8)).tolist() == [[1.0, -1.5, -6.0, 6.0]]
    packed = torch.full((1, 8), 0xB2, dtype=torch.uint8)  # 16 columns: one group
    scale = torch.tensor([[2.0]]).to(torch.float8_e4m3fn)
    assert nvfp4_to_float(packed, scale, torch.tensor([4.0])).tolist() == [[0.5, -0.75] * 8]


@pytest.mark.parametrize("scheme", SCHEMES)
def test_experts_load_stacked_and_quantized_and_weights_stay_tied(checkpoints, scheme):
    from transformers import DiffusionGemmaForBlockDiffusion

    folder, _ = checkpoints[scheme]
    loaded = load_model(EngineSettings(model=str(folder)))
    model = loaded.model
    assert loaded.quantization == f"compressed-tensors-{scheme}" and loaded.dequantized_experts
    experts = model.model.decoder.layers[1].experts
    assert type(experts) is compressed_experts_class()
    if scheme == "fp8":
        assert (experts.gate_up_proj.dtype, experts.gate_up_proj.shape) == (torch.float8_e4m3fn, (4, 128, 64))
        assert (experts.down_proj_scale.dtype, experts.down_proj_scale.shape) == (torch.float32, (4, 64, 1))
        assert isinstance(model.model.decoder.layers[0].self_attn.o_proj, Fp8Linear)
    else:
        assert (experts.gate_up_proj.dtype, experts.gate_up_proj.shape) == (torch.uint8, (4, 128, 32))
        assert (experts.gate_up_proj_scale.dtype, experts.gate_up_proj_scale.shape) == (torch.float8_e4m3fn, (4, 128, 4))
    # tied as in the plain loading path: the encoder's layers are the decoder's, the lm head the embedding
    encoder = model.model.encoder.language_model
    assert encoder.layers[1].experts.gate_up_proj is experts.gate_up_proj
    assert encoder.layers[0].self_attn.q_proj.weight is model.model.decoder.layers[0].self_attn.q_proj.weight
    assert model.lm_head.weight is model.model.decoder.embed_tokens.weight is encoder.embed_tokens.weight
    # the bytes the loaded weights take are the arithmetic the presets use (deploy.presets)
    with torch.device("meta"):
        meta = DiffusionGemmaForBlockDiffusion(model.config)
    held = sum(p.numel() * p.element_size() for p in model.parameters())
    assert held == compressed_weight_bytes(meta, SCHEMES[scheme], 4)
    assert held < sum(p.numel() * 4 for p in meta.parameters())


def test_no_fp8_gemm_reaches_every_fp8_layer(checkpoints):
    # --no-fp8-gemm: an H100 runs the dequantized path of a GPU without FP8 GEMMs (the CUDA test checks the
    # plan); here every FP8 layer must carry the setting, the experts and the dense layers alike
    folder, _ = checkpoints["fp8"]
    for fp8_gemm in (True, False):
        model = load_model(EngineSettings(model=str(folder), fp8_gemm=fp8_gemm)).model
        layers = [m for m in model.modules() if isinstance(m, (Fp8Linear, compressed_experts_class()))]
        assert {type(m) for m in layers} == {Fp8Linear, compressed_experts_class()}
        assert {m.fp8_gemm for m in layers} == {fp8_gemm}


@pytest.mark.parametrize("scheme", SCHEMES)
def test_dummy_load_format_builds_the_published_layout_from_the_config(checkpoints, scheme, tmp_path):
    """--load-format dummy on a compressed-tensors config (no weight files): the same model, tensor for
    tensor in shape and dtype, as loading the real checkpoint, with random values, the same in every load;
    it generates."""
    import shutil

    folder, _ = checkpoints[scheme]
    config_only = tmp_path / "config-only"
    shutil.copytree(folder, config_only, ignore=shutil.ignore_patterns("*.safetensors", "*.safetensors.index.json"))
    real = load_model(EngineSettings(model=str(folder))).model
    settings = EngineSettings(model=str(config_only), load_format="dummy")
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    loaded = load_model(settings)
    assert torch.equal(torch.rand(3), expected)  # the caller's random state did not move
    # the same weights in every load (engine replicas each build the dummy model)
    again = load_model(settings).model.state_dict()
    assert all(torch.equal(t, again[k]) for k, t in loaded.model.state_dict().items())
    assert loaded.quantization == f"compressed-tensors-{scheme}"
    shapes = {n: (p.shape, p.dtype) for n, p in real.named_parameters(remove_duplicate=False)}
    assert {n: (p.shape, p.dtype) for n, p in loaded.model.named_parameters(remove_duplicate=False)} == shapes
    experts = loaded.model.model.decoder.layers[1].experts
    assert type(experts) is compressed_experts_class()
    assert experts.gate_up_proj.float().std() > 0  # random codes, not zeros
    assert loaded.model.model.encoder.language_model.layers[1].experts.gate_up_proj is experts.gate_up_proj
    core = EngineCore(loaded, settings)
    out = run_to_completion(core, [("a", [5, 6, 7], SamplingParams(max_tokens=16, seed=1, ignore_eos=True))])
    assert len(out["a"]["tokens"]) == 16 and out["a"]["finish_reason"] == "length"
    core.close()


@pytest.mark.parametrize("scheme", SCHEMES)
def test_tokens_equal_the_dequantized_plain_checkpoints(checkpoints, scheme):
    folder, reference = checkpoints[scheme]
    requests = [(f"r{seed}", [2] + [5 + b for b in text.encode()], SamplingParams(max_tokens=40, seed=seed))
                for seed, text in ((0, "hello world"), (7, "a longer prompt, batched with the first"))]
    got = _tokens(folder, requests)
    assert got == _tokens(reference, requests)
    assert all(len(tokens) > 0 for tokens in got.values())


@pytest.mark.parametrize("scheme", SCHEMES)
def test_default_settings_do_not_try_to_trace_the_dequantizing_experts(checkpoints, scheme, caplog):
    """The decoder trace (a CPU default) cannot record the per-call dequantization loops: a compressed
    checkpoint runs its passes eagerly from the start, without failed traces and their warnings; asking
    for the trace is refused."""
    folder, _ = checkpoints[scheme]
    settings = EngineSettings(model=str(folder), max_num_seqs=4)
    core = EngineCore(load_model(settings), settings)
    assert core.runner.traced is None
    with caplog.at_level("WARNING", logger="engine.traced_decoder"):
        run_to_completion(core, [("r", [2, 9, 10, 11], SamplingParams(max_tokens=20, seed=1)),
                                 ("s", [2] + [5] * 30, SamplingParams(max_tokens=20, seed=2))])
    assert not [r for r in caplog.records if "tracing the decoder pass failed" in r.getMessage()]
    with pytest.raises(ValueError, match="quantized experts"):  # before any weight is read
        load_model(EngineSettings(model=str(folder), trace_decoder=True))


@pytest.mark.parametrize("layers,shards", [("encoder", 1), ("both", 1), ("decoder", 3)])
def test_other_layouts_load_too(source, tmp_path, layers, shards):
    """vLLM reads either copy of the tied text layers (both prefixes map to one parameter), so does this;
    and weights split over several files with an index, as on the hub."""
    ref = tmp_path / "reference"
    folder = write_quantized_checkpoint(source, tmp_path / "q", "fp8", reference=ref, layers=layers, shards=shards)
    assert len(list(folder.glob("*.safetensors"))) == shards
    requests = [("r", [2] + [5 + b for b in b"tied layers"], SamplingParams(max_tokens=24, seed=5))]
    assert _tokens(folder, requests) == _tokens(ref, requests)


@pytest.mark.parametrize("missing", [MISSING, "model.decoder.layers.0.experts.3.gate_proj.weight",
                                     "model.decoder.layers.1.mlp.down_proj.weight_scale",
                                     "model.decoder.layers.1.layer_scalar"])
def test_any_missing_tensor_is_refused_naming_it(source, tmp_path, missing):
    folder = write_quantized_checkpoint(source, tmp_path / "q", "fp8", drop=(missing,))
    with pytest.raises(CheckpointError, match=f"has no tensor {missing}: "):
        load_model(EngineSettings(model=str(folder)))


def test_a_missing_expert_tensor_is_refused_naming_it(source, tmp_path):
    folder = write_quantized_checkpoint(source, tmp_path / "q", "fp8", drop=(MISSING,))
    with pytest.raises(CheckpointError) as info:
        load_model(EngineSettings(model=str(folder)))
    assert str(info.value) == (f"the checkpoint {folder} has no tensor {MISSING}: "
                               f"the model would run with it uninitialised")


def test_a_quantized_checkpoint_with_quantization_flag_is_refused(checkpoints):
    folder, _ = checkpoints["fp8"]
    with pytest.raises(CheckpointError) as info:
        load_model(EngineSettings(model=str(folder), quantization="fp8-experts"))
    assert str(info.value) == f"{folder} is already quantized (compressed-tensors): drop --quantization fp8-experts"


def test_an_unsupported_format_is_refused(source, tmp_path):
    folder = write_quantized_checkpoint(source, tmp_path / "q", "fp8")
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"]["config_groups"]["group_0"]["format"] = "pack-quantized"  # int4 (W4A16)
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError) as info:
        load_model(EngineSettings(model=str(folder)))
    assert str(info.value) == ("compressed-tensors format ['pack-quantized'] is not supported "
                               "(supported: float-quantized, nvfp4-pack-quantized)")


def _edit_config(folder, change):
    config = json.loads((folder / "config.json").read_text())
    change(config["quantization_config"])
    (folder / "config.json").write_text(json.dumps(config))


def _group(qc):
    return qc["config_groups"]["group_0"]


@pytest.mark.parametrize("scheme, change, message", [
    ("fp8", lambda qc: qc.pop("config_groups"), "the compressed-tensors config_groups must map group names to "
                                                "schemes, got None"),
    ("fp8", lambda qc: qc.update(config_groups=[{"format": "float-quantized"}]),
     "the compressed-tensors config_groups must map group names to schemes, got [{'format': 'float-quantized'}]"),
    ("fp8", lambda qc: qc.update(transform_config={"config_groups": {"R1": {"type": "hadamard"}}}),
     "compressed-tensors transforms (transform_config: rotations applied at run time) are not supported"),
    ("fp8", lambda qc: _group(qc)["weights"].update(symmetric=False),
     "compressed-tensors group group_0: asymmetric weights (zero points) are not supported"),
    ("nvfp4", lambda qc: _group(qc)["weights"].update(symmetric=False),
     "compressed-tensors group group_0: asymmetric weights (zero points) are not supported"),
    ("fp8", lambda qc: _group(qc)["input_activations"].update(dynamic=False),
     "compressed-tensors group group_0: static activation scales are not supported (only dynamic FP8 activations)"),
])
def test_a_scheme_the_arithmetic_does_not_follow_is_refused(source, tmp_path, scheme, change, message):
    """Settings that change what the stored numbers mean (zero points, rotations, static scales) are refused,
    not dropped: the model would load and compute something else."""
    folder = write_quantized_checkpoint(source, tmp_path / "q", scheme)
    _edit_config(folder, change)
    with pytest.raises(CheckpointError) as info:
        load_model(EngineSettings(model=str(folder)))
    assert str(info.value) == message


@pytest.mark.parametrize("name, dtype", [("model.decoder.layers.0.input_layernorm.weight", torch.float8_e5m2),
                                         ("model.decoder.layers.0.input_layernorm.weight", torch.float8_e4m3fn),
                                         ("model.decoder.layers.1.experts.gate_up_proj", torch.float8_e4m3fn)])
def test_quantized_codes_where_a_plain_weight_is_expected_are_refused(source, tmp_path, name, dtype):
    """An 8-bit float tensor with no scales (a plain weight, or experts stored fused as the recipe's ignore
    list leaves them) would be read as its codes' values."""
    from safetensors.torch import load_file, save_file

    folder = write_quantized_checkpoint(source, tmp_path / "q", "fp8")
    tensors = load_file(folder / "model.safetensors")
    if name.endswith("experts.gate_up_proj"):  # these experts stored fused instead of as per-expert linears
        plain = load_file(next(source.glob("*.safetensors")))
        for key in [k for k in tensors if k.startswith("model.decoder.layers.1.experts.")]:
            del tensors[key]
        for key in ("gate_up_proj", "down_proj"):
            tensors[f"model.decoder.layers.1.experts.{key}"] = plain[f"model.decoder.layers.1.experts.{key}"]
    tensors[name] = tensors[name].to(dtype)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError) as info:
        load_model(EngineSettings(model=str(folder)))
    assert str(info.value) == (f"the checkpoint's {name} is {str(dtype).removeprefix('torch.')} with no scales: "
                               f"it cannot be read as a weight")


def test_unreadable_or_doubled_weight_files_are_refused_naming_them(source, tmp_path):
    folder = write_quantized_checkpoint(source, tmp_path / "q", "fp8", shards=2)
    first, second = sorted(folder.glob("*.safetensors"))
    from safetensors.torch import load_file, save_file

    doubled = load_file(first)
    key = sorted(doubled)[0]
    save_file({**load_file(second), key: doubled[key]}, second, metadata={"format": "pt"})
    with pytest.raises(CheckpointError) as info:
        load_model(EngineSettings(model=str(folder)))
    assert str(info.value) == f"the checkpoint {folder} holds {key} twice (in {second.name} and another file)"
    first.write_bytes(b"\xff" * 64)  # a corrupt header
    with pytest.raises(CheckpointError, match=rf"^{re.escape(str(first))} cannot be read as safetensors: "):
        load_model(EngineSettings(model=str(folder)))


def test_server_serves_it_with_no_extra_flag(server_launcher, checkpoints):
    """--model DIR alone: the completion is the dequantized plain checkpoint's."""
    folder, reference = checkpoints["fp8"]
    server = server_launcher(["--model", str(folder), "--sampler", "reference"])
    prompt = [5 + b for b in b"hello world"]
    r = httpx.post(f"{server.url}/v1/completions", timeout=60,
                   json={"model": str(folder), "prompt": prompt, "max_tokens": 32, "seed": 3, "ignore_eos": True})
    assert r.status_code == 200, r.text
    expected = _tokens(reference, [("r", prompt, SamplingParams(max_tokens=32, seed=3, ignore_eos=True))])["r"]
    assert r.json()["choices"][0]["text"] == bytes(t - 5 for t in expected if t >= 5).decode("utf-8", errors="replace")


def test_server_exits_at_start_up_on_a_missing_tensor(source, tmp_path):
    folder = write_quantized_checkpoint(source, tmp_path / "q", "fp8", drop=(MISSING,))
    proc = subprocess.run([sys.executable, "-m", "server", "--model", str(folder), "--host", "127.0.0.1", "--port", "0"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 1, proc.stderr[-3000:]
    message = f"failed to load the model {folder}: the checkpoint {folder} has no tensor {MISSING}: the model would " \
              f"run with it uninitialised"
    assert any(line.endswith(message) for line in proc.stderr.splitlines()), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr


def _scaled_grouped_mm_definition(a, b, scale_a, scale_b, offs=None, out_dtype=None):
    """torch._scaled_grouped_mm (2-D x 3-D) by its definition, with the layout checks its CUDA kernel
    makes: rows of ``a`` grouped by ``offs``, group g times ``b[g]``, row-wise scales on both sides."""
    assert a.dtype == b.dtype == torch.float8_e4m3fn and scale_a.dtype == scale_b.dtype == torch.float32
    assert a.stride(-1) == 1 and b.stride(-2) == 1, "a row-major, b column-major"
    assert scale_a.shape == (a.shape[0],) and scale_b.shape == (b.shape[0], b.shape[-1])
    assert offs.dtype == torch.int32 and offs.shape == (b.shape[0],)
    out, start = torch.empty(a.shape[0], b.shape[-1]), 0
    for g, end in enumerate(offs.tolist()):
        out[start:end] = (a[start:end].float() * scale_a[start:end, None]) @ (b[g].float() * scale_b[g])
        start = end
    return out.to(out_dtype)


def test_fp8_experts_forward_routes_and_scales_like_the_reference(checkpoints, monkeypatch):
    """The GPU FP8 experts path on CPU, with torch's grouped FP8 GEMM replaced by its definition: the
    sorting by expert, offsets, per-token activation scales, gate/up split and routing weights give the
    dequantized reference's result up to FP8 activation rounding. (tests/test_compressed_tensors_cuda.py
    runs the real kernel on a GPU.)"""
    from transformers.models.diffusion_gemma.modeling_diffusion_gemma import DiffusionGemmaTextExperts

    from engine.compressed_tensors import _DequantizedView
    from engine.fp8_compute import fp8_experts_forward

    monkeypatch.setattr(torch, "_scaled_grouped_mm", _scaled_grouped_mm_definition, raising=False)
    experts = load_model(EngineSettings(model=str(checkpoints["fp8"][0]))).model.model.decoder.layers[0].experts
    gen = torch.Generator().manual_seed(2)
    hidden = torch.randn(50, experts.hidden_dim, generator=gen)
    index = torch.stack([torch.randperm(experts.num_experts, generator=gen)[:2] for _ in range(50)])
    index[index == 3] = 2  # an expert no token picks: an empty group
    weights = torch.softmax(torch.randn(50, 2, generator=gen), dim=-1)
    with torch.no_grad():
        got = fp8_experts_forward(experts, hidden, index, weights)
        want = DiffusionGemmaTextExperts.forward(_DequantizedView(experts, torch.float32), hidden, index, weights)
    assert float((got - want).norm() / want.norm()) < 0.08


def test_fp8_linear_matches_the_dequantized_reference():
    """The dense FP8 product (torch._scaled_mm over per-token FP8 activations and per-row FP8 weights,
    which torch also runs on CPU) against the dequantized float32 product: FP8 activation rounding only."""
    from engine.fp8_compute import fp8_linear
    from tools.quantized_checkpoint import quantize_fp8

    gen = torch.Generator().manual_seed(3)
    t = quantize_fp8(torch.randn(96, 128, generator=gen) / 128**0.5)
    x = torch.randn(3, 7, 128, generator=gen)
    got = fp8_linear(x, t["weight"], t["weight_scale"])
    want = x @ (t["weight"].float() * t["weight_scale"]).t()
    assert got.shape == (3, 7, 96) and got.dtype == torch.float32
    assert float((got - want).norm() / want.norm()) < 0.05


_PEAK_SCRIPT = r"""
import sys, torch
from transformers import DiffusionGemmaTextConfig
from transformers.models.diffusion_gemma.modeling_diffusion_gemma import DiffusionGemmaTextExperts
from engine.compressed_tensors import compressed_experts_class
from engine.quantization import expert_dequant_bytes

scheme, dtype = sys.argv[1], getattr(torch, sys.argv[2])
E, I, H = 64, 512, 1024
config = DiffusionGemmaTextConfig(hidden_size=H, moe_intermediate_size=I, num_experts=E, top_k_experts=4)
config._experts_implementation = "grouped_mm"
with torch.device("meta"):
    experts = DiffusionGemmaTextExperts(config)
for name, rows, cols in (("gate_up_proj", 2 * I, H), ("down_proj", H, I)):  # the stacked layout the loader builds
    if scheme == "nvfp4":
        stored = {name: torch.randint(0, 256, (E, rows, cols // 2), dtype=torch.uint8),
                  name + "_scale": torch.full((E, rows, cols // 16), 0.01).to(torch.float8_e4m3fn),
                  name + "_global": torch.ones(E, rows, 1)}
    else:
        stored = {name: torch.randn(E, rows, cols).to(torch.float8_e4m3fn), name + "_scale": torch.full((E, rows, 1), 0.01)}
    for key, value in stored.items():
        experts._parameters[key] = torch.nn.Parameter(value, requires_grad=False)
experts.__class__ = compressed_experts_class()
tokens = torch.randn(8, H, dtype=dtype)
index = torch.stack([torch.randperm(E)[:4] for _ in range(8)])
routing = torch.full((8, 4), 0.25, dtype=dtype)
print(peak_growth(lambda: experts(tokens, index, routing)), expert_dequant_bytes(config, torch.finfo(dtype).bits // 8))
"""


@pytest.mark.skipif(not peak_rss.SUPPORTED, reason="needs Linux's peak-RSS reset")
@pytest.mark.parametrize("scheme", ["fp8", "nvfp4"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_dequantized_compressed_experts_stay_within_the_planned_transient(scheme, dtype):
    """Where there is no FP8 grouped GEMM (CPU, the RTX 5090) a layer's compressed experts are dequantized
    whole for each call: the peak of one call (a fresh process, the peak resident set reset before it) stays
    within the plan's expert_dequant_bytes, NVFP4's int32 codes and float32 values included."""
    grew, planned = peak_rss.growth_and_plan(_PEAK_SCRIPT, scheme, dtype)
    dequantized = 64 * 3 * 512 * 1024 * torch.finfo(getattr(torch, dtype)).bits // 8
    assert dequantized <= planned < 1.2 * dequantized
    assert grew <= planned + 4 * 2**20, (grew, planned)  # malloc's page rounding; no timing involved


def test_the_writer_refuses_a_folder_that_holds_files(source, tmp_path, capsys):
    """An earlier run's shards and index would load in place of the new weights: the writer wants a new
    or empty folder, for the checkpoint and for the reference (and at least one shard)."""
    from tools.quantized_checkpoint import main

    used = write_quantized_checkpoint(source, tmp_path / "q", "fp8", shards=2)
    with pytest.raises(ValueError, match=rf"^{re.escape(str(used))} is not empty: write the checkpoint to a new or"):
        write_quantized_checkpoint(source, used, "fp8")
    with pytest.raises(ValueError, match="is not empty"):
        write_quantized_checkpoint(source, tmp_path / "new", "fp8", reference=used)
    with pytest.raises(ValueError, match="^the reference and the quantized checkpoint need folders of their own$"):
        write_quantized_checkpoint(source, tmp_path / "new", "fp8", reference=tmp_path / "." / "new")
    with pytest.raises(SystemExit) as exc:
        main(["--src", str(source), "--out", str(tmp_path / "other"), "--shards", "0"])
    assert exc.value.code == 2 and "shards must be at least 1 (got 0)" in capsys.readouterr().err
    assert not (tmp_path / "other").exists() and not (tmp_path / "new").exists()
    # a source it cannot read whole, or one already quantized (its scales would be quantized again)
    with pytest.raises(ValueError, match=rf"^{re.escape(str(used))} has no model.safetensors: the source must be"):
        write_quantized_checkpoint(used, tmp_path / "again", "fp8")
    single = write_quantized_checkpoint(source, tmp_path / "one", "fp8")
    with pytest.raises(ValueError, match=rf"^{re.escape(str(single))} is already quantized: the source must be"):
        write_quantized_checkpoint(single, tmp_path / "again", "fp8")
