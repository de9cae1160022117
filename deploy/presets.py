"""Memory plans of the presets in configs/*.yaml, computed from the model config (never typed by hand).

    python -m deploy.presets                 # one plain-text plan per preset
    python -m deploy.presets --markdown      # the tables of docs/deployment.md
    python -m deploy.presets --write-docs    # rewrite those tables in docs/deployment.md
    python -m deploy.presets --check-docs    # exit 1 when docs/deployment.md is out of date

Each preset is read through the server's own config loader (``server.cli.settings_from_args``), so
its max-num-seqs, max-model-len, dtype and memory-fraction are the values the server will use. The
model's parameter count, KV bytes per token, per-request state and the sampling/decoder transients
come from ``bench.memory_report.report`` (a meta-device instantiation of the model config and
``engine.memory.plan_memory``). What this module adds is only the card and the arithmetic the
engine does at start-up (``engine.memory.derive_kv_budget``):

    budget    = (card memory - CUDA context - weights) * memory_fraction
    needed    = sampling transient + decoder transient + max_num_seqs * request(max_model_len)
    fits      = needed <= budget

where request(L) counts L tokens of full-attention KV, the sliding-window KV, the request's state,
and the copies of one layer attention holds beside it (engine.memory.attention_copies).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from engine.compressed_tensors import FORMAT_FP8, METHOD_NAMES, compressed_weight_bytes
from engine.memory import auto_sampling_tile_bytes
from engine.quantization import expert_dequant_bytes, quantized_weight_bytes
from engine.sampling.fast import planned_transient_bytes

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIGS_DIR = REPO_ROOT / "configs"
DOCS_PATH = REPO_ROOT / "docs" / "deployment.md"
MODEL_SHAPE_26B = "configs/models/diffusiongemma-26b-a4b-shape.json"

# Memory the engine cannot budget: the CUDA context, cuBLAS workspaces, allocator slack (assumed).
CUDA_CONTEXT_GIB = 1.0

BEGIN_MARK = "<!-- BEGIN generated presets: python -m deploy.presets --write-docs -->"
END_MARK = "<!-- END generated presets -->"

_DTYPE_BYTES = {"float64": 8, "float32": 4, "bfloat16": 2, "float16": 2, "fp8": 1}


@dataclass(frozen=True)
class Preset:
    name: str  # configs/<name>.yaml
    hardware: str
    memory_gib: float  # the card's total memory as nvidia-smi reports it; for CPU, a host RAM budget
    model_config: str | None  # JSON of the model shape; None: the embedded model (or the tiny fallback)
    overhead_gib: float = CUDA_CONTEXT_GIB
    note: str = ""
    # the served checkpoint's compressed-tensors format (engine.compressed_tensors), None for a plain one
    checkpoint_format: str | None = None

    @property
    def path(self) -> Path:
        return CONFIGS_DIR / f"{self.name}.yaml"


PRESETS: tuple[Preset, ...] = (
    Preset("cpu-embedded", "any CPU host (budget: 4 GiB of RAM)", 4.0, None, overhead_gib=0.0),
    Preset("h100-80gb", "NVIDIA H100 80 GB (nvidia-smi total 81,559 MiB)", 81559 / 1024, MODEL_SHAPE_26B),
    Preset(
        "rtx5090-32gb", "NVIDIA RTX 5090 32 GB (nvidia-smi total 32,607 MiB)", 32607 / 1024, MODEL_SHAPE_26B,
        checkpoint_format=FORMAT_FP8,
        note="the published FP8-dynamic checkpoint (compressed-tensors, loaded by --model alone): loading, tokens "
             "equal to its dequantized twin and these byte counts are tested on CPU with a tiny checkpoint in the "
             "same layout; nothing is measured on a GPU yet. The RTX 5090 (compute capability 12.0) has no FP8 "
             "grouped GEMM in torch: its experts are dequantized a layer at a time (the transient above)",
    ),
)


def preset(name: str) -> Preset:
    for p in PRESETS:
        if p.name == name:
            return p
    raise KeyError(f"unknown preset {name!r}; known: {', '.join(p.name for p in PRESETS)}")


def load_settings(path: str | Path):
    """A preset through the server's own loader (unknown keys and wrong types exit with a message);
    ``DIFFUSION_SERVER_*`` variables of this shell are left out."""
    from server.cli import settings_from_args

    return settings_from_args(["--config", str(path)], environ={})


def _embedded_or_tiny_config():
    """The config of the model the CPU preset serves: engine/default_model, else the tiny fallback."""
    from server.default_model import embedded_model_dir

    embedded = embedded_model_dir()
    if (embedded / "config.json").is_file():
        from transformers import DiffusionGemmaConfig

        return DiffusionGemmaConfig.from_pretrained(embedded), "engine/default_model/config.json"
    from tools.tiny_checkpoint import SPECIAL_TOKENS, TinySpec, tiny_config

    return tiny_config(TinySpec(), len(SPECIAL_TOKENS) + 256), "the tiny fallback model: no engine/default_model in this checkout"


@lru_cache(maxsize=None)
def _model_config(source: str | None):
    if source is None:
        return _embedded_or_tiny_config()
    from bench.memory_report import load_config

    return load_config(str(REPO_ROOT / source)), source


@lru_cache(maxsize=None)
def _meta_model(source: str | None):
    """The model on the meta device: parameter shapes without memory."""
    import torch
    from transformers import DiffusionGemmaForBlockDiffusion

    config, _ = _model_config(source)
    with torch.device("meta"):
        return DiffusionGemmaForBlockDiffusion(config)


def _expert_parameters(source: str | None) -> int:
    """Parameters held by the MoE experts (fused 3-D tensors, not nn.Linear): what quantization must reach."""
    return sum(p.numel() for n, p in _meta_model(source).named_parameters() if ".experts." in n)


def _resolved_dtype(dtype: str, device: str) -> str:
    if dtype != "auto":
        return dtype
    return "float32" if device == "cpu" else "bfloat16"


def compute(p: Preset) -> dict:
    """The memory plan of one preset (all sizes in GiB unless the key says otherwise)."""
    from bench.memory_report import report

    server_settings = load_settings(p.path)
    settings = server_settings.engine
    config, config_source = _model_config(p.model_config)
    text = config.text_config
    dtype = _resolved_dtype(settings.dtype, settings.device)
    quantization = settings.quantization
    max_len = settings.max_model_len or text.max_position_embeddings
    seqs = settings.max_num_seqs
    meta = _meta_model(p.model_config)
    weights_in_dtype_gib = sum(q.numel() for q in meta.parameters()) * _DTYPE_BYTES[dtype] / 2**30
    weights_gib = weights_in_dtype_gib
    if p.checkpoint_format is not None:  # as engine.compressed_tensors holds it (its tests check the formula)
        quantization = METHOD_NAMES[p.checkpoint_format]
        weights_gib = compressed_weight_bytes(meta, p.checkpoint_format, _DTYPE_BYTES[dtype]) / 2**30
    elif quantization != "none":  # the bytes torchao stores (tests/test_engine_quantization.py checks the formula)
        weights_gib = quantized_weight_bytes(meta, quantization, _DTYPE_BYTES[dtype]) / 2**30
    free_after_weights = p.memory_gib - p.overhead_gib - weights_gib
    # the engine's default tile budget depends on the memory free after the weights (engine.memory)
    tile_bytes = settings.sampling_tile_bytes or auto_sampling_tile_bytes(int(free_after_weights * 2**30))
    r = report(config, weight_dtype=dtype, kv_dtype=dtype, gpu_gib=p.memory_gib - p.overhead_gib, context=max_len,
               max_num_seqs=seqs, tile_budget_mib=tile_bytes // 2**20,
               draws_in_flight=2 if settings.device == "cpu" else 1, max_encoder_tokens=settings.max_encoder_tokens,
               encoder_beside_decoder=settings.device == "cpu")  # a traced CPU pass runs rows beside the encoder
    r["weights_gib"] = weights_gib
    sampling_gib = r["sampling_transient_gib"]  # tiles never hold more rows than the batch (engine.memory)
    if (settings.sampler or ("reference" if settings.device == "cpu" else "fast")) == "fast":  # CUDA's default
        sampling_gib = planned_transient_bytes(seqs, tile_bytes, config.canvas_length, text.vocab_size,
                                               text.hidden_size) / 2**30
    # quantized experts are dequantized one layer at a time (engine.quantization.DEQUANTIZED_EXPERTS,
    # engine.compressed_tensors where the GPU has no FP8 grouped GEMM)
    dequant_gib = 0.0 if quantization == "none" else expert_dequant_bytes(text, _DTYPE_BYTES[dtype]) / 2**30
    transients_gib = sampling_gib + r["decoder_transient_gib"] + dequant_gib
    request_gib = r["request_mib_at_context"] / 1024
    budget_gib = free_after_weights * settings.memory_fraction
    needed_gib = transients_gib + seqs * request_gib
    # engine.memory.derive_kv_budget: the KV tokens the engine reserves for all running requests
    usable = budget_gib * 2**30 - transients_gib * 2**30
    usable -= 2 * seqs * r["sliding_kv_mib_per_request"] * 2**20 + seqs * r["state_kib_per_request"] * 2**10
    per_token = r["kv_bytes_per_token_full_layers"] + r["attention_bytes_per_token"]
    kv_tokens = int(max(0, min(usable // per_token, max_len * seqs)))
    out = {
        "preset": p.name,
        "file": f"configs/{p.name}.yaml",
        "hardware": p.hardware,
        "memory_gib": p.memory_gib,
        "overhead_gib": p.overhead_gib,
        "model_config": config_source,
        "model": server_settings.model or "(embedded model)",
        "device": settings.device,
        "dtype": dtype,
        "quantization": quantization,
        "parameters": r["parameters"],
        "weights_gib": r["weights_gib"],
        "weights_in_dtype_gib": weights_in_dtype_gib,
        "max_num_seqs": seqs,
        "max_model_len": max_len,
        "memory_fraction": settings.memory_fraction,
        "kv_kib_per_token": r["kv_bytes_per_token_full_layers"] / 1024,
        "request_mib": r["request_mib_at_context"],
        "sampling_transient_gib": sampling_gib,
        "decoder_transient_gib": r["decoder_transient_gib"],
        "expert_dequant_gib": dequant_gib,
        "budget_gib": budget_gib,
        "needed_gib": needed_gib,
        "headroom_gib": budget_gib - needed_gib,
        "requests_at_max_len": max(0, math.floor((budget_gib - transients_gib) / request_gib)),
        "kv_tokens_derived": kv_tokens,
        "fits": r["weights_gib"] < p.memory_gib - p.overhead_gib and needed_gib <= budget_gib,
        "note": p.note,
    }
    if quantization != "none":
        experts = _expert_parameters(p.model_config)
        out["expert_parameters"] = experts
        out["expert_share"] = experts / r["parameters"]
    return out


def compute_all() -> list[dict]:
    return [compute(p) for p in PRESETS]


def _gib(x: float) -> str:
    return f"{x:,.2f} GiB" if x < 10 else f"{x:,.1f} GiB"


def _size(gib: float) -> str:
    return f"{gib * 1024:,.1f} MiB" if gib < 1 else _gib(gib)


def markdown(plans: list[dict] | None = None) -> str:
    """The preset tables of docs/deployment.md."""
    plans = compute_all() if plans is None else plans
    lines = [
        BEGIN_MARK,
        "",
        f"Computed by `python -m deploy.presets --markdown` from the model config; CUDA context and allocator "
        f"slack assumed {CUDA_CONTEXT_GIB:g} GiB per GPU. Budget = (memory - context - weights) x memory-fraction, "
        "the memory the engine plans with at start-up; a request is counted at max-model-len tokens, with the "
        "copies of one layer that attention holds beside the KV (engine.memory.attention_copies: the concatenation "
        "with the new tokens, K and V repeated to every query head, and one more layer's worth for the encoder's "
        "gathered rows, the new tokens' columns and the mask). "
        "The decoder transient is one layer's activations over the larger of a full decoder batch and an encoder "
        "call (the engine setting `max_encoder_tokens`), over both on CPU where decoder rows run beside the "
        "encoder: for a MoE layer, each token's top-k experts' inputs and outputs, two float32 weighted copies "
        "and four hidden vectors (`engine.memory.activation_bytes_per_token`).",
        "",
    ]
    for plan in plans:
        status = "fits" if plan["fits"] else "DOES NOT FIT"
        lines += [
            f"#### `{plan['file']}`: {status}",
            "",
            "| | |",
            "|---|---|",
            f"| hardware | {plan['hardware']} |",
            f"| model | `{plan['model']}` (shape from `{plan['model_config']}`) |",
            f"| parameters | {plan['parameters'] / 1e9:,.3f} B |" if plan["parameters"] >= 1e8 else
            f"| parameters | {plan['parameters']:,} |",
        ]
        if plan["quantization"] == "none":
            lines.append(f"| weights ({plan['dtype']}) | {_size(plan['weights_gib'])} |")
        elif plan["quantization"] == METHOD_NAMES[FORMAT_FP8]:
            lines += [f"| weights (FP8 checkpoint: experts and attention/MLP linears float8 with a scale per row, "
                      f"the rest {plan['dtype']}) | {_size(plan['weights_gib'])} |",
                      f"| weights unquantized ({plan['dtype']}) | {_size(plan['weights_in_dtype_gib'])} |"]
        else:
            lines += [f"| weights (experts `{plan['quantization']}`, the rest {plan['dtype']}) | {_size(plan['weights_gib'])} |",
                      f"| weights unquantized ({plan['dtype']}) | {_size(plan['weights_in_dtype_gib'])} |"]
        if "expert_share" in plan:
            lines.append(f"| MoE expert parameters (fused 3-D tensors, not nn.Linear) | "
                         f"{plan['expert_parameters'] / 1e9:,.2f} B ({plan['expert_share']:.0%}) |")
        lines += [
            f"| activations and KV | {plan['dtype']}, {plan['kv_kib_per_token']:,.1f} KiB of full-attention KV per token |",
            f"| max-num-seqs x max-model-len | {plan['max_num_seqs']} x {plan['max_model_len']:,} tokens |",
            f"| one request at max-model-len | {_size(plan['request_mib'] / 1024)} |",
            f"| transients (sampling tile + decoder) | {_size(plan['sampling_transient_gib'])} + "
            f"{_size(plan['decoder_transient_gib'])} |" if not plan["expert_dequant_gib"] else
            f"| transients (sampling tile + decoder + one layer's experts dequantized) | "
            f"{_size(plan['sampling_transient_gib'])} + {_size(plan['decoder_transient_gib'])} + "
            f"{_size(plan['expert_dequant_gib'])} |",
            f"| budget ({plan['memory_fraction']:g} of {_gib(plan['memory_gib'])} - {plan['overhead_gib']:g} GiB "
            f"context - weights) | {_size(plan['budget_gib'])} |",
            f"| needed (transients + {plan['max_num_seqs']} requests) | {_size(plan['needed_gib'])} |",
            f"| headroom | {_size(plan['headroom_gib'])} |",
            f"| requests at max-model-len the budget holds | {plan['requests_at_max_len']:,} |",
            f"| KV tokens the engine derives (`--max-num-kv-tokens` default) | {plan['kv_tokens_derived']:,} |",
        ]
        if plan["note"]:
            lines.append(f"| note | {plan['note']} |")
        lines.append("")
    lines.append(END_MARK)
    return "\n".join(lines) + "\n"


def text(plans: list[dict] | None = None) -> str:
    plans = compute_all() if plans is None else plans
    out = []
    for plan in plans:
        out.append(f"{plan['file']}: {'fits' if plan['fits'] else 'DOES NOT FIT'}"
                   + ("" if plan["quantization"] == "none" else f" (quantization {plan['quantization']})"))
        for k, v in plan.items():
            if k not in ("file",):
                out.append(f"  {k}: {v:,.3f}" if isinstance(v, float) else f"  {k}: {v}")
    return "\n".join(out) + "\n"


def replace_generated(doc: str, generated: str) -> str:
    """``doc`` with the section delimited by ``generated``'s first and last lines replaced by it."""
    lines = generated.rstrip("\n").splitlines()
    begin, end_mark = lines[0], lines[-1]
    start, end = doc.find(begin), doc.find(end_mark)
    if start < 0 or end < start:
        raise ValueError(f"markers not found: put {begin!r} and {end_mark!r} in the document")
    return doc[:start] + generated.rstrip("\n") + doc[end + len(end_mark):]


