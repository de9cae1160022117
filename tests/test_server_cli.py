"""Command line, YAML config, default model, request log."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from server import default_model
from server.cli import build_parser, load_config, settings_from_args
from server.settings import ServerSettings, options

REPO_ROOT = Path(__file__).resolve().parent.parent


def test_help_documents_every_flag():
    out = subprocess.run([sys.executable, "-m", "server", "--help"], cwd=REPO_ROOT, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    for option in options():
        assert option.flag in out.stdout, option.flag
        assert option.help.split()[0] in out.stdout
    for required in ("--model", "--host", "--port", "--api-key", "--config", "--served-model-name", "--dtype",
                     "--device", "--max-num-seqs", "--max-waiting", "--max-model-len", "--num-threads",
                     "--log-prompts", "--max-request-body-bytes"):
        assert required in out.stdout
    assert "stream_drafts" in out.stdout and "seed + i" in out.stdout


def test_config_file_and_flag_precedence(tmp_path, monkeypatch):
    monkeypatch.delenv("DIFFUSION_SERVER_API_KEY", raising=False)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: /m\nport: 9000\nmax_num_seqs: 4\nmax-waiting: 7\napi-key: [a, b]\nlog-prompts: true\n"
                   "num-threads: 2\nmemory_fraction: 0.5\n")
    s = settings_from_args(["--config", str(cfg), "--port", "9100", "--api-key", "c"])
    assert s.model == "/m" and s.port == 9100 and s.engine.max_num_seqs == 4 and s.engine.max_waiting == 7
    assert s.api_keys == ["c"]  # the flag replaces the config's list
    assert s.log_prompts is True and s.engine.num_threads == 2 and s.engine.memory_fraction == 0.5
    s = settings_from_args(["--config", str(cfg), "--no-log-prompts"])
    assert s.api_keys == ["a", "b"] and s.log_prompts is False
    monkeypatch.setenv("DIFFUSION_SERVER_API_KEY", "env1,env2")
    assert settings_from_args(["--api-key", "x"]).api_keys == ["x", "env1", "env2"]


def test_config_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("modle: x\n")
    with pytest.raises(SystemExit, match="unknown key 'modle'"):
        load_config(str(bad))
    bad.write_text("port: eighty\n")
    with pytest.raises(SystemExit, match="port"):
        load_config(str(bad))
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--port", "x"])


def test_environment_variables_sit_between_flags_and_the_config(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("max-num-seqs: 3\nmax-waiting: 9\nport: 9000\ncors-allow-origin: [https://a.example]\n")
    env = {"DIFFUSION_SERVER_CONFIG": str(cfg), "DIFFUSION_SERVER_MAX_NUM_SEQS": "5", "DIFFUSION_SERVER_PORT": "9001",
           "DIFFUSION_SERVER_UI": "off", "DIFFUSION_SERVER_MAX_MODEL_LEN": " ",
           "DIFFUSION_SERVER_CORS_ALLOW_ORIGIN": "https://b.example, https://c.example"}
    s = settings_from_args(["--port", "9002"], environ=env)
    assert (s.engine.max_num_seqs, s.engine.max_waiting, s.port, s.ui) == (5, 9, 9002, False)
    assert s.engine.max_model_len is None  # an empty variable is ignored
    assert s.cors_allow_origins == ["https://a.example", "https://b.example", "https://c.example"]
    other = tmp_path / "other.yaml"
    other.write_text("max-waiting: 1\n")
    assert settings_from_args(["--config", str(other)], environ=env).engine.max_waiting == 1  # the flag's file
    for name, value, message in [("DIFFUSION_SERVER_LOG_PROMPTS", "maybe", "expected true or false"),
                                 ("DIFFUSION_SERVER_PORT", "eighty", "expected an int"),
                                 ("DIFFUSION_SERVER_MEMORY_FRACTION", "most", "expected a float")]:
        with pytest.raises(SystemExit) as info:
            settings_from_args([], environ={name: value})
        assert info.value.code == 2  # like a bad flag
        err = capsys.readouterr().err
        assert f"{name}={value!r}: {message}" in err and "usage:" not in err  # one line: the flags were fine


def test_settings_by_name():
    s = ServerSettings.from_flat(model="/m", port=1, max_num_seqs=4, max_encoder_tokens=64, max_n=2)
    assert (s.model, s.port, s.max_n) == ("/m", 1, 2)
    assert (s.engine.max_num_seqs, s.engine.max_encoder_tokens, s.engine.model) == (4, 64, None)
    assert ServerSettings.from_flat(**s.flat()) == s
    assert set(s.flat()) == {o.name for o in options() if o.name != "config"} | {"max_encoder_tokens",
                                                                                   "experts_implementation"}
    with pytest.raises(ValueError, match="not engine.model"):
        ServerSettings(engine=s.engine_settings())


def test_defaults_and_engine_settings():
    s = settings_from_args([])
    assert s == ServerSettings(api_keys=s.api_keys)
    assert s.host == "127.0.0.1" and s.port == 8000 and s.model is None
    s.model = "/some/model"
    e = s.engine_settings()
    assert e.model == "/some/model" and e.max_num_seqs == 16 and e.max_waiting == 256
    assert e.num_threads == 1  # CPU-only machine: one intra-op thread by default
    s.engine.num_threads = 3
    assert s.engine_settings().num_threads == 3


def test_default_model_is_built_once(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFUSION_SERVER_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(default_model, "embedded_model_dir", lambda: tmp_path / "no_embedded_model")
    path = Path(default_model.resolve_default_model())
    assert (path / "config.json").is_file() and path.parent == tmp_path / "cache"
    mtime = (path / "config.json").stat().st_mtime_ns
    assert Path(default_model.resolve_default_model()) == path
    assert (path / "config.json").stat().st_mtime_ns == mtime
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [path.name]  # no leftovers
    # an embedded model wins
    embedded = tmp_path / "embedded"
    embedded.mkdir()
    (embedded / "config.json").write_text("{}")
    monkeypatch.setattr(default_model, "embedded_model_dir", lambda: embedded)
    assert default_model.resolve_default_model() == str(embedded)
    # and each gets a short, path-independent served name
    assert default_model.default_served_name(str(embedded)) == "diffusiongemma-sudoku"
    assert default_model.default_served_name(str(path)) == "tiny-random-diffusiongemma-v1"


def test_the_default_models_cache_heals_and_refuses_in_one_line(tmp_path, monkeypatch):
    """A target left half made (no config.json) is built again, readable by others sharing the cache; a
    cache folder it cannot write is one line naming it (exit 1), not a traceback."""
    monkeypatch.setattr(default_model, "embedded_model_dir", lambda: tmp_path / "no_embedded_model")
    monkeypatch.setenv("DIFFUSION_SERVER_CACHE", str(tmp_path / "cache"))
    half = tmp_path / "cache" / default_model.TINY_DEFAULT_NAME
    half.mkdir(parents=True)
    (half / "model.safetensors").write_bytes(b"left by an interrupted copy")
    path = Path(default_model.resolve_default_model())
    assert path == half and (path / "config.json").is_file() and path.stat().st_mode & 0o777 == 0o755
    assert {p.stat().st_mode & 0o777 for p in path.iterdir()} == {0o644}
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [path.name]  # no leftovers
    monkeypatch.setenv("DIFFUSION_SERVER_CACHE", "~/a-cache")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_model.cache_dir() == tmp_path / "home" / "a-cache"
    monkeypatch.delenv("DIFFUSION_SERVER_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", "relative")  # ignored, as the XDG rules say
    assert default_model.cache_dir() == tmp_path / "home" / ".cache" / "diffusion-server"
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the cache folder would be")
    monkeypatch.setenv("DIFFUSION_SERVER_CACHE", str(blocked))
    with pytest.raises(default_model.DefaultModelError) as info:
        default_model.resolve_default_model()
    assert str(info.value).startswith(f"cannot build the default model in {blocked}: ")


@pytest.mark.parametrize("model, message", [
    ("./no-such-model", "./no-such-model: no such folder"),
    ("~/no-such-model", "~/no-such-model: no such folder"),
    ("{tmp}", "{tmp}: no config.json in this folder"),
])
def test_a_local_folder_without_a_checkpoint_is_named_in_one_line(tmp_path, model, message):
    from engine.errors import CheckpointError
    from engine.loader import local_folder

    with pytest.raises(CheckpointError) as info:
        local_folder(model.format(tmp=tmp_path))
    assert str(info.value).startswith(message.format(tmp=tmp_path))
    assert local_folder("google/diffusiongemma") == "google/diffusiongemma"  # a hub id, as given


def test_a_folder_under_the_home_directory_loads(tmp_path, monkeypatch):
    """``~/...`` is a local folder (transformers would read the string as a hub id and refuse it)."""
    from engine import EngineSettings
    from engine.loader import load_model
    from tools.tiny_checkpoint import TinySpec, build_tiny_checkpoint

    build_tiny_checkpoint(tmp_path / "models" / "tiny", TinySpec(num_layers=1))
    monkeypatch.setenv("HOME", str(tmp_path))
    loaded = load_model(EngineSettings(model="~/models/tiny", device="cpu"))
    assert loaded.model.config.text_config.num_hidden_layers == 1


def test_unloadable_model_exits_nonzero(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", DIFFUSION_SERVER_BOGUS="1")
    out = subprocess.run([sys.executable, "-m", "server", "--model", str(tmp_path / "missing"), "--port", "0"],
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 1, out.stderr[-2000:]
    # one line that says the folder is not there (not a hub id's rules, not a traceback)
    assert f"could not be loaded: {tmp_path / 'missing'}: no such folder" in out.stderr
    assert "Traceback" not in out.stderr
    # and an unknown variable is named before anything starts (see test_a_misspelt_variable_stops_the_server...)
    assert "DIFFUSION_SERVER_BOGUS is not a setting: ignored" in out.stderr


@pytest.mark.parametrize("flags, reason", [
    (["--max-model-len", "100000"], "max_model_len 100000 is over the model's context of {context} tokens "
     "(max_position_embeddings): positions past it were never trained"),
    (["--max-num-seqs", "1000000"], "the KV budget (0 token slots) cannot hold even a one-token prompt; free memory, "
     "lower --max-num-seqs, or set --max-num-kv-tokens"),
    (["--device", "cuda"], "device cuda: torch {torch} finds no CUDA GPU here (it is a CPU build); pass --device cpu"),
])
def test_settings_the_model_cannot_serve_stop_it_in_one_line(flags, reason):
    """Settings that only the checkpoint or the machine can refuse stop the server once it knows, with one
    line and status 1, no traceback; a CUDA device torch cannot use is refused before the checkpoint is read."""
    import torch

    if flags[0] == "--device" and (torch.cuda.is_available() or os.path.exists("/proc/driver/nvidia/version")):
        pytest.skip("needs a machine without an NVIDIA driver")
    config = json.loads((REPO_ROOT / "engine" / "default_model" / "config.json").read_text())
    reason = reason.format(context=config.get("text_config", config)["max_position_embeddings"],
                           torch=torch.__version__)
    out = subprocess.run([sys.executable, "-m", "server", "--port", "0", *flags], cwd=REPO_ROOT,
                         capture_output=True, text=True, timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert out.returncode == 1, out.stderr[-2000:]
    assert f"exiting: the model could not be loaded: {reason}" in out.stderr, out.stderr[-2000:]
    assert "Traceback" not in out.stderr


@pytest.fixture(scope="module")
def never_loading_checkpoint(tmp_path_factory):
    """A checkpoint whose load never ends, as on storage that never answers: its weights file is a FIFO
    no one writes, which the compressed-tensors loader opens itself (the open waits in the kernel)."""
    from tools.quantized_checkpoint import write_quantized_checkpoint
    from tools.tiny_checkpoint import TinySpec, build_tiny_checkpoint

    work = tmp_path_factory.mktemp("never-loading")
    folder = write_quantized_checkpoint(build_tiny_checkpoint(work / "plain", TinySpec(hidden_size=64)),
                                        work / "fp8", "fp8")
    (folder / "model.safetensors").unlink()
    os.mkfifo(folder / "model.safetensors")
    return folder


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
@pytest.mark.parametrize("signals", [["SIGTERM"], ["SIGINT", "SIGINT"]])
def test_a_stop_during_the_model_load_exits_at_once(tmp_path, never_loading_checkpoint, signals):
    """While the model loads, /health and the API answer 503 with Retry-After; SIGTERM (docker stop) or
    Ctrl-C ends the process with status 0 without waiting for the load, which can take many minutes."""
    import signal

    from tests.conftest import wait_for_port

    log = tmp_path / "server.log"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "server", "--model", str(never_loading_checkpoint),
                                 "--host", "127.0.0.1", "--port", "0"],
                                cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        port = wait_for_port(proc, log, 120)
        url = f"http://127.0.0.1:{port}"
        health = httpx.get(url + "/health", timeout=10)
        assert health.status_code == 503 and health.json() == {"status": "loading"}
        for path, body in (("/v1/completions", {"prompt": "hi"}),
                           ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})):
            r = httpx.post(url + path, json=body, timeout=10)
            assert r.status_code == 503 and int(r.headers["retry-after"]) > 0
            assert r.json() == {"error": {"message": "The model is still loading. Retry shortly.",
                                          "type": "server_error", "param": None, "code": "server_loading"}}
        for name in signals:
            proc.send_signal(getattr(signal, name))
        assert proc.wait(60) == 0, log.read_text()
    finally:
        proc.kill()
    assert "exiting while the model was still loading" in log.read_text()


# A server whose engine replicas never finish loading: spawn imports the parent's main script in each
# replica, under the name __mp_main__, before the replica's own work.
SLOW_REPLICAS_SERVER = """
import sys, time
if __name__ == "__mp_main__":
    time.sleep(600)
