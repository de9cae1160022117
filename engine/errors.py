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


class ContextLengthError(InvalidRequestError):
    """A request's prompt and ``max_tokens`` together are over the context length (each kept, for the
    server to word the refusal for what the client sent)."""

    def __init__(self, prompt_len: int, max_tokens: int, max_model_len: int):
        super().__init__(
            f"this model's maximum context length is {max_model_len} tokens, but the prompt has {prompt_len} tokens "
            f"and max_tokens is {max_tokens} ({prompt_len + max_tokens} in total); reduce the prompt or max_tokens",
            "max_tokens")
        self.prompt_len, self.max_tokens, self.max_model_len = prompt_len, max_tokens, max_model_len


class QueueFullError(RuntimeError):
    """The engine holds ``max_num_seqs + max_waiting`` unfinished requests; the caller should retry later."""


class EngineDeadError(RuntimeError):
    """The step loop is not running (shut down, or died): no request can be served."""


class CheckpointError(ValueError):
    """The checkpoint cannot be loaded as it is (a missing tensor, an unsupported format): one line."""


class SettingsError(ValueError):
    """Settings this checkpoint or machine cannot serve, found at load (a context over the model's, a CUDA
    device torch cannot use, a KV budget too small): one line."""


def log_load_failure(log: logging.Logger, exc: BaseException, message: str, *args) -> None:
    """Log why a model did not load, from inside the ``except`` block: a ``CheckpointError`` or
    ``SettingsError`` as one line (its message names the reason), anything else with its traceback."""
    if isinstance(exc, (CheckpointError, SettingsError)):
        log.error(message + ": %s", *args, exc)
    else:
        log.exception(message, *args)