def generated_section(doc: str, begin: str = BEGIN_MARK, end_mark: str = END_MARK) -> str:
    start, end = doc.find(begin), doc.find(end_mark)
    if start < 0 or end < start:
        raise ValueError(f"generated section {begin!r} not found")
    return doc[start:end + len(end_mark)] + "\n"


def updated_docs(doc: str, plans: list[dict] | None = None) -> str:
    """docs/deployment.md with the generated preset tables refreshed."""
    return replace_generated(doc, markdown(plans))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--markdown", action="store_true", help="print the markdown tables")
    mode.add_argument("--json", action="store_true", help="print the plans as JSON")
    mode.add_argument("--write-docs", action="store_true", help=f"rewrite the tables in {DOCS_PATH.relative_to(REPO_ROOT)}")
    mode.add_argument("--check-docs", action="store_true", help="exit 1 when the docs tables are out of date")
    args = ap.parse_args(argv)
    if args.json:
        print(json.dumps(compute_all(), indent=2))
    elif args.markdown:
        sys.stdout.write(markdown())
    elif args.write_docs or args.check_docs:
        doc = DOCS_PATH.read_text()
        new = updated_docs(doc)
        if args.check_docs:
            if new != doc:
                print(f"{DOCS_PATH} is out of date: run python -m deploy.presets --write-docs", file=sys.stderr)
                return 1
            return 0
        DOCS_PATH.write_text(new)
    else:
        sys.stdout.write(text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
