"""FP8 matrix products on GPUs that have FP8 tensor cores, for FP8-dynamic checkpoints.

The checkpoint's scheme (compressed-tensors ``FP8_DYNAMIC``): float8_e4m3fn weights with one scale
per output row, and activations quantized to float8_e4m3fn per token at run time (a scale per row
from the row's largest magnitude). Products run in FP8 with both row-wise scales applied by the
kernel and a bfloat16 result:

    dense layers   ``torch._scaled_mm``          x [T, K] . W[N, K]^T
    MoE experts    ``torch._scaled_grouped_mm``  tokens sorted by expert, one GEMM over all groups

Elsewhere (CPU, older GPUs, other dtypes) the weights are dequantized and the product runs in the
load dtype: ``engine.compressed_tensors`` is the reference path; ``tests/test_compressed_tensors_cuda.py``
compares the two on random inputs.
"""

from __future__ import annotations

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
# Row-wise scaled FP8 GEMMs (and their grouped form) have kernels for compute capability 9.0 (Hopper)
# and 10.x (Blackwell datacenter); torch refuses them elsewhere.
FP8_CAPABILITIES = ((9, 0), (10, 0), (10, 3))


def unsupported_reason(device: torch.device) -> str | None:
    """Why the FP8 path cannot run on ``device`` (None when it can)."""
    if device.type != "cuda":
        return "FP8 GEMMs need a CUDA device"
    if not (hasattr(torch, "_scaled_mm") and hasattr(torch, "_scaled_grouped_mm")):
        return f"torch {torch.__version__} has no _scaled_grouped_mm"
    capability = torch.cuda.get_device_capability(device)
    if capability not in FP8_CAPABILITIES:
        return f"row-wise FP8 grouped GEMMs need compute capability 9.0 or 10.x (this GPU is {capability[0]}.{capability[1]})"
    return None


def aligned(*dims: int) -> bool:
    """Whether FP8 GEMM kernels take these matrix sizes: rows of 16-byte multiples (16 float8 values)."""
    return all(d % 16 == 0 for d in dims)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token quantization: x [T, K] -> (float8 [T, K], float32 scale [T, 1]),
    x ~= q * scale, with each row's largest magnitude mapped to 448."""
    amax = x.abs().amax(dim=-1, keepdim=True).to(torch.float32)
    scale = torch.clamp(amax, min=1e-12) / FP8_MAX
    q = (x.to(torch.float32) / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q, scale


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
    """x [..., K] . weight [N, K]^T with weight float8 and weight_scale float32 [N, 1]; x's dtype out."""
    shape = x.shape
    q, scale = quantize_rows(x.reshape(-1, shape[-1]))
    out = torch._scaled_mm(q, weight.t(), scale_a=scale, scale_b=weight_scale.reshape(1, -1),
                           out_dtype=torch.bfloat16)
    return out.to(x.dtype).reshape(*shape[:-1], weight.shape[0])


def _grouped(q: torch.Tensor, scale: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
             offsets: torch.Tensor) -> torch.Tensor:
    """Rows of q [R, K] (sorted by expert) . weight[e] [N, K]^T for each row's expert e."""
    return torch._scaled_grouped_mm(q, weight.transpose(-2, -1), scale.reshape(-1),
                                    weight_scale.reshape(weight.shape[0], -1), offs=offsets,
                                    out_dtype=torch.bfloat16)


def fp8_experts_forward(experts, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                        top_k_weights: torch.Tensor) -> torch.Tensor:
    """DiffusionGemma's experts (gate/up, activation, down, routing weights) as two FP8 grouped GEMMs
    over ``experts``' stacked FP8 weights and their per-row scales. hidden [T, H] -> [T, H]."""
    tokens, top_k = top_k_index.shape
    flat = top_k_index.reshape(-1)
    order = torch.argsort(flat, stable=True)  # (token, slot) pairs grouped by expert
    token_of = order // top_k
    counts = torch.bincount(flat, minlength=experts.num_experts)
    offsets = torch.cumsum(counts, 0, dtype=torch.int32)
    q, scale = quantize_rows(hidden_states[token_of])
    gate_up = _grouped(q, scale, experts.gate_up_proj, experts.gate_up_proj_scale, offsets)
    gate, up = gate_up.chunk(2, dim=-1)
    q, scale = quantize_rows(experts.act_fn(gate) * up)
    out = _grouped(q, scale, experts.down_proj, experts.down_proj_scale, offsets)
    out = out.to(hidden_states.dtype) * top_k_weights.reshape(-1)[order, None].to(hidden_states.dtype)
    return sum_over_slots(out, order, tokens, top_k)


def sum_over_slots(out: torch.Tensor, order: torch.Tensor, tokens: int, top_k: int) -> torch.Tensor:
    """Each token's ``top_k`` expert outputs summed in one fixed order: ``out`` [T*k, H], its rows in
    ``order`` (grouped by expert) -> [T, H] (the reduction accumulates in float32). ``index_add_`` would
    add them with CUDA atomics, in an order that changes from run to run."""
    slots = torch.empty_like(out)
    slots[order] = out  # back to (token, slot) order
    return slots.view(tokens, top_k, -1).sum(dim=1)
