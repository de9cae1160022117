"""engine.rowwise_experts against transformers' own experts, bit for bit, on one MoE layer with random weights.

The engine's contract in float32 is ``model.generate``'s bits on the checkpoint as transformers loads it,
whose experts run ``grouped_mm_experts_forward``; in bfloat16 and float64 the reference is the ``eager`` loop.
Top-k above 2 tells the order of a token's sum apart (float addition of three or more terms depends on it).
"""

from __future__ import annotations

import pytest
import torch

from engine.rowwise_experts import rowwise_experts_forward

NUM_EXPERTS = 16


def _experts(top_k: int, dtype: torch.dtype, hidden: int = 32, intermediate: int = 24):
    """One DiffusionGemma experts module with random weights, in ``dtype``."""
    from transformers.models.diffusion_gemma.configuration_diffusion_gemma import DiffusionGemmaTextConfig
    from transformers.models.diffusion_gemma.modeling_diffusion_gemma import DiffusionGemmaTextExperts

    config = DiffusionGemmaTextConfig(hidden_size=hidden, moe_intermediate_size=intermediate,
                                      num_experts=NUM_EXPERTS, top_k_experts=top_k)
    experts = DiffusionGemmaTextExperts(config)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in experts.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return experts.to(dtype).eval()


def _routing(tokens: int, top_k: int, dtype: torch.dtype, hidden: int = 32, seed: int = 1):
    """Random hidden states [T, H], each token's top_k distinct experts [T, k] and softmax weights [T, k]."""
    g = torch.Generator().manual_seed(seed)
    hidden_states = torch.randn(tokens, hidden, generator=g).to(dtype)
    index = torch.stack([torch.randperm(NUM_EXPERTS, generator=g)[:top_k] for _ in range(tokens)])
    weights = torch.softmax(torch.randn(tokens, top_k, generator=g), -1).to(dtype)
    return hidden_states, index, weights


@pytest.mark.parametrize("top_k", [2, 4, 8])
def test_large_groups_give_grouped_mm_bits_in_float32(top_k):
    """Every expert group has at least 16 tokens (the same matrix kernel on both sides): only the order of
    a token's sum can differ, and it must be grouped_mm's (top-k order), not the experts' order."""
    from transformers.integrations.moe import grouped_mm_experts_forward

    experts = _experts(top_k, torch.float32)
    hidden_states, index, weights = _routing(256, top_k, torch.float32)
    assert int(torch.bincount(index.flatten(), minlength=NUM_EXPERTS).min()) >= 16
    with torch.inference_mode():
        expected = grouped_mm_experts_forward(experts, hidden_states, index, weights)
        got = rowwise_experts_forward(experts, hidden_states, index, weights)
    assert got.dtype == expected.dtype
    differing = int((got != expected).any(-1).sum())
    assert differing == 0, f"{differing} of {len(got)} tokens differ from grouped_mm"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_large_groups_give_eager_bits_in_bfloat16_and_float64(dtype):
    """bfloat16 and float64 compare with transformers' eager loop, which adds a token's experts in expert order."""
    experts = _experts(4, dtype)
    hidden_states, index, weights = _routing(256, 4, dtype)
    assert int(torch.bincount(index.flatten(), minlength=NUM_EXPERTS).min()) >= 16
    with torch.inference_mode():
        # the class's own loop, under transformers' dispatch (use_experts_implementation wraps it)
        expected = type(experts).forward.__wrapped__(experts, hidden_states, index, weights)
        got = rowwise_experts_forward(experts, hidden_states, index, weights)
    assert torch.equal(got, expected)


