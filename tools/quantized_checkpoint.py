"""Write a DiffusionGemma checkpoint in the layout LLM Compressor publishes (compressed-tensors).

From a plain checkpoint folder (e.g. ``tools.tiny_checkpoint.build_tiny_checkpoint``) this writes
what ``oneshot(..., QuantizationModifier(targets="Linear", scheme=...))`` followed by
``save_pretrained`` writes for DiffusionGemma (docs/quantized-checkpoints.md):

* every expert unfused into three linear layers, ``model.decoder.layers.{L}.experts.{e}.gate_proj``,
  ``up_proj`` and ``down_proj`` (gate is the first half of transformers' ``gate_up_proj[e]``), each
  quantized on its own;
* the dense MLP of every layer quantized the same way, and for ``fp8`` its attention projections
  too (the published NVFP4 recipe ignores ``self_attn``);
* the embeddings, lm head, routers, self-conditioning MLP, vision tower and norms as stored;
* ``quantization_config`` (quant_method ``compressed-tensors``) in config.json.

Schemes: ``fp8`` (FP8_DYNAMIC: ``weight`` float8_e4m3fn [N, K] + ``weight_scale`` [N, 1] in the
checkpoint's dtype, activations per token at run time) and ``nvfp4`` (NVFP4: ``weight_packed`` uint8
[N, K/2] + ``weight_scale`` float8_e4m3fn [N, K/16] + ``weight_global_scale`` and
``input_global_scale`` float32 [1]). The quantization here is round-to-nearest from the weights
alone (LLM Compressor calibrates the NVFP4 activation scale; this writes a plausible one).

``reference=DIR`` also writes the same model dequantized to float32 as a plain checkpoint, with the
engine's own dequantization: loading both must give the same tokens.

    python -m tools.quantized_checkpoint --src PLAIN_DIR --out DIR --scheme fp8 [--reference REF_DIR]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
from pathlib import Path

import torch

from engine.compressed_tensors import (
    DENSE_TARGETS, E2M1_VALUES, FORMAT_FP8, FORMAT_NVFP4, FP4_MAX, FP8_MAX, NVFP4_GROUP, PUBLISHED_EXPERTS, fp8_to_float,
    nvfp4_to_float,
)

SCHEMES = ("fp8", "nvfp4")
FORMATS = {"fp8": FORMAT_FP8, "nvfp4": FORMAT_NVFP4}
# Linear layers the published recipes leave alone (their ignore lists: lm_head, embeddings, routers,
# vision tower, self-conditioning; NVFP4 also self_attn)
IGNORED_LINEAR = re.compile(r"(router\.proj|self_conditioning\.\w+_proj|self_attn\.[qkvo]_proj|vision_tower\..*"
                            r"|embed_vision\..*)\.weight$")


def quantization_config(scheme: str, ignore: list[str]) -> dict:
    """config.json's ``quantization_config`` as LLM Compressor writes it for ``scheme``."""
    if scheme == "fp8":
        weights = dict(num_bits=8, type="float", symmetric=True, strategy="channel", dynamic=False,
                       group_size=None, block_structure=None, actorder=None, observer="minmax", observer_kwargs={})
        inputs = dict(num_bits=8, type="float", symmetric=True, strategy="token", dynamic=True,
                      group_size=None, block_structure=None, actorder=None, observer=None, observer_kwargs={})
        fmt = FORMAT_FP8
    else:
        weights = dict(num_bits=4, type="float", symmetric=True, strategy="tensor_group", group_size=16,
                       dynamic=False, block_structure=None, actorder=None, observer="minmax", observer_kwargs={})
        inputs = dict(num_bits=4, type="float", symmetric=True, strategy="tensor_group", group_size=16,
                      dynamic="local", block_structure=None, actorder=None, observer="minmax", observer_kwargs={})
        fmt = FORMAT_NVFP4
    return {
        "quant_method": "compressed-tensors",
        "format": fmt,
        "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": inputs,
                                      "output_activations": None, "format": fmt}},
        "ignore": ignore,
        "kv_cache_scheme": None,
        "sparsity_config": {},
        "global_compression_ratio": None,
    }


