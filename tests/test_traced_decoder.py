"""The CPU decoder pass as a TorchScript trace (engine.traced_decoder) is bitwise the eager pass.

A trace records the operators of one pass and replays them for others, so these tests replay each
trace on passes it was not traced on: other batch sizes, other KV lengths, padded rows, sliding-window
masks, and MoE routings where an expert gets one token or none. The model has random weights and runs
in the default dtype (float32), bfloat16 and float64: near-flat logits, where any last-bit difference
shows. Its canvas (12), head size (8) and experts' minimum group (16) differ, so that a size frozen
into a trace in the wrong place would show too. Also: the row-wise attention against transformers'
SDPA function, what a trace keeps alive, and passes that cannot be traced.
"""

from __future__ import annotations

import gc
import itertools
import types

import pytest
import torch

from engine import EngineCore, EngineSettings, SamplingParams
from engine.loader import load_model
from engine.rowwise_attention import batch_layout
from tools.tiny_checkpoint import TinySpec, build_tiny_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    # sliding layers (window 24) and a full one, MoE with 4 experts, canvas 16
    return build_tiny_checkpoint(tmp_path_factory.mktemp("traced"), TinySpec(num_layers=3, canvas_length=12, head_dim=8))


def _eager(runner, part) -> torch.Tensor:
    with batch_layout(part.layout):
        return runner._decoder_forward(part.inputs)


@pytest.mark.parametrize("dtype", ["auto", "bfloat16", "float64"])
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
                    params = SamplingParams(max_tokens=12 * (1 + i % 3), seed=i, ignore_eos=True, max_denoising_steps=4)
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
    # the test saw unpadded and padded batches, masks on one layer type and on both; a handful of traces
    # served them all, and none failed (a failed key would compare eager with eager)
    assert {padded for _, padded, _ in keys} == {False, True}
    assert {len(set(masked)) for masked, _, _ in keys} == {1, 2}
    assert not runner.traced.failed_keys
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


def _toy_inputs():
    from engine.decoder_graphs import DecoderInputs
    from engine.kv_cache import BatchKVView, _LayerView

    kv = torch.zeros(1, 1, 4, 2)
    return DecoderInputs(torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 3, 2), torch.zeros(1, 3, dtype=torch.int32),
                         {"full_attention": (torch.ones(1, 3, 2), torch.zeros(1, 3, 2))}, {"full_attention": None},
                         BatchKVView([_LayerView(kv, kv.clone())], ["full_attention"], {}, {}))


@pytest.mark.parametrize("why", ["an output a trace cannot have", "a branch on a value"])
def test_a_pass_that_cannot_be_traced_runs_eagerly(caplog, why):
    from engine.traced_decoder import MAX_TRACE_ATTEMPTS, TracedDecoder

    def forward(inputs):
        if why == "an output a trace cannot have":
            return inputs.soft * 2, "a string"
        return inputs.soft * 2 if inputs.soft.sum() > 0 else inputs.soft  # a trace would keep one branch

    inputs = _toy_inputs()
    traced = TracedDecoder(forward, ["full_attention"])
    for _ in range(MAX_TRACE_ATTEMPTS + 2):
        out = traced.run(inputs, None)
        assert torch.equal(out[0] if isinstance(out, tuple) else out, inputs.soft * 2)
    assert traced.keys == [] and len(traced.failed_keys) == 1
    failures = [r.getMessage() for r in caplog.records if r.getMessage().startswith("tracing the decoder pass failed")]
    assert len(failures) == MAX_TRACE_ATTEMPTS  # then the key stays eager, quietly
    if why == "a branch on a value":
        assert "the trace would freeze a value read at" in failures[0] and "test_traced_decoder.py" in failures[0]


def test_traces_keep_no_kv_buffers_alive(checkpoint):
    """A trace must not hold its first pass's KV views: once the buffers are reallocated the old ones go."""
    settings = EngineSettings(model=str(checkpoint), max_num_seqs=4)
    core = EngineCore(load_model(settings), settings)
    runner = core.runner
    g = torch.Generator().manual_seed(1)

    def add(rid, length):
        prompt = torch.randint(5, 261, (length,), generator=g).tolist()
        core.add_request(rid, prompt, core.resolve(prompt, SamplingParams(max_tokens=12, seed=1, max_denoising_steps=2)))

    add("short", 5)
    core.step()
    core.step()
    assert runner.traced.keys
    old = [t.untyped_storage()._weak_ref() for t in runner.kv._keys + runner.kv._values]
    reallocations = runner.kv.reallocations
    add("long", 300)  # a longer reservation: new buffers
    while core.has_work():
        core.step()
    assert runner.kv.reallocations > reallocations
    gc.collect()
    assert all(torch.UntypedStorage._expired(ref) for ref in old)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_the_scripted_row_attention_is_transformers_sdpa_for_one_row(dtype):
    """engine.rowwise_sdpa's per-row call against transformers' sdpa_attention_forward: each GQA path
    (SDPA's own, packed heads for one query, repeated KV heads), with and without a mask, causal or not
    (with its key crop), head sizes either side of 256."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from engine.rowwise_sdpa import _sdpa_one

    g = torch.Generator().manual_seed(0)
    for groups, q_len, k_len, masked, causal, dim in itertools.product([1, 2, 4], [1, 3, 16], [1, 5, 40], [False, True],
                                                                       [False, True], [16, 272]):
        module = types.SimpleNamespace(num_key_value_groups=groups, is_causal=causal)
        q = torch.randn(1, q_len, 2 * groups, dim, generator=g, dtype=dtype).transpose(1, 2)
        k, v = (torch.randn(1, 2, k_len, dim, generator=g, dtype=dtype) for _ in range(2))
        mask = None
        if masked:
            mask = torch.rand(1, 1, q_len, k_len, generator=g) > 0.3
            mask[..., 0] = True
        expected, _ = sdpa_attention_forward(module, q, k, v, mask, dropout=0.0, scaling=0.7, is_causal=causal)
        got = _sdpa_one(q, k, v, mask, groups, 0.7, causal, False)
        case = (groups, q_len, k_len, masked, causal, dim)
        assert torch.equal(got, expected) and got.stride() == expected.stride(), case
