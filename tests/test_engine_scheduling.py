"""Batch invariance, first-done-first-out, abort and leaks, parameter validation."""

from __future__ import annotations

import pytest
import torch

from engine import InvalidRequestError, SamplingParams
from tools.tiny_checkpoint import TinySpec, build_tiny_checkpoint
from tests.engine_helpers import make_core, run_to_completion


@pytest.fixture(scope="module")
def core(tmp_path_factory):
    path = build_tiny_checkpoint(tmp_path_factory.mktemp("tiny64"), TinySpec(dtype=torch.float64))
    return make_core(path, max_num_seqs=6)


def _requests(tok):
    """Requests of different prompt lengths, step counts, temperatures and lengths."""
    return [
        ("a", tok("hello world").input_ids, SamplingParams(max_tokens=40, seed=1)),
        ("b", tok("x").input_ids, SamplingParams(max_tokens=16, seed=2, max_denoising_steps=3)),
        ("c", tok("a much longer prompt that crosses the sliding window of the tiny model").input_ids,
         SamplingParams(max_tokens=50, seed=3, max_denoising_steps=6, t_min=0.2, t_max=1.2)),
        ("d", tok("early stopper").input_ids,
         SamplingParams(max_tokens=48, seed=4, max_denoising_steps=12, entropy_bound=1000.0, t_min=0.01, t_max=0.02,
                        stability_threshold=1, confidence_threshold=100.0)),
    ]


def _alone(core, requests):
    return {rid: run_to_completion(core, [(rid, p, sp)])[rid]["tokens"] for rid, p, sp in requests}


def test_batch_invariance_together_staggered_and_mixed(core):
    tok = core.loaded.tokenizer
    requests = _requests(tok)
    alone = _alone(core, requests)
    assert all(alone.values())

    together = run_to_completion(core, requests)
    assert {rid: r["tokens"] for rid, r in together.items()} == alone

    staggered = run_to_completion(core, requests, arrivals={"a": 0, "b": 2, "c": 5, "d": 9})
    assert {rid: r["tokens"] for rid, r in staggered.items()} == alone

    noise = [
        (f"n{i}", tok("noise " * (i + 1)).input_ids,
         SamplingParams(max_tokens=16 * (1 + i % 3), seed=100 + i, max_denoising_steps=2 + i, entropy_bound=0.05 * (i + 1)))
        for i in range(5)
    ]
    mixed = run_to_completion(core, noise + requests, arrivals={"n0": 0, "a": 1, "n1": 1, "b": 3, "n2": 4, "c": 4, "d": 7})
    assert {rid: mixed[rid]["tokens"] for rid in alone} == alone


def test_first_done_first_out_and_mid_flight_admission(core):
    tok = core.loaded.tokenizer
    prompt = tok("fdfo").input_ids
    fast = SamplingParams(max_tokens=16, seed=1, max_denoising_steps=2, ignore_eos=True)
    slow = SamplingParams(max_tokens=16, seed=2, max_denoising_steps=10, ignore_eos=True)
    late = SamplingParams(max_tokens=16, seed=3, max_denoising_steps=2, ignore_eos=True, stream_drafts=True)
    res = run_to_completion(core, [("fast", prompt, fast), ("slow", prompt, slow), ("late", prompt, late)],
                            arrivals={"fast": 0, "slow": 0, "late": 3})
    # pass numbers are 1-based: fast needs 2 decoder steps, slow needs 10
    assert res["fast"]["finished_pass"] == 2
    assert res["slow"]["finished_pass"] == 10
    # late arrives after pass 3, takes its first step in pass 4 while slow is still denoising
    assert res["late"]["first_pass"] == 4
    assert res["late"]["finished_pass"] == 5 < res["slow"]["finished_pass"]


