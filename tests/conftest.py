"""Shared fixtures.

Server fixtures (all named ``server_*`` or ``live_server``): a tiny checkpoint built once per
session, and real ``python -m server`` processes on free loopback ports.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
SERVER_API_KEY = "test-key-123"
SERVER_MODEL_NAME = "tiny-diffusion"
SERVER_BODY_LIMIT = 65536


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """A ``python -m server`` subprocess on a free loopback port."""

    def __init__(self, args: list[str], log_path: Path, api_key: str | None = None, startup_timeout: float = 120.0,
                 model_name: str | None = None):
        self.model_name = model_name
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.base_url = self.url + "/v1"
        self.api_key = api_key
        self.log_path = log_path
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
        env.pop("DIFFUSION_SERVER_API_KEY", None)
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "server", "--host", "127.0.0.1", "--port", str(self.port), *args],
            cwd=REPO_ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT,
        )
        self._wait_ready(startup_timeout)

    @property
    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"server not ready after {timeout}s:\n{self.log()}")

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def metrics_text(self) -> str:
        return httpx.get(self.url + "/metrics", timeout=10).text

    def metrics(self) -> dict:
        """{(sample name, frozenset(labels)): value} parsed with prometheus_client's parser."""
        from prometheus_client.parser import text_string_to_metric_families

        out = {}
        for family in text_string_to_metric_families(self.metrics_text()):
            for s in family.samples:
                out[(s.name, frozenset(s.labels.items()))] = s.value
        return out

    def wait_idle(self, timeout: float = 60.0) -> dict:
        """Poll /metrics until no request is running or waiting; return the last scrape."""
        deadline = time.monotonic() + timeout
        while True:
            m = self.metrics()
            if m[("diffusion_server:num_requests_running", frozenset())] == 0 and m[("diffusion_server:num_requests_waiting", frozenset())] == 0:
                return m
            if time.monotonic() > deadline:
                raise AssertionError(f"server not idle after {timeout}s: {m}")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()


def parse_sse(raw: bytes | str) -> list[str]:
    """The ``data:`` payloads of an SSE body, in order; comments (keep-alive pings) skipped.

    Asserts OpenAI's framing: every event is exactly one ``data: <payload>`` line.
    """
    text = raw.decode() if isinstance(raw, bytes) else raw
    assert "\r" not in text, "frames must be separated by \\n\\n"
    payloads = []
    for block in text.split("\n\n"):
        lines = [ln for ln in block.split("\n") if ln and not ln.startswith(":")]
        if not lines:
            continue
        assert len(lines) == 1 and lines[0].startswith("data: "), f"unexpected SSE event {block!r}"
        payloads.append(lines[0][len("data: "):])
    return payloads


def parse_sse_json(raw: bytes | str) -> list:
    """Payloads of an SSE body: JSON objects, with the final ``[DONE]`` kept as the string."""
    payloads = parse_sse(raw)
    assert payloads and payloads[-1] == "[DONE]", f"stream must end with [DONE]: {payloads[-3:]}"
    assert "[DONE]" not in payloads[:-1]
    return [json.loads(p) for p in payloads[:-1]] + ["[DONE]"]


@pytest.fixture(scope="session")
def server_tiny_checkpoint(tmp_path_factory) -> Path:
    """A tiny float32 DiffusionGemma checkpoint (canvas 16, 8 denoising steps by default)."""
    from tools.tiny_checkpoint import TinySpec, build_tiny_checkpoint

    return build_tiny_checkpoint(tmp_path_factory.mktemp("server_tiny"), TinySpec())


@pytest.fixture(scope="session")
def server_launcher(tmp_path_factory):
    """``launch(args, api_key=None) -> LiveServer``; every server is stopped at the end of the session."""
    servers: list[LiveServer] = []
    logs = tmp_path_factory.mktemp("server_logs")

    def launch(args: list[str], api_key: str | None = None, model_name: str | None = None) -> LiveServer:
        server = LiveServer(args, logs / f"server{len(servers)}.log", api_key=api_key, model_name=model_name)
        servers.append(server)
        return server

    yield launch
    for s in servers:
        s.stop()


@pytest.fixture(scope="session")
def live_server(server_launcher, server_tiny_checkpoint, tmp_path_factory) -> LiveServer:
    """The main test server: API key, a served model name and a small body limit from a YAML config.

    ``live_server.model_name`` is the served model name; ``live_server.body_limit`` the body limit.
    """
    config = tmp_path_factory.mktemp("server_config") / "server.yaml"
    config.write_text(
        f"served-model-name: {SERVER_MODEL_NAME}\n"
        f"max_request_body_bytes: {SERVER_BODY_LIMIT}\n"
        "max-num-seqs: 8\n"
        "max-waiting: 64\n"
        "log-prompts: false\n"
    )
    server = server_launcher(
        ["--config", str(config), "--model", str(server_tiny_checkpoint), "--api-key", SERVER_API_KEY, "--log-prompts"],
        api_key=SERVER_API_KEY,
        model_name=SERVER_MODEL_NAME,
    )
    server.body_limit = SERVER_BODY_LIMIT
    return server


@pytest.fixture
def server_sse():
    """Helpers for raw SSE bodies: ``.parse(raw)`` (payload strings), ``.parse_json(raw)``."""

    class _SSE:
        parse = staticmethod(parse_sse)
        parse_json = staticmethod(parse_sse_json)

    return _SSE
