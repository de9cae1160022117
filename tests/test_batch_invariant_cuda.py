"""``--batch-invariant`` on CUDA (engine.batch_invariant_ops): the kernels in bfloat16 on the GPU, and
a whole engine whose requests get bitwise their solo tokens under a mixed load (the fast sampler;
the reference one is refused).
Runs on a lent GPU: ``bash bench/gpu_check.sh batch-invariant``."""

from __future__ import annotations

import pytest
import torch

from engine import EngineCore, EngineSettings, SamplingParams
from engine.loader import load_model
from tests.engine_helpers import run_to_completion
from tools.tiny_checkpoint import TinySpec, build_tiny_checkpoint

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_kernels_in_bfloat16_are_row_invariant_and_close_to_cublas():
    from engine import batch_invariant_ops as bi

    g = torch.Generator(device="cuda").manual_seed(0)
    A = torch.randn(1000, 2816, device="cuda", dtype=torch.bfloat16, generator=g)
    W = torch.randn(704, 2816, device="cuda", dtype=torch.bfloat16, generator=g) / 50
    full = bi.matmul(A, W.t())
    ref = A.float() @ W.float().t()
    assert (full.float() - ref).abs().max() <= 0.02 * ref.abs().max()
    for m in (1, 7, 128, 333):
        assert torch.equal(bi.matmul(A[:m], W.t()), full[:m]), m
    x = torch.randn(300, 2816, device="cuda", dtype=torch.bfloat16, generator=g)
    mean = bi._mean_dim(x, [-1], True)
    assert torch.equal(bi._mean_dim(x[:5], [-1], True), mean[:5])
    torch.testing.assert_close(mean.float(), x.float().mean(-1, keepdim=True), rtol=1e-2, atol=1e-3)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return build_tiny_checkpoint(tmp_path_factory.mktemp("bi-cuda"), TinySpec(num_layers=3, canvas_length=16))


def _requests():
    """(requests, arrival passes): prompts of 3-70 tokens, 1-3 canvases, mixed step counts and bounds."""
    g = torch.Generator().manual_seed(5)
    requests = []
    for i in range(6):
        prompt = torch.randint(5, 261, ([3, 17, 30, 41, 64, 70][i],), generator=g).tolist()
        params = SamplingParams(max_tokens=[16, 40, 24, 48, 10, 33][i], seed=100 + i, ignore_eos=i % 2 == 0,
                                max_denoising_steps=[6, 8, 5, 7, 9, 6][i], t_max=0.8 + 0.05 * (i % 4),
                                entropy_bound=[0.1, 2.0, 0.5, 4.0, 1.0, 0.1][i])
        requests.append((f"r{i}", prompt, params))
    return requests, {"r2": 1, "r3": 2, "r4": 2, "r5": 4}


def test_rows_equal_their_solo_runs_on_cuda(checkpoint):
    from engine import batch_invariant_ops as bi

    settings = EngineSettings(model=str(checkpoint), device="cuda", batch_invariant=True, max_num_seqs=8)
    loaded = load_model(settings)
    assert loaded.dtype == torch.bfloat16 and loaded.batch_invariant
    core = EngineCore(loaded, settings)
    assert core.runner.graphs is None and core.runner.rowwise_always
    requests, arrivals = _requests()
    launched = bi.launches
    together = run_to_completion(core, requests, arrivals)
    assert bi.launches > launched  # the products went through the batch-invariant kernels
    for request in requests:
        assert run_to_completion(core, [request])[request[0]]["tokens"] == together[request[0]]["tokens"], request[0]
    core.close()


def test_the_reference_sampler_is_refused(checkpoint):
    """Its softmax and entropy reduce over the vocabulary with torch's kernels (batch-dependent order)."""
    settings = EngineSettings(model=str(checkpoint), device="cuda", batch_invariant=True, sampler="reference")
    with pytest.raises(ValueError, match="needs --sampler fast"):
        EngineCore(load_model(settings), settings)
