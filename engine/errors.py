"""The errors the engine raises to its callers (no torch): the server maps each to an HTTP status."""

from __future__ import annotations

import logging


class InvalidRequestError(ValueError):
    """A request parameter is invalid. ``param`` names the offending field, ``code`` the kind of error where
    it has one (``limit_exceeded``: over a setting), as in OpenAI's error shape."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


class QueueFullError(RuntimeError):
    """The engine holds ``max_num_seqs + max_waiting`` unfinished requests; the caller should retry later."""


class EngineDeadError(RuntimeError):
    """The step loop is not running (shut down, or died): no request can be served."""


class CheckpointError(ValueError):
    """The checkpoint cannot be loaded as it is (a missing tensor, an unsupported format): one line."""


def log_load_failure(log: logging.Logger, exc: BaseException, message: str, *args) -> None:
    """Log why a model did not load, from inside the ``except`` block: a ``CheckpointError`` as one line (its
    message names the reason), anything else with its traceback."""
    if isinstance(exc, CheckpointError):
        log.error(message + ": %s", *args, exc)
    else:
        log.exception(message, *args)
