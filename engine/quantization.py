"""Weight-only quantization of the MoE experts at load time, through torchao.

Most of DiffusionGemma's parameters are its MoE experts, which transformers stores as fused
3-D parameters (``experts.gate_up_proj`` [E, 2I, H] and ``experts.down_proj`` [E, H, I]), not as
``nn.Linear`` modules. bitsandbytes and transformers' fine-grained FP8 only replace linear layers (or
need a GPU to quantize at all), so the engine asks torchao to quantize those two parameters by name
(``FqnToConfig``); every other weight stays in the load dtype. Scales are per row: one per expert and
output channel.

    fp8-experts   float8 e4m3 weights + an fp32 scale per row   (torchao Float8WeightOnlyConfig)
    int8-experts  int8 weights + an fp32 scale and an int8 zero point per row (Int8WeightOnlyConfig)

The quantized model is built from a bf16/fp32 checkpoint on every load; torchao must be installed
(``pip install '.[quant]'``).

The experts then run ``DEQUANTIZED_EXPERTS`` (registered in transformers' experts interface): each
layer dequantizes its two expert tensors whole (in place, a chunk of experts at a time), once per
call, and runs transformers' grouped_mm forward on them. transformers' eager loop, the alternative,
runs one iteration per expert, and torchao dequantizes each expert's weights inside each ``linear``
call: with 128 experts that is far slower, on GPU and CPU alike (the measurements are in
the docs). The price is a transient of about one layer's experts in the load dtype
(``expert_dequant_bytes``).
"""

from __future__ import annotations

import torch

from .settings import QUANTIZATION_METHODS  # the names the setting accepts

DEQUANTIZED_EXPERTS = "dequantized_grouped_mm"

# The two fused expert parameters of every layer (encoder and decoder share them: tied weights).
EXPERT_PARAMETERS = r"re:.*\.experts\.(gate_up_proj|down_proj)"

# Bytes per row of scale metadata: fp8 keeps an fp32 scale, int8 an fp32 scale and an int8 zero point.
SCALE_BYTES_PER_ROW = {"fp8-experts": 4, "int8-experts": 5}


def quantization_config(method: str):
    """The ``quantization_config`` for ``from_pretrained``; ``None`` for ``"none"``."""
    if method == "none":
        return None
    if method not in QUANTIZATION_METHODS:
        raise ValueError(f"quantization must be one of {', '.join(QUANTIZATION_METHODS)} (got {method!r})")
    try:
        from torchao.quantization import Float8WeightOnlyConfig, FqnToConfig, Int8WeightOnlyConfig
    except ImportError as exc:
        raise ValueError(
            f"quantization {method} needs torchao: pip install torchao (or the project's 'quant' extra)"
        ) from exc
    from transformers import TorchAoConfig

    weights = Float8WeightOnlyConfig() if method == "fp8-experts" else Int8WeightOnlyConfig()
    # modules_to_not_convert must be a list: with None, transformers skips every tied parameter, and
    # DiffusionGemma ties all decoder-layer weights to the encoder's, so nothing would be quantized.
    return TorchAoConfig(FqnToConfig({EXPERT_PARAMETERS: weights}), modules_to_not_convert=["lm_head"])


def quantized_weight_bytes(model, method: str, dtype_bytes: int) -> int:
    """Weight bytes of ``model`` (e.g. on the meta device) once loaded with ``method``: experts at one
    byte per parameter plus their per-row scales, everything else at ``dtype_bytes``."""
    total = 0
    for name, p in model.named_parameters():  # tied parameters are listed once
        if method != "none" and ".experts." in name and name.rsplit(".", 1)[-1] in ("gate_up_proj", "down_proj"):
            rows = p.numel() // p.shape[-1]
            total += p.numel() + rows * SCALE_BYTES_PER_ROW[method]
        else:
            total += p.numel() * dtype_bytes
    return total


