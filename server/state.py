"""The server's state behind the app: the engine's lifecycle (loading -> ready -> draining, or failed)
and the drain that a graceful shutdown runs.

The engine loads in a worker thread after start-up, so ``/health`` answers 503 ("loading") at
once and 200 when the model is ready; generation requests get 503 with ``Retry-After`` meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Callable, TypeVar

from engine.errors import log_load_failure

from . import errors
from .bodies import BodyLimits
from .engine_client import EngineClient
from .images import ImageFetches
from .metrics import ServerMetrics
from .middleware import InFlight
from .preprocess import PreprocessGate
from .prompt_bounds import TokenBound
from .request_limits import PromptLimit
from .settings import ServerSettings

logger = logging.getLogger("server")
T = TypeVar("T")

# (settings, stats sink) -> a started-or-not engine; slow (loads the model), runs in a worker thread.
EngineFactory = Callable[[ServerSettings, object], EngineClient]

# After a drain's deadline aborts what is left, how long the aborted requests get to send their
# last bytes (the 503 or the error chunk and [DONE]) before the server closes.
ABORT_GRACE_SECONDS = 5.0

# How often a ready server checks that its engine is still alive (to log its death, and to exit with
# --exit-on-engine-death).
ENGINE_WATCH_SECONDS = 0.5


def default_engine_factory(settings: ServerSettings, stats_sink) -> EngineClient:
    """Build the engine (slow: loads the model). Runs in a worker thread."""
    from engine import AsyncEngine
    from engine.replicas import ReplicatedEngine

    engine_settings = settings.engine_settings()
    kind = ReplicatedEngine if engine_settings.data_parallel_size > 1 else AsyncEngine
    return kind(engine_settings, stats_sink=stats_sink)


async def in_daemon_thread(work: Callable[[], T]) -> T:
    """``work()`` in a thread of its own that nothing waits for at exit (``asyncio.to_thread``'s executor
    is joined when the loop closes: a shutdown would wait out a model load of many minutes)."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future = loop.create_future()

    def settle(result, exc) -> None:
        if done.done():  # the awaiting task was cancelled
            return
        if exc is not None:
            done.set_exception(exc)
        else:
            done.set_result(result)

    def run() -> None:
        result, error = None, None
        try:
            result = work()
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting task
            error = exc
        try:
            loop.call_soon_threadsafe(settle, result, error)
        except RuntimeError:  # the loop has closed: the server stopped while this ran
            pass

    threading.Thread(target=run, name="model-load", daemon=True).start()
    return await done


def _token_bound(tokenizer) -> TokenBound | None:
    try:
        return TokenBound.from_tokenizer(tokenizer)
    except Exception:  # noqa: BLE001 - an unusual tokenizer: prompts are then bounded only once tokenized
        logger.warning("no character bound on prompts for this tokenizer", exc_info=True)
        return None