def test_abort_frees_within_one_pass(core):
    tok = core.loaded.tokenizer
    prompt = tok("abort me").input_ids
    params = SamplingParams(max_tokens=64, seed=0, max_denoising_steps=8, ignore_eos=True)
    core.add_request("victim", prompt, core.resolve(prompt, params))
    core.add_request("other", prompt, core.resolve(prompt, params))
    core.step()
    core.step()
    assert core.runner.num_live_states() == 2
    out = core.abort_request("victim")
    assert out.finished and out.finish_reason == "abort"
    assert core.num_running == 1
    core.step()  # the next pass releases the victim's KV and canvas
    assert core.runner.num_live_states() == 1 and len(core.runner.kv) == 1
    assert core.abort_request("victim") is None  # idempotent
    core.abort_request("other")
    core.step()
    assert core.num_live_states() == 0


def test_no_leak_after_a_thousand_requests(core):
    tok = core.loaded.tokenizer
    prompts = [tok(f"r{i}").input_ids for i in range(7)]
    added = 0
    passes = 0
    finished = 0
    while finished < 1000:
        while added < 1000 and core.num_waiting < 8:
            p = prompts[added % 7]
            params = SamplingParams(max_tokens=8 + added % 20, seed=added, max_denoising_steps=1 + added % 3)
            core.add_request(f"q{added}", p, core.resolve(p, params))
            added += 1
        for out in core.step():
            finished += out.finished
        passes += 1
        if passes % 5 == 0 and core.num_running:  # abort some mid-flight
            out = core.abort_request(core.scheduler.running[0].request_id)
            finished += out is not None
    core.step()
    assert core.num_live_states() == 0
    assert core.scheduler.reserved_kv_tokens == 0


BAD = [
    (dict(max_denoising_steps=0), "max_denoising_steps"),
    (dict(max_denoising_steps=-3), "max_denoising_steps"),
    (dict(t_min=0.9, t_max=0.5), "t_max"),
    (dict(t_min=0.5, t_max=0.5), "t_max"),
    (dict(t_min=-0.1), "t_min"),
    (dict(t_min=0.0, t_max=1e-9), "t_min"),  # the last step's temperature, 1e-9 / N, is below 1e-6
    (dict(t_min=1e-40, t_max=2e-40), "t_min"),
    (dict(entropy_bound=0.0), "entropy_bound"),
    (dict(entropy_bound=-1.0), "entropy_bound"),
    (dict(entropy_bound=float("nan")), "entropy_bound"),
    (dict(confidence_threshold=0.0), "confidence_threshold"),
    (dict(stability_threshold=-1), "stability_threshold"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(max_tokens=5000), "max_tokens"),  # over the 4096 context
    (dict(eos_token_ids=(10**6,)), "eos_token_ids"),
]


@pytest.mark.parametrize("overrides,param", BAD, ids=[b[1] + str(i) for i, b in enumerate(BAD)])
def test_bad_parameters_rejected_before_work(core, overrides, param):
    prompt = core.loaded.tokenizer("hi").input_ids
    before = core.scheduler.pass_index
    with pytest.raises(InvalidRequestError) as info:
        core.resolve(prompt, SamplingParams(**overrides))
    assert info.value.param == param
    assert info.value.message
    assert core.scheduler.pass_index == before and not core.has_work()


@pytest.mark.parametrize("prompt", [[5, 10**6], [-1, 5], []])
def test_bad_prompt_tokens_rejected(core, prompt):
    with pytest.raises(InvalidRequestError) as info:
        core.resolve(prompt, SamplingParams())
    assert info.value.param == "prompt"


