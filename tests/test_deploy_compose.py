"""docker-compose.yml and the files it mounts: they parse, and every cross-reference holds
(Prometheus scrapes the server's service name and port, Grafana's datasource points at the
prometheus service, nginx balances the replica services, mounted files exist). No Docker needed."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
SERVER_PORT = 8000


class ComposeLoader(yaml.SafeLoader):
    """YAML with Compose's ``!reset`` / ``!override`` tags (kept as the tagged value)."""


def _tagged(loader, node):
    if isinstance(node, yaml.MappingNode):
        return {"!reset": loader.construct_mapping(node)} if node.tag == "!reset" else loader.construct_mapping(node)
    if isinstance(node, yaml.SequenceNode):
        return {"!reset": loader.construct_sequence(node)} if node.tag == "!reset" else loader.construct_sequence(node)
    return {"!reset": loader.construct_scalar(node)} if node.tag == "!reset" else loader.construct_scalar(node)


ComposeLoader.add_constructor("!reset", _tagged)
ComposeLoader.add_constructor("!override", _tagged)


def _load(path: Path):
    return yaml.load(path.read_text(), Loader=ComposeLoader)


@pytest.fixture(scope="module")
def compose() -> dict:
    return _load(REPO / "docker-compose.yml")


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


def _published(service: dict) -> dict[int, int]:
    """{host port: container port}"""
    out = {}
    for spec in service.get("ports", []):
        host, container = str(spec).rsplit(":", 1) if ":" in str(spec) else (spec, spec)
        out[int(str(host).rsplit(":", 1)[-1])] = int(container)
    return out


def _bind_mounts(service: dict) -> list[tuple[str, str]]:
    out = []
    for vol in service.get("volumes", []):
        src, dst = vol.split(":")[:2]
        if src.startswith("."):
            out.append((src, dst))
    return out


def _server_port(service: dict) -> int:
    return int(service.get("environment", {}).get("DIFFUSION_SERVER_PORT", SERVER_PORT))


def _gpu_devices(service: dict) -> list[dict]:
    return service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])


def _model_servers(services: dict) -> dict[str, dict]:
    return {name: s for name, s in services.items() if s.get("image", "").startswith("diffusion-server")}


def test_stack_ports(services):
    assert _published(services["server"]) == {8000: SERVER_PORT}
    assert _published(services["prometheus"]) == {9090: 9090}
    assert _published(services["grafana"]) == {3000: 3000}
    assert set(_model_servers(services)) == {"server", "server-2"}


def test_every_model_server_reserves_its_own_gpu(services):
    ids = []
    for name, svc in _model_servers(services).items():
        (dev,) = _gpu_devices(svc)
        assert dev["driver"] == "nvidia" and dev["capabilities"] == ["gpu"], name
        ids.append(tuple(dev["device_ids"]))
        assert svc["build"]["args"]["VARIANT"] == "gpu"
        assert _server_port(svc) == SERVER_PORT
        assert any(dst == "/data" for _, dst in [v.split(":")[:2] for v in svc["volumes"]]), "HF_HOME lives on /data"
    assert len(set(ids)) == len(ids), "replicas must not share a GPU"


def test_bind_mounted_files_exist(services):
    for name, svc in services.items():
        for src, _dst in _bind_mounts(svc):
            assert (REPO / src).exists(), f"{name} mounts missing {src}"


def test_presets_named_by_the_stack_exist(services):
    cpu = _load(REPO / "deploy/compose/cpu.yml")
    for env in [s.get("environment", {}) for s in list(services.values()) + list(cpu["services"].values())]:
        value = env.get("DIFFUSION_SERVER_CONFIG")
        if value:
            path = re.search(r"/etc/diffusion-server/([\w.-]+\.yaml)", value).group(1)
            assert (REPO / "configs" / path).is_file(), value


def test_prometheus_scrapes_the_server_services(services):
    prom = yaml.safe_load((REPO / "deploy/prometheus/prometheus.yml").read_text())
    mount_targets = dict((dst, src) for src, dst in _bind_mounts(services["prometheus"]))
    assert mount_targets["/etc/prometheus/prometheus.yml"] == "./deploy/prometheus/prometheus.yml"
    assert "--config.file=/etc/prometheus/prometheus.yml" in services["prometheus"]["command"]
    scraped = set()
    for job in prom["scrape_configs"]:
        assert job.get("metrics_path", "/metrics") == "/metrics"
        for static in job.get("static_configs", []):
            for target in static["targets"]:
                host, port = target.split(":")
                assert host in services, f"{target}: no compose service {host}"
                assert int(port) == _server_port(services[host])
                scraped.add(host)
        for dns in job.get("dns_sd_configs", []):
            for host in dns["names"]:
                assert host in services and int(dns["port"]) == _server_port(services[host])
                scraped.add(host)
    assert scraped == set(_model_servers(services)), "every model server, and only those, is scraped"


