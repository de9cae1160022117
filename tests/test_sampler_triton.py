"""The fast sampler's Triton kernel equals its PyTorch specification, under Triton's CPU interpreter.

The interpreter must be switched on before the kernel is decorated, so the comparison runs in a
fresh process with ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="triton is part of the test extra (pip install -e '.[test]')")

REPO = Path(__file__).resolve().parents[1]

_SCRIPT = r"""
import torch
from engine import EngineSettings
from engine.loader import load_model
from engine.sampling.counter_rng import GUMBEL, step_key
from engine.sampling.fast import FastSampler, block_stats
from engine.sampling.triton_stats import triton_block_stats
from engine.work import DecodeWork
from tools.tiny_checkpoint import TinySpec, build_tiny_checkpoint

torch.manual_seed(0)
N, V, block, blocks = 6, 291, 16, 8
for v0, width in ((0, 128), (256, 35)):  # a whole chunk, and the vocabulary's ragged end
    z = torch.randn(N, width) * 20
    temps = torch.rand(N, 1) + 0.4
    keys = torch.tensor([step_key(seed, 1, 3, GUMBEL) for seed in range(N)])
    counter0 = (torch.arange(N) * V)[:, None]
    # two canvas rows of three positions, each row with its own logit bias
    for softcap, bias in ((30.0, None), (None, None), (30.0, torch.randn(2, V) * 5)):
        want, want_e = block_stats(z, temps, keys, counter0, v0, V, blocks, block, softcap, bias)
        got, got_e = triton_block_stats(z, temps, keys, counter0, v0, V, blocks, block, softcap, bias)
        assert torch.equal(got.argmax_index, want.argmax_index)
        assert torch.equal(got.gumbel_index, want.gumbel_index)
        for a, b in ((got.m, want.m), (got.S, want.S), (got.B, want.B), (got.gumbel_value, want.gumbel_value),
                     (got_e, want_e)):
            torch.testing.assert_close(a, b, rtol=2e-6, atol=2e-5)

# the whole sampler with the kernel: the same tokens as with the specification
path = build_tiny_checkpoint("$TMP", TinySpec(extra_vocab=30))
model = load_model(EngineSettings(model=path.as_posix(), dtype="float32")).model
rows = [DecodeWork(f"r{i}", False, 0, 6 - i, 8, 0.4, 0.8, 0.5, 0.5) for i in range(3)]
rows[1] = DecodeWork("r1", False, 0, 5, 8, 0.4, 0.8, 0.5, 0.5, logprobs=3, logit_bias=((7, 40.0), (9, -100.0)))
hidden = torch.randn(3, model.config.canvas_length, model.config.text_config.hidden_size) * 3
outs = []
for stats in (None, triton_block_stats):
    s = FastSampler(model, torch.device("cpu"), tile_bytes=1 << 30, max_num_seqs=4, vocab_chunk=64, block=16,
                    stats=stats)
    for i in range(3):
        s.add(f"r{i}", 100 + i)
    with torch.inference_mode():
        outs.append(s.sample(hidden, rows))
assert torch.equal(outs[0].draft, outs[1].draft)
assert torch.equal(outs[0].next_canvas, outs[1].next_canvas)
assert torch.equal(outs[0].logprobs.top_ids, outs[1].logprobs.top_ids)
torch.testing.assert_close(outs[0].logprobs.chosen, outs[1].logprobs.chosen, rtol=1e-5, atol=1e-5)
torch.testing.assert_close(outs[0].soft, outs[1].soft, rtol=1e-5, atol=1e-5)
print("ok")
"""


def test_triton_kernel_equals_the_pytorch_specification(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    script = _SCRIPT.replace("$TMP", str(tmp_path / "model"))
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-4000:]
