"""The decoder pass a CUDA graph captures (engine.decoder_graphs), run eagerly on CPU: static input
buffers, a full-width KV view and its masks must give the tokens of the ordinary pass."""

from __future__ import annotations

import pytest
import torch

from engine import EngineCore, EngineSettings, SamplingParams
from engine.decoder_graphs import DecoderGraphs
from engine.loader import load_model
from engine.tiny_checkpoint import TinySpec, build_tiny_checkpoint
from tests.engine_helpers import make_core, reference_tokens, run_to_completion


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), TinySpec(dtype=torch.float64))


def _static_path(core: EngineCore, max_batch: int) -> DecoderGraphs:
    """Route the core's decoder batches of up to ``max_batch`` rows through the graph path, uncaptured."""
    core.runner.graphs = DecoderGraphs(core.runner._decoder_forward, max_batch, capture=False)
    return core.runner.graphs


def _requests(tok):
    # prompts shorter and longer than the sliding window (24), outputs of one to four canvases (16)
    prompts = ["hi", "a much longer prompt that overflows the sliding window", "mid-length prompt", "x",
               "another prompt of some length", "last"]
    return [(f"r{i}", tok(p).input_ids, SamplingParams(max_tokens=[16, 40, 64, 8, 33, 50][i], seed=100 + i,
                                                          ignore_eos=i % 2 == 0))
            for i, p in enumerate(prompts)]


def test_static_decoder_path_gives_the_tokens_of_the_eager_pass(checkpoint):
    eager, static = make_core(checkpoint, max_num_seqs=4), make_core(checkpoint, max_num_seqs=4)
    graphs = _static_path(static, max_batch=3)  # batches of 4 stay eager: both paths in one run
    tok = eager.loaded.tokenizer
    reqs = _requests(tok)
    arrivals = {"r0": 0, "r1": 0, "r2": 1, "r3": 5, "r4": 9, "r5": 30}
    expected = run_to_completion(eager, reqs, arrivals)
    got = run_to_completion(static, reqs, arrivals)
    assert {k: v["tokens"] for k, v in got.items()} == {k: v["tokens"] for k, v in expected.items()}
    assert {k: v["finish_reason"] for k, v in got.items()} == {k: v["finish_reason"] for k, v in expected.items()}
    assert graphs.passes > 10 and graphs.captures == 0
    assert static.runner.kv.reallocations >= 3  # the static entries were rebuilt for new buffers
    assert static.num_live_states() == 0


def test_static_decoder_path_matches_generate_at_batch_one(checkpoint):
    core = make_core(checkpoint)
    graphs = _static_path(core, max_batch=1)
    tok = core.loaded.tokenizer
    prompt = tok("a prompt longer than the sliding window of the tiny model").input_ids
    params = SamplingParams(max_tokens=48, seed=7)
    expected = reference_tokens(core.loaded.model, prompt, 7, core.resolve(prompt, params))
    got = run_to_completion(core, [("r", prompt, params)])["r"]["tokens"]
    assert got == expected and graphs.passes > 0


def test_cuda_graph_setting_is_ignored_on_cpu(checkpoint):
    settings = EngineSettings(model=str(checkpoint), device="cpu", cuda_graph_max_batch=4)
    core = EngineCore(load_model(settings), settings)
    assert core.runner.graphs is None
    tok = core.loaded.tokenizer
    out = run_to_completion(core, [("r", tok("hello").input_ids, SamplingParams(max_tokens=20, seed=1, ignore_eos=True))])
    assert len(out["r"]["tokens"]) == 20


@pytest.mark.parametrize("value", [-1, 17, True, 2.0])
def test_cuda_graph_max_batch_is_validated(value):
    with pytest.raises(ValueError, match=r"cuda_graph_max_batch must be an integer from 0 to max_num_seqs \(16\)"):
        EngineSettings(model="m", cuda_graph_max_batch=value).validate()
