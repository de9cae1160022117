"""uvicorn around the app, with a graceful drain on SIGTERM/SIGINT: ``run(settings)``.

While draining the server keeps listening, so load balancers and clients see /health 503 and
503 + Retry-After on new requests rather than refused connections; in-flight requests get
``graceful_shutdown_seconds`` to finish (``ServerState.drain``). A second SIGINT exits at once.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import multiprocessing
import os
import signal
import socket
import sys

import uvicorn
from fastapi import FastAPI

from .app import create_app
from .http_protocol import (
    AcceptErrorLog,
    ConnectionGuard,
    accept_burst,
    connection_cap,
    protocol_class,
    raise_file_limit,
    relisten,
)
from .settings import ServerSettings
from .state import ABORT_GRACE_SECONDS

logger = logging.getLogger("server")


class DrainingServer(uvicorn.Server):
    """A uvicorn server that drains ``app`` before closing; its exit status is 0 after a drain."""

    def __init__(self, config: uvicorn.Config, app: FastAPI, drain_seconds: float, accept_note: str = ""):
        super().__init__(config)
        self.app = app
        self.drain_seconds = drain_seconds
        self.accept_note = accept_note
        self._loop: asyncio.AbstractEventLoop | None = None
        self._draining = False
        self._drain_task: asyncio.Future | None = None

    async def serve(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop.set_exception_handler(AcceptErrorLog(self._loop, note=self.accept_note))
        await super().serve(sockets)

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        for server in self.servers:
            relisten(server.sockets)

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


def exit_now(status: int) -> None:
    """End the process at once with ``status``, logs flushed, without interpreter shutdown (which could
    meet the model load's thread inside torch or a download). Engine replicas still loading are killed
    first (their own exit handler does not run)."""
    for child in multiprocessing.active_children():
        child.kill()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(status)


def cannot_listen(host: str, port: int) -> OSError | None:
    """Why ``host:port`` cannot be listened on now (None when it can, and for port 0). Checked before
    anything starts: uvicorn binds only after the app's start-up, which begins loading the model, and
    the process could not exit before that load ended (minutes for a large checkpoint)."""
    if port == 0:
        return None
    unavailable: OSError | None = None  # an address that is not this machine's (or a family that is off)
    bound = False
    try:
        addresses = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        for family, kind, proto, _, address in addresses:
            with socket.socket(family, kind, proto) as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server's listener does
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                try:
                    sock.bind(address)
                except OSError as exc:
                    if exc.errno != errno.EADDRNOTAVAIL:
                        raise
                    unavailable = exc  # asyncio skips it too, while another address binds
                else:
                    bound = True
    except OSError as exc:
        return exc
    return None if bound else unavailable


# The exit status after the engine died, with --exit-on-engine-death (1: the server could not start).
ENGINE_DIED_EXIT_STATUS = 3


def run(settings: ServerSettings) -> int:
    """Serve until shut down. Returns the exit status: 0; 1 when the address cannot be listened on or the
    model could not be loaded; ``ENGINE_DIED_EXIT_STATUS`` when the engine died (``exit_on_engine_death``)."""
    problem = cannot_listen(settings.host, settings.port)
    if problem is not None:
        logger.error("exiting: cannot listen on %s:%d: %s", settings.host, settings.port, problem)
        return 1
    failed: list[BaseException] = []
    server: DrainingServer | None = None

    def on_load_failure(exc: BaseException) -> None:
        failed.append(exc)
        if server is not None:
            server.should_exit = True

    died: list[bool] = []

    def on_engine_death() -> None:  # on the loop: drain as on SIGTERM, then exit
        died.append(True)
        if server is not None:
            server.handle_exit(signal.SIGTERM, None)

    app = create_app(settings, on_load_failure=on_load_failure,
                     on_engine_death=on_engine_death if settings.exit_on_engine_death else None)
    file_limit = raise_file_limit()
    max_connections = connection_cap(settings.max_connections, file_limit)
    guard = ConnectionGuard(settings.request_head_timeout_seconds, settings.write_timeout_seconds, max_connections,
                            on_reject=app.state.metrics.count_error)
    config = uvicorn.Config(
        app,
        http=protocol_class(guard),
        ws="none",  # no WebSocket route: an upgrade request is answered as the plain HTTP request it is
        backlog=accept_burst(file_limit),  # see relisten
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
    server = DrainingServer(config, app, settings.graceful_shutdown_seconds,
                            accept_note=f"; max_connections is {max_connections}, the open-file limit {file_limit}")
    logger.info(
        "diffusion-server on http://%s:%d (model %s, auth %s, at most %d connections)",
        settings.host, settings.port, settings.model, "on" if settings.api_keys else "off", max_connections,
    )
    try:
        server.run()
    except SystemExit as exc:  # uvicorn's start-up failure (its status 3 is this server's engine death)
        if exc.code != uvicorn.config.STARTUP_FAILURE:
            raise
        logger.error("exiting: the server could not start on %s:%d (the reason is above)", settings.host, settings.port)
        state = getattr(app.state, "server", None)
        if state is not None and state.loading:
            exit_now(1)
        return 1
    state = getattr(app.state, "server", None)
    if state is not None and state.loading:  # stopped before the model was in: the load is not waited for
        logger.warning("exiting while the model was still loading")
        exit_now(0)
    if failed:
        logger.error("exiting: the model could not be loaded: %s", failed[0])
        return 1
    if died:
        logger.error("exiting with status %d: the engine died", ENGINE_DIED_EXIT_STATUS)
        return ENGINE_DIED_EXIT_STATUS
    return 0
