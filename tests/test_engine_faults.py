"""Faults: a request whose logits go non-finite fails alone; an exception in a pass fails that
pass's requests; the engine keeps serving either way."""

from __future__ import annotations

import pytest

from engine import SamplingParams
from tests.engine_helpers import POISON, build_poisoned_checkpoint, make_core, run_to_completion

@pytest.fixture(scope="module")
def poisoned_core(tmp_path_factory):
    return make_core(build_poisoned_checkpoint(tmp_path_factory.mktemp("poisoned")), max_num_seqs=4)


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