elif __name__ == "__main__":
    from server.cli import main
    sys.exit(main(sys.argv[1:]))
"""


def _children(pid: int) -> list[int]:
    return [int(p) for t in Path(f"/proc/{pid}/task").iterdir() for p in (t / "children").read_text().split()]


def test_a_stop_during_the_replicas_load_stops_them_too(tmp_path):
    """--data-parallel-size: a stop while the replicas load also ends them (they would load to the end
    otherwise: replicas ignore SIGTERM, and the exit skips their usual exit handler)."""
    import signal

    from tests.conftest import wait_for_port
    from tests.processes import kill_all, wait_gone

    script, log = tmp_path / "server_main.py", tmp_path / "server.log"
    script.write_text(SLOW_REPLICAS_SERVER)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO_ROOT))
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, str(script), "--data-parallel-size", "2", "--host", "127.0.0.1",
                                 "--port", "0"], cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    replicas: list[int] = []
    try:
        port = wait_for_port(proc, log, 120)
        deadline = time.monotonic() + 60
        while len(replicas) < 2:  # the replica processes (multiprocessing's resource tracker is not one)
            assert time.monotonic() < deadline, log.read_text()
            replicas = [c for c in _children(proc.pid) if "--multiprocessing-fork" in Path(f"/proc/{c}/cmdline").read_text()]
            time.sleep(0.1)
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=10).json() == {"status": "loading"}
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, log.read_text()
        wait_gone(replicas, 10, "a replica outlived the server")
    finally:
        proc.kill()
        kill_all(replicas)


def test_a_port_in_use_exits_before_loading(tmp_path):
    """A port someone else listens on stops the server at once, before the model starts loading (it
    would otherwise load to the end first: minutes for a large checkpoint)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = subprocess.run([sys.executable, "-m", "server", "--model", str(tmp_path / "never-read"), "--host",
                              "127.0.0.1", "--port", str(port)], cwd=REPO_ROOT, capture_output=True, text=True,
                             timeout=120, env=env)
    assert out.returncode == 1, out.stderr[-2000:]
    assert f"exiting: cannot listen on 127.0.0.1:{port}: [Errno 98] Address already in use" in out.stderr
    assert "could not be loaded" not in out.stderr and "application startup" not in out.stderr