def test_grafana_datasource_and_dashboards(services):
    grafana = services["grafana"]
    mounts = {dst: src for src, dst in _bind_mounts(grafana)}
    prov = REPO / mounts["/etc/grafana/provisioning"]
    (ds,) = yaml.safe_load((prov / "datasources/prometheus.yml").read_text())["datasources"]
    m = re.fullmatch(r"http://([\w-]+):(\d+)", ds["url"])
    assert m and m.group(1) == "prometheus" and m.group(1) in services
    assert int(m.group(2)) in _published(services["prometheus"]).values()
    assert ds["type"] == "prometheus"
    (provider,) = yaml.safe_load((prov / "dashboards/diffusion-server.yml").read_text())["providers"]
    dash_dir = provider["options"]["path"]
    assert dash_dir in mounts, "the provider reads the mounted dashboards folder"
    dashboards = list((REPO / mounts[dash_dir]).glob("*.json"))
    assert dashboards
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert (REPO / mounts[str(Path(home).parent)] / Path(home).name).is_file()


def test_nginx_balances_the_replicas(services):
    lb = services["lb"]
    assert lb["profiles"] == ["replicas"] and services["server-2"]["profiles"] == ["replicas"]
    conf_src = {dst: src for src, dst in _bind_mounts(lb)}["/etc/nginx/nginx.conf"]
    conf = (REPO / conf_src).read_text()
    upstream = re.search(r"upstream\s+(\w+)\s*\{(.*?)\}", conf, re.S)
    servers = re.findall(r"^\s*server\s+([\w.-]+):(\d+)", upstream.group(2), re.M)
    assert {host for host, _ in servers} == set(_model_servers(services))
    for host, port in servers:
        assert int(port) == _server_port(services[host])
    assert f"proxy_pass http://{upstream.group(1)};" in conf
    assert "proxy_buffering off;" in conf, "SSE streams must not be buffered"
    listen = int(re.search(r"listen\s+(\d+);", conf).group(1))
    assert listen in _published(lb).values()
    assert set(lb["depends_on"]) == set(_model_servers(services))
    # nginx resolves the upstream names once: a recreated server (new image, new address) restarts it
    assert all(lb["depends_on"][name]["restart"] is True for name in lb["depends_on"])


def test_cpu_override_drops_the_gpu(services):
    cpu = _load(REPO / "deploy/compose/cpu.yml")["services"]
    assert set(cpu) == {"server"}
    server = cpu["server"]
    assert server["build"]["args"]["VARIANT"] == "cpu"
    assert server["image"] == "diffusion-server:cpu"
    assert "!reset" in server["deploy"], "the GPU reservation of docker-compose.yml is reset"
    assert "cpu-embedded.yaml" in server["environment"]["DIFFUSION_SERVER_CONFIG"]


def _drop_resets(node):
    if isinstance(node, dict):
        return {k: _drop_resets(v) for k, v in node.items() if not (isinstance(v, dict) and "!reset" in v)}
    if isinstance(node, list):
        return [_drop_resets(v) for v in node]
    return node


@pytest.mark.parametrize("path", ["docker-compose.yml", "deploy/compose/cpu.yml"])
def test_compose_files_match_the_compose_spec(path):
    """Against the Compose specification's JSON schema, vendored in deploy/compose/compose-spec.schema.json
    (schema/compose-spec.json of github.com/compose-spec/compose-spec at a08f8d5, 2025-10-28, Apache-2.0):
    misspelt or misplaced keys fail here."""
    import json

    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((REPO / "deploy/compose/compose-spec.schema.json").read_text())
    errors = [f"{list(e.path)}: {e.message}"
              for e in jsonschema.Draft7Validator(schema).iter_errors(_drop_resets(_load(REPO / path)))]
    assert not errors, errors


