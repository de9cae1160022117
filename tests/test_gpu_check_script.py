"""bench/gpu_check.sh, the one script a lent GPU runs: it parses, every step the docs name exists, and
a step rehearses on this CPU with the tiny shape (device time is too scarce to find a typo there)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench/gpu_check.sh"


def _steps() -> set[str]:
    return set(re.findall(r"^ {4}([a-z0-9-]+)\)", SCRIPT.read_text(), flags=re.M))


def _listed(name: str) -> list[str]:
    """The words of the script's array ``name=( ... )``."""
    return re.search(rf"^{name}=\(([a-z0-9 \n-]+)\)", SCRIPT.read_text(), flags=re.M).group(1).split()


def test_script_parses_and_the_documented_steps_exist():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    steps = _steps()
    assert {"tests", "model", "bench", "samplers-full", "fp8-full", "batch-invariant"} <= steps
    assert sorted(_listed("ALL_STEPS")) == sorted(steps)  # the names checked up front are the case's
    assert set(_listed("DEFAULT_STEPS")) < steps
    docs = (REPO / "docs/gpu.md").read_text()
    listed = set(re.findall(r"^\d+\. `([a-z0-9-]+)`", docs, flags=re.M))  # the numbered list of steps
    listed |= set(re.findall(r"`(samplers?(?:-[a-z]+)*)`", docs))  # the sampler steps' paragraph
    for command in re.findall(r"gpu_check\.sh ([a-z0-9 -]+)`", docs):  # the commands quoted
        listed |= set(command.split())
    assert len(listed) >= 12 and listed <= steps, listed - steps


def test_an_unknown_step_is_refused_before_any_step_runs(tmp_path):
    r = subprocess.run(["bash", str(SCRIPT), "model", "no-such-step"], cwd=REPO, capture_output=True, text=True,
                       env={**os.environ, "PYTHON": sys.executable, "RESULTS": str(tmp_path)}, timeout=60)
    assert r.returncode == 2 and r.stderr.startswith("unknown step: no-such-step (steps: tests model bench")
    assert "==" not in r.stderr and not list(tmp_path.iterdir())


def test_help_lists_the_steps_and_installs_nothing(tmp_path):
    r = subprocess.run(["bash", str(SCRIPT), "--help"], cwd=REPO, capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PYTHON": str(tmp_path / "no-python"), "RESULTS": str(tmp_path / "r")})
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0].split()[1:] == _listed("ALL_STEPS")
    assert not (tmp_path / "r").exists()


def test_the_model_step_rehearses_on_cpu(tmp_path):
    """SHAPE=the tiny config: the model step writes a loadable DiffusionGemma-shaped checkpoint, the
    step's header reaches the script's stderr, and the results are packed into the device tool's $OUT."""
    env = {**os.environ, "PYTHON": sys.executable, "RESULTS": str(tmp_path / "out"), "MODEL_DIR": str(tmp_path / "m"),
           "SHAPE": "configs/models/diffusiongemma-tiny-shape.json", "LAYERS": "2", "OUT": str(tmp_path / "back")}
    r = subprocess.run(["bash", str(SCRIPT), "model"], cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert re.search(r"^== \d\d:\d\d:\d\d \(\d+ s\): .*make_random_model", r.stderr, flags=re.M)
    assert "!!" not in r.stderr
    assert (tmp_path / "out/model.txt").read_text().startswith(f"wrote {tmp_path / 'm'}")
    import tarfile

    with tarfile.open(tmp_path / "back/gpu-results.tgz") as packed:
        assert packed.extractfile("./model.txt").read() == (tmp_path / "out/model.txt").read_bytes()
    assert [p.name for p in (tmp_path / "back").iterdir()] == ["gpu-results.tgz"]
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tmp_path / "m")
    assert config.text_config.num_hidden_layers == 2 and config.text_config.num_experts == 8


def _image_packages() -> dict[str, str | None]:
    """The GPU image's packages (tests/gpu_image_packages.txt): name -> version where recorded."""
    packages = {}
    for line in (REPO / "tests/gpu_image_packages.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            packages[canonicalize_name(name)] = version or None
    return packages


def test_the_carried_wheels_and_the_image_meet_every_requirement():
    """Nothing can be installed on a lent GPU machine but the wheels scripts/gpu_wheels.sh carries (this
    .venv's versions, installed without their dependencies): every requirement of the project and of a
    carried package, and every version transformers checks at import, must be met by a carried wheel or
    by the image (by a recorded version where there is one). A miss costs a device call."""
    names = re.search(r"^NAMES=\(([a-z0-9 \n-]+)\)", (REPO / "scripts/gpu_wheels.sh").read_text(), re.M).group(1)
    carried = {canonicalize_name(n) for n in names.split()}
    image = _image_packages()
    machine = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
               "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
               "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}

    def unmet(requirement: Requirement, by: str) -> str | None:
        name = canonicalize_name(requirement.name)
        if name in carried:
            have = metadata.version(name)
        elif name in image:
            have = image[name]
            if have is None:
                return None
        else:
            return f"{by} needs {requirement}: neither carried nor in the image"
        if requirement.specifier.contains(have, prereleases=True):
            return None
        return f"{by} needs {requirement}, has {have}"

    misses = []
    for by in ["diffusion-server", *sorted(carried)]:
        for text in metadata.requires(by) or []:
            requirement = Requirement(text)
            if requirement.marker is None or requirement.marker.evaluate(machine):
                misses.append(unmet(requirement, by))
    from transformers.dependency_versions_check import pkgs_to_check_at_runtime
    from transformers.dependency_versions_table import deps

    for package in pkgs_to_check_at_runtime:
        if package != "python":
            misses.append(unmet(Requirement(deps[package]), "transformers at import"))
    assert [m for m in misses if m] == []
    assert {"fastapi", "transformers", "torchao"} <= carried and "torch" not in carried  # the list was read
