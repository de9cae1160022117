"""AsyncEngine: the asyncio face of the engine. The step loop runs in its own thread.

Requests and aborts cross into the loop thread through a thread-safe queue; outputs come back to
each request's ``asyncio.Queue`` with ``call_soon_threadsafe``. The event loop never waits on the
model.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import queue
import threading
import time

import torch

from .core import EngineCore
from .detokenizer import IncrementalDetokenizer
from .errors import EngineDeadError, InvalidRequestError, QueueFullError
from .loader import load_model
from .multimodal import ImageInputs
from .outputs import RequestOutput
from .request_rules import RequestRules
from .sampling_params import SamplingParams
from .settings import EngineSettings
from .stats import StatsSink
from .work import fault_name

logger = logging.getLogger("engine")

_IDLE_WAIT_S = 0.05
# the finish reasons an abort may record: a client that left, or a stop string found in the text
ABORT_REASONS = ("abort", "stop")


class AsyncEngine:
    """Load a checkpoint and serve requests from asyncio code. See ``generate``."""

    def __init__(self, settings: EngineSettings, stats_sink: StatsSink | None = None, model_name: str | None = None):
        settings.validate()
        if settings.num_threads:
            torch.set_num_threads(settings.num_threads)
        loaded = load_model(settings)
        self.core = EngineCore(loaded, settings, stats_sink)
        self._init_front(settings, loaded.tokenizer, loaded.processor, self.core.rules, model_name)
        self._inbox: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def _init_front(self, settings: EngineSettings, tokenizer, processor, rules: RequestRules,
                    model_name: str | None) -> None:
        """The request-facing state, whatever runs the passes (this step loop, or ``engine.replicas``)."""
        self.settings = settings
        self.rules = rules
        self.tokenizer = tokenizer
        self.processor = processor  # None: the checkpoint takes no images
        self.model_name = model_name or settings.model
        self.max_model_len = rules.max_model_len
        self.vocab_size = rules.vocab_size
        self.canvas_length = rules.canvas_length
        self.default_params = rules.defaults
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._lock = threading.RLock()  # re-entrant: a stream's __del__ may run inside a locked block
        self._closed = False  # set when the passes stop for good; no stream is accepted after it
        self._dead: str | None = None
        # gauges: plain values published after each pass (other threads only read them)
        self.num_running = 0
        self.num_waiting = 0
        self.kv_usage = 0.0  # fraction of the KV token budget the running requests take (0..1)
        self._num_live_states = 0
        self._inbox_adds = 0  # requests submitted and not yet taken by the passes (waiting); guarded by _lock
        self._unfinished = 0  # admitted and not yet released; guarded by _lock (bound checked in admit only)
        # aborted ids whose abort the passes have not taken yet: not reused until then, so that a new
        # request with the id never gets the old one's outputs; guarded by _lock
        self._retiring: set[str] = set()

    def queue_bound(self) -> int:
        """Unfinished requests the engine takes at most (``admit``): running ones and ``max_waiting`` more."""
        return self.settings.max_num_seqs + self.settings.max_waiting

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="engine-step-loop", daemon=True)
            self._thread.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._inbox.put(("wake", None))
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def healthy(self) -> bool:
        return self._dead is None and self._thread is not None and self._thread.is_alive()

    # -- requests ------------------------------------------------------------------------------
    def resolve(self, prompt_ids: list[int], params: SamplingParams, *, prompt_checked: bool = False,
                images: ImageInputs | None = None) -> SamplingParams:
        """Fill defaults from the checkpoint and validate (raises ``InvalidRequestError``).
        ``prompt_checked=True`` skips the per-token check of a prompt already accepted once (and of
        its ``images``)."""
        return self.rules.resolve(prompt_ids, params, prompt_checked=prompt_checked, images=images)

    def admit(self, count: int) -> "Admission":
        """Reserve room for ``count`` requests at once, all or none: the one place the queue bound
        (``queue_bound()`` unfinished requests) is checked.

        Raises ``InvalidRequestError`` when ``count`` is over the bound itself (no room could ever be
        made), ``QueueFullError`` when the room is not there now, ``EngineDeadError`` when the step loop
        is not running; nothing is queued in any case. Each ``generate(..., admission=a)`` takes one
        reserved place; ``a.release()`` (or leaving ``with a:``) gives back the places not taken.
        """
        if count < 1:
            raise ValueError(f"count must be positive, got {count}")
        if not self.healthy:
            raise EngineDeadError("the engine is not running")
        bound = self.queue_bound()
        if count > bound:
            raise InvalidRequestError(
                f"This request has {count} choices (prompts x n), more than the {bound} requests this server holds "
                "at once (settings max_num_seqs and max_waiting): send fewer in one request.", "n", "limit_exceeded")
        with self._lock:
            if self._closed:
                raise EngineDeadError("the engine is not running")
            if self._unfinished + count > bound:
                if count == 1:
                    raise QueueFullError(f"the waiting queue is full (the engine holds at most {bound} unfinished "
                                         "requests: settings max_num_seqs and max_waiting)")
                raise QueueFullError(
                    f"the waiting queue has no room for {count} requests ({bound - self._unfinished} free places; "
                    f"the engine takes {bound} unfinished requests)")
            self._unfinished += count
        return Admission(self, count)

    def _give_back(self, count: int) -> None:
        with self._lock:
            self._unfinished -= count

    def generate(self, prompt_ids: list[int], params: SamplingParams, request_id: str, *,
                 prompt_checked: bool = False, admission: "Admission | None" = None,
                 images: ImageInputs | None = None) -> "RequestStream":
        """Submit one request and return its stream of ``RequestOutput`` events (``async for``); the
        last event has ``finished=True``.

        Validation and admission happen here, synchronously: ``InvalidRequestError`` for bad
        parameters; without ``admission``, ``QueueFullError`` when the queue has no room (``admit(1)``;
        the scheduler queues whatever comes through) and ``EngineDeadError`` when the loop is not
        running. With ``admission`` (from ``admit``), the request takes one of its reserved places.
        Closing the stream early (``aclose()``, or dropping it: client gone, task cancelled) aborts the
        request and frees its slot. ``prompt_checked=True``: the prompt already passed ``resolve``
        (skips its per-token check). ``images``: the prompt's images (``engine.multimodal.ImageInputs``,
        from ``processor``), whose placeholders the prompt holds.
        """
        params = self.resolve(prompt_ids, params, prompt_checked=prompt_checked, images=images)
        loop = asyncio.get_running_loop()
        own = admission is None
        if own:
            admission = self.admit(1)
        try:
            queue_: asyncio.Queue = asyncio.Queue()
            with self._lock:
                if self._closed:
                    raise EngineDeadError("the engine is not running")
                if request_id in self._streams:
                    raise ValueError(f"duplicate request id {request_id!r}")
                if request_id in self._retiring:
                    raise ValueError(f"duplicate request id {request_id!r}: the request aborted under it is "
                                     "still being dropped")
                admission._take()
                self._streams[request_id] = (loop, queue_)
        finally:
            if own:
                admission.release()
        self._submit(request_id, list(prompt_ids), params, images)
        return RequestStream(self, request_id, queue_, IncrementalDetokenizer(self.tokenizer, params.stop))

    def _submit(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                images: ImageInputs | None) -> None:
        """Hand an admitted request to whatever runs the passes. It counts as waiting, and its queue time
        runs, from now: the passes take it only between two of them."""
        with self._lock:
            self._inbox_adds += 1
            self.num_waiting += 1
        self._inbox.put(("add", (request_id, prompt_ids, params, images, time.monotonic())))

    def _release(self, request_id: str, finished: bool) -> None:
        # one critical section: a new request under this id is refused (aborted ids are held until the
        # passes take the abort) or finds nothing of this one left
        with self._lock:
            if self._streams.pop(request_id, None) is None:
                return
            self._unfinished -= 1
            if not finished:
                self.abort(request_id)
            self._forget(request_id)

    def _forget(self, request_id: str) -> None:
        """Drop what the front keeps of a released request, beside its stream (nothing here)."""

    def abort(self, request_id: str, reason: str = "abort") -> None:
        """Abort a request (thread-safe, idempotent); it is freed within one pass, and its id is not
        taken again until then. ``reason`` is the finish reason recorded in the engine's stats: one of
        ``ABORT_REASONS`` ("abort", or "stop" for a stop string); another raises ``ValueError``."""
        if reason not in ABORT_REASONS:
            raise ValueError(f"abort reason must be one of {', '.join(ABORT_REASONS)} (got {reason!r})")
        with self._lock:
            if request_id in self._retiring:  # its abort is on its way: the id stays held until it lands
                return
            self._retiring.add(request_id)
        if not self._post_abort(request_id, reason):
            self._settled([request_id])

    def _post_abort(self, request_id: str, reason: str) -> bool:
        """Hand an abort to whatever runs the passes; False where nothing runs the request."""
        self._inbox.put(("abort", (request_id, reason)))
        return True

    def _settled(self, request_ids) -> None:
        """The passes took these aborts: their ids may be used again."""
        with self._lock:
            self._retiring.difference_update(request_ids)

    def num_live_states(self) -> int:
        """Per-request states the core and the runner held after the last pass (0 when idle)."""
        return self._num_live_states

    # -- the step-loop thread ------------------------------------------------------------------
    def _deliver(self, out: RequestOutput) -> None:
        self._deliver_all([out])

    def _deliver_all(self, outs) -> None:
        """Hand outputs to their streams in one callback per event loop: a pass's outputs all reach their
        queues before any reader runs, so a request whose choices finish in the same pass sees each one's
        end before it acts on the first (a sibling that failed too is counted ``error``, not ``abort``)."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        with self._lock:
            for out in outs:
                target = self._streams.get(out.request_id)
                if target is not None:
                    by_loop.setdefault(target[0], []).append((target[1], out))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # loop closed
                pass

    def _drain_inbox(self, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=_IDLE_WAIT_S) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            kind, payload = item
            if kind == "add":
                request_id, prompt_ids, params, images, arrival_time = payload
                self.core.add_request(request_id, prompt_ids, params, images, arrival_time=arrival_time)
                with self._lock:
                    self._inbox_adds -= 1
            elif kind == "abort":
                out = self.core.abort_request(*payload)
                if out is not None:
                    self._deliver(out)
                self._settled([payload[0]])
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _publish_gauges(self) -> None:
        """Snapshot the core's counts for readers on other threads (the core itself is not thread-safe).
        Waiting is written before running, and readers read running first (``EngineClient``): a request that
        moved from waiting to running is never counted in both by a read between the two writes."""
        core = self.core
        with self._lock:
            self.num_waiting = core.num_waiting + self._inbox_adds
        self.num_running = core.num_running
        self.kv_usage = core.kv_usage
        self._num_live_states = core.num_live_states()

    def _loop(self) -> None:
        try:
            while not self._stop.is_set():
                self._drain_inbox(block=not self.core.has_work())
                outputs = self.core.step()
                # gauges first: a reader that learns of a finish (and submits anew) sees it counted out
                self._publish_gauges()
                self._deliver_all(outputs)
        except BaseException as exc:  # the loop itself broke: report and fail everyone
            logger.exception("engine step loop died")
            self._dead = f"the engine's step loop died ({fault_name(exc)})"
        finally:
            self.core.close()
            self._close_streams()

    def _close_streams(self) -> None:
        """No pass runs any more: accept no stream, zero the gauges (the bookkeeping is abandoned, not
        served), then end each open one with ``abort`` (and the reason the engine died, if it did): a
        client that sees its stream end reads gauges that say so."""
        with self._lock:
            self._closed = True
            pending = list(self._streams)
            self.num_running = self.num_waiting = self._num_live_states = 0
            self.kv_usage = 0.0
        self._deliver_all([RequestOutput(rid, finished=True, finish_reason="abort",
                                         error=self._dead or "the engine shut down") for rid in pending])


