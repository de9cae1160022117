"""Load DiffusionGemma checkpoints quantized by LLM Compressor (the compressed-tensors format).

The published checkpoints (RedHatAI's ``diffusiongemma-26B-A4B-it-FP8-dynamic`` and ``-NVFP4``; the
format is in docs/quantized-checkpoints.md) store every MoE expert as three separate linear layers,
``...layers.{L}.experts.{e}.{gate_proj,up_proj,down_proj}``, each quantized on its own, where
transformers' model keeps one layer's experts fused: ``experts.gate_up_proj`` [E, 2I, H] and
``experts.down_proj`` [E, H, I]. A checkpoint is recognised by ``quantization_config.quant_method ==
"compressed-tensors"`` in its config.json and loaded here, without transformers' quantizer:

* experts are stacked per layer into the engine's representation, still quantized:
    FP8:   ``gate_up_proj`` float8_e4m3fn [E, 2I, H] + ``gate_up_proj_scale`` float32 [E, 2I, 1]
           ``down_proj``    float8_e4m3fn [E, H, I]  + ``down_proj_scale``    float32 [E, H, 1]
    NVFP4: ``gate_up_proj`` uint8 [E, 2I, H/2] (two E2M1 codes a byte) + ``gate_up_proj_scale``
           float8_e4m3fn [E, 2I, H/16] + ``gate_up_proj_global`` float32 [E, 2I, 1]; the same for down.
  Each layer's experts are dequantized whole on every call (``CompressedExperts``) and run whatever
  experts implementation the engine chose (row-wise on CPU, grouped_mm on GPUs); on a GPU with FP8
  tensor cores, FP8 experts run ``engine.fp8_compute`` instead (a grouped GEMM over the FP8 weights).
* quantized dense linears: FP8 ones stay FP8 (``Fp8Linear``: ``torch._scaled_mm`` where the GPU has
  it, dequantized per call elsewhere); NVFP4 ones are dequantized to the load dtype at load.
* every other tensor loads as stored, cast to the load dtype; tied encoder/decoder weights stay tied.

Nothing is left uninitialised: a tensor the model needs that the checkpoint lacks (an expert, a scale)
stops the load with a ``CheckpointError`` naming it.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import zlib
from pathlib import Path

import torch

from .errors import CheckpointError  # noqa: F401  (re-exported: raised by this module's loaders)
from .quantization import dequantize_rows
from .settings import DUMMY_SEED

logger = logging.getLogger(__name__)

COMPRESSED_TENSORS = "compressed-tensors"
FP8_MAX = 448.0  # largest float8_e4m3fn
FP4_MAX = 6.0  # largest E2M1
NVFP4_GROUP = 16
# E2M1 magnitudes by code (bit 3 is the sign); two codes a byte, the even column in the low nibble
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
FORMAT_FP8 = "float-quantized"
FORMAT_NVFP4 = "nvfp4-pack-quantized"
SUPPORTED_FORMATS = (FORMAT_FP8, FORMAT_NVFP4)
# LoadedModel.quantization for each format
METHOD_NAMES = {FORMAT_FP8: "compressed-tensors-fp8", FORMAT_NVFP4: "compressed-tensors-nvfp4"}
DEQUANT_CHUNKS = 16  # experts dequantized a chunk at a time (see engine.quantization.DEQUANT_CHUNKS)
# The published layout (docs/quantized-checkpoints.md): each decoder layer's fused experts, stored as
# per-expert linears, and the recipes' other targets, each text layer's dense MLP and for FP8 its
# attention projections too (tied encoder copies match as well; the checkpoint stores the decoder's).
PUBLISHED_EXPERTS = re.compile(r"^(model\.decoder\.layers\.\d+\.experts)\.(gate_up_proj|down_proj)$")
DENSE_TARGETS = {
    FORMAT_FP8: re.compile(r"layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\.weight$"),
    FORMAT_NVFP4: re.compile(r"layers\.\d+\.mlp\.(gate|up|down)_proj\.weight$"),
}


# -- the format ---------------------------------------------------------------------------------

def quantization_config_dict(config) -> dict | None:
    """The checkpoint's ``quantization_config`` as a dict (transformers may hold it as an object), or None."""
    qc = getattr(config, "quantization_config", None)
    if qc is not None and not isinstance(qc, dict):
        qc = qc.to_dict() if hasattr(qc, "to_dict") else vars(qc)
    return qc


