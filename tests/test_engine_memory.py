"""The KV budget derived from the memory free at start-up (``derive_kv_budget``), and what it means for
the engine: an engine whose budget cannot hold one request refuses to start, and one with room for
every row at the longest length runs max_num_seqs such requests at once."""

from __future__ import annotations

import pytest

from engine import EngineCore, EngineSettings, SamplingParams
from engine.kv_budget import kv_reservation
from engine.loader import load_model
from engine.memory import MemoryPlan, derive_kv_budget
from tools.tiny_checkpoint import TinySpec, build_tiny_checkpoint

MIB = 2**20
CPU = __import__("torch").device("cpu")


def mem_available() -> int:
    """The host's available memory (what the engine budgets from on CPU), read independently."""
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no MemAvailable in /proc/meminfo")


def budget_within(plan: MemoryPlan, fraction: float, max_num_seqs: int, max_model_len: int,
                  fixed_bytes: int) -> tuple[int, int, int]:
    """(budget, lowest, highest): the derived budget and the budgets that the available memory read just
    before and just after the call allow: the largest number of token slots whose bytes, with
    ``fixed_bytes``, fit in ``fraction`` of it. Other processes on a shared machine allocate and free
    memory meanwhile; 64 MiB of slack either side covers that (each token here costs 1 MiB or more, so
    the slack is a few dozen tokens out of thousands)."""
    per_token = plan.kv_bytes_per_token + plan.attention_bytes_per_token
    before = mem_available()
    budget = derive_kv_budget(plan, CPU, fraction=fraction, max_num_seqs=max_num_seqs, max_model_len=max_model_len)
    after = mem_available()
    lowest = max(0, (int(min(before, after) * fraction) - 64 * MIB - fixed_bytes) // per_token)
    highest = max(0, (int(max(before, after) * fraction) + 64 * MIB - fixed_bytes) // per_token)
    return budget, lowest, highest


PLAN = MemoryPlan(kv_bytes_per_token=MIB, attention_bytes_per_token=0, sliding_kv_bytes_per_request=0,
                  state_bytes_per_request=0, sampling_transient_bytes=0, decoder_transient_bytes=0)
UNCAPPED = dict(max_num_seqs=4, max_model_len=10**9)


def test_budget_is_the_token_slots_that_fit_in_the_memory_fraction():
    assert mem_available() > 2**30, "this test needs 1 GiB of available memory"
    budget, lowest, highest = budget_within(PLAN, 0.5, fixed_bytes=0, **UNCAPPED)
    assert lowest <= budget <= highest and budget > 256
    small, lowest, highest = budget_within(PLAN, 0.25, fixed_bytes=0, **UNCAPPED)  # half the fraction
    assert lowest <= small <= highest


def test_the_transients_and_the_per_request_state_come_off_first():
    """Attention's copies of one layer per token slot (attention_bytes_per_token), the sampling,
    decoder and dequantization transients once, sliding-window KV twice and the state once per row."""
    plan = MemoryPlan(kv_bytes_per_token=MIB, attention_bytes_per_token=MIB // 2, sliding_kv_bytes_per_request=3 * MIB,
                      state_bytes_per_request=5 * MIB, sampling_transient_bytes=100 * MIB,
                      decoder_transient_bytes=50 * MIB, expert_dequant_bytes=7 * MIB)
    fixed = 100 * MIB + 50 * MIB + 7 * MIB + 4 * (2 * 3 * MIB + 5 * MIB)
    budget, lowest, highest = budget_within(plan, 0.5, fixed_bytes=fixed, **UNCAPPED)
    assert lowest <= budget <= highest
    # the same memory without the fixed costs and the layer copies holds strictly more
    plain, _, _ = budget_within(PLAN, 0.5, fixed_bytes=0, **UNCAPPED)
    assert plain - budget > plain // 3 - 128  # 1.5 MiB per slot instead of 1 MiB, and 201 MiB less


def test_the_budget_is_capped_at_every_row_at_the_longest_length_and_never_negative():
    tiny = MemoryPlan(kv_bytes_per_token=1, attention_bytes_per_token=0, sliding_kv_bytes_per_request=0,
                      state_bytes_per_request=0, sampling_transient_bytes=0, decoder_transient_bytes=0)
    # 3 rows: the slot buffers hold 3 rows (the next power of two, capped at max_num_seqs) of 256 tokens
    assert derive_kv_budget(tiny, CPU, fraction=1.0, max_num_seqs=3, max_model_len=256) == 3 * 256
    assert derive_kv_budget(tiny, CPU, fraction=1.0, max_num_seqs=8, max_model_len=100) == 8 * 100
    huge = MemoryPlan(kv_bytes_per_token=MIB, attention_bytes_per_token=0, sliding_kv_bytes_per_request=0,
                      state_bytes_per_request=0, sampling_transient_bytes=2**62, decoder_transient_bytes=0)
    assert derive_kv_budget(huge, CPU, fraction=1.0, max_num_seqs=4, max_model_len=4096) == 0


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny_memory"), TinySpec())


def test_an_engine_whose_budget_cannot_hold_one_request_refuses_to_start(tiny_path):
    settings = EngineSettings(model=str(tiny_path), memory_fraction=1e-9)
    with pytest.raises(ValueError, match="cannot hold even a one-token prompt"):
        EngineCore(load_model(settings), settings)


def test_a_roomy_engine_runs_every_row_at_the_longest_length_at_once(tiny_path):
    """On a host with far more memory than the tiny model needs, the derived budget is the cap: four
    requests of nearly max_model_len tokens each are all admitted in the first pass."""
    settings = EngineSettings(model=str(tiny_path), max_num_seqs=4, max_model_len=256)
    core = EngineCore(load_model(settings), settings)
    prompt = [7] * 200
    params = SamplingParams(max_tokens=56, ignore_eos=True, max_denoising_steps=2, stream_drafts=True)
    assert kv_reservation(len(prompt), 56, core.canvas_length) == 248  # close to max_model_len
    for i in range(4):
        core.add_request(f"r{i}", prompt, core.resolve(prompt, SamplingParams(**{**params.__dict__, "seed": i})))
    first = core.step()
    assert sorted(o.request_id for o in first if o.draft is not None) == ["r0", "r1", "r2", "r3"]
    assert core.kv_usage == pytest.approx(4 * 248 / (4 * 256))
    core.drain()
    assert core.num_live_states() == 0


@pytest.mark.parametrize("limit", [0, -1.0, float("inf"), float("nan"), True, "32"])
def test_a_device_memory_limit_must_be_a_positive_number(limit):
    with pytest.raises(ValueError, match="device_memory_limit_gib must be a positive number of GiB"):
        EngineSettings(model="x", device="cuda", device_memory_limit_gib=limit).validate()


def test_a_device_memory_limit_is_refused_on_cpu(tiny_path):
    """The cap is torch's per-process CUDA memory fraction: on CPU it would silently do nothing."""
    with pytest.raises(ValueError, match="device_memory_limit_gib applies to CUDA devices"):
        EngineSettings(model=str(tiny_path), device="cpu", device_memory_limit_gib=4).validate()
    if __import__("torch").cuda.is_available():
        return  # "auto" resolves to the GPU there
    with pytest.raises(ValueError, match=r"applies to CUDA devices \(the device is cpu\)"):
        load_model(EngineSettings(model=str(tiny_path), device="auto", device_memory_limit_gib=4))


def test_attention_copies_of_a_layer_are_in_the_plan(tmp_path, monkeypatch):
    """Where query heads share KV heads, transformers' SDPA repeats K and V to every query head (it does
    whenever a mask is given, as for rows of different lengths, or the head is wider than 256, as the
    real model's full-attention layers are). Per token slot, those copies, the gathered rows and the
    concatenation with the new tokens stay within the plan's ``attention_bytes_per_token``."""
    import transformers.integrations.sdpa_attention as sdpa

    from tests.engine_helpers import make_core, run_to_completion

    path = build_tiny_checkpoint(tmp_path / "gqa", TinySpec(num_heads=8, num_kv_heads=1))
    core = make_core(path, dtype="float32", max_num_seqs=4, batch_invariant=False)  # batched SDPA, as on CUDA
    repeated = []  # bytes per token slot of each repeat of K or V
    stock = sdpa.repeat_kv

    def recording(states, n_rep):
        out = stock(states, n_rep)
        if n_rep > 1:
            repeated.append(out.numel() * out.element_size() // (out.shape[0] * out.shape[2]))
        return out

    monkeypatch.setattr(sdpa, "repeat_kv", recording)
    run_to_completion(core, [(f"r{n}", list(range(10, 10 + n)), SamplingParams(max_tokens=32, seed=n, ignore_eos=True,
                                                                               max_denoising_steps=3)) for n in (30, 7)])
    assert repeated  # rows of different lengths: a mask, so SDPA repeated the heads
    text = core.loaded.model.config.text_config
    layer_kv = max(2 * text.per_layer_config[i].num_key_value_heads * text.per_layer_config[i].head_dim * 4
                   for i, kind in enumerate(text.layer_types) if kind != "sliding_attention")
    assert 2 * layer_kv + 2 * max(repeated) <= core.memory_plan.attention_bytes_per_token


@pytest.mark.parametrize("kv_tokens,level,message", [
    (4 * 4096, "INFO", "KV budget: 16384 token slots (set by --max-num-kv-tokens), 4 of max_num_seqs 4 requests at "
                       "the full context of 4096 tokens at once"),
    (1000, "WARNING", "KV budget: 1000 token slots (set by --max-num-kv-tokens), less than the context of 4096 tokens: "
                      "one request may reserve at most 1000 KV tokens (its prompt and every canvas of 16 but the last; "
                      "more is refused): raise --max-num-kv-tokens or --memory-fraction, or free memory"),
])
def test_the_start_up_log_says_what_the_kv_budget_holds(tmp_path, caplog, kv_tokens, level, message):
    import logging

    from tests.engine_helpers import make_core

    path = build_tiny_checkpoint(tmp_path / "tiny", TinySpec())
    with caplog.at_level(logging.INFO, logger="engine"):
        make_core(path, max_num_seqs=4, max_num_kv_tokens=kv_tokens)
    assert [(r.levelname, r.getMessage()) for r in caplog.records if r.getMessage().startswith("KV budget")] == [
        (level, message)]


def test_a_batched_encoder_call_stays_within_max_encoder_tokens_padded(tiny_path):
    """Short prompts are padded to the many-row kernel's width (16 tokens) in a batched encoder call: the
    grouping counts that width, so rows x padded length stays within max_encoder_tokens, as the memory plan
    prices the encoder."""
    from tests.engine_helpers import make_core, run_to_completion

    core = make_core(tiny_path, dtype="auto", max_num_seqs=32, max_encoder_tokens=64)
    calls = []

    def record(module, args, kwargs):
        inputs = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs["inputs_embeds"]
        calls.append(tuple(inputs.shape[:2]))

    handle = core.runner.model.model.encoder.register_forward_pre_hook(record, with_kwargs=True)
    try:
        requests = [(f"r{i}", list(range(5 + i, 5 + i + n)), SamplingParams(max_tokens=4, max_denoising_steps=2))
                    for i, n in enumerate([4, 7, 15] * 5)]
        run_to_completion(core, requests)
    finally:
        handle.remove()
        core.close()
    prompt_calls = [(rows, width) for rows, width in calls if width >= 4]
    assert prompt_calls and max(rows for rows, _ in prompt_calls) > 1  # batched calls happened
    assert all(rows * width <= 64 for rows, width in prompt_calls), calls
