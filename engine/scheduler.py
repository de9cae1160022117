"""The block scheduler: one pass = one denoising step for every running canvas.

Pure bookkeeping: it decides who is admitted, who is encoded, who takes a decoder step, and
turns the runner's per-row results into commits, finishes and outputs. It never touches tensors.
"""

from __future__ import annotations

import time
from collections import deque

from .kv_budget import kv_tokens_needed
from .outputs import Draft, RequestOutput, TokenLogprob
from .request import Request, RequestStatus
from .stats import CanvasStats
from .work import CanvasLogprobs, DecodeWork, EncodeWork, NewRow, StepPlan, StepResult


class Scheduler:
    """The waiting queue and the running set: admission under the decoder batch and KV budget, one
    ``StepPlan`` per pass, and the runner's results turned into outputs."""

    def __init__(self, *, max_num_seqs: int, max_num_kv_tokens: int, max_encoder_tokens: int | None = None):
        self.max_num_seqs = max_num_seqs
        self.max_num_kv_tokens = max_num_kv_tokens
        # prompt tokens encoded in one pass, over all requests (oldest first, each a whole chunk or none):
        # a longer text prompt is prefilled a chunk of this many tokens a pass, so that the running
        # requests' steps go on meanwhile; a prompt with images is encoded whole in one pass (its features
        # are computed once), alone if it is longer. Commits are not counted: at most one canvas per
        # running request. None: whole prompts
        self.max_encoder_tokens = max_encoder_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._to_free: list[str] = []
        self.pass_index = 0  # number of passes scheduled so far

    # -- intake --------------------------------------------------------------------------------
    def add(self, request: Request) -> None:
        """Queue a request. The queue bound is the caller's (``AsyncEngine.generate`` refuses past it)."""
        self.waiting.append(request)

    def abort(self, request_id: str, status: RequestStatus = RequestStatus.FINISHED_ABORTED) -> Request | None:
        """Remove a request wherever it is, finishing it with ``status`` (a stop string found by the
        caller finishes as ``FINISHED_STOPPED``); returns it, or None if unknown or already finished."""
        for req in self.waiting:
            if req.request_id == request_id:
                self.waiting.remove(req)
                req.status = status
                return req
        for req in self.running:
            if req.request_id == request_id:
                self._finish(req, status)
                return req
        return None

    def fail(self, request_ids: set[str], message: str) -> list[Request]:
        failed = [r for r in self.running if r.request_id in request_ids]
        for req in failed:
            req.error = message
            self._finish(req, RequestStatus.FINISHED_ERROR)
        return failed

    def take_freed(self) -> list[str]:
        """Request ids whose runner state must be released (normally carried by the next plan)."""
        freed, self._to_free = self._to_free, []
        return freed

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self._to_free)

    @property
    def reserved_kv_tokens(self) -> int:
        """KV token slots the running set takes from the budget (the slot buffers' size)."""
        return kv_tokens_needed((r.kv_reservation for r in self.running), self.max_num_seqs)

    # -- one pass ------------------------------------------------------------------------------
    def schedule(self) -> StepPlan:
        plan = StepPlan(free=self._to_free)
        self._to_free = []
        now = time.monotonic()
        # Admit in arrival order while the decoder batch and the KV budget (the slot buffers) allow.
        while self.waiting and len(self.running) < self.max_num_seqs:
            req = self.waiting[0]
            reservations = [r.kv_reservation for r in self.running] + [req.kv_reservation]
            if kv_tokens_needed(reservations, self.max_num_seqs) > self.max_num_kv_tokens and self.running:
                break
            self.waiting.popleft()
            req.status = RequestStatus.ENCODING
            req.pending_encode = req.prompt_ids
            req.scheduled_time = now
            self.running.append(req)
            plan.new.append(NewRow(req.request_id, req.seed, req.kv_reservation))
        prompt_tokens = 0  # encoded this pass
        # text prompt chunks of this pass by (prompt hash, tokens left): another choice of the same prompt,
        # as far along, copies its K/V (no cost to the budget)
        chunks: dict[tuple[int, int], tuple[Request, tuple[int, ...]]] = {}
        for req in self.running:
            if req.status is RequestStatus.ENCODING:
                chunk, same_as = req.pending_encode, None
                text_prompt = req.canvas_index == 0 and req.images is None
                key = (req.prompt_hash, len(req.pending_encode)) if text_prompt else None
                twin = chunks.get(key)
                if twin is not None and twin[0].prompt_ids == req.prompt_ids:
                    chunk, same_as = twin[1], twin[0].request_id
                elif req.canvas_index == 0 and self.max_encoder_tokens is not None:  # its prompt, not a commit
                    chunk = self._prompt_chunk(req, self.max_encoder_tokens - prompt_tokens, first=not prompt_tokens)
                    if req.pending_encode and not chunk:  # the pass's prompt tokens are spent: a later pass
                        continue
                    prompt_tokens += len(chunk)
                if text_prompt and same_as is None:
                    chunks.setdefault(key, (req, chunk))
                plan.encode.append(EncodeWork(req.request_id, chunk, req.images, same_as))
                req.pending_encode = req.pending_encode[len(chunk):]
                req.images = None  # only the prompt has images; the runner keeps none after its encode
                if req.pending_encode:  # still prefilling: its first denoising step comes after the last chunk
                    continue
                req.status = RequestStatus.DENOISING
            p = req.params
            if req.step == 0:
                req.canvas_start_time = now
            plan.decode.append(
                DecodeWork(
                    request_id=req.request_id,
                    new_canvas=req.step == 0,
                    canvas_index=req.canvas_index,
                    cur_step=p.max_denoising_steps - req.step,
                    max_steps=p.max_denoising_steps,
                    t_min=p.t_min,
                    t_max=p.t_max,
                    entropy_bound=p.entropy_bound,
                    confidence_threshold=p.confidence_threshold,
                    logprobs=p.logprobs,
                    logit_bias=p.logit_bias,
                    pinned_start=p.max_tokens if p.infill_suffix else 0,  # right after the gap (one canvas)
                    pinned=p.infill_suffix,
                )
            )
        if not plan.is_empty():
            self.pass_index += 1
        return plan

    def update(self, result: StepResult) -> tuple[list[RequestOutput], list[CanvasStats]]:
        """Apply the runner's results: drafts, commits, finishes. Returns outputs and canvas stats."""
        now = time.monotonic()
        by_id = {r.request_id: r for r in self.running}
        outputs: list[RequestOutput] = []
        canvases: list[CanvasStats] = []
        for res in result.decode:
            req = by_id.get(res.request_id)
            if req is None or req.status.finished:
                continue
            if res.error is not None:
                req.error = res.error
                self._finish(req, RequestStatus.FINISHED_ERROR)
                outputs.append(self.output_for(req))
                continue
            req.step += 1
            req.num_denoising_steps += 1
            if req.first_draft_time is None:
                req.first_draft_time = now
            draft = None
            if req.params.stream_drafts:
                draft = self._draft(req, res.draft)
            if not (req.converged(res.draft, res.confident) or req.step >= req.params.max_denoising_steps):
                if draft is not None:
                    outputs.append(self.output_for(req, draft=draft))
                continue
            new_tokens = self._commit(req, res.draft, now, canvases)
            logprobs = None if res.logprobs is None else token_logprobs(new_tokens, res.logprobs)
            outputs.append(self.output_for(req, token_ids=new_tokens, draft=draft, logprobs=logprobs))
        return outputs, canvases

    # -- internals -----------------------------------------------------------------------------
    def _prompt_chunk(self, req: Request, budget: int, *, first: bool) -> tuple[int, ...]:
        """The part of ``req``'s prompt to encode this pass, within ``budget`` prompt tokens, if it fits or
        comes first in the pass (else none): a text prompt's next chunk of ``max_encoder_tokens``, a
        prompt with images whole. A chunk's bounds never depend on the other prompts: they change the
        last bits of the logits."""
        chunk = req.pending_encode if req.images is not None else req.pending_encode[:self.max_encoder_tokens]
        return chunk if first or len(chunk) <= budget else ()

    def _draft(self, req: Request, tokens: tuple[int, ...]) -> Draft:
        prev = req.last_draft
        if prev is None:
            changed = tuple(range(len(tokens)))
        else:
            changed = tuple(i for i, (a, b) in enumerate(zip(prev, tokens)) if a != b)
        req.last_draft = tokens
        return Draft(req.canvas_index, req.step, req.params.max_denoising_steps, tokens, changed)

    def _commit(self, req: Request, canvas: tuple[int, ...], now: float, canvases: list[CanvasStats]) -> tuple[int, ...]:
        """Commit the argmax canvas: trim at eos and max_tokens, then finish or queue its encoding."""
        kept = list(canvas[: req.remaining_tokens])
        finish: RequestStatus | None = None
        if not req.params.ignore_eos:
            eos = set(req.params.eos_token_ids or ())
            for i, tok in enumerate(kept):
                if tok in eos:
                    kept = kept[: i + 1]
                    finish = RequestStatus.FINISHED_STOPPED
                    break
        req.output_ids.extend(kept)
        if finish is None and req.remaining_tokens <= 0:
            # an infill's gap ends at its pinned suffix: filling it is the natural end
            finish = RequestStatus.FINISHED_STOPPED if req.params.infill_suffix else RequestStatus.FINISHED_LENGTH
        if kept and req.first_token_time is None:
            req.first_token_time = now
        canvases.append(CanvasStats(req.step, len(kept), now - (req.canvas_start_time or now)))
        req.canvas_index += 1
        req.new_canvas()
        if finish is not None:
            self._finish(req, finish)
        else:
            req.status = RequestStatus.ENCODING
            req.pending_encode = canvas  # the whole argmax canvas enters the cache, as in generate()
        return tuple(kept)

    def _finish(self, req: Request, status: RequestStatus) -> None:
        req.status = status
        if req in self.running:
            self.running.remove(req)
            self._to_free.append(req.request_id)

    @staticmethod
    def output_for(req: Request, token_ids: tuple[int, ...] = (), draft: Draft | None = None,
                   logprobs: tuple[TokenLogprob, ...] | None = None) -> RequestOutput:
        """The ``RequestOutput`` describing ``req`` now, with this event's new tokens and draft."""
        return RequestOutput(
            request_id=req.request_id,
            token_ids=token_ids,
            draft=draft,
            logprobs=logprobs,
            finished=req.status.finished,
            finish_reason=req.status.value if req.status.finished else None,
            error=req.error,
            num_prompt_tokens=len(req.prompt_ids),
            num_generated_tokens=len(req.output_ids),
            num_denoising_steps=req.num_denoising_steps,
            num_canvases=req.canvas_index,
        )


def token_logprobs(tokens: tuple[int, ...], canvas: CanvasLogprobs) -> tuple[TokenLogprob, ...]:
    """The log-probabilities of a commit's tokens (the first ``len(tokens)`` positions of its canvas)."""
    return tuple(TokenLogprob(t, canvas.chosen[i], canvas.top[i]) for i, t in enumerate(tokens))