def _put_all(items) -> None:
    for stream, out in items:
        stream.put_nowait(out)


class Admission:
    """Places reserved in the engine's queue by ``AsyncEngine.admit``, taken one per ``generate``.

    ``release()`` gives back the places not taken (idempotent); ``with engine.admit(n) as a:`` does it
    on exit, so a request refused between its reservation and its last submission leaves no trace.
    """

    def __init__(self, engine: AsyncEngine, count: int):
        self._engine = engine
        self.remaining = count

    def _take(self) -> None:  # under the engine's lock
        if self.remaining < 1:
            raise ValueError("this admission has no reserved place left")
        self.remaining -= 1

    def release(self) -> None:
        with self._engine._lock:
            left, self.remaining = self.remaining, 0
        if left:
            self._engine._give_back(left)

    def __enter__(self) -> "Admission":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class RequestStream:
    """The outputs of one submitted request, as an async iterator. Detokenizes and applies stop strings."""

    def __init__(self, engine: AsyncEngine, request_id: str, queue_: asyncio.Queue, detok: IncrementalDetokenizer):
        self.request_id = request_id
        self._engine = engine
        self._queue = queue_
        self._detok = detok
        self._done = False  # the last output was handed out
        self._closed = False

    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> RequestOutput:
        if self._done or self._closed:
            raise StopAsyncIteration
        try:
            out: RequestOutput = await self._queue.get()
        except BaseException:  # cancelled while waiting: the caller is gone
            self._close(finished=False)
            raise
        detok = self._detok
        text = detok.add(out.token_ids, final=out.finished) if out.token_ids or out.finished else ""
        if detok.stopped:
            # a stop string: cut the text, count the tokens that produced it, end the request
            self._engine.abort(self.request_id, reason="stop")
            self._close(finished=True)
            prior = len(detok.token_ids) - len(out.token_ids)
            kept = detok.num_tokens_at_stop - prior  # at least 1: the stop was not in the earlier text
            return dataclasses.replace(
                out, text=text, finished=True, finish_reason="stop",
                token_ids=out.token_ids[:kept],
                logprobs=None if out.logprobs is None else out.logprobs[:kept],
                num_generated_tokens=detok.num_tokens_at_stop,
            )
        if out.finished:
            self._close(finished=True)
        return dataclasses.replace(out, text=text)

    def _close(self, finished: bool) -> None:
        if self._closed:
            return
        self._closed = True
        self._done = finished
        self._engine._release(self.request_id, finished)

    async def aclose(self) -> None:
        """Stop listening; aborts the request unless it already finished."""
        self._close(finished=False)

    def __del__(self):
        if not getattr(self, "_closed", True):
            self._close(finished=False)
