"""The fast sampler: DiffusionGemma's step in one pass over vocabulary chunks, with no [rows, canvas,
vocab] tensor ever whole, and every random number a pure function of the row's key (``counter_rng``).

Per canvas position, with soft-capped logits z and the step's temperature T (the reference's
schedule), s = z / T:

- draft: argmax s (the first index on ties); sample: Gumbel-max, argmax (s + g);
- entropy H = log S - B / S, where S = sum exp(s - m), B = sum exp(s - m) (s - m), m = max s;
- soft embedding: sum_v softmax(s)_v E_v * embed_scale (attention over the vocabulary, with the tied
  embedding as keys and values), accumulated with online rescaling;
- acceptance, renoising and confidence by the reference's ``reference.accept``, with ties of equal
  entropy broken by position (a stable sort).

The statistics are reduced over fixed blocks of ``block`` tokens (aligned to the vocabulary) and then
combined in a fixed binary tree over the blocks, so max, S and B, hence the entropies and the
accepted tokens, are bitwise the same whatever the chunk size; the draft and the sample (maxima)
are exact anyway. ``block_stats`` is the part a Triton kernel replaces on CUDA (``triton_stats``);
this file is its specification.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..pass_stages import LM_HEAD, clock, stage
from ..work import DecodeWork
from . import SampleResult
from .constraints import BiasRows, add_bias, pins
from .counter_rng import GUMBEL, INITIAL_CANVAS, RENOISE, gumbel, step_key, uniform_tokens, values
from .logprobs import LogprobTensors, asking, by_count, concat, fit, spread, top_count
from .reference import accept
from .schedule import step_temperature

BLOCK_MAX = 1024  # tokens per statistics block (smaller vocabularies: the next power of two)
# tokens per lm-head chunk by default (a power-of-two number of blocks): the PyTorch statistics keep
# many [rows, canvas, chunk] temporaries, the Triton kernel two
VOCAB_CHUNK = {"torch": 2048, "triton": 16384}
# the peak per canvas position and chunk token, in float32 copies of a chunk (bench.sampler_memory
# measures it): the PyTorch statistics' temporaries (logits, int64 counters and their mix, the noise's
# terms, exponentials), about 11 alive at once, and what glibc's allocator keeps of the freed ones,
# which varies from run to run; for the kernel, its input, exponentials and product weights by count
# and the scaled chunk a log-probabilities pass keeps (not yet measured on a GPU)
CHUNK_FP32_COPIES = {"torch": 36, "triton": 4}

_FMIN = torch.finfo(torch.float32).min


def block_width(vocab_size: int) -> int:
    """The statistics block for a vocabulary: ``BLOCK_MAX`` or the next power of two below it."""
    return min(BLOCK_MAX, 1 << (vocab_size - 1).bit_length())


def chunk_width(vocab_size: int, requested: int, block: int) -> int:
    """Tokens per chunk: a power-of-two number of blocks, at least one block, no wider than needed."""
    if block <= 0 or block & (block - 1):
        raise ValueError(f"the statistics block must be a power of two (got {block})")
    blocks = max(1, min(requested, 1 << (vocab_size - 1).bit_length()) // block)
    return block << (blocks.bit_length() - 1)


@dataclass
class Partial:
    """Statistics of a span of the vocabulary, per (row position, span): [N, k] each."""

    m: torch.Tensor  # max of s (-inf for an empty span)
    S: torch.Tensor  # sum of exp(s - m)
    B: torch.Tensor  # sum of exp(s - m) * (s - m)
    argmax_value: torch.Tensor  # max of s ...
    argmax_index: torch.Tensor  # ... and its first token id
    gumbel_value: torch.Tensor  # max of s + g ...
    gumbel_index: torch.Tensor  # ... and its first token id

    def pick(self, index) -> "Partial":
        return Partial(*(t[:, index] for t in self.fields()))

    def fields(self) -> tuple[torch.Tensor, ...]:
        return (self.m, self.S, self.B, self.argmax_value, self.argmax_index, self.gumbel_value, self.gumbel_index)


def combine(a: Partial, b: Partial) -> Partial:
    """The statistics of span ``a`` followed by span ``b`` (elementwise, exact for an empty span)."""
    m = torch.maximum(a.m, b.m)  # NaN propagates: such a row ends unusable
    m_ref = torch.where(m == float("-inf"), 0.0, m)
    da = (a.m - m_ref).clamp(min=_FMIN)
    db = (b.m - m_ref).clamp(min=_FMIN)
    ea, eb = da.exp(), db.exp()
    take_arg = b.argmax_value > a.argmax_value  # strictly: the first index wins ties
    take_gumbel = b.gumbel_value > a.gumbel_value
    return Partial(
        m=m,
        S=ea * a.S + eb * b.S,
        B=ea * (a.B + da * a.S) + eb * (b.B + db * b.S),
        argmax_value=torch.where(take_arg, b.argmax_value, a.argmax_value),
        argmax_index=torch.where(take_arg, b.argmax_index, a.argmax_index),
        gumbel_value=torch.where(take_gumbel, b.gumbel_value, a.gumbel_value),
        gumbel_index=torch.where(take_gumbel, b.gumbel_index, a.gumbel_index),
    )


def tree_reduce(blocks: Partial) -> Partial:
    """[N, 2**k] block statistics -> [N, 1], combining neighbours level by level."""
    while blocks.m.shape[1] > 1:
        blocks = combine(blocks.pick(slice(0, None, 2)), blocks.pick(slice(1, None, 2)))
    return blocks


def scale_chunk(out: torch.Tensor, z: torch.Tensor, temps: torch.Tensor, softcap: float | None,
                bias: torch.Tensor | None, v0: int) -> torch.Tensor:
    """out [N, w] fp32 = (softcap(z) + bias) / T for a chunk of tokens v0 .. v0+w (``constraints``)."""
    out.copy_(z)
    if softcap is not None:
        out.div_(softcap).tanh_().mul_(softcap)  # == tanh(x / cap) * cap
    return add_bias(out, bias, v0).div_(temps)


def block_stats(z: torch.Tensor, temps: torch.Tensor, keys: torch.Tensor, counter0: torch.Tensor, v0: int,
                vocab_size: int, num_blocks: int, block: int, softcap: float | None,
                bias: torch.Tensor | None = None) -> tuple[Partial, torch.Tensor]:
    """Statistics of each block of one chunk, and the block-relative exponentials.

    z: [N, w] lm-head output for tokens v0 .. v0+w (w <= num_blocks * block; tokens past the
    vocabulary are padding) of n rows' N = n * C positions; temps: [N, 1] fp32; keys: [N, 2] int64
    Gumbel keys of each row's step; counter0: [N, 1] int64, the position's counter base (position *
    vocab); bias: [n, vocab] fp32 logit bias of each row, or None.
    Returns (Partial [N, num_blocks], e [N, num_blocks * block] fp32 = exp(s - m_block), 0 on padding).
    """
    N, w = z.shape
    width = num_blocks * block
    s = torch.empty((N, width), dtype=torch.float32, device=z.device)
    s[:, w:] = float("-inf")
    scale_chunk(s[:, :w], z, temps, softcap, bias, v0)
    tokens = torch.arange(v0, v0 + width, dtype=torch.int64, device=z.device)
    y = gumbel(values(counter0 + tokens, keys)).add_(s)  # s + g; -inf on padding
    s3 = s.view(N, num_blocks, block)
    offsets = tokens.view(num_blocks, block)[:, 0]
    argmax_value, argmax_index = s3.max(dim=-1)
    gumbel_value, gumbel_index = y.view(N, num_blocks, block).max(dim=-1)
    del y
    m = argmax_value
    d = s3.sub_(torch.where(m == float("-inf"), 0.0, m)[..., None])  # s - m, in place
    e = d.exp()
    S = e.sum(dim=-1)
    B = d.clamp_(min=_FMIN).mul_(e).sum(dim=-1)
    partial = Partial(m, S, B, argmax_value, argmax_index + offsets, gumbel_value, gumbel_index + offsets)
    return partial, e.view(N, width)


def row_keys(seeds: list[int], rows: list[DecodeWork], purpose: int, device) -> torch.Tensor:
    """[n, 2] int64 key words of each row's current step for ``purpose``."""
    return torch.tensor([step_key(seed, r.canvas_index, r.cur_step, purpose) for seed, r in zip(seeds, rows)],
                        dtype=torch.int64, device=device)


