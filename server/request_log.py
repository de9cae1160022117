"""One log line per completion request that reaches its endpoint, written when it ends (``server.requests``
logger); a request the middleware refuses (401, 403, 408, 413) is only counted (``http_errors_total``).

The line carries the request id, endpoint, status, token and step counts and latency; prompts and
outputs only with ``--log-prompts`` (each cut to ``LOG_TEXT_LIMIT`` characters).
"""

from __future__ import annotations

import logging
import time

from .choices import usage

logger = logging.getLogger("server.requests")

LOG_TEXT_LIMIT = 2000
CLIENT_GONE = "client_gone"  # the status of a request whose client disconnected before its answer


class RequestLog:
    """Writes one line per HTTP request when it ends."""

    def __init__(self, request_id: str, endpoint: str, log_prompts: bool):
        self.request_id = request_id
        self.endpoint = endpoint
        self.log_prompts = log_prompts
        self.start = time.monotonic()
        self.prompt_text: str | None = None
        self._done = False

    def finish(self, status: int | str, specs=(), results: dict | None = None, note: str = "") -> None:
        if self._done:
            return
        self._done = True
        results = results or {}
        u = usage(list(specs), results) if specs else {}
        # a client that left ends its unfinished choices with abort (as request_success_total counts them)
        unfinished = "abort" if status == CLIENT_GONE else "-"
        reasons = sorted({r.finish_reason or unfinished for r in results.values()}) or ["-"]
        line = (
            f"{self.request_id} {self.endpoint} status={status} choices={len(results)} "
            f"prompt_tokens={u.get('prompt_tokens', 0)} completion_tokens={u.get('completion_tokens', 0)} "
            f"denoising_steps={u.get('denoising_steps', 0)} canvases={u.get('canvases', 0)} "
            f"latency={time.monotonic() - self.start:.3f}s finish={','.join(reasons)}"
        )
        if note:
            line += f" note={note}"
        if self.log_prompts:
            prompt = (self.prompt_text or "")[:LOG_TEXT_LIMIT]
            outputs = [results[i].text[:LOG_TEXT_LIMIT] for i in sorted(results)]
            line += f" prompt={prompt!r} outputs={outputs!r}"
        logger.info(line)
