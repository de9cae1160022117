"""logprobs, logit_bias and the infill suffix, in the default dtype (float32 on CPU) on a random-weight
tiny model, with the default (reference) sampler; logprobs and logit_bias against transformers' own
``generate``.

- logit_bias: the engine's tokens equal ``generate`` given a logits processor that adds the same
  bias (generate applies external processors before its temperature schedule: the bias is added to
  the soft-capped logits, as the engine does).
- infill: the suffix's tokens hold their positions in every draft; the completion is the gap.
- logprobs: a committed token's log-probability is log softmax of the temperature-scaled logits of
  the step whose draft committed it (docs/api.md); recorded from ``generate``'s own logits, step by
  step, and compared with what the engine returned.
"""

from __future__ import annotations

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList
from transformers.models.diffusion_gemma.generation_diffusion_gemma import LinearTemperatureScheduleLogitsProcessor

from engine import EngineCore, EngineSettings, SamplingParams
from engine.errors import InvalidRequestError
from engine.loader import load_model
from tests.engine_helpers import reference_model, reference_run, run_to_completion
from tools.tiny_checkpoint import TinySpec, build_tiny_checkpoint

PARAMS = SamplingParams(max_tokens=40, max_denoising_steps=6, t_min=0.4, t_max=1.2)  # three canvases of 16


@pytest.fixture(scope="module")
def core(tmp_path_factory):
    settings = EngineSettings(model=str(build_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), TinySpec())))
    core = EngineCore(load_model(settings), settings)
    assert core.loaded.dtype == torch.float32 and core.runner.sampler.name == "reference"
    return core


@pytest.fixture(scope="module")
def prompt(core):
    return core.loaded.tokenizer("The quick brown fox jumps over").input_ids


class AddBias(LogitsProcessor):
    def __init__(self, bias: dict[int, float]):
        self.bias = bias

    def __call__(self, input_ids, scores, cur_step=None):
        scores = scores.clone()
        for token, value in self.bias.items():
            scores[..., token] += value
        return scores


class Record(LogitsProcessor):
    """Keeps every step's logits as generate's temperature schedule scales them, by canvas."""

    def __init__(self, params: SamplingParams):
        self.schedule = LinearTemperatureScheduleLogitsProcessor(params.t_min, params.t_max, params.max_denoising_steps)
        self.steps: dict[int, list[torch.Tensor]] = {}  # sequence length before the canvas -> scaled logits per step

    def __call__(self, input_ids, scores, cur_step=None):
        self.steps.setdefault(input_ids.shape[1], []).append(self.schedule(input_ids, scores, cur_step)[0].clone())
        return scores


def run(core, prompt, seed: int, **options):
    params = SamplingParams(**{**PARAMS.__dict__, "seed": seed, **options})
    return run_to_completion(core, [("r", prompt, params)])["r"]


@pytest.mark.parametrize("seed", [0, 3])
def test_logit_bias_equals_generate_with_the_same_bias(core, prompt, seed):
    plain = run(core, prompt, seed)["tokens"]
    favoured, banned = 77, plain[0]  # a token the unbiased run commits first
    bias = {favoured: 4.0, banned: -100.0}
    expected, _ = reference_run(reference_model(core), prompt, seed, core.resolve(prompt, PARAMS),
                                LogitsProcessorList([AddBias(bias)]))
    got = run(core, prompt, seed, logit_bias=tuple(bias.items()))["tokens"]
    assert got == expected
    assert got != plain and banned not in got and favoured in got


def test_logit_bias_minus_100_removes_a_token_from_every_output(core, prompt):
    runs = {seed: run(core, prompt, seed)["tokens"] for seed in range(4)}
    common = max(set().union(*runs.values()), key=lambda t: sum(t in r for r in runs.values()))
    assert all(common in r for r in runs.values())
    for seed in runs:
        assert common not in run(core, prompt, seed, logit_bias=((common, -100.0),))["tokens"]


