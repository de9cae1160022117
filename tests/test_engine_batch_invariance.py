"""Batch invariance in the default CPU dtype (float32): every request gets bitwise the tokens it gets
alone, whoever shares its passes, with each sampler.

A random-weight model (near-flat distributions: a last-bit difference in a logit flips samples) with
prompts of different lengths, staggered arrivals, canvases committed at different passes, several
canvases per request and mixed diffusion parameters, logprobs, logit biases and an infill suffix; and
with the decoder pass's rows run in one group or in several side by side (``forward_threads``).
"""

from __future__ import annotations

import pytest
import torch

from engine import EngineCore, EngineSettings, SamplingParams
from engine.cpu_threads import (MIN_GROUP_WORK, encoder_canvases, row_groups, rows_after_encoder,
                                rows_beside_encoder)
from engine.loader import load_model
from tools.tiny_checkpoint import TinySpec, build_tiny_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    # DiffusionGemma's layer pattern in small: sliding layers (window 24) and a full one, MoE, canvas 16
    return build_tiny_checkpoint(tmp_path_factory.mktemp("invariance"), TinySpec(num_layers=3, canvas_length=16))


def _requests():
    """(id, prompt, params, arrival pass): prompt lengths 3..70 (past the sliding window), 1-3
    canvases, different step counts and schedules, some with early stopping."""
    g = torch.Generator().manual_seed(5)
    out = []
    for i in range(8):
        length = [3, 9, 17, 30, 41, 52, 64, 70][i]
        prompt = torch.randint(5, 261, (length,), generator=g).tolist()
        params = SamplingParams(
            max_tokens=[16, 40, 24, 48, 10, 33, 20, 44][i], seed=100 + i, ignore_eos=i % 3 != 0,
            max_denoising_steps=[6, 8, 5, 7, 9, 6, 8, 5][i], t_max=0.8 + 0.05 * (i % 4),
            entropy_bound=[0.1, 2.0, 0.5, 4.0, 1.0, 0.1, 3.0, 0.7][i],
            stability_threshold=i % 3, confidence_threshold=[0.005, 5.0, 0.5, 1.0, 0.005, 4.0, 0.2, 2.0][i],
            logprobs={1: 3, 5: 0}.get(i), logit_bias={2: ((70, 5.0), (80, -100.0))}.get(i, ()),
            infill_suffix=(71, 72, 73, 74) if i == 4 else (),
        )
        out.append((f"r{i}", prompt, params, [0, 0, 1, 2, 2, 3, 5, 6][i]))
    return out


def _run(core: EngineCore, requests, suffix: str = ""):
    """Drive the core pass by pass; per request: its tokens, finish reason, the pass it finished in, and
    after each of its denoising steps its self-conditioning input (the soft embeddings of the step's
    scaled logits: bitwise equal soft embeddings mean bitwise equal logits, which tokens can hide)."""
    pending = sorted(requests, key=lambda r: r[3])
    out = {rid: dict(tokens=[], finish=None, finished_pass=None, soft=[], logprobs=[]) for rid, *_ in requests}
    passes = 0
    while pending or core.has_work():
        while pending and pending[0][3] <= passes:
            rid, prompt, params, _ = pending.pop(0)
            core.add_request(rid + suffix, prompt, core.resolve(prompt, params))
        outputs = core.step()
        passes += 1
        for rid in out:
            state = core.runner.rows.get(rid + suffix)
            if state is not None and state.soft_embeddings is not None:
                out[rid]["soft"].append(state.soft_embeddings.clone())
        for o in outputs:
            rid = o.request_id[: len(o.request_id) - len(suffix)] if suffix else o.request_id
            out[rid]["tokens"].extend(o.token_ids)
            out[rid]["logprobs"].extend(o.logprobs or ())
            if o.finished:
                out[rid]["finish"], out[rid]["finished_pass"] = o.finish_reason, passes
    return out


