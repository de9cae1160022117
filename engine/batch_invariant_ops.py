"""Batch-invariant matrix products and means for ``--batch-invariant`` on CUDA.

cuBLAS picks its kernel, tiling and split-K from the matrix shapes, and torch's reductions split a
row over more threads when there are few rows: so a token's linear layers and RMSNorm come out
different in the last bits depending on how many other tokens share the call. Here ``aten::mm``,
``aten::addmm`` and ``aten::mean.dim`` are replaced (``enable``) by Triton kernels with one fixed
configuration whatever the shapes:

- ``mm``/``addmm``: each program computes one BLOCK_M x BLOCK_N tile of the output over the whole K
  dimension in BLOCK_K steps, in order, accumulating in float32 (no split-K). An output element
  depends only on its row of A, its column of B and that fixed order, not on how many rows A has.
- ``mean.dim``: one program per output element walks its row in BLOCK pieces, in order.

Attention goes through the engine's row-wise SDPA (each row as alone) and the MoE experts through
the row-wise experts loop, whose linear layers land here. ``bmm`` and the other reductions are
untouched. The kernels are slower than cuBLAS: the mode is opt-in.

``enable`` registers the kernels for one dispatch key, process-wide; the tests use the CPU key under
Triton's interpreter (``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import functools
import importlib.util
import math
from contextlib import nullcontext

import torch

BLOCK_M, BLOCK_N, BLOCK_K = 128, 128, 64  # fixed for every shape: the point of the kernels
SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)  # float32 accumulation: no float64
MEAN_BLOCK = 1024

_library = None
_kernels = None
launches = 0  # kernel launches so far (a check that the operators really come here)


def _build_kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def mm_kernel(a, b, c, bias, M, N, K, sam, sak, sbk, sbn, scm, scn,
                  HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
                  BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        rm = (tl.program_id(0) * BM + tl.arange(0, BM)).to(tl.int64)
        rn = (tl.program_id(1) * BN + tl.arange(0, BN)).to(tl.int64)
        rk = tl.arange(0, BK).to(tl.int64)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, K, BK):  # the whole K in order: the reduction never depends on M
            ka = k0 + rk
            x = tl.load(a + rm[:, None] * sam + ka[None, :] * sak, mask=(rm[:, None] < M) & (ka[None, :] < K), other=0.0)
            y = tl.load(b + ka[:, None] * sbk + rn[None, :] * sbn, mask=(ka[:, None] < K) & (rn[None, :] < N), other=0.0)
            if IEEE:
                acc = tl.dot(x, y, acc, input_precision="ieee")
            else:
                acc = tl.dot(x, y, acc)
        if HAS_BIAS:
            acc += tl.load(bias + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        tl.store(c + rm[:, None] * scm + rn[None, :] * scn, acc.to(c.dtype.element_ty),
                 mask=(rm[:, None] < M) & (rn[None, :] < N))

    @triton.jit
    def row_mean_kernel(x, out, N, stride, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for start in range(0, N, BLOCK):  # in order, one program per row
            acc += tl.load(x + row * stride + start + cols, mask=start + cols < N, other=0.0).to(tl.float32)
        tl.store(out + row, (tl.sum(acc, axis=0) / N).to(out.dtype.element_ty))

    return mm_kernel, row_mean_kernel


def _get_kernels():
    """The compiled kernels (built on first use), counting a launch."""
    global _kernels, launches
    if _kernels is None:
        _kernels = _build_kernels()
    launches += 1
    return _kernels


def matmul(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """a [M, K] @ b [K, N] (+ bias [N]) -> [M, N] in a's dtype, each element reduced in one fixed order."""
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
        raise RuntimeError(f"mat1 and mat2 shapes cannot be multiplied ({tuple(a.shape)} and {tuple(b.shape)})")
    if a.dtype != b.dtype or (bias is not None and bias.dtype != a.dtype):
        raise RuntimeError(f"expected mat1 and mat2 to have the same dtype, but got: {a.dtype} != {b.dtype}")
    if a.dtype not in SUPPORTED_DTYPES:
        raise RuntimeError(f"batch-invariant mm supports {', '.join(map(str, SUPPORTED_DTYPES))}, not {a.dtype}")
    M, K = a.shape
    N = b.shape[1]
    c = torch.empty((M, N), dtype=a.dtype, device=a.device)
    if M == 0 or N == 0:
        return c
    if K == 0:
        return c.zero_() if bias is None else c.copy_(bias.expand(M, N))
    mm_kernel, _ = _get_kernels()
    grid = (-(-M // BLOCK_M), -(-N // BLOCK_N))
    with _on_device(a):
        stages = pipeline_stages(a.dtype, _shared_memory_per_block(a.device) if a.is_cuda else None)
        mm_kernel[grid](a, b, c, bias if bias is not None else c, M, N, K, a.stride(0), a.stride(1), b.stride(0),
                        b.stride(1), c.stride(0), c.stride(1), HAS_BIAS=bias is not None,
                        IEEE=a.dtype == torch.float32, BM=BLOCK_M, BN=BLOCK_N, BK=BLOCK_K,
                        num_warps=8, num_stages=stages)
    return c


def pipeline_stages(dtype: torch.dtype, shared_memory: int | None) -> int:
    """Software-pipelining stages of the mm kernel: three for 16-bit tiles and two for float32 (twice the
    bytes), fewer where one block's shared memory (``shared_memory`` bytes; ``None``: no limit) holds fewer
    stages' A and B tiles, as on consumer GPUs in float32. The stages change the speed only: the tiles and
    the order of the reduction stay the same, so the results do not depend on the GPU's shared memory."""
    most = 2 if dtype == torch.float32 else 3
    if shared_memory is None:
        return most
    per_stage = (BLOCK_M * BLOCK_K + BLOCK_K * BLOCK_N) * dtype.itemsize
    return max(1, min(most, shared_memory // per_stage))


@functools.cache
def _shared_memory_per_block(device: torch.device) -> int:
    """The shared memory one block may use on ``device`` (Triton's own limit for its kernels)."""
    import triton

    index = device.index if device.index is not None else torch.cuda.current_device()
    return triton.runtime.driver.active.utils.get_device_properties(index)["max_shared_mem"]


def _on_device(t: torch.Tensor):
    """Triton launches on the current CUDA device's stream: make it the tensor's (``cuda:N``)."""
    return torch.cuda.device(t.device) if t.is_cuda else nullcontext()


def _mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return matmul(a, b)


def _addmm(input: torch.Tensor, mat1: torch.Tensor, mat2: torch.Tensor, *, beta=1, alpha=1) -> torch.Tensor:
    N = mat2.shape[1] if mat2.dim() == 2 else -1
    bias_row = input.dim() == 1 or (input.dim() == 2 and input.shape[0] == 1)
    if beta == 1 and alpha == 1 and bias_row and input.shape[-1] == N and input.dtype == mat1.dtype:
        return matmul(mat1, mat2, input.reshape(N).contiguous())  # what a linear layer with a bias calls
    product = matmul(mat1, mat2)
    if alpha != 1:
        product = product * alpha
    return product if beta == 0 else product + (input if beta == 1 else input * beta)


def _mean_dim(x: torch.Tensor, dim=None, keepdim: bool = False, *, dtype=None) -> torch.Tensor:
    if dtype is not None:
        x = x.to(dtype)
    if x.dtype not in SUPPORTED_DTYPES:
        raise RuntimeError(f"batch-invariant mean supports {', '.join(map(str, SUPPORTED_DTYPES))}, not {x.dtype}")
    ndim = max(1, x.dim())
    given = list(range(x.dim())) if dim is None or len(dim) == 0 else list(dim)
    for d in given:
        if not -ndim <= d < ndim:
            raise IndexError(f"Dimension out of range (expected to be in range of [{-ndim}, {ndim - 1}], but got {d})")
    dims = sorted({d % ndim for d in given})
    if len(dims) != len(given):
        raise RuntimeError("dim appears multiple times in the list of dims")
    if x.dim() == 0:
        return x.clone()
    kept = [d for d in range(x.dim()) if d not in dims]
    rows_shape = [x.shape[d] for d in kept]
    rows = math.prod(rows_shape)
    n = math.prod(x.shape[d] for d in dims)
    out = torch.empty(rows, dtype=x.dtype, device=x.device)
    if rows and n:
        flat = x.permute(*kept, *dims).contiguous().reshape(rows, n)  # the reduced dims last, one row per output
        _, row_mean_kernel = _get_kernels()
        with _on_device(x):
            row_mean_kernel[(rows,)](flat, out, n, flat.stride(0), BLOCK=MEAN_BLOCK)
    elif rows:
        out.fill_(float("nan"))  # the mean of nothing, as torch gives it
    out = out.reshape(rows_shape)
    if keepdim:
        for d in dims:
            out = out.unsqueeze(d)
    return out


def enable(dispatch_key: str = "CUDA") -> None:
    """Route ``aten::mm``, ``aten::addmm`` and ``aten::mean.dim`` on ``dispatch_key`` tensors through
    the kernels above, for the rest of the process (idempotent). Needs Triton."""
    global _library
    if _library is not None:
        return
    if importlib.util.find_spec("triton") is None:
        raise ValueError("batch_invariant on CUDA needs Triton (it comes with PyTorch's CUDA wheels)")
    library = torch.library.Library("aten", "IMPL")
    library.impl("mm", _mm, dispatch_key)
    library.impl("addmm", _addmm, dispatch_key)
    library.impl("mean.dim", _mean_dim, dispatch_key)
    _library = library


def enabled() -> bool:
    return _library is not None
