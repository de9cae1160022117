"""The model served when ``--model`` is not given."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

logger = logging.getLogger("server")

TINY_DEFAULT_NAME = "tiny-random-diffusiongemma-v1"
EMBEDDED_SERVED_NAME = "diffusiongemma-sudoku"


def default_served_name(model_path: str) -> str:
    """The name /v1/models shows for the default model: short, stable, path-independent."""
    if Path(model_path).resolve() == embedded_model_dir():
        return EMBEDDED_SERVED_NAME
    return TINY_DEFAULT_NAME


def embedded_model_dir() -> Path:
    import engine

    return Path(engine.__file__).resolve().parent / "default_model"


def cache_dir() -> Path:
    base = os.environ.get("DIFFUSION_SERVER_CACHE")
    if base:
        return Path(base)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "diffusion-server"


def resolve_default_model() -> str:
    """``engine/default_model`` if it holds a checkpoint, else a tiny random model in the cache folder.

    The tiny model is built once with ``tools.tiny_checkpoint.build_tiny_checkpoint`` into a
    temporary folder and renamed into place, so concurrent first starts do not see half a checkpoint.
    """
    embedded = embedded_model_dir()
    if (embedded / "config.json").is_file():
        return str(embedded)
    target = cache_dir() / TINY_DEFAULT_NAME
    if (target / "config.json").is_file():
        return str(target)
    from tools.tiny_checkpoint import build_tiny_checkpoint

    logger.warning("no --model given and no embedded model: building a tiny random model in %s", target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=target.parent))
    try:
        build_tiny_checkpoint(tmp)
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():  # someone else won the race, or a real failure
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return str(target)