class _DequantizedExperts:
    """An experts module seen with its 8-bit weights dequantized: the weights are dequantized when
    read (once each per forward) and freed after use; everything else is the module's own."""

    def __init__(self, experts: torch.nn.Module):
        self._experts = experts

    @property
    def gate_up_proj(self) -> torch.Tensor:
        return _dequantized(self._experts.gate_up_proj)

    @property
    def down_proj(self) -> torch.Tensor:
        return _dequantized(self._experts.down_proj)

    def __getattr__(self, name):
        return getattr(self._experts, name)


# Experts dequantized per in-place chunk: torchao's dequantize() keeps an fp32 copy, the fp32 product
# and the result alive at once (for a bf16 result, two fp32 tensors of twice its size, and itself); in
# place, only a chunk's temporaries come on top of the result (on CPU two fp32 copies of a bf16 chunk;
# none in fp32).
DEQUANT_CHUNKS = 16


def _dequantized(weight: torch.Tensor) -> torch.Tensor:
    """``weight.dequantize()`` for torchao's 8-bit tensors, bit for bit, at about the result's size:
    (q - zero_point) * scale in the weight's dtype, a chunk of experts at a time, in place."""
    from torchao.utils import TorchAOBaseTensor

    if not isinstance(weight, TorchAOBaseTensor):
        return weight
    qdata = weight.qdata  # [E, N, K] 8-bit
    rows = qdata.shape[:-1] + (1,)
    if weight.scale.numel() != qdata.numel() // qdata.shape[-1]:  # not a scale per row: torchao's own way
        return weight.dequantize()
    zero_point = getattr(weight, "zero_point", None)  # int8: [E, N, 1]
    return dequantize_rows(qdata, weight.scale.reshape(rows), weight.dtype,
                           None if zero_point is None else zero_point.reshape(rows))


def dequantize_rows(qdata: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype,
                    zero_point: torch.Tensor | None = None) -> torch.Tensor:
    """8-bit weights [..., N, K] with an fp32 scale (and optionally a zero point) per row [..., N, 1]
    as ``dtype``: (q - zero_point) * scale computed in fp32 and rounded once, a chunk of the leading
    dimension at a time, in place (at about the result's size)."""
    out = torch.empty(qdata.shape, dtype=dtype, device=qdata.device)
    step = max(1, -(-qdata.shape[0] // DEQUANT_CHUNKS))
    for start in range(0, qdata.shape[0], step):
        chunk = out[start:start + step]
        chunk.copy_(qdata[start:start + step])  # exact: 8-bit values fit bf16 and fp32
        if zero_point is not None:
            chunk.sub_(zero_point[start:start + step].to(out.dtype))
        chunk.mul_(scale[start:start + step])  # computed in fp32, rounded once to the weight's dtype
    return out


def dequantized_experts_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                                top_k_weights: torch.Tensor) -> torch.Tensor:
    """transformers' grouped_mm experts forward over this layer's experts, dequantized whole."""
    from transformers.integrations.moe import grouped_mm_experts_forward

    return grouped_mm_experts_forward(_DequantizedExperts(self), hidden_states, top_k_index, top_k_weights)


def register_dequantized_experts() -> None:
    """Make ``DEQUANTIZED_EXPERTS`` a valid ``experts_implementation`` (idempotent)."""
    from transformers.integrations.moe import ExpertsInterface

    ExpertsInterface.register(DEQUANTIZED_EXPERTS, dequantized_experts_forward)


def expert_dequant_bytes(text_config, dtype_bytes: int) -> int:
    """The transient of ``DEQUANTIZED_EXPERTS``: one layer's gate_up [E, 2I, H] and down [E, H, I]
    in the load dtype (transformers' forward still holds the dequantized gate_up when it reads
    down_proj), plus two 4-byte temporaries of the largest chunk, whatever the load dtype: the fp32
    copies of a chunk below fp32 (``_dequantized``), NVFP4's int32 codes and fp32 values
    (``engine.compressed_tensors.unpack_e2m1``)."""
    experts, inter, hidden = text_config.num_experts, text_config.moe_intermediate_size, text_config.hidden_size
    chunk = -(-experts // DEQUANT_CHUNKS) * 2 * inter * hidden  # elements of a gate_up chunk
    return experts * 3 * inter * hidden * dtype_bytes + 2 * 4 * chunk