def test_a_trace_replays_for_other_routings():
    """A trace of the experts (as ``engine.traced_decoder`` records the decoder) traced where an expert has a
    single token and replayed on other token counts and routings gives the eager call's bits."""
    import warnings

    experts = _experts(4, torch.float32)

    class Layer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.experts = experts

        def forward(self, hidden_states, index, weights):
            return rowwise_experts_forward(self.experts, hidden_states, index, weights)

    hidden_states, index, weights = _routing(5, 4, torch.float32)
    assert int(torch.bincount(index.flatten(), minlength=NUM_EXPERTS).min()) <= 1
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("error", torch.jit.TracerWarning)  # no size may be frozen into the trace
        trace = torch.jit.trace(Layer(), (hidden_states, index, weights), check_trace=False)
        for tokens, seed in ((1, 2), (3, 3), (16, 4), (64, 5)):
            hidden_states, index, weights = _routing(tokens, 4, torch.float32, seed=seed)
            assert torch.equal(trace(hidden_states, index, weights),
                               rowwise_experts_forward(experts, hidden_states, index, weights)), tokens


def test_requests_sharing_a_call_get_their_solo_grouped_mm_bits():
    """Canvases of 16 tokens sharing a call (``request_rows``), where an expert often has 1-3 tokens of a
    canvas: each canvas's output is bitwise its output alone, and grouped_mm's (which runs such a group on
    exactly its rows); likewise left-padded rows whose padding tokens belong to no request."""
    from transformers.integrations.moe import grouped_mm_experts_forward

    from engine.rowwise_experts import request_rows

    experts = _experts(4, torch.float32)
    canvas, small = 16, 0
    with torch.inference_mode():
        for trial, batch in enumerate((2, 3, 5, 8)):
            hidden_states, index, weights = _routing(batch * canvas, 4, torch.float32, seed=10 + trial)
            with request_rows(canvas):
                together = rowwise_experts_forward(experts, hidden_states, index, weights)
            # the same rows as an encoder batch: request b's tokens after 3 * b padding tokens of no request
            owners = torch.arange(batch).repeat_interleave(canvas)
            owners[torch.arange(batch * canvas) % canvas < 3 * torch.arange(batch).repeat_interleave(canvas)] = -1
            with request_rows(owners):
                padded = rowwise_experts_forward(experts, hidden_states, index, weights)
            for b in range(batch):
                rows = slice(b * canvas, (b + 1) * canvas)
                counts = torch.bincount(index[rows].flatten(), minlength=NUM_EXPERTS)
                small += int(((counts > 0) & (counts < 4)).any())
                alone = rowwise_experts_forward(experts, hidden_states[rows], index[rows], weights[rows])
                expected = grouped_mm_experts_forward(experts, hidden_states[rows], index[rows], weights[rows])
                assert torch.equal(alone, expected), (batch, b)
                assert torch.equal(together[rows], expected), (batch, b)
                real = slice(b * canvas + 3 * b, (b + 1) * canvas)
                expected = grouped_mm_experts_forward(experts, hidden_states[real], index[real], weights[real])
                assert torch.equal(padded[real], expected), (batch, b)
    assert small > 0  # the case this test is about did occur


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_premise_a_linear_rows_bits_do_not_depend_on_the_row_count_from_four_up(dtype):
    """What batch invariance on CPU rests on (``ALONE_BELOW``, ``MIN_ROWS``): on this machine's matrix
    kernels a linear layer's rows come out bitwise the same for any number of rows from ``ALONE_BELOW`` up,
    for the shapes of the tiny models, the embedded model and DiffusionGemma's experts."""
    from engine.rowwise_experts import ALONE_BELOW

    g = torch.Generator().manual_seed(0)
    for inputs, outputs in ((32, 48), (128, 256), (704, 2816), (2816, 1408)):
        weight = torch.randn(outputs, inputs, generator=g).to(dtype)
        x = torch.randn(64, inputs, generator=g).to(dtype)
        full = torch.nn.functional.linear(x, weight)
        for n in (ALONE_BELOW, 5, 7, 16, 33):
            assert torch.equal(torch.nn.functional.linear(x[:n], weight), full[:n]), (inputs, outputs, n)
