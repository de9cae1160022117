"""The fast sampler on CUDA: the Triton kernel against its PyTorch specification on the GPU, its rows
independent of their batch, and the whole sampler in bf16 (run by bench/gpu_check.sh's sampler-tests step)."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.cuda

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

from engine import EngineSettings  # noqa: E402
from engine.loader import load_model  # noqa: E402
from engine.work import DecodeWork  # noqa: E402
from engine.sampling.counter_rng import GUMBEL, step_key  # noqa: E402
from engine.sampling.fast import FastSampler, block_stats  # noqa: E402
from engine.sampling.triton_stats import triton_block_stats  # noqa: E402
from tools.tiny_checkpoint import TinySpec, build_tiny_checkpoint  # noqa: E402

CUDA = torch.device("cuda")


def _inputs(n: int, width: int, V: int, dtype=torch.bfloat16):
    g = torch.Generator(device=CUDA).manual_seed(0)
    z = (torch.randn(n, width, device=CUDA, generator=g) * 20).to(dtype)
    temps = torch.rand(n, 1, device=CUDA, generator=g) + 0.4
    keys = torch.tensor([step_key(seed, 0, 5, GUMBEL) for seed in range(n)], device=CUDA)
    counter0 = (torch.arange(n, device=CUDA) * V)[:, None]
    return z, temps, keys, counter0


def test_kernel_equals_the_specification_on_the_gpu():
    V, block, blocks = 262144, 1024, 16
    for v0, width in ((0, blocks * block), (V - 5000, 5000)):
        z, temps, keys, counter0 = _inputs(64, width, V)
        want, want_e = block_stats(z, temps, keys, counter0, v0, V, blocks, block, 30.0)
        got, got_e = triton_block_stats(z, temps, keys, counter0, v0, V, blocks, block, 30.0)
        assert torch.equal(got.argmax_index, want.argmax_index)
        # Gumbel winners: equal but for float near-ties between the two formulas' last bits
        assert (got.gumbel_index == want.gumbel_index).float().mean() > 0.999
        for a, b in ((got.m, want.m), (got.S, want.S), (got.B, want.B), (got_e, want_e)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)


def test_kernel_rows_do_not_depend_on_their_batch():
    V, block, blocks = 262144, 1024, 8
    z, temps, keys, counter0 = _inputs(48, blocks * block, V)
    together, e_together = triton_block_stats(z, temps, keys, counter0, 0, V, blocks, block, 30.0)
    for i in (0, 17, 47):
        alone, e_alone = triton_block_stats(z[i:i + 1], temps[i:i + 1], keys[i:i + 1], counter0[i:i + 1], 0, V,
                                            blocks, block, 30.0)
        for a, b in zip(alone.fields(), together.fields()):
            assert torch.equal(a[0], b[i])
        assert torch.equal(e_alone[0], e_together[i])


def test_fast_sampler_with_the_kernel_matches_the_pytorch_statistics_in_bf16(tmp_path):
    path = build_tiny_checkpoint(tmp_path / "m", TinySpec(extra_vocab=30))
    model = load_model(EngineSettings(model=str(path), device="cuda")).model
    assert next(model.parameters()).dtype == torch.bfloat16
    rows = [DecodeWork(f"r{i}", False, 0, 6 - i, 8, 0.4, 0.8, 0.5, 0.5) for i in range(4)]
    # a biased row asking for logprobs, and a row with pinned positions
    rows[1] = DecodeWork("r1", False, 0, 5, 8, 0.4, 0.8, 0.5, 0.5, logprobs=3, logit_bias=((7, 40.0), (9, -100.0)))
    rows[2] = DecodeWork("r2", False, 0, 4, 8, 0.4, 0.8, 0.5, 0.5, pinned_start=2, pinned=(20, 21, 22))
    g = torch.Generator(device=CUDA).manual_seed(1)
    hidden = (torch.randn(4, model.config.canvas_length, model.config.text_config.hidden_size, device=CUDA,
                          generator=g) * 3).to(torch.bfloat16)
    outs = []
    for stats in (block_stats, triton_block_stats):
        s = FastSampler(model, CUDA, tile_bytes=1 << 30, max_num_seqs=4, vocab_chunk=64, block=16, stats=stats)
        for i in range(4):
            s.add(f"r{i}", 100 + i)
        with torch.inference_mode():
            outs.append(s.sample(hidden, rows))
    assert torch.equal(outs[0].draft, outs[1].draft)
    assert (outs[0].next_canvas == outs[1].next_canvas).float().mean() > 0.99
    assert (outs[1].draft[1] == 7).all() and torch.equal(outs[1].draft[2, 2:5].cpu(), torch.tensor([20, 21, 22]))
    assert torch.equal(outs[0].logprobs.top_ids, outs[1].logprobs.top_ids)
    torch.testing.assert_close(outs[0].logprobs.chosen, outs[1].logprobs.chosen, rtol=1e-4, atol=1e-4)
