"""Roofline shares of a benchmark run: how close a decoder pass comes to the GPU's memory bandwidth
(batch 1 reads the weights) and to its matrix throughput (large batches compute).

    python -m bench.roofline --bench bench/results-gpu/bf16/bench.json \\
        --config configs/models/diffusiongemma-26b-a4b-shape.json --layers 4 --gpu "NVIDIA H200"
    python -m bench.roofline --bench OUT/full-dg-shape-full-fp8/bench.json --model /tmp/dg-shape-full-fp8

The cost of one decoder pass comes from the model's shape (a meta-device instantiation, no weights):

- **bytes**: every decoder weight once (the layers, the self-conditioning MLP, the tied embedding
  as the lm head), the experts that the pass's tokens reach (uniform routing: a fraction
  ``1 - (1 - k/E)^tokens`` of them, which is all of them for one 256-token canvas of DiffusionGemma),
  and each canvas's cached keys and values (a sliding layer's last ``window - 1`` tokens).
  Quantized checkpoints count their stored bytes (``engine.compressed_tensors.parameter_bytes``). The self-conditioning product reads the embedding
  a second time; a fused kernel need not, so it is left out: the bound is the smallest traffic.
- **FLOPs**: 2 per weight per token for the dense products, ``k`` experts per token, the attention's
  ``4 x keys x query width`` per token and layer, and the lm head and the self-conditioning product
  (``2 x vocab x hidden`` per token each). An FP8 checkpoint's experts and dense targets count at
  the FP8 peak, the rest (lm head, attention, router, self-conditioning) at the bf16 peak.

A run's pass rate is its committed tok/s divided by the tokens a canvas commits per step and by the
mean decoder batch (``bench.json``), so the pass time includes everything a pass does (encoder work,
sampling, scheduling). The share is the bound's time over the pass time.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.compressed_tensors import (DENSE_TARGETS, FORMAT_FP8, FORMAT_NVFP4, checkpoint_format,
                                       compressed_config, parameter_bytes)

from .make_random_model import shape_config
from .report import _variant

# Peak figures (dense, no sparsity) from NVIDIA's data sheets: HBM GB/s, bf16 and FP8 tensor TFLOPS.
GPUS = {
    "H200": (4800, 989, 1979),  # H200 SXM
    "H100 80GB HBM3": (3350, 989, 1979),  # H100 SXM
    "H100 PCIe": (2000, 756, 1513),
}


@dataclass(frozen=True)
class PassCost:
    """One decoder pass over ``canvases`` canvases: the least bytes it must read, its FLOPs, and of
    those the ones an FP8 checkpoint computes in FP8 (its experts and dense targets)."""

    canvases: float
    weight_bytes: float
    kv_bytes: float
    flops: float
    fp8_flops: float = 0.0

    @property
    def bytes(self) -> float:
        return self.weight_bytes + self.kv_bytes

    def compute_seconds(self, tflops: float, fp8_tflops: float) -> float:
        """The least time of the products: the FP8 ones at ``fp8_tflops``, the rest at ``tflops``."""
        return (self.flops - self.fp8_flops) / (tflops * 1e12) + self.fp8_flops / (fp8_tflops * 1e12)


def shape_model(config):
    """The model of ``config`` on the meta device (no memory)."""
    from transformers import DiffusionGemmaForBlockDiffusion

    with torch.device("meta"):
        return DiffusionGemmaForBlockDiffusion(config)


def pass_cost(model, canvases: float, prefix: float, fmt: str | None = None, dtype_bytes: int = 2) -> PassCost:
    """The cost of a decoder pass over ``canvases`` canvases, each after ``prefix`` cached tokens.
    ``fmt``: the compressed-tensors format of the weights (None: all at ``dtype_bytes``)."""
    config = model.config
    text = config.text_config
    C, V, H = config.canvas_length, text.vocab_size, text.hidden_size
    E, k = text.num_experts, text.top_k_experts
    tokens = canvases * C
    reached = 1 - (1 - k / E) ** tokens if E else 0.0  # the share of experts some token routes to
    weight_bytes = flops = fp8_flops = 0.0
    for name, p in model.model.decoder.named_parameters():
        stored = parameter_bytes(name, p, fmt, dtype_bytes)
        expert = name.endswith((".experts.gate_up_proj", ".experts.down_proj"))
        if expert:
            weight_bytes += stored * reached
            products = 2 * k * (p.numel() / E) * tokens
        elif name == "embed_tokens.weight":  # the tied lm head; its lookups are free
            weight_bytes += stored
            products = 2 * 2 * V * H * tokens  # the lm head and the self-conditioning product
        else:
            weight_bytes += stored
            products = 2 * p.numel() * tokens if p.dim() == 2 else 0
        flops += products
        if fmt == FORMAT_FP8 and (expert or DENSE_TARGETS[fmt].search(name)):
            fp8_flops += products
    # attention: the canvas against its cached keys and itself; the cache holds K and V of every layer
    # (a sliding layer the last window - 1 tokens), as engine.memory counts them
    kv_bytes = 0.0
    for i, layer in enumerate(model.model.decoder.layers[: text.num_hidden_layers]):
        cached = prefix if text.layer_types[i] != "sliding_attention" else min(prefix, text.sliding_window - 1)
        flops += 4 * (cached + C) * layer.self_attn.q_proj.out_features * tokens
        per_layer = text.per_layer_config[i]
        kv_bytes += canvases * cached * 2 * per_layer.num_key_value_heads * per_layer.head_dim * dtype_bytes
    return PassCost(canvases, weight_bytes, kv_bytes, flops, fp8_flops)


def gpu_peaks(name: str) -> tuple[float, float, float] | None:
    """(HBM GB/s, bf16 TFLOPS, FP8 TFLOPS) of a GPU by its nvidia-smi name, or None if unknown."""
    for key, peaks in GPUS.items():
        if key in name:
            return peaks
    return None


def mean_prefix(workload: dict, canvas_length: int) -> float:
    """The mean cached tokens before a canvas of a ``bench.run`` random workload: the mean prompt and
    half the canvases before the last one (the Sudoku workload's prompts are the puzzles)."""
    lo, hi = workload.get("prompt_len") or (96, 96)
    cmin, cmax = workload.get("canvases") or (1, 1)
    return (lo + hi) / 2 + canvas_length * ((cmin + cmax) / 2 - 1) / 2


def shares(bench: dict, model, fmt: str | None, hbm_gbs: float | None, tflops: float | None,
           fp8_tflops: float | None = None) -> list[dict]:
    """Per run of ``bench`` (a ``bench.json``): the pass time and the roofline shares (None where the
    GPU's peak is not known). ``fp8_tflops``: the FP8 products' peak (default: ``tflops``)."""
    C = model.config.canvas_length
    prefix = mean_prefix(bench.get("workload") or {}, C)
    rows = []
    for run in bench["runs"]:
        if not run.get("tokens_per_step") or not run.get("decoder_batch_mean"):
            continue
        passes_per_s = run["tokens_per_s"] / run["tokens_per_step"] / run["decoder_batch_mean"]
        cost = pass_cost(model, run["decoder_batch_mean"], prefix, fmt)
        pass_s = 1 / passes_per_s
        rows.append({
            "variant": _variant(run),
            "concurrency": run["concurrency"],
            "tokens_per_s": run["tokens_per_s"],
            "decoder_batch": run["decoder_batch_mean"],
            "pass_ms": 1e3 * pass_s,
            "gb_per_pass": cost.bytes / 1e9,
            "tflop_per_pass": cost.flops / 1e12,
            "memory_share": cost.bytes / (hbm_gbs * 1e9) / pass_s if hbm_gbs else None,
            "compute_share": cost.compute_seconds(tflops, fp8_tflops or tflops) / pass_s if tflops else None,
        })
    return rows


def _percent(share: float | None) -> str:
    return "—" if share is None else f"{100 * share:.1f}%"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bench", required=True, help="a bench.json of python -m bench.run")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="the served checkpoint folder (its config.json; a quantization_config counts)")
    src.add_argument("--config", help="a shape config such as configs/models/diffusiongemma-26b-a4b-shape.json")
    ap.add_argument("--layers", type=int, default=30, help="with --config: the decoder layers the benchmarked model had")
    ap.add_argument("--scheme", choices=("fp8", "nvfp4"), help="with --config: the weights' compressed-tensors scheme")
    ap.add_argument("--gpu", help="the GPU's name as nvidia-smi gives it (default: the bench.json's)")
    ap.add_argument("--hbm-gbs", type=float, help="memory bandwidth, GB/s (default: the GPU's data sheet)")
    ap.add_argument("--tflops", type=float, help="dense bf16 tensor TFLOPS (default: the data sheet)")
    ap.add_argument("--fp8-tflops", type=float, help="dense FP8 tensor TFLOPS, for an FP8 checkpoint's FP8 products "
                    "(default: the data sheet)")
    ap.add_argument("--out", help="write the table here (markdown) as well")
    args = ap.parse_args(argv)

    bench = json.loads(Path(args.bench).read_text())
    if args.model:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(args.model)
        qc = compressed_config(config)
        fmt = checkpoint_format(qc) if qc else None
    else:
        config = shape_config(args.config, args.layers)
        fmt = {"fp8": FORMAT_FP8, "nvfp4": FORMAT_NVFP4, None: None}[args.scheme]
    gpu = args.gpu or (bench.get("machine") or {}).get("gpu") or ""
    peaks = gpu_peaks(gpu)
    hbm = args.hbm_gbs or (peaks and peaks[0])
    tflops = args.tflops or (peaks and peaks[1])
    fp8 = fmt == FORMAT_FP8
    fp8_tflops = (args.fp8_tflops or (peaks and peaks[2])) if fp8 else None
    rows = shares(bench, shape_model(config), fmt, hbm, tflops, fp8_tflops)
    peak = (f"{hbm:g} GB/s, " if hbm else "memory bandwidth unknown, ") + \
        (f"{tflops:g} dense bf16 TFLOPS" if tflops else "peak TFLOPS unknown") + \
        (f", {fp8_tflops:g} FP8 for the FP8 products" if fp8 and fp8_tflops else "")
    hint = "" if hbm and tflops and (fp8_tflops or not fp8) else "; --hbm-gbs, --tflops, --fp8-tflops give the shares"
    lines = [f"Roofline of `{args.bench}` on {gpu or 'an unnamed device'} ({peak}{hint}); "
             "`python -m bench.roofline` (its docstring has the model).", "",
             "| variant | concurrency | committed tok/s | decoder batch | pass (ms) | GB a pass | memory share | "
             "TFLOP a pass | compute share |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['variant'] or 'default'} | {r['concurrency']} | {r['tokens_per_s']:.0f} | "
                     f"{r['decoder_batch']:.2f} | {r['pass_ms']:.2f} | {r['gb_per_pass']:.3g} | "
                     f"{_percent(r['memory_share'])} | {r['tflop_per_pass']:.3g} | {_percent(r['compute_share'])} |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
