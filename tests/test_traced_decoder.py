"""The CPU decoder pass as a TorchScript trace (engine.traced_decoder) is bitwise the eager pass.

A trace records the operators of one pass and replays them for others, so these tests replay each
trace on passes it was not traced on: other batch sizes, other KV lengths, padded rows, sliding-window
masks, and MoE routings where an expert gets one token or none. The model has random weights and runs
in the default dtype (float32) and in bfloat16: near-flat logits, where any last-bit difference shows.
"""

from __future__ import annotations

import pytest
import torch

from engine import EngineCore, EngineSettings, SamplingParams
from engine.loader import load_model
from engine.rowwise_attention import batch_layout
from tools.tiny_checkpoint import TinySpec, build_tiny_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    # sliding layers (window 24) and a full one, MoE with 4 experts, canvas 16
    return build_tiny_checkpoint(tmp_path_factory.mktemp("traced"), TinySpec(num_layers=3, canvas_length=16))


def _eager(runner, part) -> torch.Tensor:
    with batch_layout(part.layout):
        return runner._decoder_forward(part.inputs)


@pytest.mark.parametrize("dtype", ["auto", "bfloat16"])
def test_every_pass_equals_the_eager_pass(checkpoint, dtype):
    settings = EngineSettings(model=str(checkpoint), dtype=dtype, max_num_seqs=6)
    core = EngineCore(load_model(settings), settings)
    runner = core.runner
    assert runner.traced is not None  # on by default on CPU
    g = torch.Generator().manual_seed(3)
    # prompt lengths 3..70: equal and unequal KV lengths, and prompts past the sliding window (masks)
    lengths = [12, 12, 3, 41, 70, 30, 12, 52]
    arrivals = [0, 0, 1, 2, 2, 4, 7, 9]
    compared, batches = 0, set()
    with torch.inference_mode():
        for n in range(40):
            for i, (length, arrival) in enumerate(zip(lengths, arrivals)):
                if arrival == n:
                    prompt = torch.randint(5, 261, (length,), generator=g).tolist()
                    params = SamplingParams(max_tokens=16 * (1 + i % 3), seed=i, ignore_eos=True, max_denoising_steps=4)
                    core.add_request(f"r{i}", prompt, core.resolve(prompt, params))
            if not core.has_work():
                break
            core.step()
            ids = sorted((r for r, s in runner.rows.items() if s.canvas is not None), key=lambda r: runner.kv.get(r).slot)
            # every run of consecutive slots: each batch size, each mix of padded rows
            for a in range(len(ids)):
                for b in range(a + 1, len(ids) + 1):
                    part = runner._decoder_inputs(ids[a:b], [runner.rows[r] for r in ids[a:b]], False, group=100)
                    assert torch.equal(runner.traced.run(part.inputs, part.layout), _eager(runner, part))
                    compared += 1
                    batches.add(b - a)
    keys = runner.traced.keys
    # the test saw unpadded and padded batches, and sliding-window masks; a handful of traces served them all
    assert {padded for _, padded, _ in keys} == {False, True}
    assert any(any(masked) for masked, _, _ in keys)
    assert len(keys) <= 4 and compared > 100 and max(batches) >= 5


def test_an_expert_with_one_token_or_none(checkpoint):
    """The MoE loop's trace, replayed on routings unlike the one it was traced on."""
    loaded = load_model(EngineSettings(model=str(checkpoint)))
    experts = loaded.model.model.decoder.layers[0].experts
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(40, experts.hidden_dim, generator=g)
    weights = torch.rand(40, 2, generator=g)

    def routing(first: list[int], second: list[int]) -> torch.Tensor:
        return torch.tensor([first, second]).T.contiguous()

    everyone = routing([t % 4 for t in range(40)], [(t + 1) % 4 for t in range(40)])
    with torch.inference_mode():
        trace = torch.jit.trace(lambda h, i, w: experts(h, i, w), (hidden, everyone, weights), check_trace=False)
        cases = {
            "as traced": (hidden, everyone),
            "expert 3 gets nothing": (hidden, routing([t % 3 for t in range(40)], [(t + 1) % 3 for t in range(40)])),
            "expert 2 gets one token": (hidden, routing([2] + [0] * 39, [1] * 40)),
            "three tokens": (hidden[:3], routing([0, 1, 2], [3, 3, 1])),
        }
        for name, (h, index) in cases.items():
            w = weights[: len(h)]
            with torch.jit.optimized_execution(False):
                replayed = trace(h, index, w)
            assert torch.equal(replayed, experts(h, index, w)), name


def test_the_setting(checkpoint):
    def runner(**overrides):
        settings = EngineSettings(model=str(checkpoint), **overrides)
        return EngineCore(load_model(settings), settings).runner

    assert runner(dtype="float64").traced is not None  # every CPU dtype
    assert runner(trace_decoder=False).traced is None
    assert runner(batch_invariant=False).traced is None  # grouped_mm experts branch on the routing
    with pytest.raises(ValueError, match="trace_decoder needs batch invariance"):
        runner(batch_invariant=False, trace_decoder=True)


def test_a_pass_that_cannot_be_traced_runs_eagerly(caplog):
    from engine.decoder_graphs import DecoderInputs
    from engine.kv_cache import BatchKVView, _LayerView
    from engine.traced_decoder import TracedDecoder

    def forward(inputs: DecoderInputs):
        return inputs.soft * 2, "a string: not an output a trace can have"

    kv = torch.zeros(1, 1, 4, 2)
    inputs = DecoderInputs(torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 3, 2), torch.zeros(1, 3, dtype=torch.int32),
                           {"full_attention": (torch.ones(1, 3, 2), torch.zeros(1, 3, 2))}, {"full_attention": None},
                           BatchKVView([_LayerView(kv, kv)], ["full_attention"], {}, {}))
    traced = TracedDecoder(forward, ["full_attention"])
    for _ in range(2):
        out, text = traced.run(inputs, None)
        assert torch.equal(out, inputs.soft * 2) and text.startswith("a string")
    assert traced.keys == []
    assert [r.message for r in caplog.records].count(
        "tracing the decoder pass failed (((False,), False, False)); these passes run eagerly") == 1
