"""The model runner: owns every tensor (weights, KV, canvases, generators) and runs one ``StepPlan``.

It never sees queues or request states; it receives plain ``StepPlan`` data from the scheduler
and returns plain ``StepResult`` data.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from .cpu_threads import (default_forward_threads, encoder_canvases, min_group_work, row_groups, rows_after_encoder,
                          rows_beside_encoder)
from .decoder_graphs import DecoderGraphs, DecoderInputs, capture_blocker, graph_max_batch
from .errors import SettingsError
from .kv_cache import BatchKVView, KVCacheManager
from .loader import LoadedModel
from .memory import auto_sampling_tile_bytes, available_bytes
from .multimodal import chunk_bounds, image_features, prompt_embeddings, vision_blocks
from .pass_stages import DECODER, ENCODER, SAMPLER, clock, stage
from .rowwise_attention import BatchLayout, batch_layout
from .rowwise_experts import ALONE_BELOW, MIN_ROWS, ROWWISE_EXPERTS, request_rows
from .sampling import Sampler, make_sampler
from .sampling.constraints import pin_row
from .sampling.logprobs import to_host
from .settings import QUANTIZATION_METHODS
from .traced_decoder import TracedDecoder
from .work import DecodeResult, DecodeWork, EncodeWork, NewRow, StepPlan, StepResult, fault_name, pass_error

logger = logging.getLogger("engine")


@dataclass
class _DecoderGeometry:
    key: tuple  # (buffer generation, full width, (slot, token count) of each row)
    view: BatchKVView  # slices of the KV buffers (read at forward time, so always current)
    positions: torch.Tensor  # [B, C] int32
    masks: dict  # per layer type: None (no padding) or the padding mask
    rotary: dict  # per layer type: (cos, sin), each [B, C, head_dim]
    layout: BatchLayout | None  # which keys of each row are real, when rows are padded (rowwise_attention)


@dataclass
class _PassInputs:
    """One row group's decoder inputs, whether a CUDA graph runs it, and its row-wise attention layout."""

    inputs: DecoderInputs
    graphed: bool
    layout: BatchLayout | None


@dataclass
class _EarlyRows:
    """Decoder rows of a pass that started before its encoder ran: the first rows in slot order, in row
    groups running on the pool (``ModelRunner._start_early_rows``)."""

    work: list[DecodeWork]
    groups: list[Future]  # each group's [rows, C, hidden], in order
    encoder: float  # the pass's encoder work, in canvases (cpu_threads.encoder_canvases)


@dataclass
class RowState:
    """Tensor state of one request between passes (its random state is the sampler's)."""

    canvas: torch.Tensor | None = None  # [C] current (noised) canvas
    soft_embeddings: torch.Tensor | None = None  # [C, hidden]: softmax(scaled logits) @ E, the self-conditioning input