@pytest.mark.parametrize("sampler", ["reference", "fast"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("forward_threads", [1, 3])
def test_rows_equal_their_solo_runs(checkpoint, sampler, dtype, forward_threads):
    settings = EngineSettings(model=str(checkpoint), sampler=sampler, max_num_seqs=8, forward_threads=forward_threads,
                              dtype="auto" if dtype == "float32" else dtype)
    loaded = load_model(settings)
    assert str(loaded.dtype) == f"torch.{dtype}"  # float32: the default CPU dtype
    core = EngineCore(loaded, settings)
    assert core.runner.traced is not None and core.runner.min_group_work == 0  # the CPU default: traced, split
    requests = _requests()
    together = _run(core, requests)
    assert (core.runner.grouped_passes > 0) == (forward_threads > 1)
    # with threads to spare, passes with prompts or commits to encode ran them beside earlier rows
    assert (core.runner.early_passes > 0) == (forward_threads > 1)
    assert core.runner.traced.keys and not core.runner.traced.failed_keys  # the passes replayed traces
    # the load really mixed: rows of different lengths shared passes and committed at different ones
    assert len({together[rid]["finished_pass"] for rid, *_ in requests}) >= 4
    assert len(together["r1"]["logprobs"]) == len(together["r1"]["tokens"]) > 0
    for request in requests:
        rid = request[0]
        alone = _run(core, [(*request[:3], 0)], suffix="-alone")[rid]
        assert together[rid]["tokens"] == alone["tokens"], rid
        assert together[rid]["finish"] == alone["finish"], rid
        assert together[rid]["logprobs"] == alone["logprobs"], rid
        assert len(together[rid]["soft"]) == len(alone["soft"]) > 0
        for step, (a, b) in enumerate(zip(together[rid]["soft"], alone["soft"])):
            assert torch.equal(a, b), (rid, step, (a - b).abs().max().item())
    assert core.num_live_states() == 0
    core.close()


@pytest.fixture(scope="module")
def twin_checkpoint(tmp_path_factory):
    """Every byte token has a twin with the same embedding row (tied lm head): their logits are bitwise
    equal, as those of duplicated or untrained vocabulary rows are, so every top-k meets ties."""
    from safetensors.torch import load_file, save_file

    path = build_tiny_checkpoint(tmp_path_factory.mktemp("twins"), TinySpec(num_layers=2, canvas_length=16))
    weights = load_file(path / "model.safetensors")
    embed = weights["model.decoder.embed_tokens.weight"]
    embed[6:261:2] = embed[5:260:2]
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    return path


def _one_row_tiles(sampler: str, canvas: int, hidden: int, vocab: int) -> int:
    """A sampling tile budget of one row and a half: every row is a tile of its own."""
    if sampler == "reference":
        from engine.sampling.reference import SamplingTiles

        per_row = SamplingTiles(1, canvas, 2).transient_bytes(canvas, vocab)
    else:
        from engine.sampling.fast import VOCAB_CHUNK, block_width, chunk_width, row_transient_bytes

        per_row = row_transient_bytes(canvas, hidden, chunk_width(vocab, VOCAB_CHUNK["torch"], block_width(vocab)),
                                      "torch")
    return per_row + per_row // 2


@pytest.mark.parametrize("tiles", ["one tile", "a tile a row"])
@pytest.mark.parametrize("sampler", ["reference", "fast"])
def test_top_alternatives_do_not_depend_on_what_others_ask_for(twin_checkpoint, sampler, tiles):
    """Which of several equally probable tokens a top-k lists depends on k: each row's alternatives come
    from its own k, so a request lists the same ones beside requests asking for more, fewer or none,
    whether a pass samples its rows together or a tile at a time."""
    config = TinySpec(num_layers=2, canvas_length=16)
    budget = None if tiles == "one tile" else _one_row_tiles(sampler, 16, config.hidden_size, 261)
    settings = EngineSettings(model=str(twin_checkpoint), sampler=sampler, max_num_seqs=5, sampling_tile_bytes=budget)
    core = EngineCore(load_model(settings), settings)
    rows_per_tile = core.runner.sampler.tiles.rows if sampler == "reference" else core.runner.sampler.rows_per_tile
    assert rows_per_tile >= 5 if budget is None else rows_per_tile == 1
    g = torch.Generator().manual_seed(11)
    # the last asks for none and finishes first: then every row asks, the counts out of row order
    requests = [(f"r{i}", torch.randint(5, 261, (6 + 5 * i,), generator=g).tolist(),
                 SamplingParams(max_tokens=16, max_denoising_steps=2 if count is None else 4, ignore_eos=True,
                                seed=20 + i, logprobs=count), 0)
                for i, count in enumerate([2, 5, 2, 1, None])]
    together = _run(core, requests)
    tied = 0
    for request in requests:
        rid = request[0]
        alone = _run(core, [request], suffix="-alone")[rid]
        assert together[rid]["tokens"] == alone["tokens"], rid
        assert together[rid]["logprobs"] == alone["logprobs"], rid
        tied += sum(len({v for _, v in entry.top}) < len(entry.top) for entry in alone["logprobs"])
    assert tied > 0  # the lists did meet equal probabilities
    core.close()


def test_commits_beside_a_longer_cache_equal_their_solo_runs(checkpoint):
    """Two canvases committed in one encoder call have new tokens of one length (the canvas) but cached
    prompts of 4 and 200 tokens: the short row must attend over its own keys, not over keys padded to
    the long row's, or its later canvases' logits differ from its solo run."""
    settings = EngineSettings(model=str(checkpoint), max_num_seqs=4)
    core = EngineCore(load_model(settings), settings)
    g = torch.Generator().manual_seed(7)
    params = SamplingParams(max_tokens=32, max_denoising_steps=3, ignore_eos=True, seed=1)
    short, long_ = (("short", torch.randint(5, 261, (4,), generator=g).tolist(), params, 0),
                    ("long", torch.randint(5, 261, (200,), generator=g).tolist(), params, 0))
    together = _run(core, [short, long_])
    assert together["short"]["finished_pass"] == together["long"]["finished_pass"]  # committed side by side
    alone = _run(core, [short], suffix="-alone")["short"]
    assert together["short"]["tokens"] == alone["tokens"]
    assert len(together["short"]["soft"]) == len(alone["soft"]) == 6  # two canvases of three steps
    for step, (a, b) in enumerate(zip(together["short"]["soft"], alone["soft"])):
        assert torch.equal(a, b), (step, (a - b).abs().max().item())
    core.close()


@pytest.mark.parametrize("trace_decoder", [True, False], ids=["traced", "eager"])
@pytest.mark.parametrize("forward_threads", [2, 3])
def test_row_groups_follow_their_rows(checkpoint, forward_threads, trace_decoder):
    """The decoder pass runs its rows in groups side by side (``forward_threads``). One canvas after
    prompts of one length gives every row the same token count, so when a request finishes and the
    groups' bounds move, a group holds other rows with the same counts: it must read its own rows' KV.
    Requests arrive at different passes and finish at different ones; each gets its solo tokens."""
    settings = EngineSettings(model=str(checkpoint), max_num_seqs=8, forward_threads=forward_threads,
                              trace_decoder=trace_decoder)
    core = EngineCore(load_model(settings), settings)
    assert core.runner.forward_threads == forward_threads
    # traced passes split from two canvases; eager ones of this tiny model would stay whole
    assert core.runner.min_group_work == (0 if trace_decoder else MIN_GROUP_WORK)
    core.runner.min_group_work = 0
    g = torch.Generator().manual_seed(9)
    requests = [(f"e{i}", torch.randint(5, 261, (12,), generator=g).tolist(),
                 SamplingParams(max_tokens=16, seed=300 + i, ignore_eos=True,
                                max_denoising_steps=[3, 7, 4, 9, 5, 2, 8][i]), [0, 0, 0, 1, 1, 4, 6][i])
                for i in range(7)]
    together = _run(core, requests)
    assert len({together[rid]["finished_pass"] for rid, *_ in requests}) >= 4
    assert core.runner.grouped_passes > 5
    assert (core.runner.early_passes > 0) == trace_decoder  # eager passes take turns on the GIL anyway
    for request in requests:
        alone = _run(core, [(*request[:3], 0)], suffix="-alone")[request[0]]
        assert together[request[0]]["tokens"] == alone["tokens"], request[0]
        assert len(together[request[0]]["soft"]) == len(alone["soft"])
        for a, b in zip(together[request[0]]["soft"], alone["soft"]):
            assert torch.equal(a, b), request[0]
    core.close()


def test_small_eager_passes_stay_in_one_group():
    """An eager group is formed only for enough work (canvas tokens x hidden^2): the bench model's passes
    (hidden 64, canvas 32) stay whole, the embedded Sudoku model's (hidden 128, canvas 82) split at
    about a dozen canvases, DiffusionGemma's (hidden 2816, canvas 256) at two."""
    assert row_groups(32, 32, 64, forward_threads=2) == 1
    assert row_groups(4, 82, 128, forward_threads=2) == 1
    assert row_groups(12, 82, 128, forward_threads=2) == 2
    assert row_groups(12, 82, 128, forward_threads=8) == 3
    assert row_groups(2, 256, 2816, forward_threads=8) == 2
    assert row_groups(16, 256, 2816, forward_threads=1) == 1


def test_rows_start_beside_the_encoder_for_an_even_share():
    """A traced pass with prompts or commits to encode starts the leading rows that do not wait for them
    in the other threads, and shares out the rows left after the encoder, so that the threads finish
    about together (a prompt of 81 tokens costs about two canvases of 82)."""
    encoder = encoder_canvases(81, 82)
    assert encoder == pytest.approx(1.99, abs=0.01) and encoder_canvases(0, 82) == 0
    # 7 rows | the encoder, then the 5 rows left
    assert rows_beside_encoder(12, 12, encoder, forward_threads=2) == 7
    assert rows_after_encoder(7, 5, encoder, forward_threads=2) == 5
    # only the first 4 rows do not wait: 4 rows and then 3 more | the encoder and then 5 rows
    assert rows_beside_encoder(12, 4, encoder, forward_threads=2) == 4
    assert rows_after_encoder(4, 8, encoder, forward_threads=2) == 5
    # three threads: 2 groups | the encoder and 3 rows
    assert rows_beside_encoder(12, 12, encoder, forward_threads=3) == 9
    assert rows_after_encoder(9, 3, encoder, forward_threads=3) == 3
    # the encoder alone outweighs the rows: all of them start early, but a row left after it stays here
    assert rows_beside_encoder(4, 4, encoder_canvases(16 * 81, 82), forward_threads=2) == 4
    assert rows_after_encoder(4, 1, encoder_canvases(16 * 81, 82), forward_threads=2) == 1
    assert rows_after_encoder(4, 0, encoder, forward_threads=2) == 0
    assert rows_beside_encoder(12, 0, encoder, forward_threads=2) == 0  # the first row waits for the encoder
    assert rows_beside_encoder(12, 12, encoder, forward_threads=1) == 0
    assert rows_beside_encoder(12, 12, 0.0, forward_threads=2) == 0


def test_the_embedded_model_splits_by_default_and_rows_equal_their_solo_runs():
    """The embedded Sudoku model's passes split by default: twelve puzzles at once run in two groups,
    and each gets its solo tokens."""
    from server.default_model import embedded_model_dir
    from tools.sudoku.common import eval_set

    settings = EngineSettings(model=str(embedded_model_dir()), max_num_seqs=12, forward_threads=2)
    core = EngineCore(load_model(settings), settings)
    tok = core.loaded.tokenizer
    puzzles = [p for bucket in eval_set(3).values() for p, _ in bucket][:12]
    requests = [(f"s{i}", tok(p).input_ids, SamplingParams(max_tokens=82, seed=i), 0) for i, p in enumerate(puzzles)]
    together = _run(core, requests)
    assert core.runner.grouped_passes > 5
    for request in requests[::3]:
        assert _run(core, [request], suffix="-alone")[request[0]]["tokens"] == together[request[0]]["tokens"]
    core.close()
