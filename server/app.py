"""The FastAPI application: ``create_app(settings)``.

The engine loads in a worker thread after start-up, so ``/health`` answers 503 ("loading") at
once and 200 when the model is ready; generation requests get 503 with ``Retry-After`` meanwhile.
Handlers only do cheap attribute reads on the engine; the step loop runs in the engine's thread.
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import asynccontextmanager
from typing import Callable

from fastapi import FastAPI, Request
from starlette.responses import JSONResponse, Response

from . import errors
from .auth import APIKeyMiddleware
from .chat import create_chat_completion
from .completions import create_completion
from .limits import BodyLimitMiddleware
from .metrics import ServerMetrics
from .middleware import InFlight, InFlightMiddleware, RequestIdMiddleware
from .openapi import install_openapi
from .settings import ServerSettings
from .ui import install_ui

logger = logging.getLogger("server")

EngineFactory = Callable[[ServerSettings, object], object]

# After a drain's deadline aborts what is left, how long the aborted requests get to send their
# last bytes (the 503 or the error chunk and [DONE]) before the server closes.
ABORT_GRACE_SECONDS = 5.0


def default_engine_factory(settings: ServerSettings, stats_sink) -> object:
    """Build the engine (slow: loads the model). Runs in a worker thread."""
    from engine import AsyncEngine

    return AsyncEngine(settings.engine_settings(), stats_sink=stats_sink)


class ServerState:
    """Lifecycle of the engine behind the app: loading -> ready -> draining (or failed)."""

    def __init__(self, settings: ServerSettings, metrics: ServerMetrics, engine_factory: EngineFactory,
                 on_load_failure: Callable[[BaseException], None] | None = None, inflight: InFlight | None = None):
        self.settings = settings
        self.inflight = inflight or InFlight()
        self.live_choice_sets: set = set()  # ChoiceSets with engine requests (see streaming.ChoiceSet)
        self.metrics = metrics
        self.engine_factory = engine_factory
        self.on_load_failure = on_load_failure
        self.engine = None
        self.status = "loading"
        self.load_error: str | None = None
        self.created = int(time.time())
        self._load_task: asyncio.Task | None = None

    # lifecycle

    def start_loading(self) -> None:
        self._load_task = asyncio.create_task(self._load())

    async def _load(self) -> None:
        t0 = time.monotonic()
        try:
            engine = await asyncio.to_thread(self.engine_factory, self.settings, self.metrics)
        except Exception as exc:  # noqa: BLE001
            logger.exception("failed to load the model %s", self.settings.model)
            self.status = "failed"
            self.load_error = str(exc)
            if self.on_load_failure is not None:
                self.on_load_failure(exc)
            return
        if self.status == "draining":
            await asyncio.to_thread(engine.shutdown)
            return
        engine.start()
        self.engine = engine
        self.metrics.bind_engine_gauges(self._engine_counts, self._engine_live_states,
                                        lambda: float(getattr(engine, "kv_usage", 0.0)))
        self.status = "ready"
        logger.info(
            "serving %s as %s (max_model_len=%s, canvas_length=%s) after %.1fs",
            self.settings.model, self.model_names()[0], getattr(engine, "max_model_len", "?"),
            getattr(engine, "canvas_length", "?"), time.monotonic() - t0,
        )

    async def drain(self, timeout: float) -> None:
        """Shut down gracefully: /health and new requests answer 503 at once; in-flight requests and
        streams get ``timeout`` seconds to finish; whatever is left is then aborted in the engine, so
        its client gets a clear end (a 503 ``request_aborted``, or that error chunk and ``[DONE]``).
        Returns when nothing is in flight any more (or the abort grace has passed)."""
        self.status = "draining"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.0, timeout)
        while self.inflight.count > 0 and loop.time() < deadline:
            await asyncio.sleep(0.05)
        if self.inflight.count > 0:
            logger.warning("drain timeout (%.0fs): aborting %d in-flight request(s)", timeout, self.inflight.count)
            for choice_set in list(self.live_choice_sets):
                choice_set.abort_in_engine()
            grace = loop.time() + ABORT_GRACE_SECONDS
            while self.inflight.count > 0 and loop.time() < grace:
                await asyncio.sleep(0.05)
        logger.info("drained: %d request(s) still open", self.inflight.count)

    async def close(self) -> None:
        self.status = "draining"
        if self._load_task is not None and not self._load_task.done():
            self._load_task.cancel()
        if self.engine is not None:
            await asyncio.to_thread(self.engine.shutdown)

    def _engine_counts(self):
        e = self.engine
        if e is None:
            return None
        return e.num_running, e.num_waiting

    def _engine_live_states(self) -> int:
        e = self.engine
        count = getattr(e, "num_live_states", None) if e is not None else None
        return count() if count is not None else 0

    # request helpers

    def engine_or_503(self):
        if self.status == "loading":
            raise errors.unavailable("The model is still loading. Retry shortly.", "server_loading")
        if self.status == "draining":
            raise errors.unavailable("The server is shutting down.", "server_draining")
        if self.status == "failed" or self.engine is None:
            raise errors.unavailable("The model failed to load.", "engine_unavailable")
        if not self.engine.healthy:
            raise errors.unavailable("The engine has stopped; the server needs a restart.", "engine_dead")
        return self.engine

    def model_names(self) -> list[str]:
        engine_name = getattr(self.engine, "model_name", None) if self.engine is not None else None
        return self.settings.model_names(engine_name) or ["unknown"]

    def check_model(self, model: str | None) -> str:
        names = self.model_names()
        if model is None or model in names:
            return names[0]
        raise errors.model_not_found(model, names[:1])

    def health(self) -> tuple[int, str]:
        if self.status == "ready":
            return (200, "ok") if self.engine.healthy else (503, "dead")
        return 503, self.status


def create_app(
    settings: ServerSettings,
    engine_factory: EngineFactory | None = None,
    on_load_failure: Callable[[BaseException], None] | None = None,
) -> FastAPI:
    metrics = ServerMetrics()
    inflight = InFlight()
    metrics.bind_in_flight(lambda: inflight.count)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state = ServerState(settings, metrics, engine_factory or default_engine_factory, on_load_failure, inflight)
        app.state.server = state
        state.start_loading()
        try:
            yield
        finally:
            await state.close()

    app = FastAPI(
        title="diffusion-server",
        description="OpenAI-compatible server for text diffusion language models.",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
    )
    app.state.metrics = metrics
    errors.install_error_handlers(app, on_error=metrics.count_error)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_request_body_bytes, on_reject=metrics.count_error)
    app.add_middleware(APIKeyMiddleware, api_keys=settings.api_keys, on_reject=metrics.count_error)
    app.add_middleware(InFlightMiddleware, inflight=inflight)
    if settings.cors_allow_origins:  # closed unless configured: no CORS headers at all
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors_allow_origins),
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["Authorization", "Content-Type", "X-Request-Id"],
            expose_headers=["X-Request-Id", "Retry-After"],
            allow_credentials=False,
            max_age=600,
        )
    app.add_middleware(RequestIdMiddleware)  # outermost: every response carries X-Request-Id

    @app.get("/health")
    async def health(request: Request):
        status, text = request.app.state.server.health()
        headers = {} if status == 200 else {"Retry-After": str(errors.RETRY_AFTER_UNAVAILABLE)}
        return JSONResponse({"status": text}, status_code=status, headers=headers)

    @app.get("/metrics")
    async def metrics_endpoint():
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    def model_card(state: ServerState, name: str) -> dict:
        card = {"id": name, "object": "model", "created": state.created, "owned_by": "diffusion-server", "root": state.settings.model}
        if state.engine is not None:
            card["max_model_len"] = state.engine.max_model_len
        return card

    @app.get("/v1/models")
    async def list_models(request: Request):
        state = request.app.state.server
        return {"object": "list", "data": [model_card(state, state.model_names()[0])]}

    @app.get("/v1/models/{model_id:path}")
    async def retrieve_model(model_id: str, request: Request):
        state = request.app.state.server
        state.check_model(model_id)
        return model_card(state, state.model_names()[0])

    app.add_api_route("/v1/completions", create_completion, methods=["POST"])
    app.add_api_route("/v1/chat/completions", create_chat_completion, methods=["POST"])
    if settings.ui:
        install_ui(app)
    install_openapi(app)
    return app
