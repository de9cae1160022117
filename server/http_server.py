"""uvicorn around the app, with a graceful drain on SIGTERM/SIGINT: ``run(settings)``.

While draining the server keeps listening, so load balancers and clients see /health 503 and
503 + Retry-After on new requests rather than refused connections; in-flight requests get
``graceful_shutdown_seconds`` to finish (``ServerState.drain``). A second SIGINT exits at once.
"""

from __future__ import annotations

import asyncio
import logging
import signal

import uvicorn
from fastapi import FastAPI

from .app import create_app
from .settings import ServerSettings
from .state import ABORT_GRACE_SECONDS

logger = logging.getLogger("server")


class DrainingServer(uvicorn.Server):
    """A uvicorn server that drains ``app`` before closing; its exit status is 0 after a drain."""

    def __init__(self, config: uvicorn.Config, app: FastAPI, drain_seconds: float):
        super().__init__(config)
        self.app = app
        self.drain_seconds = drain_seconds
        self._loop: asyncio.AbstractEventLoop | None = None
        self._draining = False
        self._drain_task: asyncio.Future | None = None

    async def serve(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig, frame) -> None:
        # not calling super(): uvicorn would re-raise the signal at exit (status -15 instead of 0)
        if self._draining:
            if sig == signal.SIGINT:
                logger.warning("second SIGINT: exiting without waiting for in-flight requests")
                self.force_exit = True
                self.should_exit = True
            return
        self._draining = True
        state = getattr(self.app.state, "server", None)  # set by the app's lifespan once it started
        if state is None or self._loop is None or self.should_exit:
            self.should_exit = True
            return
        state.status = "draining"
        logger.info("shutting down: draining in-flight requests (up to %.0fs)", self.drain_seconds)
        self._loop.call_soon_threadsafe(self._start_drain, state)

    def _start_drain(self, state) -> None:
        async def drain_then_exit() -> None:
            try:
                await state.drain(self.drain_seconds)
            finally:
                self.should_exit = True

        self._drain_task = asyncio.ensure_future(drain_then_exit())


def run(settings: ServerSettings) -> int:
    """Serve until shut down. Returns the exit status: 0, or 1 when the model could not be loaded."""
    failed: list[BaseException] = []
    server: DrainingServer | None = None

    def on_load_failure(exc: BaseException) -> None:
        failed.append(exc)
        if server is not None:
            server.should_exit = True

    app = create_app(settings, on_load_failure=on_load_failure)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        access_log=settings.access_log,
        log_config=None,
        # the drain runs before uvicorn's own shutdown; this only bounds what is left after it
        timeout_graceful_shutdown=ABORT_GRACE_SECONDS,
    )
    # sse-starlette would cut every stream at the first signal; the drain lets them finish instead.
    from sse_starlette.sse import AppStatus

    AppStatus.disable_automatic_graceful_drain()
    server = DrainingServer(config, app, settings.graceful_shutdown_seconds)
    logger.info(
        "diffusion-server on http://%s:%d (model %s, auth %s)",
        settings.host, settings.port, settings.model, "on" if settings.api_keys else "off",
    )
    server.run()
    if failed:
        logger.error("exiting: the model could not be loaded: %s", failed[0])
        return 1
    return 0
