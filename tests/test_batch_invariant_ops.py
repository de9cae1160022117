"""The CUDA batch-invariant mode's kernels (engine.batch_invariant_ops), under Triton's CPU interpreter:
a row's product and mean do not depend on how many rows share the call or where the row sits, and
they agree with torch's. Then the same kernels routed in for the CPU dispatch key (what ``enable``
does for CUDA) under a whole engine whose rows all attend as alone (what CUDA's mode does): every
request gets its solo tokens. bfloat16 is left to the GPU step (``bash bench/gpu_check.sh
batch-invariant``): the interpreter computes its products wrongly.

The interpreter must be switched on before a kernel is compiled, and ``enable`` changes aten for the
whole process, so each check runs in a fresh process with ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="triton is part of the test extra (pip install -e '.[test]')")

import torch  # noqa: E402

from engine import batch_invariant_ops  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

_KERNELS = r"""
import torch
from engine import batch_invariant_ops as bi

torch.manual_seed(0)
for dtype, tol in ((torch.float32, 1e-5), (torch.float16, 2e-3)):
    A = torch.randn(300, 96, dtype=dtype)
    W = torch.randn(70, 96, dtype=dtype)  # a linear layer's weight: B = W.t() is not contiguous
    bias = torch.randn(70, dtype=dtype)
    full = bi.matmul(A, W.t(), bias)
    ref = A.double() @ W.double().t() + bias.double()
    assert (full.double() - ref).abs().max() <= tol * ref.abs().max(), dtype
    for m in (1, 3, 17, 129, 200):
        assert torch.equal(bi.matmul(A[:m], W.t(), bias), full[:m]), (dtype, m)
    perm = torch.randperm(300)
    assert torch.equal(bi.matmul(A[perm], W.t(), bias), full[perm])
    assert torch.equal(bi._mm(A[5:9], W.t()), bi.matmul(A, W.t())[5:9])
    # addmm beyond a linear layer's bias: a full input matrix, alpha and beta
    C = torch.randn(300, 70, dtype=dtype)
    got = bi._addmm(C, A, W.t(), beta=0.5, alpha=2.0)
    torch.testing.assert_close(got.double(), 0.5 * C.double() + 2.0 * (A.double() @ W.double().t()),
                               rtol=tol * 10, atol=tol * 100)
    # means: the last dim (RMSNorm), several dims, a dtype
    x = torch.randn(37, 5, 1300, dtype=dtype)
    m = bi._mean_dim(x, [-1], True)
    assert m.shape == (37, 5, 1) and torch.equal(bi._mean_dim(x[:3, 2:], [-1], True), m[:3, 2:])
    torch.testing.assert_close(m.double(), x.double().mean(-1, keepdim=True), rtol=tol, atol=tol)
    torch.testing.assert_close(bi._mean_dim(x, [0, 2]).double(), x.double().mean((0, 2)), rtol=tol, atol=tol)
    assert bi._mean_dim(x[:2, :, :3], [1], dtype=torch.float32).dtype == torch.float32  # one program per output
    assert torch.isnan(bi._mean_dim(x[:, :, :0], [-1])).all()  # the mean of nothing, as torch gives it
assert bi.matmul(torch.randn(0, 4), torch.randn(4, 3)).shape == (0, 3)
for bad in (lambda: bi.matmul(torch.randn(2, 3, dtype=torch.float64), torch.randn(3, 2, dtype=torch.float64)),
            lambda: bi._mean_dim(torch.randn(2, 3), [2]), lambda: bi._mean_dim(torch.randn(2, 3), [1, -1])):
    try:
        bad()
    except (RuntimeError, IndexError):
        pass
    else:
        raise AssertionError("accepted")
assert torch.equal(bi.matmul(torch.randn(2, 0), torch.randn(0, 3), torch.ones(3)), torch.ones(2, 3))

# routed in for a dispatch key: linear layers (3-D inputs, with and without a bias) and means land here
bi.enable("CPU")
x = torch.randn(4, 33, 96)
W = torch.randn(70, 96)
bias = torch.randn(70)
for b in (bias, None):
    y = torch.nn.functional.linear(x, W, b)
    assert torch.equal(y.reshape(-1, 70), bi.matmul(x.reshape(-1, 96), W.t(), b))
    assert torch.equal(torch.nn.functional.linear(x[1:2], W, b), y[1:2])
