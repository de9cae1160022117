"""The CI rule on skips (tests/conftest.py): under CI=true a skip fails the run unless the test is
marked cuda; outside CI a skip stays a skip, and the README's test command prints its reason."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import REPO_ROOT

SAMPLE = '''
import pytest

def test_passes():
    pass

def test_skips_for_a_missing_tool():
    pytest.skip("frobnicator not installed")

@pytest.mark.cuda
def test_needs_a_gpu():
    pytest.skip("needs a CUDA device")

@pytest.mark.xfail(strict=True, reason="a known bug")
def test_known_bug():
    assert False
'''

MODULE_SKIP = '''
import pytest
pytest.importorskip("a_module_that_is_not_installed")

def test_never_collected():
    pass
'''

CUDA_MODULE_SKIP = '''
import pytest

pytestmark = pytest.mark.cuda

pytest.skip("needs a CUDA device", allow_module_level=True)

def test_never_collected():
    pass
'''


def run_pytest(tmp_path, source: str, ci: str | None):
    test_file = tmp_path / "test_sample.py"
    test_file.write_text(source)
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci is not None:
        env["CI"] = ci
    env["PYTHONPATH"] = str(REPO_ROOT)
    # the repository's conftest as a plugin, on a file outside the repository (its own rootdir)
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "tests.conftest", "-p", "no:cacheprovider",
                           "--rootdir", str(tmp_path), str(test_file)],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)


def test_outside_ci_a_skip_is_a_skip_with_its_reason_shown(tmp_path):
    proc = run_pytest(tmp_path, SAMPLE, ci=None)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 passed, 2 skipped, 1 xfailed" in proc.stdout
    assert "frobnicator not installed" in proc.stdout  # -rs: the reason is printed


def test_under_ci_a_skip_fails_but_cuda_skips_and_xfails_do_not(tmp_path):
    proc = run_pytest(tmp_path, SAMPLE, ci="true")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "1 failed, 1 passed, 1 skipped, 1 xfailed" in proc.stdout
    assert "test_skips_for_a_missing_tool skipped under CI=true" in proc.stdout
    assert "frobnicator not installed" in proc.stdout
    assert "test_sample.py:12: needs a CUDA device" in proc.stdout  # the cuda skip stays a skip


def test_under_ci_a_module_skipped_at_collection_fails(tmp_path):
    proc = run_pytest(tmp_path, MODULE_SKIP, ci="true")
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "skipped at collection under CI=true" in proc.stdout
    assert "a_module_that_is_not_installed" in proc.stdout
    assert run_pytest(tmp_path, MODULE_SKIP, ci=None).returncode == 5  # outside CI: nothing ran, no failure


def test_under_ci_a_cuda_module_may_skip_at_collection(tmp_path):
    proc = run_pytest(tmp_path, CUDA_MODULE_SKIP, ci="true")
    assert proc.returncode == 5, proc.stdout + proc.stderr  # no test ran, none failed
    assert "1 skipped" in proc.stdout and "needs a CUDA device" in proc.stdout and "error" not in proc.stdout
