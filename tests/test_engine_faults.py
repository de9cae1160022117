"""Faults: a request whose logits go non-finite fails alone; an exception in a pass fails that
pass's requests; the engine keeps serving either way."""

from __future__ import annotations

import pytest

from engine import SamplingParams
from tests.engine_helpers import (BOOM, POISON, build_poisoned_checkpoint, fail_encoder_on_boom, make_core,
                                  run_to_completion)

@pytest.fixture(scope="module")
def poisoned_core(tmp_path_factory):
    # eager decoder passes: a fault below is injected into a layer's Python forward, which a trace does not call
    return make_core(build_poisoned_checkpoint(tmp_path_factory.mktemp("poisoned")), dtype="auto", max_num_seqs=4,
                     trace_decoder=False)


def test_non_finite_row_fails_alone(poisoned_core):
    core = poisoned_core
    tok = core.loaded.tokenizer
    good = tok("fine").input_ids
    params = SamplingParams(max_tokens=40, seed=1, ignore_eos=True)
    alone = run_to_completion(core, [("alone", good, params)])["alone"]
    res = run_to_completion(core, [("bad", good + [POISON], params), ("bystander", good, params)])
    assert res["bad"]["finish_reason"] == "error"
    assert res["bad"]["outputs"][-1].error == "the model produced non-finite logits"
    assert res["bystander"]["finish_reason"] == "length"
    assert res["bystander"]["tokens"] == alone["tokens"]
    assert core.num_live_states() == 0


def test_exception_in_a_pass_fails_that_pass_and_the_engine_goes_on(poisoned_core, monkeypatch):
    core = poisoned_core
    tok = core.loaded.tokenizer
    params = SamplingParams(max_tokens=16, seed=1, ignore_eos=True)
    for rid in ("a", "b"):
        core.add_request(rid, tok(rid).input_ids, core.resolve(tok(rid).input_ids, params))
    core.step()
    # the decoder blows up in the next pass (as a CUDA OOM would): both running requests fail
    broken = core.loaded.model.model.decoder.layers[0]
    monkeypatch.setattr(broken, "forward", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("out of memory")))
    outs = core.step()
    assert sorted((o.request_id, o.finish_reason) for o in outs) == [("a", "error"), ("b", "error")]
    assert all(o.error == "internal error in the model pass: RuntimeError" for o in outs)
    assert core.num_live_states() == 0
    monkeypatch.undo()
    after = run_to_completion(core, [("next", tok("next").input_ids, params)])["next"]
    assert after["finish_reason"] == "length" and len(after["tokens"]) == 16


@pytest.mark.parametrize("arriving", [False, True], ids=["decoder-only", "on-the-pool-beside-the-encoder"])
def test_exception_in_a_traced_pass_fails_that_pass_and_the_engine_goes_on(tmp_path_factory, monkeypatch, arriving):
    """The same on the default CPU path, where the decoder pass replays a TorchScript trace (which no
    longer calls the layers' Python forward): a weight of the wrong shape makes the replay raise. With a
    request arriving whose encoder work raises too, the running rows' replay is the pass's only decoder
    work, and it runs on the pool, started before the encoder: its error still fails their requests."""
    core = make_core(build_poisoned_checkpoint(tmp_path_factory.mktemp("poisoned-traced")), dtype="auto",
                     max_num_seqs=4, forward_threads=2)
    assert core.runner.traced is not None
    tok = core.loaded.tokenizer
    params = SamplingParams(max_tokens=16, seed=1, ignore_eos=True)
    for rid in ("a", "b"):
        core.add_request(rid, tok(rid).input_ids, core.resolve(tok(rid).input_ids, params))
    core.step()
    assert core.runner.traced.keys  # the first pass traced the decoder
    if arriving:
        encoder = core.loaded.model.model.encoder
        monkeypatch.setattr(encoder, "forward", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("out of memory")))
        core.add_request("c", tok("c").input_ids, core.resolve(tok("c").input_ids, params))
    early = core.runner.early_passes
    weight = core.loaded.model.model.decoder.layers[0].mlp.down_proj.weight
    good = weight.data
    weight.data = good[:, :-1].clone()  # the trace reads the parameter it recorded: its next replay raises
    outs = core.step()
    weight.data = good
    monkeypatch.undo()
    assert core.runner.early_passes == early + arriving
    expected = ["a", "b", "c"] if arriving else ["a", "b"]
    assert sorted((o.request_id, o.finish_reason) for o in outs) == [(rid, "error") for rid in expected]
    assert all(o.error == "internal error in the model pass: RuntimeError" for o in outs)
    assert core.num_live_states() == 0
    after = run_to_completion(core, [("next", tok("next").input_ids, params)])["next"]
    assert after["finish_reason"] == "length" and len(after["tokens"]) == 16


