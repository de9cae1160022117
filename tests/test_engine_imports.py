"""The engine's walls: the bookkeeping side imports no torch, no engine module imports another that
imports it back, and every module imports on its own.

The import checks run in a fresh interpreter, so what this test process already imported cannot
hide a leak or a cycle.
"""

from __future__ import annotations

import ast
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import engine

ROOT = Path(__file__).resolve().parents[1]
TORCH_FREE = ["engine", "engine.errors", "engine.kv_budget", "engine.outputs", "engine.request",
              "engine.sampling_params", "engine.scheduler", "engine.stats", "engine.work"]
ENGINE_MODULES = sorted(f"engine.{m.name}" for m in pkgutil.iter_modules(engine.__path__))


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_scheduler_and_request_import_no_torch():
    code = (f"import sys\nimport {', '.join(TORCH_FREE)}\n"
            "heavy = sorted(m for m in ('torch', 'transformers', 'engine.model_runner', 'engine.kv_cache')"
            " if m in sys.modules)\n"
            "assert not heavy, heavy\n"
            "from engine import InvalidRequestError, QueueFullError, EngineDeadError, SamplingParams, Draft, "
            "RequestOutput, EngineSettings\n"
            "assert 'torch' not in sys.modules\n")
    result = _run(code)
    assert result.returncode == 0, result.stderr


def test_public_names_load_on_first_access():
    code = ("import engine\n"
            "from engine import AsyncEngine, EngineCore, EngineSettings, SamplingParams, InvalidRequestError, "
            "QueueFullError, EngineDeadError, Draft, RequestOutput\n"
            "import engine.async_engine, engine.core, engine.errors, engine.sampling_params, engine.scheduler\n"
            "assert AsyncEngine is engine.async_engine.AsyncEngine and EngineCore is engine.core.EngineCore\n"
            "assert QueueFullError is engine.errors.QueueFullError\n"
            "assert InvalidRequestError is engine.sampling_params.InvalidRequestError\n"
            "assert sorted(engine.__all__) == sorted(['AsyncEngine', 'Draft', 'EngineCore', 'EngineDeadError', "
            "'EngineSettings', 'InvalidRequestError', 'QueueFullError', 'RequestOutput', 'SamplingParams'])\n"
            "try:\n    engine.NoSuchThing\nexcept AttributeError:\n    pass\nelse:\n    raise SystemExit('no error')\n")
    result = _run(code)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("module", ENGINE_MODULES)
def test_every_engine_module_imports_first_in_a_fresh_process(module):
    """Imported first, before any other engine module, each one loads (an import cycle fails here)."""
    result = _run(f"import {module}")
    assert result.returncode == 0, result.stderr


def _engine_imports(path: Path) -> set[str]:
    """The engine modules a module imports, at its top or inside a function alike."""
    module = "engine" if path.stem == "__init__" else f"engine.{path.stem}"
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative to the engine package
                base = "engine" + (f".{base}" if base else "")
            # `from engine import x` names a submodule or a name of the package itself
            found.update(f"{base}.{a.name}" if f"{base}.{a.name}" in ENGINE_MODULES else base for a in node.names)
    return {name for name in found if name in ENGINE_MODULES or name == "engine"} - {module}


def test_engine_modules_import_no_cycle():
    """The import graph between engine modules is acyclic (deferred imports count: a cycle through a
    function-level import still ties the two modules together)."""
    graph = {("engine" if p.stem == "__init__" else f"engine.{p.stem}"): _engine_imports(p)
             for p in sorted((ROOT / "engine").glob("*.py"))}
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            assert cycle is None, " -> ".join(cycle)
