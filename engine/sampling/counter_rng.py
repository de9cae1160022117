"""Counter-based random numbers for the fast sampler: each one is a pure function of (request seed,
canvas index, step, purpose, position, token), so what a row draws never depends on its batch,
its tile or the vocabulary chunk it is computed in.

A row's step has a 64-bit key (``step_key``: splitmix64 over seed, canvas, step and purpose, on the
host); an element's 32-bit value is two rounds of a 32-bit integer mix keyed by its halves,
``mix32(mix32(counter ^ k0) ^ k1)``, where ``counter = position * vocab + token``. Tensors hold the
32-bit values in int64, so every product stays below 2**63 (the multiplier is below 2**27) and the
same bits come out of a Triton kernel computing in uint32.
"""

from __future__ import annotations

import torch

MASK32 = 0xFFFFFFFF
MASK64 = 0xFFFFFFFFFFFFFFFF
MIX_MULTIPLIER = 0x45D9F3B

# what a draw is for (the purpose field of its key)
INITIAL_CANVAS = 0  # a new canvas's uniform tokens (step 0)
GUMBEL = 1  # the Gumbel noise of the sample
RENOISE = 2  # the uniform tokens of positions that were not accepted

# uniforms c = (value + 0.5) / 2**32 in (0, 1), kept below 1 so that -log(1 - c) is finite
INV_2_32 = 2.0 ** -32
C_MAX = 1.0 - 2.0 ** -24  # the largest float32 below 1
SERIES_BELOW = 2.0 ** -6  # below it, -log(1 - c) by its series: 1 - c would lose c's low bits


def _splitmix64(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def step_key(seed: int, canvas: int, step: int, purpose: int) -> tuple[int, int]:
    """(k0, k1): the two 32-bit key words of one row's draws for ``purpose`` at ``step`` of ``canvas``."""
    z = _splitmix64(seed & MASK64)
    z = _splitmix64(z ^ canvas)
    z = _splitmix64(z ^ ((step << 2) | purpose))
    return z & MASK32, z >> 32


def mix32_(x: torch.Tensor) -> torch.Tensor:
    """A bijective mix of 32-bit values held in an int64 tensor (``x`` in [0, 2**32)), in place."""
    shifted = torch.empty_like(x)
    for _ in range(2):
        x.bitwise_xor_(torch.bitwise_right_shift(x, 16, out=shifted)).mul_(MIX_MULTIPLIER).bitwise_and_(MASK32)
    return x.bitwise_xor_(torch.bitwise_right_shift(x, 16, out=shifted))


def values(counters: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """32-bit random values (int64) for int64 ``counters`` [..., n] under per-row ``keys`` [..., 2]."""
    x = mix32_(counters ^ keys[..., 0:1])
    return mix32_(x.bitwise_xor_(keys[..., 1:2]))


def gumbel(bits: torch.Tensor) -> torch.Tensor:
    """float32 Gumbel(0, 1) noise from 32-bit values: -log(E) with E = -log(1 - c) ~ Exp(1). For small
    c, E is its series c + c^2/2 + c^3/3 + c^4/4 (exact to float32 there), so the smallest c, 2**-33,
    gives noise of about 22.9 (a 24-bit uniform through log(u) would stop near 16.6). Only basic
    operations, so that a Triton kernel computes the same formula."""
    c = bits.to(torch.float32).add_(0.5).mul_(INV_2_32).clamp_(max=C_MAX)
    series = torch.mul(c, 0.25).add_(1 / 3).mul_(c).add_(0.5).mul_(c).add_(1).mul_(c)  # c(1 + c(1/2 + c(1/3 + c/4)))
    small = c < SERIES_BELOW
    exponential = torch.rsub(c, 1).log_().neg_()  # -log(1 - c)
    return exponential.where(~small, series).log_().neg_()


def uniform_tokens(seed_keys: torch.Tensor, length: int, vocab_size: int) -> torch.Tensor:
    """[rows, length] uniform token ids in [0, vocab) under per-row keys [rows, 2] (int64)."""
    positions = torch.arange(length, dtype=torch.int64, device=seed_keys.device) * vocab_size
    return values(positions.expand(seed_keys.shape[0], -1), seed_keys) % vocab_size
