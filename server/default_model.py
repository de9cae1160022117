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


class DefaultModelError(RuntimeError):
    """The fallback model cannot be built in the cache folder (one line: the folder and the reason)."""


def cache_dir() -> Path:
    """``$DIFFUSION_SERVER_CACHE``, else ``$XDG_CACHE_HOME/diffusion-server`` (an absolute one, as the XDG
    rules say), else ``~/.cache/diffusion-server``."""
    base = os.environ.get("DIFFUSION_SERVER_CACHE")
    if base:
        return Path(base).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache") / "diffusion-server"


def resolve_default_model() -> str:
    """``engine/default_model`` if it holds a checkpoint, else a tiny random model in the cache folder.

    The tiny model is built once with ``tools.tiny_checkpoint.build_tiny_checkpoint`` into a
    temporary folder and renamed into place, so concurrent first starts do not see half a checkpoint;
    a target folder without ``config.json`` (a copy left half made) is moved aside and built again.
    Raises ``DefaultModelError`` when the cache folder cannot hold it (read-only, no permission).
    """
    embedded = embedded_model_dir()
    if (embedded / "config.json").is_file():
        return str(embedded)
    target = cache_dir() / TINY_DEFAULT_NAME
    try:
        if (target / "config.json").is_file():
            return str(target)
        from tools.tiny_checkpoint import build_tiny_checkpoint

        logger.warning("no --model given and no embedded model: building a tiny random model in %s", target)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=target.parent))
        try:
            build_tiny_checkpoint(tmp)
            for path in (tmp, *tmp.rglob("*")):  # as mkdir and open make them: others sharing the cache can read
                path.chmod(0o755 if path.is_dir() else 0o644)
            if target.exists() and not (target / "config.json").is_file():
                stale = Path(tempfile.mkdtemp(prefix=".stale-", dir=target.parent))
                os.replace(target, stale / TINY_DEFAULT_NAME)
                shutil.rmtree(stale, ignore_errors=True)
            try:
                os.replace(tmp, target)
            except OSError:
                if not (target / "config.json").is_file():  # someone else won the race, or a real failure
                    raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    except OSError as exc:
        raise DefaultModelError(f"cannot build the default model in {target.parent}: {exc.strerror or exc} "
                                "(set DIFFUSION_SERVER_CACHE to a folder it may write, or pass --model)") from None
    return str(target)
