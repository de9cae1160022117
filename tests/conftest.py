"""Shared fixtures, and the CI rule on skips.

Server fixtures (all named ``server_*`` or ``live_server``): a tiny checkpoint built once per
session, and real ``python -m server`` processes on loopback ports they bind themselves.

Under ``CI=true`` (``.ci/run`` sets it) a skipped test fails the run, unless it is marked ``cuda``:
CI installs every tool the CPU tests need, so a skip there means a test silently stopped testing.
"""

from __future__ import annotations

import json
import os
import re
import signal
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


# -- CI: no silent skips --------------------------------------------------------------------------

def skips_fail() -> bool:
    """True under CI (``CI=true``): a skip of anything but a ``cuda`` test is a failure."""
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def _skip_reason(report) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:  # (path, line, "Skipped: reason")
        return str(longrepr[2])
    return str(longrepr)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if (skips_fail() and report.skipped and not hasattr(report, "wasxfail")
            and item.get_closest_marker("cuda") is None):
        report.outcome = "failed"
        report.longrepr = (f"{item.nodeid} skipped under CI=true, where only tests marked cuda may skip: "
                           f"{_skip_reason(report)}")


def _module_marked_cuda(collector) -> bool:
    """Whether a test module declares ``pytestmark`` with the cuda marker (read from its source: a
    module skipped while it was imported cannot be asked)."""
    import ast

    path = getattr(collector, "path", None)
    if path is None or path.suffix != ".py":
        return False
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "pytestmark" for t in node.targets):
            return any(isinstance(n, ast.Attribute) and n.attr == "cuda" for n in ast.walk(node.value))
    return False


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    """A module skipped as a whole (a module-level ``importorskip`` or ``skip``) fails under CI too,
    unless the module is marked cuda (``pytestmark = pytest.mark.cuda``)."""
    outcome = yield
    report = outcome.get_result()
    if skips_fail() and report.skipped and not _module_marked_cuda(collector):
        report.outcome = "failed"
        report.longrepr = (f"{collector.nodeid} was skipped at collection under CI=true, where only tests "
                           f"marked cuda may skip: {_skip_reason(report)}")


# -- real server processes ----------------------------------------------------------------------

# uvicorn's start-up line: the server binds --port 0 itself and says which port it got (no probe
# that binds a port, releases it and hopes nobody takes it before the server does)
_LISTENING = re.compile(r"Uvicorn running on http://127\.0\.0\.1:(\d+) ")


def wait_for_port(proc: subprocess.Popen, log_path: Path, timeout: float) -> int:
    """The port a server started with ``--port 0`` bound, read from its log (``_LISTENING``)."""
    deadline = time.monotonic() + timeout
    while True:
        match = _LISTENING.search(log_path.read_text(errors="replace"))
        if match:
            return int(match.group(1))
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log_path.read_text(errors='replace')}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"server did not listen within {timeout}s:\n{log_path.read_text(errors='replace')}")
        time.sleep(0.05)


class LiveServer:
    """A ``python -m server`` subprocess on a loopback port it binds itself (``--port 0``).

    ``command`` replaces ``python -m server`` (a wrapper that runs ``server.cli.main``)."""

    def __init__(self, args: list[str], log_path: Path, api_key: str | None = None, startup_timeout: float = 120.0,
                 model_name: str | None = None, command: list[str] | None = None):
        self.model_name = model_name
        self.api_key = api_key
        self.log_path = log_path
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
        env.pop("DIFFUSION_SERVER_API_KEY", None)
        self._log = open(log_path, "wb")
        self._stopping = False
        self.proc = subprocess.Popen(
            [*(command or [sys.executable, "-m", "server"]), "--host", "127.0.0.1", "--port", "0", *args],
            cwd=REPO_ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + startup_timeout
        try:
            self.port = wait_for_port(self.proc, log_path, startup_timeout)
        except RuntimeError:
            self.stop()
            raise
        self.url = f"http://127.0.0.1:{self.port}"
        self.base_url = self.url + "/v1"
        self._wait_ready(deadline)

    @property
    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def _wait_ready(self, deadline: float) -> None:
        """Until /health says 200 (the model is loaded); the deadline only bounds a hang."""
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + "/health", timeout=10).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"server not ready in time:\n{self.log()}")

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def metrics_text(self) -> str:
        return httpx.get(self.url + "/metrics", timeout=10).text

    def metrics(self) -> dict:
        """{(sample name, frozenset(labels)): value} parsed with prometheus_client's parser."""
        from tests.test_server_metrics import scrape

        return scrape(self.url)

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

    def signal_stop(self) -> None:
        """SIGTERM, once (a second one would cut the drain short)."""
        if self.proc.poll() is None and not self._stopping:
            self._stopping = True
            self.proc.send_signal(signal.SIGTERM)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.signal_stop()
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
    """``launch(args, api_key=None, model_name=None, command=None) -> LiveServer``; every server is
    stopped at the end of the session."""
    servers: list[LiveServer] = []
    logs = tmp_path_factory.mktemp("server_logs")

    def launch(args: list[str], api_key: str | None = None, model_name: str | None = None,
               command: list[str] | None = None) -> LiveServer:
        server = LiveServer(args, logs / f"server{len(servers)}.log", api_key=api_key, model_name=model_name,
                            command=command)
        servers.append(server)
        return server

    yield launch
    for s in servers:  # all at once: each drains and exits on its own
        s.signal_stop()
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


# The tiny checkpoint's chat template (tools/tiny_checkpoint.py), plus two template variables.
VARIANT_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if note %}[note: {{ note }}]{% endif %}"
    "{% if enable_thinking %}[thinking]{% endif %}"
    "{% for message in messages %}"
    "<start_of_turn>{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
    "{{ message['content'] }}<end_of_turn>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
VARIANT_PING_SECONDS = 0.05


@pytest.fixture(scope="session")
def server_variant(server_launcher, server_tiny_checkpoint, tmp_path_factory) -> LiveServer:
    """A second server, no API key, --log-prompts: the tiny checkpoint with a chat template that renders
    the template variables ``note`` and ``enable_thinking`` (``VARIANT_CHAT_TEMPLATE``), and SSE
    keep-alive pings every ``VARIANT_PING_SECONDS`` on idle streams."""
    import shutil

    path = tmp_path_factory.mktemp("server_variant") / "model"
    shutil.copytree(server_tiny_checkpoint, path)
    (path / "chat_template.jinja").write_text(VARIANT_CHAT_TEMPLATE)
    return server_launcher(["--model", str(path), "--served-model-name", "tiny-variant", "--log-prompts",
                            "--sse-ping-seconds", str(VARIANT_PING_SECONDS)], model_name="tiny-variant")


@pytest.fixture
def server_sse():
    """Helpers for raw SSE bodies: ``.parse(raw)`` (payload strings), ``.parse_json(raw)``."""

    class _SSE:
        parse = staticmethod(parse_sse)
        parse_json = staticmethod(parse_sse_json)

    return _SSE