assert torch.equal(x.mean(-1, keepdim=True), bi._mean_dim(x, [-1], True))
print("ok")
"""

_ENGINE = r"""
import torch
from engine import EngineCore, EngineSettings, SamplingParams, batch_invariant_ops
from engine.loader import load_model
from tests.engine_helpers import run_to_completion
from tools.tiny_checkpoint import TinySpec, build_tiny_checkpoint

path = build_tiny_checkpoint("$TMP", TinySpec(num_layers=2, canvas_length=16))
settings = EngineSettings(model=path.as_posix(), max_num_seqs=4, forward_threads=1)
core = EngineCore(load_model(settings), settings)
core.runner.rowwise_always = True  # CUDA's mode: every row's attention as alone, padded or not
g = torch.Generator().manual_seed(3)
requests = [(f"r{i}", torch.randint(5, 261, (n,), generator=g).tolist(),
             SamplingParams(max_tokens=[16, 32, 24][i], seed=40 + i, ignore_eos=True, max_denoising_steps=3))
            for i, n in enumerate((3, 20, 31))]

def first_soft(rid, prompt, params):
    # the self-conditioning input after the first step: softmax(scaled logits) @ E
    core.add_request(rid, prompt, core.resolve(prompt, params))
    while core.runner.rows.get(rid) is None or core.runner.rows[rid].soft_embeddings is None:
        core.step()
    soft = core.runner.rows[rid].soft_embeddings.clone()
    while core.has_work():
        core.step()
    return soft

plain = first_soft(*requests[1])
batch_invariant_ops.enable("CPU")
# the kernels compute the model's function: the same logits to float32 rounding
torch.testing.assert_close(first_soft(*requests[1]), plain, rtol=1e-4, atol=1e-5)
assert batch_invariant_ops.launches > 50  # the engine's products and norms ran the kernels
together = run_to_completion(core, requests, {"r1": 1, "r2": 2})
for request in requests:
    assert run_to_completion(core, [request])[request[0]]["tokens"] == together[request[0]]["tokens"], request[0]
assert all(len(together[r[0]]["tokens"]) == r[2].max_tokens for r in requests)
print("ok")
"""


def _run(script: str, tmp_path: Path) -> None:
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(REPO))
    if platform.machine().lower() in ("x86_64", "amd64"):
        # The interpreter runs each tile's tl.dot through numpy's BLAS. OpenBLAS's FMA kernels (Haswell and
        # later, without AVX-512) round a row of a tile differently by its place in the tile, which no GPU
        # does; the AVX kernels without FMA do not, so the kernels' own row invariance is what is tested.
        env["OPENBLAS_CORETYPE"] = "Sandybridge"
    proc = subprocess.run([sys.executable, "-c", script.replace("$TMP", (tmp_path / "ckpt").as_posix())],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-4000:]


def test_kernels_are_row_invariant_and_agree_with_torch(tmp_path):
    _run(_KERNELS, tmp_path)


def test_engine_rows_equal_their_solo_runs_with_the_kernels(tmp_path):
    _run(_ENGINE, tmp_path)


@pytest.mark.parametrize("dtype, shared_memory, stages", [
    (torch.float32, None, 2), (torch.bfloat16, None, 3),
    (torch.float32, 232448, 2), (torch.bfloat16, 232448, 3),  # H100/H200 (227 KiB a block)
    (torch.float32, 101376, 1), (torch.bfloat16, 101376, 3),  # RTX 4090/5090, L4, L40S (99 KiB)
    (torch.float32, 49152, 1), (torch.bfloat16, 49152, 1),  # 48 KiB: one stage, never none
])
def test_mm_pipeline_stages_fit_the_gpus_shared_memory(dtype, shared_memory, stages):
    # float32 tiles with two stages need 128 KiB, more than a consumer GPU's block may take
    assert batch_invariant_ops.pipeline_stages(dtype, shared_memory) == stages
