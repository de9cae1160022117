"""Weight-only quantization of the MoE experts at load time, through torchao.

About 90% of DiffusionGemma's parameters are its MoE experts, which transformers stores as fused
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
layer dequantizes its two expert tensors whole, once per call, and runs transformers' grouped_mm
forward on them. transformers' eager loop, the alternative, runs one iteration per expert, and
torchao dequantizes each expert's weights inside each ``linear`` call; with 128 experts that was
5-11x slower than bf16 on an H200, and on CPU twice as slow as this (docs/deployment.md). The price
is a transient of one layer's experts in the load dtype (``expert_dequant_bytes``).
"""

from __future__ import annotations

import torch

QUANTIZATION_METHODS = ("none", "fp8-experts", "int8-experts")
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


def _dequantized(weight: torch.Tensor) -> torch.Tensor:
    from torchao.utils import TorchAOBaseTensor

    return weight.dequantize() if isinstance(weight, TorchAOBaseTensor) else weight


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
    in the load dtype (transformers' forward still holds the dequantized gate_up when it reads down_proj)."""
    return text_config.num_experts * 3 * text_config.moe_intermediate_size * text_config.hidden_size * dtype_bytes