@pytest.mark.parametrize("overrides,fragment", [
    (dict(dtype="bf16"), "dtype must be one of"),
    (dict(device="gpu"), "device must be"),
    (dict(max_num_seqs=0), "max_num_seqs must be a positive integer"),
    (dict(max_waiting=-1), "max_waiting must be an integer >= 0"),
    (dict(memory_fraction=1.5), "memory_fraction must be in (0, 1]"),
    (dict(num_threads=0), "num_threads must be a positive integer"),
    (dict(max_model_len=0), "max_model_len must be a positive integer"),
])
def test_bad_engine_settings_fail_before_loading(overrides, fragment):
    from engine import AsyncEngine, EngineSettings

    with pytest.raises(ValueError) as info:
        AsyncEngine(EngineSettings(model="/nonexistent", **overrides))
    assert fragment in str(info.value)


def test_a_context_longer_than_the_model_was_trained_for_is_refused(tmp_path_factory):
    path = build_tiny_checkpoint(tmp_path_factory.mktemp("context"), TinySpec(max_position_embeddings=512))
    assert make_core(path, max_model_len=512).max_model_len == 512
    with pytest.raises(ValueError, match="max_model_len 513 is over the model's context of 512 tokens"):
        make_core(path, max_model_len=513)


def test_long_prompt_is_prefilled_in_chunks_with_the_same_result(tmp_path_factory):
    """A prompt longer than max_encoder_tokens is encoded chunk by chunk; the tokens do not change."""
    path = build_tiny_checkpoint(tmp_path_factory.mktemp("chunks"), TinySpec(dtype=torch.float64))
    whole = make_core(path, max_encoder_tokens=4096)
    chunked = make_core(path, max_encoder_tokens=16)
    prompt = whole.loaded.tokenizer("a prompt of about seventy tokens, far past the sixteen-token chunks " * 1).input_ids
    assert len(prompt) > 3 * 16
    params = SamplingParams(max_tokens=40, seed=9)
    a = run_to_completion(whole, [("r", prompt, params)])["r"]["tokens"]
    b = run_to_completion(chunked, [("r", prompt, params)])["r"]["tokens"]
    assert a == b and len(a) > 0