def quantize_fp8(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """Round-to-nearest FP8 with a scale per output row (stored in the weight's dtype, as LLM Compressor does)."""
    w = weight.to(torch.float32)
    scale = (w.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / FP8_MAX).to(weight.dtype)
    q = (w / scale.to(torch.float32)).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return {"weight": q, "weight_scale": scale}


def _e2m1_codes(x: torch.Tensor) -> torch.Tensor:
    """The nearest E2M1 code (sign in bit 3) of each float32 value."""
    table = torch.tensor(E2M1_VALUES)
    index = (x.abs().unsqueeze(-1) - table).abs().argmin(dim=-1)
    return index | (torch.signbit(x).long() << 3)


def quantize_nvfp4(weight: torch.Tensor, global_scale: torch.Tensor) -> dict[str, torch.Tensor]:
    """Round-to-nearest NVFP4: E2M1 values, an FP8 scale per 16 columns relative to ``global_scale``."""
    w = weight.to(torch.float32)
    rows, cols = w.shape
    groups = w.reshape(rows, cols // NVFP4_GROUP, NVFP4_GROUP)
    scale = (groups.abs().amax(dim=-1) / FP4_MAX * global_scale).clamp(max=FP8_MAX).to(torch.float8_e4m3fn)
    effective = scale.to(torch.float32) / global_scale
    scaled = torch.where(effective.unsqueeze(-1) > 0, groups / effective.unsqueeze(-1), torch.zeros_like(groups))
    codes = _e2m1_codes(scaled.reshape(rows, cols))
    packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).to(torch.uint8)
    return {"weight_packed": packed, "weight_scale": scale, "weight_global_scale": global_scale.reshape(1).clone(),
            "input_global_scale": torch.tensor([FP8_MAX * FP4_MAX], dtype=torch.float32)}


def nvfp4_global_scale(*weights: torch.Tensor) -> torch.Tensor:
    """One global scale for layers LLM Compressor fuses (gate and up share theirs): 448 * 6 / amax."""
    amax = max(float(w.abs().max()) for w in weights)
    return torch.tensor(FP8_MAX * FP4_MAX / max(amax, 1e-12), dtype=torch.float32)


def _quantize(scheme: str, weight: torch.Tensor, global_scale: torch.Tensor | None = None, dequantize: bool = True):
    """(checkpoint tensors of the quantized layer, the weight they dequantize to in float32 or None)."""
    if scheme == "fp8":
        t = quantize_fp8(weight)
        return t, fp8_to_float(t["weight"], t["weight_scale"]) if dequantize else None
    t = quantize_nvfp4(weight, nvfp4_global_scale(weight) if global_scale is None else global_scale)
    return t, nvfp4_to_float(t["weight_packed"], t["weight_scale"], t["weight_global_scale"]) if dequantize else None


DECODER_LAYERS, ENCODER_LAYERS = "model.decoder.layers.", "model.encoder.language_model.layers."
LAYER_COPIES = ("decoder", "encoder", "both")


def write_quantized_checkpoint(src: str | Path, out: str | Path, scheme: str = "fp8", *,
                               reference: str | Path | None = None, drop: tuple[str, ...] = (),
                               layers: str = "decoder", shards: int = 1) -> Path:
    """Write ``src`` (a plain DiffusionGemma checkpoint folder) quantized with ``scheme`` to ``out``.

    ``reference``: also write the dequantized model (float32) there as a plain checkpoint.
    ``drop``: tensor names left out of the written checkpoint (to test refusals).
    ``layers``: which copy of the tied text layers' weights the file holds: the decoder's (as
    ``save_pretrained`` writes a plain checkpoint), the encoder's, or both.
    ``shards``: files to split the weights over (``model-0000i-of-0000n.safetensors`` and an index)."""
    from safetensors.torch import load_file, save_file

    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {', '.join(SCHEMES)} (got {scheme!r})")
    if shards < 1:
        raise ValueError(f"shards must be at least 1 (got {shards})")
    if reference is not None and Path(reference).resolve() == Path(out).resolve():
        raise ValueError("the reference and the quantized checkpoint need folders of their own")
    for folder in (out, reference):  # weight files left from an earlier run would load beside the new ones
        if folder is not None and Path(folder).is_dir() and any(Path(folder).iterdir()):
            raise ValueError(f"{folder} is not empty: write the checkpoint to a new or empty folder")
    src, out = Path(src), Path(out)
    if not (src / "model.safetensors").is_file():
        raise ValueError(f"{src} has no model.safetensors: the source must be a plain checkpoint in one file")
    if not (src / "config.json").is_file():
        raise ValueError(f"{src} has no config.json: the source must be a checkpoint folder")
    config = json.loads((src / "config.json").read_text())
    if "quantization_config" in config or "quantization_config" in config.get("text_config", {}):
        raise ValueError(f"{src} is already quantized: the source must be a plain checkpoint")
    state = load_file(str(src / "model.safetensors"))
    quantized: dict[str, torch.Tensor] = {}
    dequantized: dict[str, torch.Tensor] = {}
    ignore = ["lm_head"]
    keep = reference is not None  # the dequantized model is only built for a reference checkpoint
    for name, tensor in state.items():
        experts = PUBLISHED_EXPERTS.match(name)
        if experts:
            prefix, which = experts.groups()
            parts = []
            for e in range(tensor.shape[0]):
                if which == "gate_up_proj":
                    gate, up = tensor[e].chunk(2, dim=0)
                    shared = nvfp4_global_scale(gate, up) if scheme == "nvfp4" else None
                    pieces = (("gate_proj", gate), ("up_proj", up))
                else:
                    shared, pieces = None, (("down_proj", tensor[e]),)
                rows = []
                for proj, weight in pieces:
                    tensors, back = _quantize(scheme, weight, shared, keep)
                    quantized.update({f"{prefix}.{e}.{proj}.{k}": v for k, v in tensors.items()})
                    rows.append(back)
                parts.append(torch.cat(rows) if keep else None)
            if keep:
                dequantized[name] = torch.stack(parts)
        elif name.startswith("model.decoder.") and DENSE_TARGETS[FORMATS[scheme]].search(name):
            tensors, back = _quantize(scheme, tensor, dequantize=keep)
            layer = name.removesuffix(".weight")
            quantized.update({f"{layer}.{k}": v for k, v in tensors.items()})
            if keep:
                dequantized[name] = back
        else:
            if IGNORED_LINEAR.search(name):
                ignore.append(name.removesuffix(".weight"))
            quantized[name] = tensor
            if keep:
                dequantized[name] = tensor.to(torch.float32) if tensor.is_floating_point() else tensor
    if layers not in LAYER_COPIES:
        raise ValueError(f"layers must be one of {', '.join(LAYER_COPIES)} (got {layers!r})")
    if layers != "decoder":  # the layers' weights under the encoder's names (its layer scalars are its own)
        tied = [k for k in quantized if k.startswith(DECODER_LAYERS) and not k.endswith(".layer_scalar")]
        for key in tied:
            value = quantized.pop(key) if layers == "encoder" else quantized[key].clone()
            quantized[ENCODER_LAYERS + key.removeprefix(DECODER_LAYERS)] = value
    for name in drop:
        quantized.pop(name)
    config = json.loads((src / "config.json").read_text())
    _copy_folder(src, out)
    _save_shards({k: v.contiguous() for k, v in quantized.items()}, out, shards)
    (out / "config.json").write_text(json.dumps({**config, "quantization_config": quantization_config(scheme, ignore)},
                                                indent=2))
    if reference is not None:
        reference = Path(reference)
        _copy_folder(src, reference)
        save_file({k: v.contiguous() for k, v in dequantized.items()}, str(reference / "model.safetensors"),
                  metadata={"format": "pt"})
        (reference / "config.json").write_text(json.dumps({**config, "dtype": "float32"}, indent=2))
    return out


def _save_shards(state: dict[str, torch.Tensor], out: Path, shards: int) -> None:
    """``model.safetensors``, or ``shards`` files and ``model.safetensors.index.json`` as hub checkpoints have."""
    from safetensors.torch import save_file

    if shards == 1:
        save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
        return
    keys = list(state)
    weight_map = {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = keys[i * len(keys) // shards:(i + 1) * len(keys) // shards]
        save_file({k: state[k] for k in part}, str(out / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))


def _copy_folder(src: Path, dst: Path) -> None:
    """The tokenizer, generation config and anything else beside the weights."""
    dst.mkdir(parents=True, exist_ok=True)
    for path in src.iterdir():
        if path.is_file() and path.suffix != ".safetensors":
            shutil.copy(path, dst / path.name)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", required=True, help="a plain DiffusionGemma checkpoint folder (one model.safetensors)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--scheme", choices=SCHEMES, default="fp8")
    parser.add_argument("--reference", help="also write the dequantized float32 model here")
    parser.add_argument("--layers", choices=LAYER_COPIES, default="decoder",
                        help="which copy of the tied text layers the file holds")
    parser.add_argument("--shards", type=int, default=1, help="split the weights over this many files")
    args = parser.parse_args(argv)
    try:
        print(write_quantized_checkpoint(args.src, args.out, args.scheme, reference=args.reference,
                                         layers=args.layers, shards=args.shards))
    except ValueError as exc:
        parser.error(str(exc))


if __name__ == "__main__":
    main()
