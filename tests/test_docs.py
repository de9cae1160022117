"""The README documents every flag and every metric the code has."""

from __future__ import annotations

from pathlib import Path

from server.metrics import METRIC_DOCS, PREFIX
from server.settings import OPTIONS

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_every_flag_is_in_the_readme():
    missing = [flag for flag, *_ in OPTIONS if f"`{flag}" not in README]
    assert missing == []


def test_every_metric_is_in_the_readme():
    missing = [name for name, *_ in METRIC_DOCS if f"`{PREFIX}{name}`" not in README]
    assert missing == []


def test_readme_starts_with_the_two_commands():
    head = README.split("```bash", 1)[1].split("```", 1)[0].strip().splitlines()
    assert [line.split("#")[0].strip() for line in head] == [
        "bash scripts/bootstrap.sh serve",
        "bash scripts/bootstrap.sh test",
    ]
    ci = (Path(__file__).resolve().parents[1] / ".ci" / "run").read_text()
    assert "bash scripts/bootstrap.sh test" in ci