class ServerState:
    """Lifecycle of the engine behind the app: loading -> ready -> draining (or failed)."""

    def __init__(self, settings: ServerSettings, metrics: ServerMetrics, engine_factory: EngineFactory,
                 on_load_failure: Callable[[BaseException], None] | None = None, inflight: InFlight | None = None,
                 on_engine_death: Callable[[], None] | None = None):
        self.settings = settings
        self.inflight = inflight or InFlight()
        self.live_choice_sets: set = set()  # ChoiceSets with engine requests (see choices.ChoiceSet)
        self.metrics = metrics
        self.engine_factory = engine_factory
        self.on_load_failure = on_load_failure
        self.on_engine_death = on_engine_death  # called once, on the loop, if the engine dies while ready
        self.engine: EngineClient | None = None
        self.status = "loading"
        self.loading = False  # the model load's thread is running (a shutdown does not wait for it)
        self.aborting = False  # the drain's time is up: requests still being prepared are not started
        self.load_error: str | None = None
        self.created = int(time.time())
        self._load_task: asyncio.Task | None = None
        self._watch_task: asyncio.Task | None = None
        # large bodies parsed, prompts tokenized, chat templates rendered: this many at once, in worker threads
        self.preprocess_gate = PreprocessGate(settings.preprocess_concurrency, "preprocess")
        self.image_decodes = PreprocessGate(settings.image_decode_concurrency, "image-decode")
        self.image_fetches = ImageFetches(settings.image_fetch_concurrency)  # http(s) images: turns of their own
        self.token_bound: TokenBound | None = None  # from the tokenizer, once loaded

    # lifecycle

    def start_loading(self) -> None:
        self._load_task = asyncio.create_task(self._load())

    async def _load(self) -> None:
        t0 = time.monotonic()
        def load() -> EngineClient:
            try:
                return self.engine_factory(self.settings, self.metrics)
            finally:
                self.loading = False

        self.loading = True
        try:
            engine = await in_daemon_thread(load)
            token_bound = await asyncio.to_thread(_token_bound, engine.tokenizer)
        except Exception as exc:  # noqa: BLE001
            log_load_failure(logger, exc, "failed to load the model %s", self.settings.model)
            self.status = "failed"
            self.load_error = str(exc)
            if self.on_load_failure is not None:
                self.on_load_failure(exc)
            return
        if self.status == "draining":
            await asyncio.to_thread(engine.shutdown)
            return
        engine.start()
        self.token_bound = token_bound
        self.engine = engine
        self.metrics.bind_engine_gauges(self._engine_counts, self._engine_live_states, self._engine_kv_usage)
        self.status = "ready"
        logger.info(
            "serving %s as %s (max_model_len=%s, canvas_length=%s) after %.1fs",
            self.settings.model, self.model_names()[0], engine.max_model_len, engine.canvas_length,
            time.monotonic() - t0,
        )
        self._watch_task = asyncio.create_task(self._watch_engine())

    async def _watch_engine(self) -> None:
        """Wait for the engine to die while the server is ready; then log it and call ``on_engine_death``."""
        while self.status == "ready" and self.engine.healthy:
            await asyncio.sleep(ENGINE_WATCH_SECONDS)
        if self.status == "ready":
            then = "; exiting (--exit-on-engine-death)" if self.on_engine_death else " until the server is restarted"
            logger.error("the engine has stopped: new requests get 503 engine_dead%s", then)
            if self.on_engine_death is not None:
                self.on_engine_death()

    async def drain(self, timeout: float) -> None:
        """Shut down gracefully: /health and new requests answer 503 at once; in-flight requests and
        streams get ``timeout`` seconds to finish; whatever is left then ends at once with a clear end for
        its client (a 503 ``request_aborted``, or that error chunk and ``[DONE]``) and is aborted in the
        engine, whatever pass the engine is in; so does
        one still being prepared: at once if it waits for a preprocessing turn or job (``PreprocessGate``),
        otherwise when it would start (``aborting``).
        Returns when nothing is in flight any more (or the abort grace has passed)."""
        self.status = "draining"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.0, timeout)
        while self.inflight.count > 0 and loop.time() < deadline:
            await asyncio.sleep(0.05)
        if self.inflight.count > 0:
            logger.warning("drain timeout (%.0fs): aborting %d in-flight request(s)", timeout, self.inflight.count)
            self.aborting = True
            self.preprocess_gate.abort()
            self.image_decodes.abort()
            for choice_set in list(self.live_choice_sets):
                choice_set.abort()
            grace = loop.time() + ABORT_GRACE_SECONDS
            while self.inflight.count > 0 and loop.time() < grace:
                await asyncio.sleep(0.05)
        logger.info("drained: %d request(s) still open", self.inflight.count)

    async def close(self) -> None:
        self.status = "draining"
        for task in (self._load_task, self._watch_task):
            if task is not None and not task.done():
                task.cancel()
        if self.engine is not None:
            await asyncio.to_thread(self.engine.shutdown)

    def _engine_counts(self):
        e = self.engine
        if e is None:
            return None
        return e.num_running, e.num_waiting

    def _engine_live_states(self) -> int:
        return 0 if self.engine is None else self.engine.num_live_states()

    def _engine_kv_usage(self) -> float:
        return 0.0 if self.engine is None else float(self.engine.kv_usage)

    # request helpers

    def engine_or_503(self) -> EngineClient:
        if self.status == "loading":
            raise errors.unavailable("The model is still loading. Retry shortly.", "server_loading")
        if self.status == "draining":
            raise errors.unavailable("The server is shutting down.", "server_draining")
        if self.status == "failed" or self.engine is None:
            raise errors.unavailable("The model failed to load.", "engine_unavailable")
        if not self.engine.healthy:
            raise errors.unavailable("The engine has stopped; the server needs a restart.", "engine_dead")
        return self.engine

    def prompt_limit(self, engine: EngineClient) -> PromptLimit:
        return PromptLimit.of(self.settings, engine.max_model_len, self.token_bound, engine.canvas_length)

    def body_limits(self, array_param: str | None) -> BodyLimits:
        """What a /v1 body may hold before it is parsed: ``max_json_depth``, ``max_json_values``, and no
        array of numbers longer than a prompt may be (once the model has loaded). ``array_param``: the
        field such an array is a prompt of (None: the endpoint takes no token ids, and the refusal names
        no field)."""
        s = self.settings
        # numbers in arrays: completions takes prompts of token ids, chat only the numbers of its tools' JSON
        numbers = (dict(number_arrays=s.max_prompts_per_request, number_arrays_why="max_prompts_per_request")
                   if array_param else dict(max_numbers=s.max_tools_chars // 2 + s.max_json_values,
                                            numbers_why="max_tools_chars / 2 + max_json_values"))
        if self.engine is None:
            return BodyLimits(s.max_json_depth, s.max_json_values, array_param=array_param, **numbers)
        limit = self.prompt_limit(self.engine)
        why = limit.why() if array_param else f"no array of numbers may be longer than a prompt, and {limit.why()}"
        return BodyLimits(s.max_json_depth, s.max_json_values, limit.tokens,
                          f"longer than any this server accepts: {why}.", array_param, limit.code, **numbers)

    def model_names(self) -> list[str]:
        engine_name = self.engine.model_name if self.engine is not None else None
        return self.settings.model_names(engine_name) or ["unknown"]

    def check_model(self, model: str | None) -> str:
        names = self.model_names()
        if model is None or model in names:
            return names[0]
        raise errors.model_not_found(model, names[:1])

    @property
    def live_status(self) -> str:
        """``status``, or "dead" where the server is ready but its engine has stopped."""
        if self.status == "ready" and not self.engine.healthy:
            return "dead"
        return self.status

    def health(self) -> tuple[int, str]:
        status = self.live_status
        return (200, "ok") if status == "ready" else (503, status)