def test_an_address_not_of_this_machine_exits_before_loading(tmp_path):
    """A --host that is not one of this machine's addresses (TEST-NET-1 here) is refused like a port in
    use, with status 1, not found only when uvicorn binds (its status 3 reads as an engine death)."""
    out = subprocess.run([sys.executable, "-m", "server", "--model", str(tmp_path / "never-read"), "--host",
                          "192.0.2.1", "--port", "8000"], cwd=REPO_ROOT, capture_output=True, text=True,
                         timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert out.returncode == 1, out.stderr[-2000:]
    assert "exiting: cannot listen on 192.0.2.1:8000: [Errno 99] Cannot assign requested address" in out.stderr
    assert "could not be loaded" not in out.stderr and "application startup" not in out.stderr
    # port 0 has no check beforehand: uvicorn's own failure to bind is status 1 too (its 3 is an engine death)
    out = subprocess.run([sys.executable, "-m", "server", "--host", "192.0.2.1", "--port", "0"], cwd=REPO_ROOT,
                         capture_output=True, text=True, timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert out.returncode == 1, out.stderr[-2000:]
    assert "exiting: the server could not start on 192.0.2.1:0 (the reason is above)" in out.stderr


def test_request_log_lines(live_server):
    marker = "log-marker-prompt"
    r = httpx.post(live_server.base_url + "/completions", json={"prompt": marker, "max_tokens": 5, "seed": 1},
                   headers=live_server.headers, timeout=60)
    rid = r.json()["id"]
    httpx.post(live_server.base_url + "/completions", json={"prompt": "x", "model": "nope"}, headers=live_server.headers)
    log = live_server.log()
    lines = [ln for ln in log.splitlines() if rid in ln]
    assert len(lines) == 1, lines
    line = lines[0]
    for field in ("completions", "status=200", "prompt_tokens=17", "completion_tokens=", "denoising_steps=",
                  "canvases=", "latency=", "finish="):
        assert field in line, line
    assert marker in line  # the live server runs with --log-prompts
    assert any("status=404" in ln and "model_not_found" in ln for ln in log.splitlines())


def test_request_log_line_of_a_client_that_left(live_server):
    """A client that leaves before its answer: the line says so, and its choice ended with abort (as
    request_success_total counts it)."""
    rid = "left-before-the-answer"
    body = {"prompt": "slow", "max_tokens": 2000, "ignore_eos": True, "max_denoising_steps": 64}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(live_server.base_url + "/completions", json=body, timeout=httpx.Timeout(10, read=0.5),
                   headers={**live_server.headers, "X-Request-Id": rid})
    deadline = time.monotonic() + 60
    while not (lines := [ln for ln in live_server.log().splitlines() if f"cmpl-{rid}" in ln and "status=" in ln]):
        assert time.monotonic() < deadline, "no log line"
        time.sleep(0.1)
    assert "status=client_gone" in lines[0] and "finish=abort" in lines[0] and "note=client disconnected" in lines[0]


def test_sigterm_drains_in_flight_streams(server_launcher, server_tiny_checkpoint, server_sse):
    """SIGTERM lets a running stream finish (with [DONE]), then the process exits cleanly."""
    import signal

    srv = server_launcher(["--model", str(server_tiny_checkpoint), "--graceful-shutdown-seconds", "60"])
    body = {"prompt": "drain", "max_tokens": 480, "ignore_eos": True, "seed": 1, "stream": True,
            "stream_options": {"include_usage": True}}
    raw = b""
    with httpx.Client(timeout=120) as client:
        with client.stream("POST", srv.base_url + "/completions", json=body) as r:
            assert r.status_code == 200
            chunks = r.iter_raw()
            raw += next(chunks)
            srv.proc.send_signal(signal.SIGTERM)
            for part in chunks:
                raw += part
    frames = server_sse.parse_json(raw)
    assert frames[-1] == "[DONE]"
    assert frames[-2]["usage"]["completion_tokens"] == 480
    assert srv.proc.wait(60) == 0  # the README: status 0 after a drain (uvicorn alone would re-raise SIGTERM)
    assert "draining" in srv.log()


def test_second_sigint_exits_at_once(server_launcher, server_tiny_checkpoint):
    """A first SIGINT drains: /health says so and the running stream goes on. A second one exits at
    once, without waiting for that stream (minutes of work) or the drain (600 s)."""
    import signal

    srv = server_launcher(["--model", str(server_tiny_checkpoint), "--graceful-shutdown-seconds", "600"])
    body = {"prompt": "forever", "max_tokens": 4000, "ignore_eos": True, "max_denoising_steps": 64,
            "stability_threshold": 1000, "stream": True, "stream_drafts": True}
    after_second = []
    with httpx.Client(timeout=120) as client:
        with client.stream("POST", srv.base_url + "/completions", json=body) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            assert next(line for line in lines if line.startswith("data: {"))  # running
            srv.proc.send_signal(signal.SIGINT)
            deadline = time.monotonic() + 60  # only bounds a hang: returns as soon as the drain shows
            while httpx.get(srv.url + "/health", timeout=10).json() != {"status": "draining"}:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            assert next(line for line in lines if line.startswith("data: {"))  # the stream goes on
            assert srv.proc.poll() is None
            srv.proc.send_signal(signal.SIGINT)
            # the stream would run for minutes and the drain for 600 s: an exit within 60 s waited for neither
            status = srv.proc.wait(60)
            try:
                after_second.extend(lines)
            except httpx.HTTPError:  # the connection is cut mid-stream
                pass
    assert status == 0
    assert "data: [DONE]" not in after_second  # cut, not finished
    assert "second SIGINT: exiting without waiting for in-flight requests" in srv.log()


def test_a_misspelt_variable_stops_the_server_and_an_unknown_one_is_named():
    """A DIFFUSION_SERVER_ variable close to a setting's stops the server, naming the setting's (ignored, a
    misspelt key variable would leave authentication off), as an unknown YAML key does; one close to none
    is logged at start-up; the variables read elsewhere and Kubernetes' service links for a Service named
    diffusion-server are neither."""
    from server.cli import unknown_variables

    environ = {"DIFFUSION_SERVER_API_KEYS": "sk-1", "DIFFUSION_SERVER_MAX_NUM_SEQ": "2", "DIFFUSION_SERVER_BOGUS": "1",
               "DIFFUSION_SERVER_API_KEY": "sk-2", "DIFFUSION_SERVER_CACHE": "/data", "DIFFUSION_SERVER_PORT": "8000",
               "DIFFUSION_SERVER_SERVICE_HOST": "10.0.0.1", "DIFFUSION_SERVER_SERVICE_PORT": "8000",
               "DIFFUSION_SERVER_SERVICE_PORT_HTTP": "8000", "DIFFUSION_SERVER_PORT_8000_TCP": "tcp://10.0.0.1:8000",
               "DIFFUSION_SERVER_PORT_8000_TCP_ADDR": "10.0.0.1", "DIFFUSION_SERVER_METRICS_SERVICE_HOST": "10.0.0.2",
               "DIFFUSION_SERVER_METRICS_PORT": "tcp://10.0.0.2:9000",  # a link's bare _PORT: an address
               "DIFFUSION_SERVER_HTTP_PORT": "9000",  # a port number: a misspelt setting, not a link
               "OTHER_API_KEYS": "x"}
    assert unknown_variables(environ) == {"DIFFUSION_SERVER_API_KEYS": "DIFFUSION_SERVER_API_KEY",
                                          "DIFFUSION_SERVER_BOGUS": None,
                                          "DIFFUSION_SERVER_HTTP_PORT": "DIFFUSION_SERVER_PORT",
                                          "DIFFUSION_SERVER_MAX_NUM_SEQ": "DIFFUSION_SERVER_MAX_NUM_SEQS"}
    with pytest.raises(SystemExit) as stop:
        settings_from_args([], environ={"DIFFUSION_SERVER_API_KEYS": "sk-1"})
    assert stop.value.code == 2
    assert settings_from_args([], environ={"DIFFUSION_SERVER_BOGUS": "1"}).api_keys == []  # only logged
    # a Service named diffusion-server sets DIFFUSION_SERVER_PORT itself to its address: not a port to listen on
    assert settings_from_args([], environ={"DIFFUSION_SERVER_PORT": "tcp://10.0.0.1:8000"}).port == 8000
    assert settings_from_args([], environ={"DIFFUSION_SERVER_PORT": "9001"}).port == 9001


def test_bootstrap_serve_reads_paths_from_where_it_was_run(tmp_path):
    """``bash <repo>/scripts/bootstrap.sh serve --config my.yaml`` run from another folder reads that
    folder's my.yaml (its settings are checked: here one is refused), not one in the repository."""
    if Path(sys.prefix).resolve() != (REPO_ROOT / ".venv").resolve():
        pytest.skip("runs the bootstrap's own .venv, which this interpreter is not (it would install one)")
    (tmp_path / "my.yaml").write_text("max-num-seqs: 0\n")
    out = subprocess.run(["bash", str(REPO_ROOT / "scripts" / "bootstrap.sh"), "serve", "--config", "my.yaml"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().splitlines()[-1] == "invalid setting: max_num_seqs must be a positive integer (got 0)"


def test_bootstrap_serve_imports_the_project_not_the_callers_folders(tmp_path):
    """Run from a folder that holds its own server/ and engine/ packages, ``bootstrap.sh serve`` still runs
    this project's server (python -P: the current folder is not on sys.path)."""
    if Path(sys.prefix).resolve() != (REPO_ROOT / ".venv").resolve():
        pytest.skip("runs the bootstrap's own .venv, which this interpreter is not (it would install one)")
    for name in ("server", "engine"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(f"raise SystemExit('the caller folder\\'s {name} was imported')\n")
    out = subprocess.run(["bash", str(REPO_ROOT / "scripts" / "bootstrap.sh"), "serve", "--help"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("usage: diffusion-server")
