"""What the server needs of an engine: ``EngineClient``, the protocol ``engine.AsyncEngine`` implements.

The server reads nothing else of the engine, so a wrapper (a test's fault injector, a remote
engine) needs only this. Every member is cheap and safe to call from the event loop: the step
loop runs in the engine's own thread and publishes its gauges as plain values.
"""

from __future__ import annotations

from typing import AsyncIterator, Protocol

from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams


class Admission(Protocol):
    """Places reserved by ``EngineClient.admit``; ``release()`` (or leaving ``with``) frees those not taken."""

    remaining: int

    def release(self) -> None: ...

    def __enter__(self) -> "Admission": ...

    def __exit__(self, *exc) -> None: ...


class EngineClient(Protocol):
    tokenizer: object  # the checkpoint's transformers tokenizer
    processor: object | None  # its image processor and tokenizer (engine.multimodal); None: text only
    model_name: str
    max_model_len: int  # prompt + max_tokens limit
    canvas_length: int
    default_params: SamplingParams  # the checkpoint's generation config, fully resolved

    # gauges, as the step loop last published them (read num_running first: a request moving from waiting
    # to running then shows in one of them at most)
    num_running: int
    num_waiting: int
    kv_usage: float  # fraction of the KV token budget the running requests hold (0..1)

    @property
    def healthy(self) -> bool:
        """The step loop is running: requests can be served."""

    def num_live_states(self) -> int:
        """Requests and tensor states the engine still tracks (0 when idle: a leak check)."""

    def start(self) -> None:
        """Start the step loop."""

    def shutdown(self) -> None:
        """Stop the step loop (blocking); in-flight requests finish with ``abort``."""

    def resolve(self, prompt_ids: list[int], params: SamplingParams, *, prompt_checked: bool = False,
                images=None) -> SamplingParams:
        """Fill the checkpoint's defaults into ``params`` and validate them against this prompt;
        raises ``engine.errors.InvalidRequestError``. ``prompt_checked`` skips the per-token check
        of a prompt already accepted once. ``images``: the prompt's ``engine.multimodal.ImageInputs``
        (None: a text prompt)."""

    def admit(self, count: int) -> "Admission":
        """Reserve room in the queue for ``count`` requests, all or none (the engine's one queue bound).
        Raises ``InvalidRequestError`` (``count`` over the bound itself), ``QueueFullError`` or
        ``EngineDeadError`` with nothing queued. The result is a context
        manager: leaving it gives back the places that no ``generate`` took."""

    def generate(self, prompt_ids: list[int], params: SamplingParams, request_id: str, *,
                 prompt_checked: bool = False, admission: "Admission | None" = None,
                 images=None) -> AsyncIterator[RequestOutput]:
        """Submit one request and return its outputs; the last has ``finished=True``. Refuses at
        once, before returning, with ``InvalidRequestError``; without ``admission`` also with
        ``QueueFullError`` (the waiting queue is full) or ``EngineDeadError``. With ``admission``
        (from ``admit``) it takes one of the places reserved there. Closing the iterator early
        aborts the request."""

    def abort(self, request_id: str) -> None:
        """Abort a request from the outside (thread-safe); it finishes with ``abort``."""
