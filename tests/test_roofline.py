"""bench.roofline: the cost model of a decoder pass against torch's own FLOP counter and the engine's
weight sizes, and the pass time it reads off a benchmark."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import DiffusionGemmaForBlockDiffusion

from bench.make_random_model import shape_config
from bench.roofline import main, pass_cost, shape_model, shares
from engine.compressed_tensors import FORMAT_FP8, compressed_weight_bytes

TINY = "configs/models/diffusiongemma-tiny-shape.json"
REAL = "configs/models/diffusiongemma-26b-a4b-shape.json"


def test_flops_equal_torchs_count_of_the_forward():
    """One canvas without a prefix: the encoder's forward over the canvas (the same tied layers,
    counted by torch with eager attention and experts) plus the decoder's own self-conditioning MLP,
    lm head and self-conditioning product."""
    config = shape_config(TINY, 6)  # 5 sliding layers and a full one, with global heads and k = v
    config._attn_implementation = config.text_config._attn_implementation = "eager"
    config._experts_implementation = config.text_config._experts_implementation = "eager"
    torch.manual_seed(0)
    model = DiffusionGemmaForBlockDiffusion(config).eval()
    C, V, H = config.canvas_length, config.text_config.vocab_size, config.text_config.hidden_size
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model.model.encoder(input_ids=torch.randint(10, V, (1, C)))
    counted = counter.get_total_flops()
    assert counted > 0
    own = sum(p.numel() for p in model.model.decoder.self_conditioning.parameters() if p.dim() == 2)
    assert pass_cost(model, 1, 0).flops == counted + 2 * C * own + 2 * 2 * V * H * C


def test_one_canvas_reads_every_weight_once():
    """DiffusionGemma's shape: a 256-token canvas reaches all 128 experts, so a pass reads every text
    weight (the decoder's layers are the encoder's); one token reaches 8 of them."""
    config = shape_config(REAL, 4)
    model = shape_model(config)
    text_params = sum(p.numel() for n, p in model.named_parameters() if "vision" not in n)
    # all but 1 - (1 - 8/128)^256, about 7e-8, of the experts
    assert pass_cost(model, 1, 0).weight_bytes == pytest.approx(2 * text_params, rel=1e-7)
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    one_token = pass_cost(model, 1 / config.canvas_length, 0).weight_bytes
    assert one_token == pytest.approx(2 * (text_params - experts) + 2 * experts * 8 / 128, rel=1e-9)


def test_fp8_bytes_are_the_loaded_checkpoints():
    model = shape_model(shape_config(REAL, 4))
    vision = sum(p.numel() for n, p in model.named_parameters() if "vision" in n)
    held = compressed_weight_bytes(model, FORMAT_FP8, 2) - 2 * vision  # what the engine holds, less the vision tower
    assert pass_cost(model, 1, 0, FORMAT_FP8).weight_bytes == pytest.approx(held, rel=1e-7)
    assert held < 0.6 * pass_cost(model, 1, 0).weight_bytes  # the experts and dense layers halve


def test_kv_bytes_are_the_engines_cache():
    """A prefix longer than the window: the full layers' K and V of every cached token, the sliding
    layers' of their last window - 1 (engine.memory's plan, which sizes the engine's KV cache)."""
    from engine.memory import plan_memory

    config = shape_config(REAL, 6)  # 5 sliding layers and a full one
    plan = plan_memory(config.text_config, config.canvas_length, torch.bfloat16, sampling_transient_bytes=0,
                       max_num_seqs=1)
    per_canvas = 3000 * plan.kv_bytes_per_token + plan.sliding_kv_bytes_per_request
    assert pass_cost(shape_model(config), 2, 3000).kv_bytes == 2 * per_canvas


def test_fp8_products_count_at_the_fp8_peak():
    """An FP8 checkpoint computes its experts and dense layers in FP8; the lm head, the self-conditioning
    product and MLP, the router and the attention stay bf16."""
    model = shape_model(shape_config(REAL, 4))
    plain, fp8 = pass_cost(model, 1, 0), pass_cost(model, 1, 0, FORMAT_FP8)
    assert fp8.flops == plain.flops and plain.fp8_flops == 0
    V, H, C = 262144, 2816, 256
    assert 0 < fp8.fp8_flops < fp8.flops - 4 * V * H * C  # the vocabulary products are not FP8
    assert fp8.compute_seconds(989, 1979) == pytest.approx(
        (fp8.flops - fp8.fp8_flops) / 989e12 + fp8.fp8_flops / 1979e12)


def test_pass_time_and_shares_from_a_benchmark():
    """1000 committed tok/s at 10 tokens a canvas-step and 2 canvases a pass: 50 passes/s, 20 ms."""
    model = shape_model(shape_config(REAL, 4))
    bench = {"workload": {"prompt_len": [64, 256], "canvases": [1, 1]},
             "runs": [{"concurrency": 2, "tokens_per_s": 1000.0, "tokens_per_step": 10.0, "decoder_batch_mean": 2.0}]}
    (row,) = shares(bench, model, None, hbm_gbs=4800, tflops=989)
    assert row["pass_ms"] == pytest.approx(20.0)
    cost = pass_cost(model, 2.0, 160)
    assert row["memory_share"] == pytest.approx(cost.bytes / 4800e9 / 0.02)
    assert row["compute_share"] == pytest.approx(cost.flops / 989e12 / 0.02)  # bf16: all at the bf16 peak


def test_cli_on_the_committed_h200_run(tmp_path, capsys):
    out = tmp_path / "roofline.md"
    assert main(["--bench", "bench/results-gpu-h200/bench.json", "--config", REAL, "--layers", "4",
                 "--out", str(out)]) == 0
    rows = [line for line in out.read_text().splitlines() if line.startswith("| default |")]
    runs = json.loads(open("bench/results-gpu-h200/bench.json").read())["runs"]
    assert len(rows) == len(runs) == 3
    assert "| 1 | 835 | 1.00 | 30.64 |" in rows[0]  # 835.4 tok/s at 25.6 tokens a step: 30.64 ms a pass
    assert "4800 GB/s" in capsys.readouterr().out  # the H200's data sheet, from the run's GPU name
