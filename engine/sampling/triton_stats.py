"""``block_stats`` as one Triton kernel (CUDA): soft-capping, temperature, the counter-based Gumbel
noise and every block's statistics in one read of the lm head's output.

The specification is ``fast.block_stats`` (same arguments, same results up to float rounding: the
kernel reduces each block in its own order, and computes tanh through exp). One program per (row,
block). On CPU it runs under Triton's interpreter (``TRITON_INTERPRET=1`` before this module is
imported), which is how the tests compare it with the specification.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from .counter_rng import C_MAX, INV_2_32, MIX_MULTIPLIER, SERIES_BELOW
from .fast import Partial

# Triton kernels read module globals only as constexprs
_MIX = tl.constexpr(MIX_MULTIPLIER)
_INV_2_32 = tl.constexpr(INV_2_32)
_C_MAX = tl.constexpr(C_MAX)
_SERIES_BELOW = tl.constexpr(SERIES_BELOW)
_FMIN = tl.constexpr(torch.finfo(torch.float32).min)


@triton.jit
def _mix32(x):
    x = ((x >> 16) ^ x) * _MIX
    x = ((x >> 16) ^ x) * _MIX
    return (x >> 16) ^ x


@triton.jit
def _block_stats_kernel(z_ptr, z_stride, width, t_ptr, keys_ptr, c0_ptr, v0, softcap, bias_ptr, bias_stride,
                        positions_per_row, m_ptr, s_ptr, b_ptr, ai_ptr, gv_ptr, gi_ptr, e_ptr, num_blocks,
                        HAS_SOFTCAP: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # row * z_stride passes 2**31 in a large tile
    blk = tl.program_id(1)
    offs = blk * BLOCK + tl.arange(0, BLOCK)  # token offsets within the chunk
    valid = offs < width
    z = tl.load(z_ptr + row * z_stride + offs, mask=valid, other=0.0).to(tl.float32)
    if HAS_SOFTCAP:
        x = z / softcap
        z = (1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)) * softcap  # tanh(x) * cap
    if HAS_BIAS:  # the canvas row's logit bias (constraints), shared by its positions
        z += tl.load(bias_ptr + (row // positions_per_row) * bias_stride + v0 + offs, mask=valid, other=0.0)
    s = tl.where(valid, z / tl.load(t_ptr + row), float("-inf"))
    # counter-based Gumbel noise (counter_rng): two keyed rounds of the 32-bit mix, in uint32
    k0 = tl.load(keys_ptr + row * 2).to(tl.uint32)
    k1 = tl.load(keys_ptr + row * 2 + 1).to(tl.uint32)
    counters = (tl.load(c0_ptr + row) + v0 + offs).to(tl.uint32)
    bits = _mix32(_mix32(counters ^ k0) ^ k1)
    c = tl.minimum((bits.to(tl.float32) + 0.5) * _INV_2_32, _C_MAX)
    series = c * (1.0 + c * (0.5 + c * (1.0 / 3.0 + c * 0.25)))
    exponential = tl.where(c < _SERIES_BELOW, series, -tl.log(1.0 - c))
    y = tl.where(valid, s - tl.log(exponential), float("-inf"))
    m = tl.max(s, axis=0)
    arg = tl.argmax(s, axis=0, tie_break_left=True)
    gv = tl.max(y, axis=0)
    gi = tl.argmax(y, axis=0, tie_break_left=True)
    m_ref = tl.where(m == float("-inf"), 0.0, m)
    d = s - m_ref
    e = tl.exp(d)
    total = tl.sum(e, axis=0)
    weighted = tl.sum(e * tl.maximum(d, _FMIN), axis=0)
    tl.store(e_ptr + row * num_blocks * BLOCK + offs, e)
    out = row * num_blocks + blk
    tl.store(m_ptr + out, m)
    tl.store(s_ptr + out, total)
    tl.store(b_ptr + out, weighted)
    tl.store(ai_ptr + out, (v0 + blk * BLOCK + arg).to(tl.int64))
    tl.store(gv_ptr + out, gv)
    tl.store(gi_ptr + out, (v0 + blk * BLOCK + gi).to(tl.int64))


def triton_block_stats(z: torch.Tensor, temps: torch.Tensor, keys: torch.Tensor, counter0: torch.Tensor, v0: int,
                       vocab_size: int, num_blocks: int, block: int,
                       softcap: float | None, bias: torch.Tensor | None = None) -> tuple[Partial, torch.Tensor]:
    """``fast.block_stats`` by the kernel (see there for the arguments)."""
    N, width = z.shape
    if bias is not None:
        bias = bias.contiguous()
    z = z.contiguous()
    f32 = dict(dtype=torch.float32, device=z.device)
    m, S, B, gv = (torch.empty((N, num_blocks), **f32) for _ in range(4))
    ai, gi = (torch.empty((N, num_blocks), dtype=torch.int64, device=z.device) for _ in range(2))
    e = torch.empty((N, num_blocks * block), **f32)
    # a kernel launches on the current CUDA device: make it z's (--device cuda:1)
    with torch.cuda.device(z.device) if z.device.type == "cuda" else contextlib.nullcontext():
        _block_stats_kernel[(N, num_blocks)](
            z, z.stride(0), width, temps.contiguous(), keys.contiguous(), counter0.contiguous(), v0,
            float(softcap or 1.0), z if bias is None else bias, 0 if bias is None else bias.stride(0),
            1 if bias is None else N // bias.shape[0], m, S, B, ai, gv, gi, e, num_blocks,
            HAS_SOFTCAP=softcap is not None, HAS_BIAS=bias is not None, BLOCK=block,
        )
    return Partial(m, S, B, m, ai, gv, gi), e
