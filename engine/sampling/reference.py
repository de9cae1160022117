"""The reference sampler: DiffusionGemma's entropy-bounded step as transformers computes it.

Mirrors transformers' ``EntropyBoundSampler``, ``LinearTemperatureScheduleLogitsProcessor`` and
``StableAndConfidentStoppingCriteria`` op for op, so that a request with seed s draws exactly what
``model.generate`` draws at batch 1 after ``torch.manual_seed(s)``. Each row has its own
``torch.Generator``; its draws are taken ahead of the logits (``draws.py``) and never depend on the
other rows of the tile.

Memory: the lm head and the sampler walk a decoder batch in tiles of rows (``SamplingTiles``), a
row in chunks of positions when a whole row does not fit the budget.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from ..cpu_threads import usable_cpus
from ..pass_stages import LM_HEAD, clock, stage
from ..rowwise_experts import ALONE_BELOW
from ..work import DecodeWork
from . import SampleResult
from .constraints import BiasRows, Pins, acceptance_entropy, add_bias, pins
from .draws import DrawPrefetcher
from .logprobs import asking, concat, rows_from_probs, top_count
from .schedule import row_parameters

# fp32 [rows, positions, vocab] copies the sampler keeps alive for one chunk of positions: the lm
# head's output before the cast and soft-capping, the (scaled in place) logits, the probabilities,
# and the entropy's normalised logits and p*log(p).
CHUNK_FP32_COPIES = 5


@dataclass(frozen=True)
class SamplingTiles:
    """How the lm head and the sampler walk a decoder batch: tiles of ``rows`` canvases, each in
    chunks of ``positions`` canvas positions (all of them unless one row alone exceeds the budget; a
    remainder of 1-3 positions joins the last chunk, ``chunks``).
    Each row's exponential draws are whole [canvas, vocab] tensors (the reference draws them in one
    call), ``draws_in_flight`` tiles at a time (2 on CPU, where the next tile is drawn ahead)."""

    rows: int
    positions: int
    draws_in_flight: int

    def chunks(self, canvas_length: int) -> list[slice]:
        """The position chunks of a canvas: ``positions`` each, a last remainder of fewer than
        ``ALONE_BELOW`` positions joined to the chunk before it, so that the lm head and the
        self-conditioning product never run on 1-3 rows (another matrix kernel than generate's
        whole-canvas call, whose rows' bits hold from ``ALONE_BELOW`` rows up)."""
        starts = list(range(0, canvas_length, self.positions))
        if len(starts) > 1 and canvas_length - starts[-1] < ALONE_BELOW:
            starts.pop()
        return [slice(a, b) for a, b in zip(starts, starts[1:] + [canvas_length])]

    def transient_bytes(self, canvas_length: int, vocab_size: int) -> int:
        largest = max(c.stop - c.start for c in self.chunks(canvas_length))
        return 4 * vocab_size * self.rows * (self.draws_in_flight * canvas_length + CHUNK_FP32_COPIES * largest)


def sampling_tiles(budget_bytes: int, canvas_length: int, vocab_size: int, draws_in_flight: int) -> SamplingTiles:
    """The largest tiles whose fp32 transient stays within ``budget_bytes`` (at least ``ALONE_BELOW``
    positions of one row, or the whole canvas if shorter, plus that row's draws)."""
    per_row = SamplingTiles(1, canvas_length, draws_in_flight).transient_bytes(canvas_length, vocab_size)
    if budget_bytes >= per_row:
        return SamplingTiles(budget_bytes // per_row, canvas_length, draws_in_flight)
    spare = budget_bytes - 4 * vocab_size * draws_in_flight * canvas_length
    fit = max(ALONE_BELOW, spare // (4 * vocab_size * CHUNK_FP32_COPIES))
    positions = min(canvas_length, fit)
    # a remainder joined to the last chunk must still fit
    while positions > ALONE_BELOW and max(c.stop - c.start for c in
                                          SamplingTiles(1, positions, 1).chunks(canvas_length)) > fit:
        positions -= 1
    return SamplingTiles(1, positions, draws_in_flight)


@dataclass
class PositionsDraw:
    """The draw and the draft for a chunk of positions of a tile's rows."""

    sampled: torch.Tensor  # [n, c] the multinomial draw
    argmax: torch.Tensor  # [n, c] draft: argmax of the scaled logits
    probs: torch.Tensor  # [n, c, V] fp32 softmax of the scaled logits (== the self-conditioning softmax in fp32)


@dataclass
class AcceptResult:
    next_canvas: torch.Tensor  # [n, C] the renoised canvas fed to the next step
    confident: torch.Tensor  # [n] bool: mean entropy below the threshold
    usable: torch.Tensor  # [n] bool: no NaN or +inf logit in the row (its entropies are finite); -inf is allowed


def draw_positions(scaled: torch.Tensor, exponentials: torch.Tensor) -> PositionsDraw:
    """The multinomial draw and the draft from [n, c, V] scaled logits; ``exponentials`` are these
    positions' Exp(1) draws (``draws.py``), overwritten. Only reads ``scaled``."""
    probs = torch.softmax(scaled, dim=-1, dtype=torch.float32)
    # torch.multinomial(probs[i], 1, generator=g) is argmax(probs[i] / q) with q ~ Exp(1) from g;
    # q was drawn ahead (draws.py), so this is the reference's draw, position for position.
    # torch.max(dim).indices is argmax (the first maximal index; NaN counts as maximal) in less time
    # on CPU, where this inner-dimension reduction is not vectorized
    sampled = torch.max(torch.div(probs, exponentials, out=exponentials), dim=-1).indices
    argmax = torch.max(scaled, dim=-1).indices
    return PositionsDraw(sampled=sampled, argmax=argmax, probs=probs)


def positions_entropy(scaled: torch.Tensor) -> torch.Tensor:
    """[n, c]: ``Categorical(logits=scaled).entropy()`` op for op, without the distribution object's
    overhead. Only reads ``scaled`` (so it may run beside ``draw_positions``)."""
    normalized = scaled - scaled.logsumexp(dim=-1, keepdim=True)
    p_log_p = torch.softmax(normalized, dim=-1)
    p_log_p.mul_(normalized.clamp_(min=torch.finfo(normalized.dtype).min))
    del normalized
    return -p_log_p.sum(-1)


def accept(entropy: torch.Tensor, sampled: torch.Tensor, noise: torch.Tensor, bound: torch.Tensor,
           threshold: torch.Tensor, pinned: Pins | None = None, stable: bool = False) -> AcceptResult:
    """The entropy-bounded acceptance over whole canvases ([n, C] each) and the renoise, for both
    samplers: ``bound`` [n, 1] entropy bounds, ``threshold`` [n] confidence thresholds (fp32, as
    ``row_parameters``); ``pinned`` positions keep their tokens (``constraints``); ``stable`` orders
    equal entropies by position (the fast sampler; the reference sorts as transformers does)."""
    usable = torch.isfinite(entropy.mean(dim=-1))
    entropy, mean_entropy = acceptance_entropy(entropy, pinned)
    sorted_entropy, order = torch.sort(entropy, dim=-1, stable=stable)
    cumulative = torch.cumsum(sorted_entropy, dim=-1)
    # Accept the k lowest-entropy positions whose entropy sum minus the largest stays within the bound.
    sorted_accept = cumulative - sorted_entropy <= bound
    accepted = torch.scatter(torch.zeros_like(sorted_accept), dim=-1, index=order, src=sorted_accept)
    # every position is re-decided each step: accepted positions take the sample, the rest fresh noise
    next_canvas = torch.where(accepted, sampled, noise)
    if pinned is not None:
        next_canvas = pinned.apply(next_canvas)
    # A NaN or +inf logit makes its position's entropy NaN, hence the row mean: such a row's outputs are
    # garbage (the reference's multinomial would raise) and the caller fails it; rows never mix.
    return AcceptResult(next_canvas=next_canvas, confident=mean_entropy < threshold, usable=usable)


class ReferenceSampler:
    """transformers' sampler, tiled (see the module docstring). ``threaded`` (CPU): a worker thread
    draws the next tile's random numbers while this one is sampled, and with one intra-op thread and
    a second core also computes each chunk's entropies beside the draw."""

    name = "reference"

    def __init__(self, model, device: torch.device, *, tile_bytes: int, threaded: bool):
        self.device = device
        text = model.config.text_config
        self.canvas_length = model.config.canvas_length
        self.vocab_size = text.vocab_size
        self.softcap = text.final_logit_softcapping
        self.lm_head = model.lm_head
        self.embed = model.model.decoder.embed_tokens
        self.tiles = sampling_tiles(tile_bytes, self.canvas_length, self.vocab_size,
                                    draws_in_flight=2 if threaded else 1)
        self._position_chunks = self.tiles.chunks(self.canvas_length)
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="engine-worker") if threaded else None
        self.draws = DrawPrefetcher(self.canvas_length, self.vocab_size, device, self._worker)
        # With more intra-op threads both threads' parallel kernels would oversubscribe the cores; with
        # one core they would only take turns. (bench.profile_engine --compare-sequential turns it off
        # in every other pass: a same-run baseline.)
        self.overlap_entropy = threaded and torch.get_num_threads() == 1 and usable_cpus() > 1
        self._generators: dict[str, torch.Generator] = {}
        self.biases = BiasRows(self.vocab_size, device)
        self._tiles: list[slice] = []
        self.sampling_seconds = 0.0  # the sampler's own math and draws in the last ``sample`` (not the lm head)

    # -- per-request random state ------------------------------------------------------------------
    def add(self, request_id: str, seed: int) -> None:
        gen = torch.Generator(device=self.device)
        gen.manual_seed(seed)
        self._generators[request_id] = gen

    def free(self, request_id: str) -> None:
        self._generators.pop(request_id, None)
        self.biases.free(request_id)

    def num_live_states(self) -> int:
        return len(self._generators)

    def initial_canvas(self, row: DecodeWork) -> torch.Tensor:
        # the same draw as EntropyBoundSampler.initialize_canvas at batch 1
        C = self.canvas_length
        return torch.randint(0, self.vocab_size, (1, C), device=self.device,
                             generator=self._generators[row.request_id]).view(C)

    def transient_bytes(self, rows: int) -> int:
        tiles = SamplingTiles(min(self.tiles.rows, rows), self.tiles.positions, self.tiles.draws_in_flight)
        return tiles.transient_bytes(self.canvas_length, self.vocab_size)

    # -- one pass ----------------------------------------------------------------------------------
    def begin(self, rows: list[DecodeWork]) -> None:
        n = self.tiles.rows
        self._tiles = [slice(start, start + n) for start in range(0, len(rows), n)]
        generators = [self._generators[r.request_id] for r in rows]
        self.draws.start([generators[tile] for tile in self._tiles])

    def sample(self, hidden: torch.Tensor, rows: list[DecodeWork]) -> SampleResult:
        self.sampling_seconds = 0.0
        k = top_count(rows)  # the largest k any row asks for: only the asking rows compute it
        outputs = []  # per tile: (argmax [n, C], soft [n, C, hidden], AcceptResult, logprobs)
        for index, tile in enumerate(self._tiles):
            draws = self.draws.take(index)
            params = row_parameters(rows[tile], self.device)
            temps = params[:, 0].view(-1, 1, 1)
            bias = self.biases.matrix(rows[tile])
            wanted = asking(rows[tile])
            counts = [rows[tile][i].logprobs for i in wanted]  # each asking row's own number of alternatives
            parts = [self._sample_chunk(hidden[tile, chunk], temps, draws.exponentials[:, chunk], bias, k, wanted,
                                        counts, next_tile=index + 1 if chunk is self._position_chunks[-1] else None)
                     for chunk in self._position_chunks]
            t0 = clock()
            # over the whole canvas: argmax [n, C], sampled [n, C], entropy [n, C], soft embeddings [n, C, hidden]
            argmax, sampled, entropy, soft = parts[0][:4] if len(parts) == 1 else (
                torch.cat([p[i] for p in parts], dim=1) for i in range(4))
            pinned = pins(rows[tile], self.canvas_length, self.device)
            if pinned is not None:
                argmax = pinned.apply(argmax)
            outputs.append((argmax, soft, accept(entropy, sampled, draws.noise, params[:, 1:2], params[:, 2], pinned),
                            concat([p[4] for p in parts], dim=1)))
            self.sampling_seconds += clock() - t0
        return SampleResult(
            draft=torch.cat([a for a, _, _, _ in outputs]),
            next_canvas=torch.cat([o.next_canvas for _, _, o, _ in outputs]),
            confident=torch.cat([o.confident for _, _, o, _ in outputs]),
            usable=torch.cat([o.usable for _, _, o, _ in outputs]),
            soft=torch.cat([s for _, s, _, _ in outputs]),
            logprobs=concat([lp for _, _, _, lp in outputs], dim=0),
        )

    def end(self) -> None:
        self.draws.wait()

    def close(self) -> None:
        self.draws.wait()
        if self._worker is not None:
            self._worker.shutdown(wait=True)

    def _sample_chunk(self, hidden: torch.Tensor, temps: torch.Tensor, exponentials: torch.Tensor,
                      bias: torch.Tensor | None, k: int | None, wanted: list[int], counts: list[int],
                      next_tile: int | None):
        """lm head, soft-capping, the rows' ``bias`` ([n, V] or None) and the per-position sampler over a
        chunk of positions of a tile's rows; returns (argmax, sampled, entropy [n, c], soft embeddings
        [n, c, hidden], log-probabilities of the ``wanted`` rows, each with its own ``counts`` alternatives
        padded to ``k``, or None). The [n, c, V] copies
        are freed before the next chunk. On CPU the entropies are computed on the worker thread while
        this one draws (both only read the scaled logits); ``next_tile``'s draws are queued behind them
        (given with the tile's last chunk, so that no chunk's entropies wait behind a whole tile's draws)."""
        with stage(LM_HEAD):
            logits = self.lm_head(hidden).to(torch.float32)
        if self.softcap is not None:
            logits = logits.div_(self.softcap).tanh_().mul_(self.softcap)  # == tanh(x / cap) * cap
        add_bias(logits.view(-1, self.vocab_size), bias)
        t1 = clock()
        scaled = logits.div_(temps)
        overlap = self.overlap_entropy and self._worker is not None
        entropy = self._worker.submit(positions_entropy, scaled) if overlap else None
        if next_tile is not None:
            self.draws.prefetch(next_tile)
        drawn = draw_positions(scaled, exponentials)
        entropy = entropy.result() if entropy is not None else positions_entropy(scaled)
        logprobs = None if k is None else rows_from_probs(wanted, counts, drawn.probs, scaled, drawn.argmax, k)
        self.sampling_seconds += clock() - t1
        # Self-conditioning input of the next step, softmax(scaled logits) @ E * embed_scale, [n, c, hidden]
        # (not [n, c, V] logits); transformers computes the same product inside the decoder's forward.
        weight = self.embed.weight
        if weight.dtype in (torch.float32, torch.float64):
            probs = drawn.probs  # the same fp32 softmax of the same scaled logits (the cast is lossless)
        else:
            probs = scaled.to(weight.dtype).softmax(dim=-1, dtype=torch.float32)
        soft = torch.matmul(probs.to(weight.dtype), weight) * self.embed.embed_scale.to(weight.dtype)
        return drawn.argmax, drawn.sampled, entropy, soft, logprobs