class ModelRunner:
    """Runs ``StepPlan``s on the loaded model. Its limits come from ``EngineSettings`` (the one place
    their defaults are written), so they have no defaults here."""

    def __init__(self, loaded: LoadedModel, *, max_num_seqs: int, sampling_tile_bytes: int | None,
                 max_encoder_tokens: int, cuda_graph_max_batch: int | None, sampler: str,
                 forward_threads: int | None, trace_decoder: bool | None):
        self.model = loaded.model
        self.device = loaded.device
        self.dtype = loaded.dtype
        config = self.model.config
        self.text_config = config.text_config
        self.canvas_length = config.canvas_length
        self.vocab_size = self.text_config.vocab_size
        self.layer_types = list(self.text_config.layer_types)
        self.num_layers = self.text_config.num_hidden_layers
        self.sliding_window = self.text_config.sliding_window
        self.traced = self._traced_decoder(loaded, trace_decoder)  # refused settings raise before any thread starts
        if sampling_tile_bytes is None:  # from the memory free now, after the weights
            sampling_tile_bytes = auto_sampling_tile_bytes(available_bytes(self.device))
        self.sampling_tile_bytes = sampling_tile_bytes
        self.sampler: Sampler = make_sampler(sampler, self.model, self.device, tile_bytes=sampling_tile_bytes,
                                             threaded=self.device.type == "cpu", max_num_seqs=max_num_seqs)
        self.max_encoder_tokens = max_encoder_tokens
        # CPU: the decoder pass's rows split into groups that run side by side, one thread each (see
        # EngineSettings.forward_threads); a row's result does not depend on its group (batch invariance)
        threads = torch.get_num_threads()
        if self.device.type != "cpu":
            forward_threads = 1
        elif forward_threads is None:
            forward_threads = default_forward_threads(threads)
        self.forward_threads = forward_threads
        self.grouped_passes = 0  # decoder passes that ran in more than one group
        self.early_passes = 0  # passes whose encoder ran beside decoder rows started before it
        self._pool = None
        if forward_threads > 1:
            self._pool = ThreadPoolExecutor(forward_threads - 1, thread_name_prefix="decoder-rows",
                                            initializer=torch.set_num_threads, initargs=(threads,))
        self.min_encoder_width = MIN_ROWS if loaded.batch_invariant else 1
        # CUDA's batched attention kernels split work by batch size: with batch invariance every row's
        # attention runs as it would alone, padded or not (rowwise_attention)
        self.rowwise_always = loaded.batch_invariant and self.device.type == "cuda"
        if self.rowwise_always and self.sampler.name != "fast":
            self.sampler.close()
            raise SettingsError("batch_invariant on CUDA needs --sampler fast: the reference sampler's softmax and "
                                "entropy reduce over the vocabulary with torch's kernels, whose order depends on the "
                                "batch")
        self.min_group_work = min_group_work(self.traced is not None)
        self.eager_masks = self.model.config._attn_implementation == "eager"
        # images (engine.multimodal): the placeholder token, and whether an image's placeholders attend to
        # each other in both directions
        self.image_token_id = getattr(config, "image_token_id", None)
        self.vision_bidirectional = getattr(self.text_config, "use_bidirectional_attention", None) == "vision"
        per_layer = self.text_config.per_layer_config
        template = [(per_layer[i].num_key_value_heads, per_layer[i].head_dim) for i in range(len(self.layer_types))]
        self.kv = KVCacheManager(self.layer_types, self.sliding_window, template, max_num_seqs, self.device, self.dtype)
        self.rows: dict[str, RowState] = {}
        # per row group of the decoder pass (``_split_rows``): the last geometry, reused between commits
        self._geometries: dict[int, _DecoderGeometry] = {}
        # CUDA: small decoder batches replay captured graphs (launch-bound otherwise); see graph_max_batch
        blocker = capture_blocker(self.model, self.dtype, loaded.quantization, self.device)
        max_graph_batch, warning = graph_max_batch(cuda_graph_max_batch, max_num_seqs, blocker)
        if warning:
            logger.warning(warning)
        elif blocker is not None:
            logger.debug("CUDA graphs off, every decoder pass runs eagerly: %s", blocker)
        self.graphs: DecoderGraphs | None = None
        if max_graph_batch:
            self.graphs = DecoderGraphs(self._decoder_forward, max_graph_batch, capture=True)
            logger.info("decoder batches of up to %d canvases replay CUDA graphs", max_graph_batch)
        # transformers' eager loop indexes torchao's tensors, which inference mode forbids (version counters);
        # the dequantized path only slices their plain inner tensors
        torchao = loaded.quantization in QUANTIZATION_METHODS and loaded.quantization != "none"  # not compressed-tensors
        eager_quantized = torchao and not loaded.dequantized_experts
        self._no_grad = torch.no_grad if eager_quantized else torch.inference_mode
        self._forward_seconds = 0.0
        self._sampling_seconds = 0.0
        self._kv_stored = False  # the encoder unit being run has written K/V to the cache (``_encode``)

    def _traced_decoder(self, loaded: LoadedModel, wanted: bool | None) -> TracedDecoder | None:
        """The decoder pass's TorchScript traces (``engine.traced_decoder``): on by default on CPU where the
        pass's operators do not depend on the data (batch invariance's row-wise attention and experts)."""
        experts = self.text_config._experts_implementation
        # quantized experts dequantize in loops a trace cannot record (load_model refuses the explicit wish)
        traceable = loaded.batch_invariant and experts == ROWWISE_EXPERTS and loaded.quantization == "none"
        if wanted and self.device.type != "cpu":
            raise ValueError("trace_decoder is for CPU (CUDA replays captured graphs: cuda_graph_max_batch)")
        if wanted and not traceable:
            raise ValueError("trace_decoder needs batch invariance with its row-wise experts (experts "
                             f"implementation {experts!r}): other experts branch on the routing, which a trace "
                             "would freeze")
        if wanted is False or self.device.type != "cpu" or not traceable:
            return None
        return TracedDecoder(self._decoder_forward, self.layer_types[: self.num_layers])

    # -- lifecycle -----------------------------------------------------------------------------
    def num_live_states(self) -> int:
        """Requests with tensor or random state here (0 when idle; the sampler's states mirror ``rows``)."""
        return max(len(self.rows), self.sampler.num_live_states())

    def _add(self, row: NewRow) -> None:
        self.rows[row.request_id] = RowState()
        self.sampler.add(row.request_id, row.seed)
        self.kv.allocate(row.request_id, row.kv_tokens)

    def free(self, request_id: str) -> None:
        self.rows.pop(request_id, None)
        self.sampler.free(request_id)
        with self._no_grad():  # compaction writes into the (inference-mode) slot buffers
            self.kv.free(request_id)

    def close(self) -> None:
        """Stop the sampler's worker thread and the decoder's row-group threads."""
        self.sampler.close()
        if self._pool is not None:
            self._pool.shutdown()

    def execute(self, plan: StepPlan) -> StepResult:
        with self._no_grad():
            return self._execute(plan)

    def _execute(self, plan: StepPlan) -> StepResult:
        self._forward_seconds = 0.0
        self._sampling_seconds = 0.0
        for rid in plan.free:
            self.free(rid)
        for row in plan.new:
            self._add(row)
        if self.kv.needs_reallocation():  # views of the old buffers would keep them alive through sync
            self._geometries.clear()
            if self.graphs is not None:
                self.graphs.clear()
        self.kv.sync()
        started: list[Future] = []  # decoder row groups started before the encoder
        try:
            early = self._start_early_rows(plan, started)
            with stage(ENCODER):
                encoder_tokens, failed = self._encode(plan.encode) if plan.encode else (0, {})
            work = [w for w in plan.decode if w.request_id not in failed]
            decode = self._decode(work, early) if work else []
        finally:
            wait(started)  # no group may still read the KV or the rows once the pass is over, even a failed one
            self.sampler.end()  # no draw may still be using a generator when the pass ends
        decode += [DecodeResult(rid, (), False, error=error) for rid, error in failed.items()]
        return StepResult(decode=decode, encoder_tokens=encoder_tokens, forward_seconds=self._forward_seconds,
                          sampling_seconds=self._sampling_seconds)

    # -- masks ---------------------------------------------------------------------------------
    def _finish_mask(self, allowed: torch.Tensor) -> torch.Tensor:
        """[B, Q, K] bool -> the 4D mask the attention interface expects."""
        allowed = allowed[:, None]
        if not self.eager_masks:
            return allowed
        zero = torch.zeros((), dtype=self.dtype, device=self.device)
        return torch.where(allowed, zero, torch.finfo(self.dtype).min)

    # -- encoder -------------------------------------------------------------------------------
    def _encode(self, work: list[EncodeWork]) -> tuple[int, dict[str, str]]:
        """The pass's encoder work, in groups. Returns the tokens encoded and the requests whose group
        raised (request id -> error): such a group (say, out of memory on a long prompt) fails its own
        requests only, since it wrote no other request's KV, and the rest of the pass goes on."""
        limit = self.max_encoder_tokens
        copies: dict[str, list[str]] = {}  # request -> the requests of this pass that copy its K/V
        for w in work:
            if w.same_as is not None:
                copies.setdefault(w.same_as, []).append(w.request_id)
        work = [w for w in work if w.same_as is None]
        short = [w for w in work if len(w.token_ids) <= limit]
        # units that succeed or fail together: a group of short prompts, or every chunk of one long
        # prompt (prefilled in order, each chunk attending to the ones before it; no image is cut)
        units = [[group] for group in self._encoder_groups(short)]
        units += [[[EncodeWork(w.request_id, w.token_ids[start:end], w.images)]
                   for start, end in chunk_bounds(w.token_ids, limit, None if w.images is None else self.image_token_id)]
                  for w in work if len(w.token_ids) > limit]
        encoded, failed = 0, {}
        while units:
            unit = units.pop(0)
            request_ids = [w.request_id for w in unit[0]]
            self._kv_stored = False
            try:
                features = self._image_features(unit[0])
                for group in unit:
                    self._encode_group(group, features, copies)
                    encoded += sum(len(w.token_ids) for w in group)
            except Exception as exc:
                if len(unit) == 1 and len(unit[0]) > 1 and not self._kv_stored:
                    # a group of several requests, nothing stored yet: each again alone, so that only the
                    # requests that fail alone fail (a running request's commit may share the group)
                    logger.warning("encoder work of %s failed (%s): each request again alone", request_ids,
                                   fault_name(exc))
                    units[:0] = [[[w]] for w in unit[0]]
                    continue
                logger.exception("encoder work of %s failed", request_ids)
                failed.update(dict.fromkeys(request_ids + [c for r in request_ids for c in copies.get(r, ())],
                                            pass_error(exc)))
        return encoded, failed

    def _image_features(self, group: list[EncodeWork]) -> dict[str, torch.Tensor]:
        """[placeholders, hidden]: the vision tower's features of each request's images, one call per
        request (as generate makes it, so a request's features do not depend on its group)."""
        t0 = clock()
        encoder = self.model.model.encoder
        features = {w.request_id: image_features(encoder, w.images, self.device) for w in group if w.images is not None}
        self._forward_seconds += clock() - t0
        return features

    def _encoder_groups(self, work: list[EncodeWork]) -> list[list[EncodeWork]]:
        """Split encoder work so that rows x padded length (at least ``min_encoder_width``, as
        ``_encode_group`` pads) stays within ``max_encoder_tokens``."""
        groups: list[list[EncodeWork]] = []
        current: list[EncodeWork] = []
        longest = 0
        for item in sorted(work, key=lambda w: len(w.token_ids)):
            n = max(len(item.token_ids), self.min_encoder_width)
            if self._encodes_alone(item):
                groups.append([item])
                continue
            if current and (len(current) + 1) * max(longest, n) > self.max_encoder_tokens:
                groups.append(current)
                current, longest = [], 0
            current.append(item)
            longest = max(longest, n)
        if current:
            groups.append(current)
        return groups

    def _encodes_alone(self, work: EncodeWork) -> bool:
        """Whether ``work`` is a whole prompt too short for the many-row kernel (fewer than ``ALONE_BELOW``
        tokens, nothing cached before it), which the batch-invariant CPU runner encodes alone and unpadded, on
        exactly its rows as generate does (a chunk remainder or a commit is padded to ``min_encoder_width``)."""
        return (self.device.type == "cpu" and self.min_encoder_width > 1 and len(work.token_ids) < ALONE_BELOW
                and self.kv.get(work.request_id).total_len == 0)

    def _encode_group(self, group: list[EncodeWork], features: dict[str, torch.Tensor],
                      copies: dict[str, list[str]] | None = None) -> None:
        """Encode one batch of rows into their KV; ``features`` (``_image_features``) holds the image
        features of the rows' requests still to be placed, and loses those this group places; ``copies``:
        the requests that take a row's new K/V as theirs (``EncodeWork.same_as``)."""
        ids = [w.request_id for w in group]
        view = self.kv.view(ids)
        row_lengths = [len(w.token_ids) for w in group]
        lengths = torch.tensor(row_lengths, device=self.device)
        # CPU: at least MIN_ROWS tokens, so that a short chunk's linear layers run the many-row kernel
        # whether it is encoded alone or with others (rowwise_experts); a whole prompt of 1-3 tokens runs
        # alone on exactly its rows, as in generate
        width = max(row_lengths)
        if not (len(group) == 1 and self._encodes_alone(group[0])):
            width = max(width, self.min_encoder_width)
        # padded new tokens, or cached K/V of different lengths (a commit beside a longer request's): either
        # way each row attends over its own keys (rowwise_attention), as it would alone
        padded = min(row_lengths) < width or not all(bool(v.all()) for v in view.valid.values())
        slot = torch.arange(width, device=self.device)
        offset = slot[None, :] - (width - lengths)[:, None]  # left padding
        q_valid = offset >= 0
        starts = torch.tensor([self.kv.get(r).total_len for r in ids], device=self.device)
        q_pos = torch.where(q_valid, starts[:, None] + offset, torch.zeros_like(offset))
        pad = self.text_config.pad_token_id or 0
        input_ids = torch.tensor([[pad] * (width - n) + list(w.token_ids) for w, n in zip(group, row_lengths)],
                                 dtype=torch.long, device=self.device)
        images = any(w.images is not None for w in group)
        blocks = None
        if images and self.vision_bidirectional:
            with_images = torch.tensor([w.images is not None for w in group], device=self.device)
            blocks = torch.where(with_images[:, None], vision_blocks(input_ids, self.image_token_id), -1)

        masks, keys_valid = {}, {}
        for layer_type in set(self.layer_types):
            k_valid = keys_valid[layer_type] = torch.cat([view.valid[layer_type], q_valid], dim=1)
            k_pos = torch.cat([view.positions[layer_type], q_pos], dim=1)
            allowed = k_valid[:, None, :] & (k_pos[:, None, :] <= q_pos[:, :, None])
            if layer_type == "sliding_attention":
                allowed &= q_pos[:, :, None] - k_pos[:, None, :] < self.sliding_window
            if blocks is not None:  # an image's placeholders see each other (the cache holds no part of it)
                past_blocks = torch.full_like(view.valid[layer_type], -1, dtype=blocks.dtype)
                k_blocks = torch.cat([past_blocks, blocks], dim=1)
                allowed |= (blocks[:, :, None] == k_blocks[:, None, :]) & (blocks[:, :, None] >= 0)
            if padded:  # padding queries attend to themselves only, so no softmax row is empty
                past = view.valid[layer_type].shape[1]
                own = torch.zeros_like(allowed)
                own[:, slot, past + slot] = True
                allowed = torch.where(q_valid[:, :, None], allowed, own)
            masks[layer_type] = self._finish_mask(allowed)

        # rows of different lengths: each attends over its own keys (rowwise_attention), as it would alone
        layout = BatchLayout(q_valid if padded else None, keys_valid) if padded or self.rowwise_always else None
        t0 = clock()
        inputs = dict(input_ids=input_ids)
        if images:  # the images' features over their placeholders (the vision tower ran in _image_features)
            rows = [self._take_features(features, w) for w in group]
            inputs = dict(inputs_embeds=prompt_embeddings(self.model.model.encoder, input_ids, rows, self.image_token_id))
        # the experts' requests: each row's real tokens (rowwise_experts; padding belongs to none)
        owners = torch.where(q_valid, torch.arange(len(group), device=self.device)[:, None], -1).reshape(-1)
        with batch_layout(layout), request_rows(owners):
            self.model.model.encoder(
                **inputs,
                attention_mask=masks,
                position_ids=q_pos,
                past_key_values=view,
                use_cache=True,
            )
        self._forward_seconds += clock() - t0
        twins = [(copy, row) for row, rid in enumerate(ids) for copy in (copies or {}).get(rid, ())]
        self._kv_stored = True  # from here on a failure may leave some rows' K/V written
        self.kv.append_from_view(ids + [copy for copy, _ in twins], view, q_valid,
                                 rows=list(range(len(ids))) + [row for _, row in twins])

    def _take_features(self, features: dict[str, torch.Tensor], work: EncodeWork) -> torch.Tensor | None:
        """The first rows of ``work``'s request's image features, one per placeholder in ``work`` (each
        chunk of a prompt takes its own images' rows, in order); None for a row without images."""
        if work.images is None:
            return None
        n = sum(1 for t in work.token_ids if t == self.image_token_id)
        rows, features[work.request_id] = features[work.request_id][:n], features[work.request_id][n:]
        return rows

    # -- decoder -------------------------------------------------------------------------------
    def _slot_order(self, work: list[DecodeWork]) -> list[DecodeWork]:
        """In slot order, the batch's KV (or a run of its rows') is a slice of the slot buffers (no copy)."""
        return sorted(work, key=lambda w: self.kv.get(w.request_id).slot)

    def _start_canvases(self, work: list[DecodeWork]) -> list[RowState]:
        """The rows' states, a new canvas drawn for each row that starts one."""
        states = [self.rows[w.request_id] for w in work]
        for w, st in zip(work, states):
            if w.new_canvas:
                st.canvas = pin_row(self.sampler.initial_canvas(w), w)
                st.soft_embeddings = None
        return states

    @property
    def runs_rows_beside_encoder(self) -> bool:
        """Whether decoder rows may run beside the encoder (``_start_early_rows``): their activations and
        the encoder's are then alive at once."""
        return self.traced is not None and self._pool is not None and self.graphs is None

    def _start_early_rows(self, plan: StepPlan, started: list[Future]) -> _EarlyRows | None:
        """On a traced CPU runner, in a pass with encoder work: start the leading decoder rows (slot order)
        whose requests encode nothing this pass in the pool's threads, appending their groups to
        ``started``, so that the encoder runs beside them (``cpu_threads.rows_beside_encoder`` picks how
        many). None when no row starts early."""
        if not self.runs_rows_beside_encoder or not plan.encode or not plan.decode:
            return None
        order = self._slot_order(plan.decode)
        encoding = {w.request_id for w in plan.encode}
        independent = next((i for i, w in enumerate(order) if w.request_id in encoding), len(order))
        encoder = encoder_canvases(sum(len(w.token_ids) for w in plan.encode if w.same_as is None), self.canvas_length)
        count = rows_beside_encoder(len(order), independent, encoder, self.forward_threads)
        if count == 0:
            return None
        work = order[:count]
        ids, states = [w.request_id for w in work], self._start_canvases(work)
        parts = self._split_rows(count, self.forward_threads - 1)  # the engine's thread runs the encoder
        inputs = [self._decoder_inputs(ids[p], states[p], False, i) for i, p in enumerate(parts)]
        for part in inputs:
            started.append(self._pool.submit(self._run_group, part))
        self.early_passes += 1
        return _EarlyRows(work, started, encoder)

    def _decode(self, work: list[DecodeWork], early: _EarlyRows | None = None) -> list[DecodeResult]:
        """One denoising step of ``work``. ``early``: its first rows in slot order, started on the pool
        before the encoder ran (the encoder never fails them: their requests encode nothing this pass)."""
        work = self._slot_order(work)
        ids = [w.request_id for w in work]
        done = 0 if early is None else len(early.work)
        if early is not None and work[:done] != early.work:
            raise RuntimeError("the rows started before the encoder must lead the pass's rows")
        states = [self.rows[r] for r in ids[:done]] + self._start_canvases(work[done:])
        if early is None:
            inputs = self._decoder_pass_inputs(ids, states)
        else:  # the rest: the engine's thread takes the first rows, the pool the others behind the early groups
            rest = len(work) - done
            own = rows_after_encoder(done, rest, early.encoder, self.forward_threads)
            parts = [slice(done, done + own)] if own else []
            parts += [slice(done + own + p.start, done + own + p.stop)
                      for p in self._split_rows(rest - own, self.forward_threads - 1)] if rest > own else []
            first = len(early.groups)  # the group index of the first part (each group caches its geometry)
            inputs = [self._decoder_inputs(ids[p], states[p], False, first + i) for i, p in enumerate(parts)]
        self._keep_geometries(len(inputs) + (len(early.groups) if early else 0))
        # the sampler may draw while the forward runs (started once the inputs are built, so that a
        # CPU worker's draw loop shares the GIL with the forward only)
        self.sampler.begin(work)
        with stage(DECODER):
            hidden = self._decoder_hidden(inputs, early.groups if early else [])  # [B, C, hidden]
        t0 = clock()
        with stage(SAMPLER):
            out = self.sampler.sample(hidden, work)
        sampling = self.sampler.sampling_seconds
        self._sampling_seconds += sampling
        self._forward_seconds += clock() - t0 - sampling  # the lm head and the soft embeddings

        # One device-to-host transfer for the whole pass (on CUDA a transfer per row would leave the GPU
        # idle while the host walks the rows): [B, C + 2] = draft, confident, usable
        C = self.canvas_length
        draft = out.draft
        host = torch.cat([draft, out.confident[:, None].to(draft.dtype), out.usable[:, None].to(draft.dtype)],
                         dim=1).tolist()
        logprobs = [None] * len(work) if out.logprobs is None else to_host(out.logprobs, work)
        results: list[DecodeResult] = []
        for w, st, values, canvas, soft, lp in zip(work, states, host, out.next_canvas, out.soft, logprobs):
            # a row with NaN or +inf logits (bad weights, overflow) fails alone; the others go on as usual
            if not values[C + 1]:
                results.append(DecodeResult(w.request_id, (), False, error="the model produced non-finite logits"))
                continue
            st.canvas = canvas
            st.soft_embeddings = soft
            results.append(DecodeResult(w.request_id, tuple(values[:C]), bool(values[C]), logprobs=lp))
        return results

    def _decoder_geometry(self, ids: list[str], full_width: bool = False, group: int = 0) -> "_DecoderGeometry":
        """The rows' KV view, canvas positions, attention masks and rotary embeddings. They depend only
        on each row's token count and on the buffers (which a reallocation replaces), so between commits
        (most passes) the previous pass's are reused, one per row group. ``full_width``: the view a CUDA
        graph reads (``KVCacheManager.view``), always with masks."""
        rows = [self.kv.get(r) for r in ids]
        key = (self.kv.reallocations, full_width, tuple((kv.slot, kv.total_len) for kv in rows))
        cached = self._geometries.get(group)
        if cached is not None and cached.key == key:
            return cached
        view: BatchKVView = self.kv.view(ids, full_width=full_width)
        C = self.canvas_length
        totals = torch.tensor([kv.total_len for kv in rows], device=self.device)
        positions = (totals[:, None] + torch.arange(C, device=self.device)[None, :]).to(torch.int32)
        masks, keys_valid = {}, {}
        for layer_type in set(self.layer_types):
            valid = view.valid[layer_type]
            if bool(valid.all()) and not full_width:
                masks[layer_type] = None  # no padding: plain bidirectional attention, as in generate()
            else:
                k_valid = torch.cat([valid, torch.ones(len(ids), C, dtype=torch.bool, device=self.device)], dim=1)
                masks[layer_type] = self._finish_mask(k_valid[:, None, :].expand(-1, C, -1))
                keys_valid[layer_type] = k_valid
        probe = torch.empty((), dtype=self.dtype, device=self.device)  # rotary_emb reads only dtype and device
        decoder = self.model.model.decoder
        rotary = {lt: decoder.rotary_emb(probe, positions, lt) for lt in decoder.unique_layer_types}
        # padded rows attend over their own keys (rowwise_attention); a CUDA graph's full-width view keeps
        # the batched masks (the row-wise attention is not capturable)
        layout = None
        if (keys_valid or self.rowwise_always) and not full_width:
            all_valid = torch.ones(len(ids), 1, dtype=torch.bool, device=self.device)
            layout = BatchLayout(None, {lt: keys_valid.get(lt, all_valid.expand(-1, view.valid[lt].shape[1] + C))
                                        for lt in masks})
        geometry = self._geometries[group] = _DecoderGeometry(key, view, positions, masks, rotary, layout)
        return geometry

    def _decoder_pass_inputs(self, ids: list[str], states: list[RowState]) -> list["_PassInputs"]:
        """The decoder pass's inputs, one per row group: a small batch replays a captured CUDA graph
        (``DecoderGraphs``) as one group; on CPU the rows run in groups side by side (``_split_rows``)."""
        # a graph reads slots 0..n-1: after a request failed its encoder work, the others may not hold them
        graphed = self.graphs is not None and self.graphs.covers(len(ids)) and self.kv.leads(ids)
        parts = [slice(None)] if graphed else self._split_rows(len(ids), self.forward_threads)
        return [self._decoder_inputs(ids[p], states[p], graphed, i) for i, p in enumerate(parts)]

    def _split_rows(self, batch: int, threads: int) -> list[slice]:
        """Row groups of ``batch`` rows: one, or on CPU up to ``threads`` runs of consecutive rows (slot
        order) that run side by side (``_decoder_hidden``) when they have the work for it
        (``cpu_threads.row_groups``)."""
        groups = row_groups(batch, self.canvas_length, self.text_config.hidden_size, threads, self.min_group_work)
        bounds = [batch * i // groups for i in range(groups + 1)]
        return [slice(a, b) for a, b in zip(bounds, bounds[1:])]

    def _keep_geometries(self, groups: int) -> None:
        """Drop the cached geometries of row groups this pass does not have (views, masks and rotary of a
        larger split)."""
        for unused in [g for g in self._geometries if g >= groups]:
            del self._geometries[unused]

    def _decoder_inputs(self, ids: list[str], states: list[RowState], graphed: bool, group: int) -> "_PassInputs":
        """The decoder's inputs for these rows (row group ``group``); ``graphed``: a captured CUDA graph
        runs them, and their view spans the buffers' full width."""
        geometry = self._decoder_geometry(ids, full_width=graphed, group=group)
        canvas = torch.stack([s.canvas for s in states])  # [B, C]
        zeros = None
        soft_rows = []
        for s in states:  # [C, hidden] each; zeros before a canvas's first step
            if s.soft_embeddings is None and zeros is None:
                zeros = torch.zeros(self.canvas_length, self.text_config.hidden_size, dtype=self.dtype, device=self.device)
            soft_rows.append(s.soft_embeddings if s.soft_embeddings is not None else zeros)
        soft = torch.stack(soft_rows)  # [B, C, hidden]
        inputs = DecoderInputs(canvas, soft, geometry.positions, geometry.rotary, geometry.masks, geometry.view)
        return _PassInputs(inputs, graphed, geometry.layout)

    def _decoder_hidden(self, parts: list["_PassInputs"], started: Sequence[Future] = ()) -> torch.Tensor:
        """Run the bidirectional decoder over every row's canvas against its cached prefix: eagerly, or
        as a captured CUDA graph; several row groups run side by side, the first of ``parts`` on this
        thread. ``started``: futures of the row groups before ``parts`` in slot order, already running on
        the pool. Returns [B, C, hidden], the groups' rows in order."""
        t0 = clock()
        self.grouped_passes += len(started) + len(parts) > 1
        pending = []
        try:
            pending.extend(self._pool.submit(self._run_group, p) for p in parts[1:])
            first = [self._run_group(parts[0], on_pool=False)] if parts else []
        finally:  # no group may still read the KV or the rows once the pass is over, even a failed one
            wait([*started, *pending])
        groups = [f.result() for f in started] + first + [f.result() for f in pending]
        hidden = groups[0] if len(groups) == 1 else torch.cat(groups)
        self._forward_seconds += clock() - t0
        return hidden

    def _run_group(self, part: "_PassInputs", on_pool: bool = True) -> torch.Tensor:
        """One row group's decoder pass; ``on_pool``: in a pool thread, which needs the pass's grad mode."""
        if part.graphed:
            return self.graphs.run(self.kv.reallocations, part.inputs)
        with self._no_grad() if on_pool else nullcontext():
            if self.traced is not None and self.traced.covers(part.inputs, part.layout):
                return self.traced.run(part.inputs, part.layout)
            with batch_layout(part.layout):
                return self._decoder_forward(part.inputs)

    def _decoder_forward(self, inputs: DecoderInputs) -> torch.Tensor:
        """The decoder's modules over ``inputs``: [B, C, hidden] after the final norm. Changes no state
        outside its output (``DecoderGraphs`` captures it)."""
        decoder = self.model.model.decoder
        hidden = decoder.self_conditioning(decoder.embed_tokens(inputs.canvas), inputs.soft)
        with request_rows(self.canvas_length):  # the experts' requests: a canvas each (rowwise_experts)
            for i, layer in enumerate(decoder.layers[: self.num_layers]):
                lt = self.layer_types[i]
                hidden = layer(
                    hidden,
                    position_embeddings=inputs.rotary[lt],
                    attention_mask=inputs.masks[lt],
                    position_ids=inputs.positions,
                    past_key_values=inputs.view,
                )
        return decoder.norm(hidden)
