"""The FastAPI application: ``create_app(settings)``: middleware, routes and the server state.

Routes only translate: the completion endpoints go through ``serving.serve`` (``completions.py``,
``chat.py``); the engine's lifecycle and the drain live in ``state.py``.
"""

from __future__ import annotations

import logging
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
from .middleware import HeadAsGetMiddleware, InFlight, InFlightMiddleware, RequestIdMiddleware
from .origins import CORSErrorMiddleware, OriginGuardMiddleware, normalized_origins
from .openapi import install_openapi
from .settings import ServerSettings
from .state import EngineFactory, ServerState, default_engine_factory
from .ui import install_ui

__all__ = ["create_app", "default_engine_factory"]

logger = logging.getLogger("server")


def create_app(
    settings: ServerSettings,
    engine_factory: EngineFactory | None = None,
    on_load_failure: Callable[[BaseException], None] | None = None,
    on_engine_death: Callable[[], None] | None = None,
) -> FastAPI:
    metrics = ServerMetrics()
    inflight = InFlight()
    metrics.bind_in_flight(lambda: inflight.count)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state = ServerState(settings, metrics, engine_factory or default_engine_factory, on_load_failure, inflight,
                            on_engine_death)
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
        # no 307 from "/v1/completions/" to a URL built from the Host header: the slash form is a 404
        redirect_slashes=False,
    )
    app.state.metrics = metrics
    errors.install_error_handlers(app, on_error=metrics.count_error)
    app.add_middleware(HeadAsGetMiddleware)  # innermost: the routes see GET
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_request_body_bytes,
                       timeout_seconds=settings.request_body_timeout_seconds, on_reject=metrics.count_error,
                       max_json_values=settings.max_json_values, max_bytes_in_flight=settings.max_body_bytes_in_flight,
                       gate=lambda: server.preprocess_gate if (server := getattr(app.state, "server", None)) else None)
    app.add_middleware(APIKeyMiddleware, api_keys=settings.api_keys, on_reject=metrics.count_error)
    app.add_middleware(InFlightMiddleware, inflight=inflight)
    # a POST from a web page of another site (any site the user visits could send one) is refused
    origins = normalized_origins(settings.cors_allow_origins)  # one list for both: as browsers write them
    if "null" in origins:
        logger.warning("--cors-allow-origin null admits every site, as * does: any page can send Origin: null "
                       "from a sandboxed frame")
    app.add_middleware(OriginGuardMiddleware, allowed_origins=origins, bind_host=settings.host,
                       keys=bool(settings.api_keys), on_reject=metrics.count_error)
    if origins:  # closed unless configured: no CORS headers at all
        app.add_middleware(
            CORSErrorMiddleware,
            allow_origins=origins,
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["*"],  # the openai JS SDK sends its own (X-Stainless-*, OpenAI-*) from browsers too
            expose_headers=["X-Request-Id", "Retry-After"],
            allow_credentials=False,
            max_age=600,
        )
    app.add_middleware(RequestIdMiddleware)  # outermost: every response carries X-Request-Id

    @app.get("/health")
    async def health(request: Request):
        """200 `{"status": "ok"}` when serving; 503 with `Retry-After` while loading, draining or after the
        engine stopped (`{"status": "loading" | "draining" | "failed" | "dead"}`). Open without an API key."""
        status, text = request.app.state.server.health()
        headers = {} if status == 200 else {"Retry-After": str(errors.RETRY_AFTER_UNAVAILABLE)}
        return JSONResponse({"status": text}, status_code=status, headers=headers)

    @app.get("/metrics")
    async def metrics_endpoint():
        """Prometheus text format (every metric: docs/metrics.md). Open without an API key."""
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    def model_card(state: ServerState, name: str) -> dict:
        # the served name only: never the checkpoint's folder (vLLM's "root" is the served name here too)
        card = {"id": name, "object": "model", "created": state.created, "owned_by": "diffusion-server", "root": name}
        if state.engine is not None:
            card["max_model_len"] = state.engine.max_model_len
        return card

    @app.get("/v1/models")
    async def list_models(request: Request):
        """The served model: one entry, with `max_model_len` once the model has loaded."""
        state = request.app.state.server
        return {"object": "list", "data": [model_card(state, state.model_names()[0])]}

    @app.get("/v1/models/{model_id:path}")
    async def retrieve_model(model_id: str, request: Request):
        """The served model by its served name (as `GET /v1/models` shows it); another name is a 404
        `model_not_found`."""
        state = request.app.state.server
        served = state.model_names()[0]
        if model_id != served:
            raise errors.model_not_found(model_id, [served])
        return model_card(state, served)

    app.add_api_route("/v1/completions", create_completion, methods=["POST"])
    app.add_api_route("/v1/chat/completions", create_chat_completion, methods=["POST"])
    if settings.ui:
        install_ui(app)
    install_openapi(app)
    return app
