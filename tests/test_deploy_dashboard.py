"""The container path, run without Docker: deploy/entrypoint.py maps DIFFUSION_SERVER_* variables to
flags and starts a real server (CPU preset, a tiny checkpoint, a free loopback port); the health
check script sees it; and every metric the Grafana dashboard queries is one the server exports."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import wait_for_port

REPO = Path(__file__).resolve().parent.parent
DASHBOARD = REPO / "deploy/grafana/dashboards/diffusion-server.json"
API_KEY = "deploy-test-key"
MODEL_NAME = "tiny-deploy"
METRIC_RE = re.compile(r"diffusion_server:[A-Za-z0-9_:]+")


@pytest.fixture(scope="module")
def entrypoint_server(server_tiny_checkpoint, tmp_path_factory):
    log_path = tmp_path_factory.mktemp("deploy_server") / "server.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("DIFFUSION_SERVER_")}
    env.update(
        PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false",
        DIFFUSION_SERVER_CONFIG=str(REPO / "configs/cpu-embedded.yaml"),
        DIFFUSION_SERVER_MODEL=str(server_tiny_checkpoint),
        DIFFUSION_SERVER_SERVED_MODEL_NAME=MODEL_NAME,
        DIFFUSION_SERVER_HOST="127.0.0.1",
        DIFFUSION_SERVER_PORT="0",  # the server binds a free port itself and logs it
        DIFFUSION_SERVER_API_KEY=API_KEY,
        DIFFUSION_SERVER_ACCESS_LOG="false",
    )
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, str(REPO / "deploy/entrypoint.py")], cwd=REPO, env=env,
                                stdout=log, stderr=subprocess.STDOUT)
        try:
            port = wait_for_port(proc, log_path, 120)
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 120
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"server exited with {proc.returncode}:\n{log_path.read_text()}")
                try:
                    if httpx.get(url + "/health", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"server not ready:\n{log_path.read_text()}")
                time.sleep(0.2)
            yield url, port
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(10)


@pytest.fixture(scope="module")
def scraped(entrypoint_server):
    """(family name -> type, sample names) after one completion and one refused request, so the
    histograms have observations and the labelled error counter a series (a labelled counter has no
    sample until its first label set; this fixture must not rely on another test having made one)."""
    from prometheus_client.parser import text_string_to_metric_families

    url, _ = entrypoint_server
    headers = {"Authorization": f"Bearer {API_KEY}"}
    r = httpx.post(url + "/v1/completions", headers=headers, timeout=60,
                   json={"model": MODEL_NAME, "prompt": "Hello", "max_tokens": 8, "seed": 1})
    assert r.status_code == 200, r.text
    assert httpx.get(url + "/v1/models", timeout=10).status_code == 401  # no key
    families, samples = {}, set()
    for family in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=10).text):
        families[family.name] = family.type
        samples.update(s.name for s in family.samples)
    return families, samples


def test_entrypoint_settings_reach_the_server(entrypoint_server):
    url, _ = entrypoint_server
    assert httpx.get(url + "/v1/models", timeout=10).status_code == 401  # DIFFUSION_SERVER_API_KEY
    models = httpx.get(url + "/v1/models", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=10).json()
    assert models["data"][0]["id"] == MODEL_NAME  # DIFFUSION_SERVER_SERVED_MODEL_NAME


def test_healthcheck_script(entrypoint_server, monkeypatch):
    sys.path.insert(0, str(REPO))
    from deploy import healthcheck

    _, port = entrypoint_server
    monkeypatch.setenv("DIFFUSION_SERVER_PORT", str(port))
    assert healthcheck.main() == 0
    with socket.socket() as bound:  # bound and never listening: connections to it are refused
        bound.bind(("127.0.0.1", 0))
        monkeypatch.setenv("DIFFUSION_SERVER_PORT", str(bound.getsockname()[1]))
        assert healthcheck.main() == 1


def _dashboard_queries() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    queries = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            q = var["query"]
            queries.append(q["query"] if isinstance(q, dict) else q)
    return queries


def test_dashboard_queries_only_exported_metrics(scraped):
    families, samples = scraped
    referenced = {name for q in _dashboard_queries() for name in METRIC_RE.findall(q)}
    assert referenced
    for name in sorted(referenced):
        assert name in samples, f"the dashboard queries {name}, which /metrics does not export"
        base = re.sub(r"_(bucket|sum|count)$", "", name)
        if base != name:
            assert families.get(base) == "histogram", f"{name}: {base} is not a histogram"
        elif name.endswith("_total"):
            assert families.get(name.removesuffix("_total")) == "counter", name
        else:
            assert name in families, name
    for q in _dashboard_queries():
        for quantile_of in re.findall(r"histogram_quantile\([^,]+,.*?(diffusion_server:[A-Za-z0-9_:]+)", q):
            assert quantile_of.endswith("_bucket"), q


def test_dashboard_covers_the_issue_panels():
    text = " ".join(_dashboard_queries())
    for needed in ("generation_tokens_total", "e2e_request_latency_seconds_bucket", "time_to_first_token_seconds_bucket",
                   "time_to_first_draft_seconds_bucket", "num_requests_running", "num_requests_waiting",
                   "denoising_steps_per_canvas", "decoder_batch_size"):
        assert "diffusion_server:" + needed in text, needed
    dash = json.loads(DASHBOARD.read_text())
    for panel in dash["panels"]:
        for t in panel.get("targets", []):
            assert t["datasource"]["uid"] == "${datasource}", panel["title"]