def test_a_long_prompt_is_prefilled_a_chunk_a_pass_while_others_denoise(tmp_path_factory):
    """A text prompt longer than max_encoder_tokens is encoded one chunk a pass, and a running request
    takes its denoising step in every one of those passes (the whole prompt in one pass would stall it);
    the long request still gets its solo tokens (float32, random weights)."""
    from engine.request import RequestStatus

    path = build_tiny_checkpoint(tmp_path_factory.mktemp("prefill"), TinySpec())
    core = make_core(path, dtype="float32", max_encoder_tokens=16, max_num_seqs=4)
    tok = core.loaded.tokenizer
    prompt = tok("a prompt of about seventy tokens, far past the sixteen-token chunks").input_ids
    chunks = -(-len(prompt) // 16)
    assert chunks >= 4
    params = SamplingParams(max_tokens=32, seed=9, ignore_eos=True)
    solo = run_to_completion(core, [("long", prompt, params)])["long"]["tokens"]
    # never converges early (no mean entropy is that low): 8 steps for each of its 4 canvases
    busy = SamplingParams(max_tokens=64, seed=1, ignore_eos=True, max_denoising_steps=8, confidence_threshold=1e-30)
    core.add_request("busy", tok("hi").input_ids, core.resolve(tok("hi").input_ids, busy))
    core.step()
    core.add_request("long", prompt, core.resolve(prompt, params))
    running = {r.request_id: r for r in core.scheduler.running}
    steps, tokens, passes = running["busy"].num_denoising_steps, [], 0
    while passes == 0 or long_request.status is RequestStatus.ENCODING:
        left = len(prompt) if passes == 0 else len(long_request.pending_encode)
        tokens += [t for out in core.step() if out.request_id == "long" for t in out.token_ids]
        passes += 1
        long_request = next(r for r in core.scheduler.running if r.request_id == "long")
        assert left - len(long_request.pending_encode) == min(16, left)  # one chunk this pass
        assert running["busy"].num_denoising_steps == steps + passes  # and the busy request's step
    assert passes == chunks
    while core.has_work():
        tokens += [t for out in core.step() if out.request_id == "long" for t in out.token_ids]
    assert tokens == solo and len(solo) == 32


def test_prompts_share_one_pass_budget_of_prompt_tokens_in_whole_chunks(tmp_path_factory):
    """Three prompts admitted together are prefilled oldest first within max_encoder_tokens prompt tokens
    a pass, each a whole chunk or none (the oldest's last chunk and a short prompt share a pass; a long
    one waits for room), a running request steps in every pass, and each request gets its solo tokens
    and log-probabilities, bit for bit (float32, random weights): a chunk's bounds do not depend on the
    other prompts."""
    path = build_tiny_checkpoint(tmp_path_factory.mktemp("budget"), TinySpec())
    core = make_core(path, dtype="float32", max_encoder_tokens=16, max_num_seqs=4)
    tok = core.loaded.tokenizer
    prompts = {"older": tok("a prompt of about seventy tokens, far past the sixteen-token chunks").input_ids,
               "short": tok("hi there").input_ids,
               "long": tok("another long prompt, of a different length, also cut up").input_ids}
    assert 0 < len(prompts["older"]) % 16 <= 16 - len(prompts["short"]) and len(prompts["long"]) > 2 * 16
    params = SamplingParams(max_tokens=32, seed=9, ignore_eos=True, logprobs=2)

    def outputs(results, rid):
        return [(t.token_id, t.logprob, t.top) for o in results[rid]["outputs"] for t in (o.logprobs or ())]

    solo = {rid: outputs(run_to_completion(core, [(rid, p, params)]), rid) for rid, p in prompts.items()}
    busy = SamplingParams(max_tokens=64, seed=1, ignore_eos=True, max_denoising_steps=8, confidence_threshold=1e-30)
    core.add_request("busy", tok("hi").input_ids, core.resolve(tok("hi").input_ids, busy))
    core.step()
    for rid, p in prompts.items():
        core.add_request(rid, p, core.resolve(p, params))
    running = {r.request_id: r for r in [*core.scheduler.running, *core.scheduler.waiting]}
    steps, shared = running["busy"].num_denoising_steps, 0
    got = {rid: [] for rid in prompts}
    left = {rid: len(p) for rid, p in prompts.items()}
    for passes in range(1, 100):
        for out in core.step():
            got.get(out.request_id, []).extend((t.token_id, t.logprob, t.top) for t in (out.logprobs or ()))
        encoded = {rid: left[rid] - len(running[rid].pending_encode) for rid in prompts}
        assert all(n in (0, min(16, left[rid])) for rid, n in encoded.items())  # whole chunks or none
        assert sum(encoded.values()) <= 16
        oldest = next(rid for rid in prompts if left[rid])
        assert encoded[oldest] == min(16, left[oldest])  # the oldest is never held back
        shared += sum(n > 0 for n in encoded.values()) > 1
        assert running["busy"].num_denoising_steps == steps + passes  # and the busy request's step
        left = {rid: len(running[rid].pending_encode) for rid in prompts}
        if not any(left.values()):
            break
    assert shared == 1
    while core.has_work():
        for out in core.step():
            got.get(out.request_id, []).extend((t.token_id, t.logprob, t.top) for t in (out.logprobs or ()))
    assert got == solo and all(len(v) == 32 for v in solo.values())


def test_choices_of_one_prompt_share_its_prefill(tmp_path_factory):
    """Three requests with the same long prompt admitted together (the choices of n=3) are prefilled as
    one: a chunk a pass for all three, the budget spent once, the other two copying the first one's K/V;
    one that arrives a pass later prefills on its own. Each gets its solo tokens and log-probabilities,
    bit for bit (float32, random weights)."""
    path = build_tiny_checkpoint(tmp_path_factory.mktemp("choices"), TinySpec())
    core = make_core(path, dtype="float32", max_encoder_tokens=16, max_num_seqs=8)
    tok = core.loaded.tokenizer
    prompt = tok("a prompt of about seventy tokens, far past the sixteen-token chunks").input_ids
    chunks = -(-len(prompt) // 16)
    seeds = {"c0": 1, "c1": 2, "c2": 3, "late": 4}

    def params(rid):
        return SamplingParams(max_tokens=32, seed=seeds[rid], ignore_eos=True, logprobs=2)

    def entries(outputs):
        return [(t.token_id, t.logprob, t.top) for o in outputs for t in (o.logprobs or ())]

    solo = {rid: entries(run_to_completion(core, [(rid, prompt, params(rid))])[rid]["outputs"]) for rid in seeds}

    class Passes:  # the engine's statistics sink, keeping each pass's encoder tokens
        def __init__(self):
            self.encoder_tokens: list[int] = []

        def on_pass(self, stats):
            self.encoder_tokens.append(stats.encoder_tokens)

        def on_canvas(self, stats):
            pass

        def on_request_finished(self, stats):
            pass

    core.stats = sink = Passes()
    for rid in ("c0", "c1", "c2"):
        core.add_request(rid, prompt, core.resolve(prompt, params(rid)))
    requests = {r.request_id: r for r in core.scheduler.waiting}
    got = {rid: [] for rid in seeds}
    for passes in range(1, chunks + 1):
        for out in core.step():
            got[out.request_id] += entries([out])
        if passes == 1:
            core.add_request("late", prompt, core.resolve(prompt, params("late")))
            requests["late"] = core.scheduler.waiting[0]
        left = {len(requests[rid].pending_encode) for rid in ("c0", "c1", "c2")}
        assert left == {max(0, len(prompt) - 16 * passes)}  # the three together, a chunk a pass
    assert len(requests["late"].pending_encode) > 0  # behind, on its own
    # the encoder ran each chunk once (the other two copied it), and nothing else while the three prefilled
    assert sink.encoder_tokens[:chunks] == [min(16, len(prompt) - 16 * i) for i in range(chunks)]
    while core.has_work():
        for out in core.step():
            got[out.request_id] += entries([out])
    assert got == solo and all(len(v) == 32 for v in solo.values())


def test_a_prompt_with_images_is_encoded_whole_when_it_fits_the_pass_or_comes_first(core):
    """The pass's prompt budget (max_encoder_tokens) over text and image prompts, in the scheduler alone:
    text is cut to what is left, a prompt with images waits for a pass with room or goes first (alone if
    longer), and an empty prompt is not held back by a spent budget."""
    from engine.request import Request, RequestStatus
    from engine.scheduler import Scheduler

    sched = Scheduler(max_num_seqs=8, max_num_kv_tokens=10**6, max_encoder_tokens=16)
    params = core.resolve([5], SamplingParams(max_tokens=16))
    for rid, length, images in (("text", 20, None), ("image", 10, "pixels"), ("large-image", 30, "pixels"),
                                ("empty", 0, None)):
        req = Request(rid, (5,) * length, params, 0, 16)
        req.images = images
        sched.add(req)
    plans = [[(w.request_id, len(w.token_ids), w.images) for w in sched.schedule().encode] for _ in range(3)]
    assert plans == [[("text", 16, None), ("empty", 0, None)],
                     [("text", 4, None), ("image", 10, "pixels")],
                     [("large-image", 30, "pixels")]]
    assert all(r.status is RequestStatus.DENOISING for r in sched.running)


def test_admission_counts_the_slot_buffers(core):
    """Budget = the slot buffers: slot_rows(n) rows (next power of two) of the longest reservation."""
    from engine.kv_budget import fits_alone
    from engine.request import Request
    from engine.scheduler import Scheduler

    sched = Scheduler(max_num_seqs=8, max_num_kv_tokens=1000)
    params = core.resolve([5], SamplingParams(max_tokens=32))  # two canvases of 16: the first enters the KV
    long_req = Request("long", tuple([5] * 284), params, 0, 16)  # reserves 284 + 16 = 300
    assert long_req.kv_reservation == 300
    assert [fits_alone(n, 8, 1000) for n in (1000, 1001, long_req.kv_reservation)] == [True, False, True]
    sched.add(long_req)
    for i in range(3):
        sched.add(Request(f"s{i}", (5,), params, 0, 16))  # reserve 17 each
    plan = sched.schedule()
    # long + 1 short: 2 rows x 300 = 600 <= 1000; long + 2 short: 4 rows x 300 = 1200 > 1000
    assert [n.request_id for n in plan.new] == ["long", "s0"]
    assert sched.reserved_kv_tokens == 600  # what kv_cache_usage_perc reports against the 1000


def test_one_kv_budget_rule_for_scheduler_and_cache():
    """The scheduler's budget and the KV cache's buffers follow engine.kv_budget: slot_rows(n) rows
    of the longest reservation; the memory plan's cap is every row at max_model_len."""
    from engine.kv_budget import kv_reservation, kv_tokens_needed, slot_buffer_shape, slot_rows
    from engine.kv_cache import KVCacheManager

    assert [slot_rows(n, 6) for n in range(8)] == [0, 1, 2, 4, 4, 6, 6, 6]
    assert kv_reservation(10, 16, 16) == 10 and kv_reservation(10, 17, 16) == 26 and kv_reservation(1, 1, 16) == 1
    assert kv_tokens_needed([], 8) == 0 and kv_tokens_needed([300, 17, 17], 8) == 4 * 300
    kv = KVCacheManager(["sliding_attention", "full_attention"], 8, [(1, 4), (1, 4)], max_rows=8,
                        device=torch.device("cpu"), dtype=torch.float32)
    for i, reservation in enumerate([40, 300, 17]):
        kv.allocate(f"r{i}", reservation)
        kv.sync()
        reservations = [40, 300, 17][: i + 1]
        rows, longest = slot_buffer_shape(reservations, 8)
        assert kv.nbytes() == rows * (longest + 7) * 4 * 4 * 2  # K and V of a full (longest) and a sliding (7) layer
        assert rows * longest == kv_tokens_needed(reservations, 8)


def test_the_scheduler_queues_without_a_bound(core):
    """The queue bound lives in AsyncEngine.generate alone (test_engine_async); the scheduler queues all."""
    from engine.request import Request
    from engine.scheduler import Scheduler

    sched = Scheduler(max_num_seqs=2, max_num_kv_tokens=10**6)
    params = core.resolve([5], SamplingParams(max_tokens=16))
    for i in range(50):
        sched.add(Request(f"q{i}", (5,), params, 0, 16))
    assert len(sched.waiting) == 50
    sched.schedule()
    assert len(sched.running) == 2 and len(sched.waiting) == 48


def test_the_last_canvas_needs_no_kv(tmp_path_factory):
    """A request reserves its prompt and every canvas but the last, which finishes it and is never
    encoded: under a KV budget of exactly prompt + one canvas, a two-canvas request is accepted and
    gives the tokens of a roomy engine, and a third canvas is refused with the tokens it would need."""
    path = build_tiny_checkpoint(tmp_path_factory.mktemp("tight_kv"), TinySpec(dtype=torch.float64))
    roomy = make_core(path)
    prompt = roomy.loaded.tokenizer("a prompt of several tokens").input_ids
    C = roomy.canvas_length
    tight = make_core(path, max_num_seqs=1, max_num_kv_tokens=len(prompt) + C)
    params = SamplingParams(max_tokens=2 * C, seed=3, ignore_eos=True)
    want = run_to_completion(roomy, [("r", prompt, params)])["r"]
    got = run_to_completion(tight, [("r", prompt, params)])["r"]
    assert got["finish_reason"] == "length" and len(got["tokens"]) == 2 * C
    assert got["tokens"] == want["tokens"]
    with pytest.raises(InvalidRequestError) as info:
        tight.resolve(prompt, SamplingParams(max_tokens=2 * C + 1))
    assert (info.value.param, info.value.code) == ("max_tokens", "limit_exceeded")
    assert f"need {len(prompt) + 2 * C} KV tokens" in info.value.message
    assert "settings max_num_kv_tokens and memory_fraction" in info.value.message
    assert info.value.message.endswith(f"with this prompt, max_tokens can be at most {2 * C}")
    # a prompt the budget cannot hold even with one canvas: lowering max_tokens would not help
    longer = prompt + prompt[:C + 1]
    with pytest.raises(InvalidRequestError) as info:
        tight.resolve(longer, SamplingParams(max_tokens=1))
    assert (info.value.param, info.value.code) == ("prompt", "limit_exceeded")
    assert info.value.message.startswith(f"the prompt alone needs {len(longer)} KV tokens, more than")


def test_slot_buffers_are_reused_in_place(core):
    """Steady batches read the KV in place: the buffers are reallocated only when the running set's
    shape (rows, longest reservation) changes, not every pass."""
    tok = core.loaded.tokenizer
    before = core.runner.kv.reallocations
    same = [(f"r{i}", tok("four equal requests").input_ids, SamplingParams(max_tokens=48, seed=i)) for i in range(4)]
    passes = core.scheduler.pass_index
    run_to_completion(core, same)
    assert core.scheduler.pass_index - passes >= 3 * 8  # three canvases of 8 steps
    assert core.runner.kv.reallocations - before <= 2  # sized once for the four, released at the end
    assert core.runner.kv.nbytes() == 0 and len(core.runner.kv) == 0


def test_a_freed_slot_does_not_leak_into_the_next_request(tmp_path_factory):
    """A request whose KV is NaN (poisoned prompt) fails while three others keep running; the request
    that takes its slot in the same buffers (no reallocation in between) gets exactly its solo tokens,
    and so do the others."""
    from tests.engine_helpers import POISON, build_poisoned_checkpoint

    core = make_core(build_poisoned_checkpoint(tmp_path_factory.mktemp("poison_slot")), dtype="auto", max_num_seqs=4)
    tok = core.loaded.tokenizer
    keepers = [(f"k{i}", tok(f"keeper number {i}").input_ids, SamplingParams(max_tokens=96, seed=i, ignore_eos=True))
               for i in range(3)]  # their reservation stays the longest, and four rows stay allocated
    after = ("after", tok("good").input_ids, SamplingParams(max_tokens=16, seed=5, ignore_eos=True))
    solo = {rid: run_to_completion(core, [(rid, p, sp)])[rid]["tokens"] for rid, p, sp in [*keepers, after]}

    for rid, prompt, params in keepers:
        core.add_request(rid, prompt, core.resolve(prompt, params))
    core.step()
    bad = [POISON] * 60
    core.add_request("bad", bad, core.resolve(bad, SamplingParams(max_tokens=16, seed=6)))
    tokens = {rid: [] for rid in solo}
    finished = {}
    while "bad" not in finished:
        for out in core.step():
            tokens.setdefault(out.request_id, []).extend(out.token_ids)
            if out.finished:
                finished[out.request_id] = out.finish_reason
    assert finished == {"bad": "error"}
    reallocations = core.runner.kv.reallocations
    core.add_request("after", after[1], core.resolve(after[1], after[2]))  # takes the poisoned row's slot
    while "after" not in finished:
        for out in core.step():
            tokens[out.request_id].extend(out.token_ids)
            if out.finished:
                finished[out.request_id] = out.finish_reason
    assert core.runner.kv.reallocations == reallocations  # same buffers: the row was reused, not reallocated
    while core.has_work():
        for out in core.step():
            tokens[out.request_id].extend(out.token_ids)
    assert {rid: tokens[rid] for rid in solo} == solo


def test_sampling_in_tiles_of_one_row_gives_the_same_tokens(core, tmp_path_factory):
    """With a tile budget below one row, every pass samples several tiles of one row, each with draws
    prefetched one tile ahead on the worker thread, and each row four canvas positions at a time (lm head,
    sampler, self-conditioning); every request still gets its solo tokens."""
    path = build_tiny_checkpoint(tmp_path_factory.mktemp("tiles"), TinySpec(dtype=torch.float64))
    tiled = make_core(path, max_num_seqs=6, sampling_tile_bytes=1)
    assert (tiled.runner.sampler.tiles.rows, tiled.runner.sampler.tiles.positions) == (1, 4)
    requests = _requests(core.loaded.tokenizer)
    together = run_to_completion(tiled, requests, arrivals={"a": 0, "b": 1, "c": 1, "d": 3})
    assert {rid: r["tokens"] for rid, r in together.items()} == _alone(core, requests)


def test_a_failed_reallocation_is_redone_in_full(monkeypatch):
    """Running out of memory halfway through a reallocation leaves some layers with the new shape: the
    next sync replaces them all, even when the running set then needs the shape recorded before."""
    from engine.kv_cache import KVCacheManager

    kv = KVCacheManager(["sliding_attention", "full_attention"], 8, [(1, 4), (1, 4)], max_rows=8,
                        device=torch.device("cpu"), dtype=torch.float32)

    def shapes():
        return [tuple(t.shape) for t in (*kv._keys, *kv._values)]

    for i in range(4):
        kv.allocate(f"r{i}", 40)
    kv.sync()
    before = shapes()
    assert {s[0] for s in before} == {4}
    for i in range(1, 4):  # three finish: the next sync shrinks to one row, and fails at its second layer
        kv.free(f"r{i}")
    real, calls = torch.zeros, []

    def failing_zeros(*args, **kwargs):
        calls.append(args)
        if len(calls) == 3:
            raise torch.OutOfMemoryError("injected")
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "zeros", failing_zeros)
    with pytest.raises(torch.OutOfMemoryError):
        kv.sync()
    monkeypatch.undo()
    kv.free("r0")  # the pass failed: its request is freed
    for i in range(4):  # the same running set as before the failure
        kv.allocate(f"n{i}", 40)
    kv.sync()
    assert shapes() == before
    kv.view([f"n{i}" for i in range(4)])  # every row of every layer is there


@pytest.mark.parametrize("k", [0, 1, 2, 5, 10**12])
def test_the_stopping_rule_keeps_one_draft_whatever_the_stability_threshold(k):
    """A canvas converges on a confident step whose draft equals the k drafts before it (DiffusionGemma's
    rule, here against its plain statement over the whole history), and a request keeps one draft for
    it, not k: a huge stability_threshold costs no memory."""
    import pickle

    from engine.request import Request

    req = Request("r", (1,), SamplingParams(stability_threshold=k), seed=0, canvas_length=4)
    drafts = [(1, 2, 3, 4)] * 3 + [(1, 2, 3, 5)] * 7 + [(1, 2, 3, 4)] * 2 + [(0, 0, 0, 0)] * 200
    sizes = set()
    for i, draft in enumerate(drafts):
        before = drafts[:i]
        want = len(before) >= k and all(d == draft for d in before[len(before) - k:])
        for confident in (False, True):  # the same draft recorded once: probe unconfident first, on a copy
            probe = pickle.loads(pickle.dumps(req)) if not confident else req
            assert probe.converged(draft, confident) == (want and confident), (i, draft)
        sizes.add(len(pickle.dumps(req)))
    assert len(sizes) <= 3  # three different drafts were the latest: nothing else grew
    req.new_canvas()
    assert req.converged((1, 2, 3, 4), True) == (k == 0)