def compressed_config(config) -> dict | None:
    """The checkpoint's compressed-tensors ``quantization_config`` (a dict), or None when it has none."""
    qc = quantization_config_dict(config)
    if not qc or qc.get("quant_method") != COMPRESSED_TENSORS:
        return None
    return qc


def checkpoint_format(qc: dict) -> str:
    """The one format of a compressed-tensors config (``float-quantized`` FP8 or ``nvfp4-pack-quantized``).
    Raises ``CheckpointError`` for anything else (int4 packing, sparse formats, mixed formats)."""
    groups = qc.get("config_groups")
    if not isinstance(groups, dict) or not groups or not all(isinstance(g, dict) for g in groups.values()):
        raise CheckpointError(f"the compressed-tensors config_groups must map group names to schemes, got {groups!r}")
    if qc.get("transform_config"):
        raise CheckpointError("compressed-tensors transforms (transform_config: rotations applied at run time) are "
                              "not supported")
    formats = {group.get("format") or qc.get("format") for group in groups.values()}
    formats.discard(None)
    if not formats and qc.get("format"):
        formats = {qc["format"]}
    if len(formats) != 1 or next(iter(formats)) not in SUPPORTED_FORMATS:
        raise CheckpointError(f"compressed-tensors format {sorted(formats) or qc.get('format')!r} is not supported "
                              f"(supported: {', '.join(SUPPORTED_FORMATS)})")
    fmt = next(iter(formats))
    for name, group in groups.items():
        weights = group.get("weights") or {}
        if weights.get("symmetric") is False:
            raise CheckpointError(f"compressed-tensors group {name}: asymmetric weights (zero points) are not supported")
        activations = group.get("input_activations") or {}
        if fmt == FORMAT_FP8 and activations and activations.get("dynamic") is False:
            raise CheckpointError(f"compressed-tensors group {name}: static activation scales are not supported "
                                  f"(only dynamic FP8 activations)")
        if fmt == FORMAT_FP8 and (weights.get("num_bits") != 8 or weights.get("type") != "float"
                                  or weights.get("strategy") != "channel"):
            raise CheckpointError(f"compressed-tensors group {name}: only FP8 weights with a scale per output "
                                  f"channel (strategy channel) are supported, got {weights!r}")
    return fmt


# -- dequantization (one definition, used by the loader, the forward and the test checkpoints) -----

