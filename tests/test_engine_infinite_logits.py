"""Infinite logits: with soft-capping (every DiffusionGemma checkpoint) a raw +inf or -inf from the lm
head is capped and the request gets generate's tokens; without it, a +inf logit fails its row alone
(``finish_reason`` "error") and a -inf logit is fine.

The checkpoint is a real float32 tiny model changed by hand so that the lm head overflows exactly where
a canvas holds one of two marker tokens: the decoder's embedding of ``PLUS`` (``MINUS``) is a large
positive (negative) value in one hidden dimension ``DIM``, and nothing else ever writes to ``DIM`` (every
other token's embedding, the self-conditioning's output and every decoder layer's post-norms are zero
there). The lm head row of ``TARGET`` reads only ``DIM``, scaled by 3e38: its logit is exactly 0 at every
position, +inf where the canvas holds ``PLUS`` and -inf where it holds ``MINUS``. Canvases are random
noise, so which markers a request meets depends on its seed; a forward hook on the lm head (a
transformers module the engine calls) records which infinities each request met.
"""

from __future__ import annotations

import torch

from engine import EngineCore, EngineSettings, SamplingParams
from engine.loader import load_model
from tests.engine_helpers import reference_model, reference_tokens, run_to_completion, save_untied, untie_weights
from tools.tiny_checkpoint import TinySpec, build_tiny_checkpoint

PLUS, MINUS, TARGET, DIM = 100, 101, 102, 3
SEEDS = range(12)
PROMPT = [2] + [5 + b for b in b"hello world"]  # <bos> and the byte tokens (id = byte + 5)
PARAMS = SamplingParams(max_tokens=32)  # two canvases of the checkpoint's 8 steps


def build_infinite_logit_checkpoint(path, softcap: float | None):
    from transformers import DiffusionGemmaForBlockDiffusion

    build_tiny_checkpoint(path, TinySpec())
    model = DiffusionGemmaForBlockDiffusion.from_pretrained(path, dtype=torch.float32)
    untie_weights(model)
    decoder = model.model.decoder
    with torch.no_grad():
        embed = decoder.embed_tokens.weight
        embed[:, DIM] = 0
        embed[PLUS] = 0
        embed[PLUS, DIM] = 1e3
        embed[MINUS] = 0
        embed[MINUS, DIM] = -1e3
        head = model.lm_head.weight
        head[TARGET] = 0
        head[TARGET, DIM] = 3e38
        decoder.self_conditioning.down_proj.weight[DIM] = 0
        for layer in decoder.layers:
            layer.post_attention_layernorm.weight[DIM] = 0
            layer.post_feedforward_layernorm.weight[DIM] = 0
    model.config.text_config.final_logit_softcapping = softcap
    save_untied(model, path, torch.float32)
    return path


def make_float32_core(path, **overrides) -> EngineCore:
    settings = EngineSettings(model=str(path), dtype="float32", max_num_seqs=len(SEEDS), **overrides)
    return EngineCore(load_model(settings), settings)


class InfinityWatch:
    """Which infinities the lm head produced since ``reset`` (a forward hook: observation only)."""

    def __init__(self, model):
        self.seen: set[str] = set()
        self.finite_target_logits: set[float] = set()  # TARGET's logit where it is finite: only 0
        model.lm_head.register_forward_hook(self._hook)

    def _hook(self, module, args, out):
        if bool((out == float("inf")).any()):
            self.seen.add("+inf")
        if bool((out == float("-inf")).any()):
            self.seen.add("-inf")
        target = out[..., TARGET]
        self.finite_target_logits.update(target[torch.isfinite(target)].unique().tolist())

    def solo(self, core, seed: int) -> tuple[dict, set[str]]:
        self.seen = set()
        result = run_to_completion(core, [(f"s{seed}", PROMPT, SamplingParams(**{**PARAMS.__dict__, "seed": seed}))])
        return result[f"s{seed}"], set(self.seen)


def together(core):
    return run_to_completion(core, [(f"s{seed}", PROMPT, SamplingParams(**{**PARAMS.__dict__, "seed": seed}))
                                    for seed in SEEDS])


def test_soft_capping_turns_infinite_raw_logits_into_generates_tokens(tmp_path):
    core = make_float32_core(build_infinite_logit_checkpoint(tmp_path / "capped", softcap=30.0))
    watch = InfinityWatch(core.loaded.model)
    met = {}
    for seed in SEEDS:
        res, met[seed] = watch.solo(core, seed)
        expected = reference_tokens(reference_model(core), PROMPT, seed, core.resolve(PROMPT, PARAMS))
        assert (res["finish_reason"], res["tokens"]) == ("stop" if len(expected) < 32 else "length", expected), seed
    assert any("+inf" in m for m in met.values()) and any(m == {"-inf"} for m in met.values()), met
    assert watch.finite_target_logits == {0.0}  # the infinities came only from the markers
    batch = together(core)
    for seed in SEEDS:
        assert batch[f"s{seed}"]["tokens"] == reference_tokens(reference_model(core), PROMPT, seed,
                                                              core.resolve(PROMPT, PARAMS))
    assert core.num_live_states() == 0


def test_without_soft_capping_plus_inf_fails_its_row_alone_and_minus_inf_is_fine(tmp_path):
    """transformers' forward cannot run without soft-capping (it divides by the cap), so the oracle for
    the rows that go on is generate with a cap of 2**100: x / 2**100 and back is exact, tanh(y) == y
    for |y| < 1e-28, and -inf capped to -2**100 has the same zero probability and entropy term."""
    from transformers import DiffusionGemmaForBlockDiffusion

    path = build_infinite_logit_checkpoint(tmp_path / "uncapped", softcap=None)
    core = make_float32_core(path)
    oracle = DiffusionGemmaForBlockDiffusion.from_pretrained(path, dtype=torch.float32)
    oracle.final_logit_softcapping = 2.0**100
    watch = InfinityWatch(core.loaded.model)
    met, outcome = {}, {}
    for seed in SEEDS:
        res, met[seed] = watch.solo(core, seed)
        outcome[seed] = (res["finish_reason"], res["tokens"])
        if "+inf" in met[seed]:
            assert res["finish_reason"] == "error", seed
            assert res["outputs"][-1].error == "the model produced non-finite logits"
        else:
            expected = reference_tokens(oracle, PROMPT, seed, core.resolve(PROMPT, PARAMS))
            assert res["finish_reason"] in ("stop", "length") and res["tokens"] == expected, seed
    assert any("+inf" in m for m in met.values()), met
    assert any(m == {"-inf"} for m in met.values()), met  # a row that met only -inf, and went on
    assert watch.finite_target_logits == {0.0}
    # all twelve in one batch: each row ends as it does alone, the failing ones fail alone
    batch = together(core)
    assert {seed: (batch[f"s{seed}"]["finish_reason"], batch[f"s{seed}"]["tokens"]) for seed in SEEDS} == outcome
    assert core.num_live_states() == 0