def row_transient_bytes(canvas_length: int, hidden_size: int, chunk: int, kind: str) -> int:
    """One canvas row's memory in the fast sampler: ``CHUNK_FP32_COPIES[kind]`` float32 copies of a vocabulary
    chunk per position, and the soft embeddings' accumulator and its update."""
    return 4 * canvas_length * (CHUNK_FP32_COPIES[kind] * chunk + 2 * hidden_size)


def planned_transient_bytes(rows: int, tile_bytes: int, canvas_length: int, vocab_size: int, hidden_size: int,
                            kind: str = "triton") -> int:
    """What ``FastSampler.transient_bytes(rows)`` plans with its default chunks, from the model's shape alone
    (memory plans made without a model: ``deploy.presets``)."""
    per_row = row_transient_bytes(canvas_length, hidden_size,
                                  chunk_width(vocab_size, VOCAB_CHUNK[kind], block_width(vocab_size)), kind)
    return min(rows, max(1, tile_bytes // per_row)) * per_row


class FastSampler:
    """The fast sampler over ``model``'s lm head and tied embedding (see the module docstring).

    Rows go through in tiles of as many rows as ``tile_bytes`` allows (at least one); each tile's
    lm head runs chunk by chunk over the vocabulary."""

    name = "fast"

    def __init__(self, model, device: torch.device, *, tile_bytes: int, max_num_seqs: int,
                 vocab_chunk: int | None = None, block: int | None = None, stats=None):
        """``block`` (a power of two; default ``block_width``) fixes the reduction tree, hence the bits
        of the entropies; ``vocab_chunk`` (a power-of-two multiple of it) only sets the memory and speed.
        ``stats``: the ``block_stats`` implementation (the Triton kernel on CUDA)."""
        self.device = device
        text = model.config.text_config
        self.canvas_length = model.config.canvas_length
        self.vocab_size = text.vocab_size
        self.hidden_size = text.hidden_size
        if self.canvas_length * self.vocab_size > 2**32:
            raise ValueError("the fast sampler's counters need canvas_length * vocab_size <= 2**32")
        self.softcap = text.final_logit_softcapping
        self.lm_head = model.lm_head
        self.embed = model.model.decoder.embed_tokens
        self.block_stats = stats or block_stats
        self.kind = "torch" if self.block_stats is block_stats else "triton"
        self.block = block or block_width(self.vocab_size)
        self.chunk = chunk_width(self.vocab_size, vocab_chunk or VOCAB_CHUNK[self.kind], self.block)
        per_row = self._row_bytes()
        self.rows_per_tile = max(1, min(max_num_seqs, tile_bytes // per_row))
        self._seeds: dict[str, int] = {}
        self.biases = BiasRows(self.vocab_size, device)
        self.sampling_seconds = 0.0

    def _row_bytes(self) -> int:
        return row_transient_bytes(self.canvas_length, self.hidden_size, self.chunk, self.kind)

    # -- per-request random state ------------------------------------------------------------------
    def add(self, request_id: str, seed: int) -> None:
        self._seeds[request_id] = seed

    def free(self, request_id: str) -> None:
        self._seeds.pop(request_id, None)
        self.biases.free(request_id)

    def num_live_states(self) -> int:
        return len(self._seeds)

    def initial_canvas(self, row: DecodeWork) -> torch.Tensor:
        keys = row_keys([self._seeds[row.request_id]], [row], INITIAL_CANVAS, self.device)
        return uniform_tokens(keys, self.canvas_length, self.vocab_size)[0]

    def transient_bytes(self, rows: int) -> int:
        return min(rows, self.rows_per_tile) * self._row_bytes()

    # -- one pass ----------------------------------------------------------------------------------
    def begin(self, rows: list[DecodeWork]) -> None:
        pass  # nothing to draw ahead: the noise is computed where it is used

    def end(self) -> None:
        pass

    def close(self) -> None:
        pass

    def sample(self, hidden: torch.Tensor, rows: list[DecodeWork]) -> SampleResult:
        self.sampling_seconds = 0.0
        k = top_count(rows)  # the largest k any row asks for: only the asking rows compute it
        parts = [self.sample_tile(hidden[start:start + self.rows_per_tile], rows[start:start + self.rows_per_tile], k)
                 for start in range(0, len(rows), self.rows_per_tile)]
        return SampleResult(*(torch.cat([getattr(p, f) for p in parts]) for f in
                              ("draft", "next_canvas", "confident", "usable", "soft")),
                            logprobs=concat([p.logprobs for p in parts], dim=0))

    def sample_tile(self, hidden: torch.Tensor, rows: list[DecodeWork], k: int | None = None) -> SampleResult:
        """One step for a tile of rows: hidden [n, C, hidden]; log-probabilities with ``k`` alternatives
        for the rows that ask, unless ``k`` is None."""
        stats = self.statistics(hidden, rows, k)
        t0 = clock()
        seeds = [self._seeds[r.request_id] for r in rows]
        noise = uniform_tokens(row_keys(seeds, rows, RENOISE, self.device), self.canvas_length, self.vocab_size)
        bounds = torch.tensor([[r.entropy_bound, r.confidence_threshold] for r in rows], dtype=torch.float32,
                              device=self.device)
        pinned = pins(rows, self.canvas_length, self.device)
        accepted = accept(stats.entropy, stats.sampled, noise, bounds[:, 0:1], bounds[:, 1], pinned, stable=True)
        self.sampling_seconds += clock() - t0
        draft = stats.draft if pinned is None else pinned.apply(stats.draft)
        return SampleResult(draft=draft, next_canvas=accepted.next_canvas, confident=accepted.confident,
                            usable=accepted.usable, soft=stats.soft, logprobs=stats.logprobs)

    def statistics(self, hidden: torch.Tensor, rows: list[DecodeWork], k: int | None = None) -> "PositionStats":
        """Every position's draft, sample, entropy and soft embedding for a tile: hidden [n, C, hidden];
        and the draft's log-probabilities with ``k`` alternatives for the rows that ask, unless ``k`` is None
        (the others' are zeros)."""
        n, C, _ = hidden.shape
        V, device = self.vocab_size, self.device
        seeds = [self._seeds[r.request_id] for r in rows]
        temps = torch.tensor([step_temperature(r.t_min, r.t_max, r.cur_step, r.max_steps, str(device)) for r in rows],
                             dtype=torch.float32, device=device).repeat_interleave(C)[:, None]  # [N, 1]
        keys = row_keys(seeds, rows, GUMBEL, device).repeat_interleave(C, dim=0)  # [N, 2]
        counter0 = (torch.arange(C, dtype=torch.int64, device=device) * V).repeat(n)[:, None]  # [N, 1]
        logit_bias = self.biases.matrix(rows)  # [n, V] or None
        wanted = asking(rows) if k is not None else []
        # the asking rows' positions, scaled once per chunk, and a running top-k for each number of
        # alternatives rows ask for (a row's own k: logprobs.py); the best one gives the draft's value
        tops = [_RowsTop(group, count, C, wanted, device) for count, group in by_count(rows, wanted).items()]
        asking_at = None if len(wanted) in (0, n) else _positions(wanted, C, device)
        top_temps = temps if asking_at is None else temps[asking_at]
        top_bias = logit_bias if logit_bias is None or asking_at is None else logit_bias[wanted]
        h = hidden.reshape(n * C, -1)
        weight, head_bias = self.lm_head.weight, self.lm_head.bias
        E = self.embed.weight
        num_blocks = self.chunk // self.block
        levels = num_blocks.bit_length() - 1
        stack: list[tuple[int, Partial]] = []  # the binary tree over blocks, one chunk subtree at a time
        soft_max = torch.full((n * C,), float("-inf"), device=device)
        soft = torch.zeros((n * C, E.shape[1]), dtype=torch.float32, device=device)
        for v0 in range(0, V, self.chunk):
            v1 = min(V, v0 + self.chunk)
            with stage(LM_HEAD):
                z = torch.nn.functional.linear(h, weight[v0:v1], None if head_bias is None else head_bias[v0:v1])
            t0 = clock()
            if tops:
                picked = torch.empty(z.shape, dtype=torch.float32, device=device) if asking_at is None else \
                    z.index_select(0, asking_at).to(torch.float32)  # scaled in fp32, as every position is
                scaled = scale_chunk(picked, z if asking_at is None else picked, top_temps, self.softcap, top_bias, v0)
                for top in tops:
                    top.add(scaled, v0)
                del picked, scaled
            blocks, e = self.block_stats(z, temps, keys, counter0, v0, V, num_blocks, self.block, self.softcap,
                                         logit_bias)
            del z
            chunk = tree_reduce(blocks)
            stack.append((levels, chunk))
            while len(stack) > 1 and stack[-1][0] == stack[-2][0]:
                (level, left), (_, right) = stack.pop(-2), stack.pop()
                stack.append((level + 1, combine(left, right)))
            self.sampling_seconds += clock() - t0
            # soft embeddings: rescale the accumulator to the running max, add this chunk's weights @ E
            new_max = torch.maximum(soft_max, chunk.m[:, 0])
            ref = torch.where(new_max == float("-inf"), 0.0, new_max)
            soft.mul_((soft_max - ref).clamp(min=_FMIN).exp_()[:, None])
            scale = (blocks.m - ref[:, None]).clamp(min=_FMIN).exp_()  # [N, blocks]: block max -> running max
            weights = e.view(n * C, num_blocks, self.block).mul_(scale[..., None]).view(n * C, -1)[:, : v1 - v0]
            soft += torch.matmul(weights.to(E.dtype), E[v0:v1]).to(torch.float32)
            soft_max = new_max
            del e, weights
        t0 = clock()
        total = stack.pop()[1]
        while stack:
            total = combine(stack.pop()[1], total)
        S, B = total.S[:, 0], total.B[:, 0]
        soft = (soft / S[:, None]).mul_(self.embed.embed_scale.to(torch.float32)).to(E.dtype)
        logprobs = None
        if tops:  # log softmax(s) = s - m - log S, at the asking rows' positions
            parts = [fit(top.logprobs(total.m, S, total.argmax_index[:, 0]), k) for top in tops]
            order = [i for top in tops for i in top.rows]
            logprobs = spread(concat(parts, dim=0), order, n, C, k, device)
        elif k is not None:
            logprobs = spread(None, [], n, C, k, device)
        self.sampling_seconds += clock() - t0
        return PositionStats(
            draft=total.argmax_index[:, 0].view(n, C),
            sampled=total.gumbel_index[:, 0].view(n, C),
            entropy=(S.log() - B / S).view(n, C),
            soft=soft.view(n, C, -1),
            logprobs=logprobs,
        )


@dataclass
class PositionStats:
    """Per position of a tile of rows: [n, C] each, ``soft`` [n, C, hidden]."""

    draft: torch.Tensor
    sampled: torch.Tensor
    entropy: torch.Tensor
    soft: torch.Tensor
    logprobs: LogprobTensors | None = None


def _positions(rows: list[int], C: int, device) -> torch.Tensor:
    """The positions of ``rows`` (each of ``C`` consecutive ones) in a tile's [n * C]."""
    return (torch.tensor(rows, dtype=torch.int64, device=device)[:, None] * C
            + torch.arange(C, device=device)).view(-1)


class _RowsTop:
    """The running top-k of some rows' positions over the vocabulary chunks, with the rows' own k."""

    def __init__(self, rows: list[int], k: int, C: int, asking_rows: list[int], device):
        """``rows``: indices among a tile's rows of ``C`` positions, some of its ``asking_rows``."""
        self.rows, self.k, self.C = rows, k, C
        self.top = TopTokens(len(rows) * C, k, device)
        self.at = _positions(rows, C, device)  # among the tile's positions
        # among the asking rows' positions (None: all of them)
        self.sub = None if rows == asking_rows else _positions([asking_rows.index(i) for i in rows], C, device)

    def add(self, scaled: torch.Tensor, v0: int) -> None:
        """Merge a chunk of the asking rows' scaled logits [positions, w] (tokens v0 .. v0+w)."""
        self.top.add(scaled if self.sub is None else scaled.index_select(0, self.sub), v0)

    def logprobs(self, m: torch.Tensor, S: torch.Tensor, draft: torch.Tensor) -> LogprobTensors:
        """The rows' log-probabilities [rows, C, k] from the tile's statistics over all its positions: the
        max scaled logit m [n * C, 1], the sum S [n * C] of exp(s - m), the draft [n * C]."""
        m, log_S, draft = m[self.at], S[self.at].log(), draft[self.at]
        values = self.top.values - m - log_S[:, None]
        # the draft is the argmax: the best alternative's value (the same bits as in the list), or, should
        # the statistics' max (a kernel's own rounding) and the list disagree on a near-tie, s = m
        chosen = torch.where(self.top.ids[:, 0] == draft, values[:, 0], -log_S)
        a, C, k = len(self.rows), self.C, self.k
        return LogprobTensors(chosen.view(a, C), self.top.ids.reshape(a, C, k), values.reshape(a, C, k))


class TopTokens:
    """The running k largest scaled logits of each position over vocabulary chunks (best first)."""

    def __init__(self, positions: int, k: int, device):
        self.k = k
        self.values = torch.empty((positions, 0), dtype=torch.float32, device=device)
        self.ids = torch.empty((positions, 0), dtype=torch.int64, device=device)

    def add(self, s: torch.Tensor, v0: int) -> None:
        """Merge a chunk's scaled logits [positions, w] of tokens v0 .. v0+w."""
        values, ids = s.topk(min(self.k, s.shape[1]), dim=-1)
        values = torch.cat([self.values, values], dim=1)
        ids = torch.cat([self.ids, ids + v0], dim=1)
        self.values, order = values.topk(min(self.k, values.shape[1]), dim=-1)
        self.ids = ids.gather(1, order)