@pytest.mark.parametrize("top", [0, 5])
def test_logprobs_are_those_of_the_committing_step(core, prompt, top):
    seed = 11
    record = Record(PARAMS)
    expected, _ = reference_run(reference_model(core), prompt, seed, core.resolve(prompt, PARAMS),
                                LogitsProcessorList([record]))
    got = run(core, prompt, seed, logprobs=top)
    assert got["tokens"] == expected
    logprobs = [lp for out in got["outputs"] for lp in (out.logprobs or ())]
    assert [lp.token_id for lp in logprobs] == got["tokens"]
    # the committing step of each canvas is its last recorded one
    canvases = [steps[-1] for _, steps in sorted(record.steps.items())]
    C = core.canvas_length
    for i, lp in enumerate(logprobs):
        direct = torch.log_softmax(canvases[i // C][i % C], dim=-1)
        assert lp.logprob == pytest.approx(float(direct[lp.token_id]), abs=2e-6)
        assert len(lp.top) == top
        if top:
            values, ids = direct.topk(top)
            assert [t for t, _ in lp.top] == ids.tolist()
            assert [v for _, v in lp.top] == pytest.approx(values.tolist(), abs=2e-6)
            assert lp.top[0] == (lp.token_id, pytest.approx(lp.logprob))  # the draft is the argmax
    assert all(out.logprobs is None for out in run(core, prompt, seed)["outputs"])


def test_logprobs_of_batched_rows_are_their_solo_ones(core, prompt):
    """Rows that ask for logprobs beside rows that do not (and with other k) get their solo values."""
    params = [SamplingParams(**{**PARAMS.__dict__, "seed": s, "logprobs": k}) for s, k in ((1, 2), (2, None), (3, 4))]
    together = run_to_completion(core, [(f"r{i}", prompt, p) for i, p in enumerate(params)])
    for i, p in enumerate(params):
        alone = run_to_completion(core, [("solo", prompt, p)])["solo"]
        assert together[f"r{i}"]["tokens"] == alone["tokens"]
        assert [o.logprobs for o in together[f"r{i}"]["outputs"]] == [o.logprobs for o in alone["outputs"]]


def test_infill_suffix_is_pinned_in_every_draft(core, prompt):
    suffix = (70, 71, 72, 73, 74)
    got = run(core, prompt, 4, max_tokens=9, infill_suffix=suffix, ignore_eos=True, stream_drafts=True)
    drafts = [out.draft.token_ids for out in got["outputs"] if out.draft is not None]
    assert len(drafts) >= 2 and all(d[9:14] == suffix for d in drafts)
    assert got["tokens"] == list(drafts[-1][:9])  # the gap, without the suffix
    assert got["finish_reason"] == "stop"  # a filled gap ends at its suffix
    free = run(core, prompt, 4, max_tokens=16, ignore_eos=True, stream_drafts=True)
    assert any(out.draft is not None for out in free["outputs"])
    assert all(out.draft.token_ids[9:14] != suffix for out in free["outputs"] if out.draft is not None)


def test_infill_gap_defaults_to_the_rest_of_the_canvas(core, prompt):
    resolved = core.resolve(prompt, SamplingParams(infill_suffix=(70, 71, 72)))
    assert resolved.max_tokens == core.canvas_length - 3
    with pytest.raises(InvalidRequestError) as info:
        core.resolve(prompt, SamplingParams(max_tokens=14, infill_suffix=(70, 71, 72)))
    assert info.value.param == "suffix" and "one canvas of 16 tokens" in str(info.value)
    with pytest.raises(InvalidRequestError) as info:
        core.resolve(prompt, SamplingParams(infill_suffix=tuple(range(70, 86))))  # 16 tokens, no max_tokens
    assert str(info.value) == ("the suffix has 16 tokens: an infill is written in one canvas of 16 tokens and needs "
                               "at least one free position before its suffix")