def fp8_to_float(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float8 weights [..., N, K] times their per-row scale [..., N, 1], in float32."""
    return q.to(torch.float32) * scale.to(torch.float32)


def unpack_e2m1(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [..., K/2] -> float32 [..., K]: the low nibble is the even column, bit 3 the sign."""
    table = torch.tensor(E2M1_VALUES + tuple(-v for v in E2M1_VALUES), dtype=torch.float32, device=packed.device)
    codes = torch.stack((packed & 0x0F, packed >> 4), dim=-1).flatten(-2).to(torch.int32)
    return table.index_select(0, codes.flatten()).reshape(codes.shape)


def nvfp4_to_float(packed: torch.Tensor, scale: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    """NVFP4 weights [..., N, K/2] -> float32 [..., N, K]: each E2M1 value times its group's scale
    (float8, one per 16 columns) divided by the tensor's global scale (compressed-tensors' order).
    Temporaries: int32 codes and the float32 result, about two float32 copies of the result."""
    values = unpack_e2m1(packed)
    effective = scale.to(torch.float32) / global_scale.to(torch.float32)
    values.unflatten(-1, (-1, NVFP4_GROUP)).mul_(effective.unsqueeze(-1))
    return values


def dequantize_experts_tensor(experts: torch.nn.Module, name: str, dtype: torch.dtype) -> torch.Tensor:
    """One of ``experts``' two stacked tensors (``gate_up_proj`` / ``down_proj``) in ``dtype``."""
    weight = getattr(experts, name)
    scale = getattr(experts, f"{name}_scale")
    if weight.dtype == torch.uint8:  # NVFP4
        global_scale = getattr(experts, f"{name}_global")
        out = torch.empty(weight.shape[:-1] + (weight.shape[-1] * 2,), dtype=dtype, device=weight.device)
        step = max(1, -(-weight.shape[0] // DEQUANT_CHUNKS))
        for start in range(0, weight.shape[0], step):
            part = slice(start, start + step)
            out[part].copy_(nvfp4_to_float(weight[part], scale[part], global_scale[part]))
        return out
    return dequantize_rows(weight, scale, dtype)


# -- the experts module -------------------------------------------------------------------------

class _DequantizedView:
    """An experts module seen with its stacked quantized weights dequantized: each on first read, then
    kept for the rest of the call (the per-expert loops index them once per expert)."""

    def __init__(self, experts: torch.nn.Module, dtype: torch.dtype):
        self._experts = experts
        self._dtype = dtype

    @functools.cached_property
    def gate_up_proj(self) -> torch.Tensor:
        return dequantize_experts_tensor(self._experts, "gate_up_proj", self._dtype)

    @functools.cached_property
    def down_proj(self) -> torch.Tensor:
        return dequantize_experts_tensor(self._experts, "down_proj", self._dtype)

    def __getattr__(self, name):
        return getattr(self._experts, name)


def _compressed_experts_class():
    from transformers.models.diffusion_gemma.modeling_diffusion_gemma import DiffusionGemmaTextExperts

    class CompressedExperts(DiffusionGemmaTextExperts):
        """DiffusionGemma's experts over stacked quantized weights: FP8 experts run the FP8 grouped GEMM
        where the GPU has it (``engine.fp8_compute``); otherwise the layer's experts are dequantized whole
        and run the configured experts implementation (the reference path)."""

        fp8_gemm = True  # EngineSettings.fp8_gemm: False dequantizes even where the GPU has FP8 GEMMs

        def forward(self, hidden_states, top_k_index, top_k_weights):
            from . import fp8_compute

            if runs_fp8_gemm(self, hidden_states.device):
                return fp8_compute.fp8_experts_forward(self, hidden_states, top_k_index, top_k_weights)
            view = _DequantizedView(self, hidden_states.dtype)
            return DiffusionGemmaTextExperts.forward(view, hidden_states, top_k_index, top_k_weights)

    return CompressedExperts


def runs_fp8_gemm(experts, device: torch.device) -> bool:
    """Whether compressed experts run the FP8 grouped GEMM on ``device``; otherwise each call dequantizes
    the layer's experts whole (a transient the memory plan reserves)."""
    from . import fp8_compute

    return (experts.fp8_gemm and experts.gate_up_proj.dtype == torch.float8_e4m3fn
            and fp8_compute.aligned(experts.hidden_dim, experts.intermediate_dim)
            and fp8_compute.unsupported_reason(device) is None)


_EXPERTS_CLASS = None


def compressed_experts_class():
    """The experts class the loaded modules are switched to (built once, on first use)."""
    global _EXPERTS_CLASS
    if _EXPERTS_CLASS is None:
        _EXPERTS_CLASS = _compressed_experts_class()
    return _EXPERTS_CLASS


class Fp8Linear(torch.nn.Module):
    """A bias-free linear layer over FP8 weights [out, in] and a float32 scale per output row:
    ``torch._scaled_mm`` with per-token FP8 activations where the GPU has it (``engine.fp8_compute``),
    the weight dequantized to the input's dtype per call elsewhere (and where ``fp8_gemm`` is False)."""

    def __init__(self, weight: torch.Tensor, weight_scale: torch.Tensor, fp8_gemm: bool = True):
        super().__init__()
        self.fp8_gemm = fp8_gemm
        self.weight = torch.nn.Parameter(weight, requires_grad=False)
        self.weight_scale = torch.nn.Parameter(weight_scale.to(torch.float32), requires_grad=False)
        self.out_features, self.in_features = weight.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from . import fp8_compute

        if (self.fp8_gemm and fp8_compute.aligned(self.in_features, self.out_features)
                and fp8_compute.unsupported_reason(x.device) is None):
            return fp8_compute.fp8_linear(x, self.weight, self.weight_scale)
        return torch.nn.functional.linear(x, dequantize_rows(self.weight, self.weight_scale, x.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8"


# -- reading the files --------------------------------------------------------------------------

class _Tensors:
    """The checkpoint's safetensors files, read lazily by tensor name."""

    def __init__(self, folder: Path):
        from safetensors import safe_open

        index = folder / "model.safetensors.index.json"
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        else:
            files = sorted(p.name for p in folder.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{folder}: no .safetensors weight files")
        self.folder = folder
        self._where = {}
        for file in files:
            try:
                handle = safe_open(str(folder / file), framework="pt")
            except Exception as exc:  # noqa: BLE001 - safetensors' own errors do not name the file
                raise CheckpointError(f"{folder / file} cannot be read as safetensors: {exc}") from None
            for key in handle.keys():
                if key in self._where:
                    raise CheckpointError(f"the checkpoint {folder} holds {key} twice (in {file} and another file)")
                self._where[key] = handle

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def keys(self):
        return self._where.keys()

    def dtype(self, name: str) -> str | None:
        """The safetensors dtype of ``name`` ("F8_E4M3", "BF16", ...) without reading it; None if absent."""
        return self._where[name].get_slice(name).get_dtype() if name in self._where else None

    def missing(self, name: str) -> CheckpointError:
        return CheckpointError(f"the checkpoint {self.folder} has no tensor {name}: "
                               f"the model would run with it uninitialised")

    def get(self, name: str) -> torch.Tensor:
        if name not in self._where:
            raise self.missing(name)
        return self._where[name].get_tensor(name)


class _RandomTensors:
    """``load_format=dummy`` for a compressed-tensors config: the tensors a checkpoint in the published
    layout would hold (``_Tensors``' interface), made up on ``device`` as they are asked for, so the
    real loading path builds the model (FP8 or NVFP4 experts and dense targets) without weight files.
    Quantized weights are random codes with scales that give weights of about ``std``; other matrices
    are normal(0, ``std``), vectors ones (norm weights, router scales; a clipping bound keeps its
    infinity) and persistent buffers keep the model's own values. Outputs are noise: for benchmarks. Each
    tensor draws from a generator of its own, seeded from ``DUMMY_SEED`` and its name: every load and every
    process (engine replicas) gets the same weights, and the caller's random state does not move."""

    def __init__(self, model: torch.nn.Module, fmt: str, dtype: torch.dtype, device: torch.device, folder: Path,
                 std: float):
        self.folder, self.fmt, self.load_dtype, self.device, self.std = folder, fmt, dtype, device, std
        self._shapes: dict[str, tuple[tuple, str]] = {}  # name -> (shape, kind)
        self._buffers = dict(model.named_buffers(remove_duplicate=False))
        for name, p in model.named_parameters(remove_duplicate=False):
            experts = PUBLISHED_EXPERTS.match(name)
            if experts:
                E, rows, cols = p.shape
                projs = ("gate_proj", "up_proj") if experts.group(2) == "gate_up_proj" else ("down_proj",)
                for e in range(E):
                    for proj in projs:
                        self._quantized(f"{experts.group(1)}.{e}.{proj}", rows // len(projs), cols)
            elif name.endswith((".experts.gate_up_proj", ".experts.down_proj")):
                continue  # the encoder's tied copies: the checkpoint stores the decoder's
            elif name.startswith("model.decoder.") and DENSE_TARGETS[fmt].search(name):
                self._quantized(name.removesuffix(".weight"), *p.shape)
            else:
                self._shapes[name] = (tuple(p.shape), "plain")
        for name in model.state_dict().keys():
            if name in self._buffers:
                self._shapes[name] = (tuple(self._buffers[name].shape), "buffer")

    def _quantized(self, prefix: str, rows: int, cols: int) -> None:
        if self.fmt == FORMAT_NVFP4:
            self._shapes[f"{prefix}.weight_packed"] = ((rows, cols // 2), "packed")
            self._shapes[f"{prefix}.weight_scale"] = ((rows, cols // NVFP4_GROUP), "fp8_scale")
            self._shapes[f"{prefix}.weight_global_scale"] = ((1,), "global")
        else:
            self._shapes[f"{prefix}.weight"] = ((rows, cols), "fp8")
            self._shapes[f"{prefix}.weight_scale"] = ((rows, 1), "scale")

    def __contains__(self, name: str) -> bool:
        return name in self._shapes

    def keys(self):
        return ()  # nothing is stored, so nothing is left unused

    def dtype(self, name: str) -> str | None:
        if name not in self._shapes:
            return None
        return "F8_E4M3" if self._shapes[name][1] == "fp8" else "BF16"

    def missing(self, name: str) -> CheckpointError:
        return CheckpointError(f"the dummy weights for {self.folder} have no tensor {name}")

    def get(self, name: str) -> torch.Tensor:
        if name not in self._shapes:
            raise self.missing(name)
        shape, kind = self._shapes[name]
        dev = self.device
        if kind == "buffer":
            return self._buffers[name].detach().clone()
        gen = torch.Generator(dev).manual_seed(DUMMY_SEED * 2**32 + zlib.crc32(name.encode()))
        if kind == "fp8":  # codes of about N(0, 1); with the scale below, weights of about N(0, std)
            return torch.randn(shape, device=dev, generator=gen).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        if kind == "scale":
            return torch.full(shape, self.std, dtype=self.load_dtype, device=dev)
        if kind == "packed":  # random E2M1 code pairs
            return torch.randint(0, 256, shape, dtype=torch.uint8, device=dev, generator=gen)
        if kind == "fp8_scale":  # E2M1 codes reach 6: group scales that give weights of about std
            return torch.full(shape, self.std / 2, device=dev).to(torch.float8_e4m3fn)
        if kind == "global":
            return torch.ones(shape, dtype=torch.float32, device=dev)
        if len(shape) >= 2:
            return torch.randn(shape, dtype=self.load_dtype, device=dev, generator=gen) * self.std
        bound = name.rsplit(".", 1)[-1]
        fill = {"input_min": -float("inf"), "output_min": -float("inf"),
                "input_max": float("inf"), "output_max": float("inf")}.get(bound, 1.0)
        return torch.full(shape, fill, dtype=self.load_dtype, device=dev)


def _local_folder(model: str) -> Path:
    if os.path.isdir(model):
        return Path(model)
    from huggingface_hub import snapshot_download  # a hub id: the config, tokenizer and weights

    return Path(snapshot_download(model, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]))


# -- loading ------------------------------------------------------------------------------------

def _parameter_groups(model: torch.nn.Module) -> list[list[tuple[torch.nn.Module, str, str]]]:
    """Every parameter once, with each (module, attribute, full name) it appears under (tied ones share)."""
    groups: dict[int, list] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for attr, param in module._parameters.items():
            if param is not None:
                full = f"{module_name}.{attr}" if module_name else attr
                groups.setdefault(id(param), []).append((module, attr, full))
    return list(groups.values())


def _check_shape(name: str, tensor: torch.Tensor, shape: tuple, dtype: torch.dtype | None = None) -> torch.Tensor:
    if tuple(tensor.shape) != tuple(shape):
        raise CheckpointError(f"the checkpoint's {name} has shape {list(tensor.shape)}, expected {list(shape)}")
    if dtype is not None and tensor.dtype != dtype:
        raise CheckpointError(f"the checkpoint's {name} is {str(tensor.dtype).removeprefix('torch.')}, "
                              f"expected {str(dtype).removeprefix('torch.')}")
    return tensor


def _plain(name: str, value: torch.Tensor, floating: bool = True) -> torch.Tensor:
    """``value`` where a plain weight is expected; ``CheckpointError`` for quantized codes (any 8-bit float, or
    integers where a float is expected), which would be read as numbers without their scales."""
    if floating and not value.is_floating_point() or value.is_floating_point() and value.element_size() == 1:
        raise CheckpointError(f"the checkpoint's {name} is {str(value.dtype).removeprefix('torch.')} with no "
                              f"scales: it cannot be read as a weight")
    return value


class _Loader:
    def __init__(self, tensors: _Tensors, fmt: str, dtype: torch.dtype, device: torch.device):
        self.tensors, self.fmt, self.dtype, self.device = tensors, fmt, dtype, device
        self.used: set[str] = set()

    def get(self, name: str) -> torch.Tensor:
        self.used.add(name)
        return self.tensors.get(name)

    def source_prefix(self, prefixes: list[str], probe: str) -> str:
        """The first of the tied ``prefixes`` the checkpoint stores ``probe`` under (the decoder's first)."""
        ordered = sorted(prefixes, key=lambda p: ".decoder." not in f".{p}.")
        for prefix in ordered:
            if f"{prefix}.{probe}" in self.tensors:
                return prefix
        return ordered[0]

    # experts: per-expert linears -> one layer's stacked tensors
    def experts(self, prefixes: list[str], module) -> dict[str, torch.Tensor]:
        experts, inter, hidden = module.num_experts, module.intermediate_dim, module.hidden_dim
        names = {n for p in prefixes for n in (f"{p}.gate_up_proj", f"{p}.down_proj")}
        fused = [n for n in names if n in self.tensors]
        if fused:  # experts left unquantized (in the recipe's ignore list): the fused tensors as stored
            prefix = self.source_prefix(prefixes, "gate_up_proj")
            return {attr: _plain(f"{prefix}.{attr}", _check_shape(f"{prefix}.{attr}", self.get(f"{prefix}.{attr}"),
                                                                  shape)).to(self.dtype)
                    for attr, shape in (("gate_up_proj", (experts, 2 * inter, hidden)),
                                        ("down_proj", (experts, hidden, inter)))}
        stored = "weight_packed" if self.fmt == FORMAT_NVFP4 else "weight"
        prefix = self.source_prefix(prefixes, f"0.gate_proj.{stored}")
        out = {}
        for attr, projs, rows, cols in (("gate_up_proj", ("gate_proj", "up_proj"), inter, hidden),
                                        ("down_proj", ("down_proj",), hidden, inter)):
            parts = [[self.linear(f"{prefix}.{e}.{proj}", rows, cols) for proj in projs] for e in range(experts)]
            for i, key in enumerate(parts[0][0]):
                stacked = torch.stack([torch.cat([p[key] for p in per_expert]) for per_expert in parts])
                out[attr if i == 0 else f"{attr}_{key}"] = stacked
        return out

    def linear(self, prefix: str, rows: int, cols: int) -> dict[str, torch.Tensor]:
        """One quantized linear layer's tensors, checked: {"weight"-like first, then scales}."""
        if self.fmt == FORMAT_NVFP4:
            packed = _check_shape(f"{prefix}.weight_packed", self.get(f"{prefix}.weight_packed"), (rows, cols // 2), torch.uint8)
            scale = _check_shape(f"{prefix}.weight_scale", self.get(f"{prefix}.weight_scale"),
                                 (rows, cols // NVFP4_GROUP), torch.float8_e4m3fn)
            global_scale = self.get(f"{prefix}.weight_global_scale")
            _check_shape(f"{prefix}.weight_global_scale", global_scale.reshape(-1), (1,))
            if f"{prefix}.input_global_scale" in self.tensors:
                self.used.add(f"{prefix}.input_global_scale")  # W4A4 activations: not used by the dequantized path
            return {"weight": packed, "scale": scale,
                    "global": global_scale.to(torch.float32).reshape(1, 1).expand(rows, 1)}
        weight = _check_shape(f"{prefix}.weight", self.get(f"{prefix}.weight"), (rows, cols), torch.float8_e4m3fn)
        scale = _check_shape(f"{prefix}.weight_scale", self.get(f"{prefix}.weight_scale"), (rows, 1))
        return {"weight": weight, "scale": scale.to(torch.float32)}

    def dense(self, prefix: str, meta: torch.Tensor):
        """A linear weight the checkpoint stores quantized: ``Fp8Linear`` tensors (FP8) or the weight
        dequantized to the load dtype (NVFP4). None when it is stored plain."""
        rows, cols = meta.shape
        fp8_weight = self.tensors.dtype(f"{prefix}.weight") == "F8_E4M3"
        if self.fmt == FORMAT_FP8 and (fp8_weight or f"{prefix}.weight_scale" in self.tensors):
            return self.linear(prefix, rows, cols)  # an FP8 weight without its scale is refused there
        if self.fmt == FORMAT_NVFP4 and f"{prefix}.weight_packed" in self.tensors:
            t = self.linear(prefix, rows, cols)
            return nvfp4_to_float(t["weight"], t["scale"], t["global"]).to(self.dtype)
        return None


def load_compressed_model(path: str, config, kwargs: dict, device: torch.device, dummy: bool = False,
                          fp8_gemm: bool = True):
    """Build DiffusionGemma from ``config`` (whose ``quantization_config`` is compressed-tensors) with
    ``kwargs`` (dtype, attention and experts implementation) and fill it from the checkpoint at ``path``
    (``dummy``: from random tensors in the published layout, ``_RandomTensors``; ``path`` then needs
    only its config; ``fp8_gemm=False``: FP8 weights are dequantized per call even on a GPU with FP8
    GEMMs, as on one without). Returns ``(model, method)`` where ``method`` names the format for
    ``LoadedModel.quantization``."""
    from accelerate import init_empty_weights
    from transformers import DiffusionGemmaForBlockDiffusion
    from transformers.models.diffusion_gemma.generation_diffusion_gemma import DiffusionGemmaGenerationConfig
    from transformers.models.diffusion_gemma.modeling_diffusion_gemma import DiffusionGemmaTextExperts

    qc = compressed_config(config)
    fmt = checkpoint_format(qc)
    folder = Path(path) if dummy else _local_folder(path)
    del config.quantization_config  # transformers' own quantizer must not touch the model
    with init_empty_weights(include_buffers=False):
        model = DiffusionGemmaForBlockDiffusion._from_config(config, **kwargs)
    model.tie_weights()
    dtype = kwargs["dtype"]
    std = config.get_text_config().initializer_range
    tensors = _RandomTensors(model, fmt, dtype, device, folder, std) if dummy else _Tensors(folder)
    loader = _Loader(tensors, fmt, dtype, device)
    experts_class = compressed_experts_class()
    fp8_linears: dict[int, Fp8Linear] = {}
    for group in _parameter_groups(model):
        module, attr, _ = group[0]
        names = [full for _, _, full in group]
        prefixes = [full.rsplit(".", 1)[0] if "." in full else "" for full in names]
        if isinstance(module, DiffusionGemmaTextExperts):
            if attr != "gate_up_proj":
                continue  # both tensors are loaded with gate_up_proj
            stacked = {k: torch.nn.Parameter(v.to(device), requires_grad=False)
                       for k, v in loader.experts(prefixes, module).items()}
            for experts, _, _ in group:
                for key, param in stacked.items():
                    experts._parameters[key] = param
                if len(stacked) > 2:  # quantized: dequantized per call
                    experts.__class__ = experts_class
                    experts.fp8_gemm = fp8_gemm
            continue
        meta = module._parameters[attr]
        if attr == "weight" and isinstance(module, torch.nn.Linear):
            prefix = loader.source_prefix(prefixes, "weight_scale" if fmt == FORMAT_FP8 else "weight_packed")
            dense = loader.dense(prefix, meta)
            if isinstance(dense, dict):  # FP8: one Fp8Linear for every (tied) place the layer appears
                if module.bias is not None:
                    raise CheckpointError(f"{names[0]}: FP8 linear layers with a bias are not supported")
                fp8 = Fp8Linear(dense["weight"].to(device), dense["scale"].to(device), fp8_gemm)
                layer = fp8_linears.setdefault(id(meta), fp8)
                for _, _, full in group:
                    parent_name, _, child = full.rsplit(".", 1)[0].rpartition(".")
                    setattr(model.get_submodule(parent_name), child, layer)
                continue
            if dense is not None:
                _set(group, dense.to(device))
                continue
        source = next((n for n in sorted(names, key=lambda n: ".decoder." not in n) if n in tensors), None)
        if source is None:
            raise tensors.missing(sorted(names, key=lambda n: ".decoder." not in n)[0])
        value = _plain(source, _check_shape(source, loader.get(source), meta.shape), meta.is_floating_point())
        _set(group, value.to(device=device, dtype=meta.dtype if meta.is_floating_point() else value.dtype))
    persistent = set(model.state_dict().keys())  # buffers saved with the model (layer scalars), not computed
    for name, buffer in model.named_buffers(remove_duplicate=False):
        if name in tensors:
            buffer.copy_(loader.get(name))
        elif name in persistent:
            raise tensors.missing(name)
    unused = sorted(set(tensors.keys()) - loader.used)
    if unused:  # e.g. the encoder's copy of tied layers, activation scales: the model has nothing to put them in
        logger.warning("%d checkpoint tensors not used (e.g. %s)", len(unused), ", ".join(unused[:3]))
    model.to(device)
    try:
        model.generation_config = DiffusionGemmaGenerationConfig.from_pretrained(folder)
    except OSError:
        pass  # transformers' defaults
    return model, METHOD_NAMES[fmt]


def _set(group, value: torch.Tensor) -> None:
    param = torch.nn.Parameter(value, requires_grad=False)
    for module, attr, _ in group:
        module._parameters[attr] = param


# -- sizes --------------------------------------------------------------------------------------


def parameter_bytes(name: str, p: torch.Tensor, fmt: str | None, dtype_bytes: int) -> int:
    """Bytes of parameter ``name`` once a checkpoint of ``fmt`` in the published layout is loaded here
    (``fmt`` None: unquantized): experts as stored (FP8: a byte a weight + an fp32 scale per row; NVFP4:
    half a byte + an fp8 scale per 16 + an fp32 global divisor per row), FP8 dense targets as
    ``Fp8Linear`` (a byte + an fp32 scale per row), NVFP4 dense targets and everything else at
    ``dtype_bytes``."""
    rows = p.numel() // p.shape[-1] if p.dim() else 1
    if fmt is not None and name.endswith((".experts.gate_up_proj", ".experts.down_proj")):
        return p.numel() + rows * 4 if fmt == FORMAT_FP8 else p.numel() // 2 + p.numel() // NVFP4_GROUP + rows * 4
    if fmt == FORMAT_FP8 and DENSE_TARGETS[fmt].search(name):  # NVFP4's are dequantized at load
        return p.numel() + rows * 4
    return p.numel() * dtype_bytes


def compressed_weight_bytes(model: torch.nn.Module, fmt: str, dtype_bytes: int) -> int:
    """Weight bytes of ``model`` (e.g. on the meta device) once a checkpoint of ``fmt`` is loaded here
    (``parameter_bytes``); tied parameters count once."""
    return sum(parameter_bytes(name, p, fmt, dtype_bytes) for name, p in model.named_parameters())