def test_promtool_accepts_prometheus_yml():
    import shutil
    import subprocess

    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package prometheus)")
    proc = subprocess.run([promtool, "check", "config", str(REPO / "deploy/prometheus/prometheus.yml")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_nginx_accepts_its_config(tmp_path):
    """``nginx -t`` on a copy whose upstream host names (compose services) are replaced by loopback addresses."""
    import shutil
    import subprocess

    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if nginx is None:
        pytest.skip("nginx not installed (Debian package nginx)")
    conf = (REPO / "deploy/nginx/nginx.conf").read_text()
    conf = re.sub(r"(^\s*server\s+)[\w.-]+:(\d+)", lambda m: f"{m.group(1)}127.0.0.1:{m.group(2)}", conf, flags=re.M)
    (tmp_path / "logs").mkdir()
    (tmp_path / "nginx.conf").write_text(conf)
    proc = subprocess.run([nginx, "-t", "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf"),
                           "-g", f"pid {tmp_path}/nginx.pid; error_log {tmp_path}/logs/error.log;"],
                          capture_output=True, text=True, timeout=60)
    # "syntax is ok" comes before nginx tries to create its temp folders, which may need root
    assert "syntax is ok" in proc.stderr, proc.stderr


def _nginx() -> str:
    import shutil

    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if nginx is None:
        pytest.skip("nginx not installed (Debian package nginx)")
    return nginx


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start_nginx(prefix: Path, conf: str, tries: int = 5):
    """``nginx -p prefix`` in the foreground with ``conf`` listening on a free loopback port, returned
    as (process, port) once it listens there.

    A port that was free when it was picked may be taken by another process before nginx binds it:
    nginx then says "Address already in use" and exits, and it is started again on another port. nginx
    writes its pid file only after it has bound its ports, so the file names the process that listens."""
    import os
    import subprocess
    import time

    user = "user root;" if os.geteuid() == 0 else ""  # root's workers would be nobody, shut out of prefix
    pid_file = prefix / "nginx.pid"
    outputs = []
    for _ in range(tries):
        port = _free_port()
        (prefix / "nginx.conf").write_text(re.sub(r"listen\s+\d+;", f"listen 127.0.0.1:{port};", conf))
        proc = subprocess.Popen([_nginx(), "-p", str(prefix), "-c", str(prefix / "nginx.conf"), "-g",
                                 f"daemon off; {user} pid {pid_file}; error_log {prefix}/logs/error.log;"],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 60  # bounds a hang only
        while proc.poll() is None:
            if pid_file.is_file() and pid_file.read_text().strip() == str(proc.pid):
                return proc, port
            if time.monotonic() > deadline:
                proc.kill()
                proc.wait(10)
                pytest.fail(f"nginx did not bind 127.0.0.1:{port} within 60 s: {proc.stdout.read()}")
            time.sleep(0.05)
        outputs.append(proc.stdout.read())
        assert "Address already in use" in outputs[-1], outputs[-1]
    pytest.fail(f"nginx found no free port in {tries} tries: {outputs}")


def test_nginx_passes_back_pressure_and_large_bodies_through(tmp_path):
    """The shipped nginx.conf in front of two stand-in replicas: while both answer 429 (queue full),
    every client gets that JSON 429 and its Retry-After, never nginx's 502, and the first request once
    they have room succeeds; a body past the server's limit reaches the server, whose JSON 413 comes back;
    with one replica down, the other answers."""
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    import httpx

    full = threading.Event()
    full.set()

    class Replica(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self):
            length = int(self.headers["Content-Length"])
            self.rfile.read(length)
            status, headers, body = 200, {}, {"ok": True}
            if length > 16 * 1024 * 1024:
                status, body = 413, {"error": {"message": "too large", "type": "invalid_request_error",
                                               "param": None, "code": "request_too_large"}}
            elif full.is_set():
                status, headers = 429, {"Retry-After": "1"}
                body = {"error": {"message": "queue full", "type": "rate_limit_error", "param": None, "code": None}}
            data = json.dumps(body).encode()
            self.send_response(status)
            for name, value in {**headers, "Content-Type": "application/json", "Content-Length": str(len(data))}.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    replicas = [ThreadingHTTPServer(("127.0.0.1", 0), Replica) for _ in range(2)]
    for replica in replicas:
        threading.Thread(target=replica.serve_forever, daemon=True).start()
    ports = iter(r.server_address[1] for r in replicas)
    conf = (REPO / "deploy/nginx/nginx.conf").read_text()
    conf = re.sub(r"(^\s*server\s+)[\w.-]+:\d+", lambda m: f"{m.group(1)}127.0.0.1:{next(ports)}", conf, flags=re.M)
    temp = "".join(f"{name}_temp_path {tmp_path}/{name};" for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    conf = conf.replace("http {", f"http {{ access_log off; {temp}", 1)
    (tmp_path / "logs").mkdir()
    proc, port = _start_nginx(tmp_path, conf)  # it listens: connections wait in its backlog for a worker
    try:
        url = f"http://127.0.0.1:{port}/v1/completions"
        for _ in range(8):
            r = httpx.post(url, json={"prompt": "hi"}, timeout=10)
            assert (r.status_code, r.headers.get("retry-after")) == (429, "1"), r.text
            assert r.json()["error"]["type"] == "rate_limit_error"
        full.clear()
        assert httpx.post(url, json={"prompt": "hi"}, timeout=10).json() == {"ok": True}
        r = httpx.post(url, content=b"x" * (16 * 1024 * 1024 + 1), headers={"Content-Type": "application/json"}, timeout=30)
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large", r.text
        replicas[0].shutdown()  # one replica down (its port refuses): the other answers every request
        replicas[0].server_close()
        assert all(httpx.post(url, json={"prompt": "hi"}, timeout=10).json() == {"ok": True} for _ in range(4))
    finally:
        proc.terminate()
        proc.wait(10)
        for replica in replicas:
            replica.shutdown()
