"""EngineCore: ``step = schedule -> execute -> update``, synchronous and single-threaded."""

from __future__ import annotations

import logging
import secrets
import time

from .errors import SettingsError
from .kv_budget import kv_reservation, kv_tokens_needed
from .loader import LoadedModel
from .memory import derive_kv_budget, plan_memory
from .model_runner import ModelRunner
from .multimodal import ImageInputs
from .outputs import RequestOutput
from .request import Request, RequestStatus
from .request_rules import RequestRules
from .sampling_params import SamplingParams
from .scheduler import Scheduler
from .settings import EngineSettings
from .stats import NullStatsSink, PassStats, RequestStats, StatsSink
from .work import pass_error

logger = logging.getLogger("engine")


class EngineCore:
    """Owns the scheduler and the model runner. Not thread-safe: one thread drives it."""

    def __init__(self, loaded: LoadedModel, settings: EngineSettings, stats_sink: StatsSink | None = None):
        self.loaded = loaded
        self.settings = settings
        self.stats = stats_sink or NullStatsSink()
        config = loaded.model.config
        self.canvas_length = config.canvas_length
        self.vocab_size = config.text_config.vocab_size
        self.max_model_len = settings.max_model_len or config.text_config.max_position_embeddings
        self.defaults = loaded.defaults
        self.runner = ModelRunner(
            loaded, max_num_seqs=settings.max_num_seqs, sampling_tile_bytes=settings.sampling_tile_bytes,
            max_encoder_tokens=settings.max_encoder_tokens, cuda_graph_max_batch=settings.cuda_graph_max_batch,
            sampler=settings.sampler, forward_threads=settings.forward_threads, trace_decoder=settings.trace_decoder,
        )
        self.max_num_kv_tokens = settings.max_num_kv_tokens
        self.memory_plan = None  # what the derived KV budget set aside (None with max_num_kv_tokens given)
        if self.max_num_kv_tokens is None:  # derived from the memory free now, after the weights
            plan = self.memory_plan = plan_memory(
                config.text_config, self.canvas_length, loaded.dtype,
                sampling_transient_bytes=self.runner.sampler.transient_bytes(settings.max_num_seqs),
                max_num_seqs=settings.max_num_seqs, dequantized_experts=loaded.dequantized_experts,
                expert_copies=self.runner.forward_threads, max_encoder_tokens=settings.max_encoder_tokens,
                encoder_beside_decoder=self.runner.runs_rows_beside_encoder)
            self.max_num_kv_tokens = derive_kv_budget(plan, loaded.device, fraction=settings.memory_fraction,
                                                      max_num_seqs=settings.max_num_seqs, max_model_len=self.max_model_len)
        if self.max_num_kv_tokens < kv_reservation(1, 1, self.canvas_length):
            raise SettingsError(
                f"the KV budget ({self.max_num_kv_tokens} token slots) cannot hold even a one-token prompt; "
                "free memory, lower --max-num-seqs, or set --max-num-kv-tokens"
            )
        self._log_kv_budget(settings.max_num_seqs)
        self.scheduler = Scheduler(max_num_seqs=settings.max_num_seqs, max_num_kv_tokens=self.max_num_kv_tokens,
                                   max_encoder_tokens=settings.max_encoder_tokens)
        self.rules = RequestRules(
            canvas_length=self.canvas_length, vocab_size=self.vocab_size, max_model_len=self.max_model_len,
            defaults=self.defaults, model_config=config, max_images_per_prompt=settings.max_images_per_prompt,
            max_encoder_tokens=settings.max_encoder_tokens, max_num_seqs=settings.max_num_seqs,
            max_num_kv_tokens=self.max_num_kv_tokens)
        self._requests: dict[str, Request] = {}

    def _log_kv_budget(self, max_num_seqs: int) -> None:
        """Say at start-up what the KV budget holds: how many requests at the full context run at once,
        or, when not one does, how much of the context one request may reserve (more is a 400)."""
        budget, context = self.max_num_kv_tokens, self.max_model_len
        source = "derived from free memory" if self.memory_plan is not None else "set by --max-num-kv-tokens"
        at_once = max((n for n in range(1, max_num_seqs + 1) if kv_tokens_needed([context] * n, max_num_seqs) <= budget),
                      default=0)
        if at_once:
            logger.info("KV budget: %d token slots (%s), %d of max_num_seqs %d requests at the full context of %d "
                        "tokens at once", budget, source, at_once, max_num_seqs, context)
        else:
            logger.warning("KV budget: %d token slots (%s), less than the context of %d tokens: one request may "
                           "reserve at most %d KV tokens (its prompt and every canvas of %d but the last; more is "
                           "refused): raise --max-num-kv-tokens or --memory-fraction, or free memory", budget, source,
                           context, budget, self.canvas_length)

    def close(self) -> None:
        """Release the runner's worker thread; the core takes no more steps after this."""
        self.runner.close()

    # -- requests ------------------------------------------------------------------------------
    def resolve(self, prompt_ids: list[int], params: SamplingParams, *, prompt_checked: bool = False,
                images: ImageInputs | None = None) -> SamplingParams:
        """``RequestRules.resolve``: fill defaults and validate (raises ``InvalidRequestError``)."""
        return self.rules.resolve(prompt_ids, params, prompt_checked=prompt_checked, images=images)

    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                    images: ImageInputs | None = None, arrival_time: float | None = None) -> Request:
        """Queue a request; ``params`` (and ``images``) must have passed ``resolve``. The queue bound is
        the caller's (``AsyncEngine.generate``): the core queues whatever it is given. ``arrival_time``
        (``time.monotonic()``): when it arrived, if earlier than now (in a replicated engine's front)."""
        if request_id in self._requests:
            raise ValueError(f"duplicate request id {request_id!r}")
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        req = Request(request_id, tuple(prompt_ids), params, seed % 2**64, self.canvas_length, images=images)
        if arrival_time is not None:
            req.arrival_time = arrival_time
        self.scheduler.add(req)
        self._requests[request_id] = req
        return req

    def abort_request(self, request_id: str, reason: str = "abort") -> RequestOutput | None:
        """Finish a request early: ``reason`` is "abort" (client gone) or "stop" (a stop string)."""
        req = self.scheduler.abort(request_id, RequestStatus(reason))
        if req is None:
            return None
        return self._finish_output(req)

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    @property
    def kv_usage(self) -> float:
        """Fraction of the KV token budget the running requests' slot buffers take (0..1)."""
        return self.scheduler.reserved_kv_tokens / max(1, self.max_num_kv_tokens)

    def num_live_states(self) -> int:
        """Requests the core still tracks plus tensor states the runner still holds (0 when idle)."""
        return len(self._requests) + self.runner.num_live_states() + len(self.runner.kv)

    # -- the pass ------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        t0 = time.perf_counter()
        plan = self.scheduler.schedule()
        if plan.is_empty():
            return []
        try:
            result = self.runner.execute(plan)
        except Exception as exc:  # a fault fails this pass's requests, never the engine
            logger.exception("engine pass failed")
            failed = self.scheduler.fail({w.request_id for w in plan.decode} | {w.request_id for w in plan.encode},
                                         pass_error(exc))
            for rid in self.scheduler.take_freed():  # release their tensor state now
                self.runner.free(rid)
            return [self._finish_output(r) for r in failed]
        outputs, canvases = self.scheduler.update(result)
        for c in canvases:
            self.stats.on_canvas(c)
        final = []
        for out in outputs:
            if out.finished:
                out = self._finish_output(self._requests[out.request_id], out)
            final.append(out)
        self.stats.on_pass(
            PassStats(
                decoder_batch_size=len(plan.decode),
                encoder_tokens=result.encoder_tokens,
                num_running=self.num_running,
                num_waiting=self.num_waiting,
                seconds=time.perf_counter() - t0,
                forward_seconds=result.forward_seconds,
                sampling_seconds=result.sampling_seconds,
            )
        )
        return final

    def _finish_output(self, req: Request, out: RequestOutput | None = None) -> RequestOutput:
        """Forget a finished request and report it; returns its last output."""
        self._requests.pop(req.request_id, None)
        if out is None:
            out = Scheduler.output_for(req)
        self.stats.on_request_finished(
            RequestStats(
                request_id=req.request_id,
                arrival_time=req.arrival_time,
                scheduled_time=req.scheduled_time,
                first_draft_time=req.first_draft_time,
                first_token_time=req.first_token_time,
                finished_time=time.monotonic(),
                num_prompt_tokens=len(req.prompt_ids),
                num_generated_tokens=len(req.output_ids),
                num_denoising_steps=req.num_denoising_steps,
                num_canvases=req.canvas_index,
                finish_reason=req.status.value if req.status.finished else RequestStatus.FINISHED_ABORTED.value,
            )
        )
        return out

    def drain(self) -> None:
        """Run passes until no request is left (tests, shutdown)."""
        while self.has_work():
            self.step()
