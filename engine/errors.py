"""The errors the engine raises to its callers (no torch): the server maps each to an HTTP status."""

from __future__ import annotations


class InvalidRequestError(ValueError):
    """A request parameter is invalid. ``param`` names the offending field (OpenAI error shape)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param


class QueueFullError(RuntimeError):
    """The engine holds ``max_num_seqs + max_waiting`` unfinished requests; the caller should retry later."""


class EngineDeadError(RuntimeError):
    """The step loop is not running (shut down, or died): no request can be served."""


class CheckpointError(ValueError):
    """The checkpoint cannot be loaded as it is (a missing tensor, an unsupported format): one line."""