@pytest.mark.parametrize("max_encoder_tokens", [64, 12], ids=["same-group", "prefilled-in-chunks"])
def test_exception_in_the_encoder_fails_that_encoder_work_alone(tmp_path_factory, monkeypatch, max_encoder_tokens):
    """A new request whose encoder work raises fails with the pass error; a request encoded in the same
    group (encoded again alone once the group has failed), one encoded in another group (here: beside a
    long prompt prefilled in chunks) and one already denoising in that pass go on with the tokens they
    get alone. With a second thread (``forward_threads``), passes with encoder work start the denoising
    rows before it."""
    from tools.tiny_checkpoint import TinySpec, build_tiny_checkpoint

    path = build_tiny_checkpoint(tmp_path_factory.mktemp("tiny-encoder-fault"), TinySpec())
    core = make_core(path, dtype="auto", max_num_seqs=4, max_encoder_tokens=max_encoder_tokens, forward_threads=2)
    tok = core.loaded.tokenizer
    params = SamplingParams(max_tokens=40, seed=1, ignore_eos=True)
    prompts = {"running": tok("fine").input_ids, "neighbour": [7] * 9,
               "bad": tok("a longer prompt").input_ids + BOOM}
    assert len(prompts["bad"]) > 12 >= len(prompts["neighbour"])
    alone = {rid: run_to_completion(core, [(rid, prompts[rid], params)])[rid]["tokens"] for rid in ("running", "neighbour")}

    fail_encoder_on_boom(core, monkeypatch)
    # "running" is denoising when the other two arrive together, one pass later
    res = run_to_completion(core, [(rid, prompts[rid], params) for rid in ("running", "neighbour", "bad")],
                            arrivals={"neighbour": 1, "bad": 1})
    assert core.runner.early_passes > 0
    assert res["bad"]["finish_reason"] == "error" and res["bad"]["tokens"] == []
    assert res["bad"]["outputs"][-1].error == "internal error in the model pass: RuntimeError"
    for rid in ("running", "neighbour"):
        assert (res[rid]["finish_reason"], res[rid]["tokens"]) == ("length", alone[rid])
    assert core.num_live_states() == 0


def test_a_running_request_whose_commit_shares_a_failing_encoder_group_goes_on(tmp_path_factory, monkeypatch):
    """A running request's committed canvas is encoded beside new prompts: when a new prompt's encoder
    work raises in the pass of that commit, the running request goes on with the tokens it gets alone."""
    from tools.tiny_checkpoint import TinySpec, build_tiny_checkpoint

    path = build_tiny_checkpoint(tmp_path_factory.mktemp("tiny-commit-fault"), TinySpec())
    core = make_core(path, dtype="auto", max_num_seqs=4, forward_threads=2)
    tok = core.loaded.tokenizer
    params = SamplingParams(max_tokens=64, seed=1, ignore_eos=True, max_denoising_steps=4, stability_threshold=1000)
    prompt = tok("a long answer").input_ids
    alone = run_to_completion(core, [("running", prompt, params)])["running"]["tokens"]
    groups = []
    encode_group = core.runner._encode_group
    monkeypatch.setattr(core.runner, "_encode_group", lambda group, *a: (groups.append(
        sorted(w.request_id for w in group)), encode_group(group, *a))[1])
    fail_encoder_on_boom(core, monkeypatch)
    # every canvas takes its 4 steps: "bad" arrives with the pass that encodes the first committed canvas
    res = run_to_completion(core, [("running", prompt, params), ("bad", [7, 7, 7] + BOOM, params)],
                            arrivals={"bad": 4})
    assert ["bad", "running"] in groups  # the two shared a group, which failed, and each ran again alone
    assert ["running"] in groups and ["bad"] in groups
    assert res["bad"]["finish_reason"] == "error" and res["bad"]["tokens"] == []
    assert (res["running"]["finish_reason"], res["running"]["tokens"]) == ("length", alone)
    assert core.num_live_states() == 0


def test_an_encoder_exception_fails_the_requests_that_copy_its_prefill(tmp_path_factory, monkeypatch):
    """Two choices of one prompt admitted together share its prefill (the second copies the first's K/V):
    when the encoder raises on it, both fail (the copy holds no K/V of that chunk), and a request already
    denoising goes on with the tokens it gets alone."""
    from tools.tiny_checkpoint import TinySpec, build_tiny_checkpoint

    path = build_tiny_checkpoint(tmp_path_factory.mktemp("tiny-shared-fault"), TinySpec())
    core = make_core(path, dtype="auto", max_num_seqs=4, max_encoder_tokens=12)
    tok = core.loaded.tokenizer
    params = SamplingParams(max_tokens=40, seed=1, ignore_eos=True)
    shared = tok("a longer prompt").input_ids + BOOM
    running = tok("fine").input_ids
    alone = run_to_completion(core, [("running", running, params)])["running"]["tokens"]
    fail_encoder_on_boom(core, monkeypatch)
    res = run_to_completion(core, [("running", running, params), ("c0", shared, params), ("c1", shared, params)],
                            arrivals={"c0": 1, "c1": 1})
    for rid in ("c0", "c1"):
        assert (res[rid]["finish_reason"], res[rid]["tokens"]) == ("error", [])
        assert res[rid]["outputs"][-1].error == "internal error in the model pass: RuntimeError"
    assert (res["running"]["finish_reason"], res["running"]["tokens"]) == ("length", alone)
    assert core.num_live_states() == 0
