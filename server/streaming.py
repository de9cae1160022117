"""Running the engine requests of one HTTP request, and server-sent events.

One HTTP request becomes one engine request per choice (``n`` times each prompt). ``ChoiceSet``
runs them as tasks that feed one queue, so the outputs of all choices interleave in the order the
engine produces them. Cancelling the set (client gone, error, stream closed) cancels the tasks,
which closes the engine's generators: the engine aborts those requests and frees their slots.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass, field

from sse_starlette import EventSourceResponse, ServerSentEvent

from engine import EngineDeadError, InvalidRequestError, QueueFullError
from engine.outputs import Draft, RequestOutput
from engine.sampling_params import SamplingParams

from . import errors
from .errors import APIError

logger = logging.getLogger("server")

DONE = "[DONE]"


@dataclass
class ChoiceSpec:
    index: int
    prompt_index: int
    prompt_ids: list[int]
    params: SamplingParams
    request_id: str


@dataclass
class ChoiceResult:
    """What one choice produced, accumulated from its outputs."""

    index: int
    text_parts: list[str] = field(default_factory=list)
    finish_reason: str | None = None
    num_prompt_tokens: int = 0
    num_generated_tokens: int = 0
    num_denoising_steps: int = 0
    num_canvases: int = 0
    num_drafts: int = 0

    @property
    def text(self) -> str:
        return "".join(self.text_parts)

    def update(self, out: RequestOutput) -> None:
        if out.text:
            self.text_parts.append(out.text)
        if out.draft is not None:
            self.num_drafts += 1
        self.num_prompt_tokens = out.num_prompt_tokens or self.num_prompt_tokens
        self.num_generated_tokens = out.num_generated_tokens
        self.num_denoising_steps = out.num_denoising_steps
        self.num_canvases = out.num_canvases
        if out.finished:
            self.finish_reason = out.finish_reason


def failure_for(out: RequestOutput) -> APIError | None:
    """The error a finished output stands for, if any (``error`` and server-side ``abort``)."""
    if not out.finished:
        return None
    if out.finish_reason == "error":
        detail = f": {out.error}" if out.error else ""
        return errors.internal_error(f"The engine failed while generating{detail}")
    if out.finish_reason == "abort":  # not by us: the engine shut down or stopped
        detail = out.error or "the server is shutting down"
        return errors.unavailable(f"The request was aborted: {detail}.", "request_aborted")
    return None


class ChoiceSet:
    """The engine requests of one HTTP request."""

    # Loop iterations ``start`` gives the tasks to reach the engine's queue (it raises
    # QueueFullError on submission, before its first real await).
    PRIME_ITERATIONS = 4

    def __init__(self, engine, specs: list[ChoiceSpec], on_choice_finished=None, live: set | None = None):
        self.engine = engine
        self.specs = specs
        self.on_choice_finished = on_choice_finished  # (finish_reason, prompt_tokens, generated_tokens)
        self.live = live  # the server's set of running ChoiceSets (aborted together when a drain times out)
        self.queue: asyncio.Queue = asyncio.Queue()
        self.tasks: list[asyncio.Task] = []
        self.results = {s.index: ChoiceResult(s.index) for s in specs}
        self._submit_errors: list[BaseException] = []

    async def start(self) -> None:
        """Submit every choice; if the engine's queue is full for any of them, abort the others and raise 429."""
        if self.live is not None:
            self.live.add(self)
        for spec in self.specs:
            self.tasks.append(asyncio.create_task(self._pump(spec), name=spec.request_id))
        for _ in range(self.PRIME_ITERATIONS):
            await asyncio.sleep(0)
            if self._submit_errors:
                break
        if any(isinstance(e, QueueFullError) for e in self._submit_errors):
            self.cancel()
            raise errors.queue_full()

    async def _pump(self, spec: ChoiceSpec) -> None:
        agen = None
        got_any = False
        submitted = True
        reason, generated = "abort", 0
        try:
            # validation and admission happen synchronously here (InvalidRequestError, QueueFullError)
            agen = self.engine.generate(spec.prompt_ids, spec.params, spec.request_id, prompt_checked=True)
            async for out in agen:
                got_any = True
                generated = out.num_generated_tokens
                self.queue.put_nowait((spec.index, out, None))
                if out.finished:
                    reason = out.finish_reason or "stop"
                    break
            else:
                raise RuntimeError("the engine's stream ended without a finished output")
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - forwarded to the consumer
            if not got_any:
                self._submit_errors.append(exc)
                submitted = not isinstance(exc, (QueueFullError, APIError, EngineDeadError))
            reason = "error"
            self.queue.put_nowait((spec.index, None, exc))
        finally:
            if agen is not None:
                await agen.aclose()
            if submitted and self.on_choice_finished is not None:
                self.on_choice_finished(reason, len(spec.prompt_ids), generated)

    async def events(self):
        """Yield ``(index, RequestOutput)`` until every choice finished; raise ``APIError`` on failure."""
        remaining = len(self.specs)
        while remaining:
            index, out, exc = await self.queue.get()
            if exc is not None:
                if isinstance(exc, QueueFullError):
                    raise errors.queue_full()
                if isinstance(exc, EngineDeadError):
                    raise errors.unavailable("The engine has stopped; the server needs a restart.", "engine_dead")
                if isinstance(exc, APIError):
                    raise exc
                if isinstance(exc, InvalidRequestError):
                    raise errors.bad_request(exc.message, exc.param)
                logger.error("engine request %s failed: %r", self.specs[index].request_id, exc)
                raise errors.internal_error()
            self.results[index].update(out)
            yield index, out
            if out.finished:
                remaining -= 1

    def cancel(self) -> None:
        if self.live is not None:
            self.live.discard(self)
        for task in self.tasks:
            if not task.done():
                task.cancel()

    def abort_in_engine(self) -> None:
        """Abort every choice inside the engine: each finishes with ``abort`` (a clear end for the client:
        a 503 ``request_aborted``, or that error chunk and ``[DONE]`` on a stream)."""
        for spec in self.specs:
            self.engine.abort(spec.request_id)


async def wait_for_disconnect(receive) -> None:
    """Return when the client has gone (the body has already been read by then)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


class ClientDisconnected(Exception):
    pass


async def collect_all(choice_set: ChoiceSet, receive) -> dict[int, ChoiceResult]:
    """Run every choice to the end (non-streaming); abort them all if the client goes away."""

    async def consume():
        async for index, out in choice_set.events():
            err = failure_for(out)
            if err is not None:
                raise err
        return choice_set.results

    consumer = asyncio.create_task(consume())
    watcher = asyncio.create_task(wait_for_disconnect(receive))
    try:
        done, _ = await asyncio.wait({consumer, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if consumer in done:
            return consumer.result()
        raise ClientDisconnected()
    finally:
        consumer.cancel()
        watcher.cancel()
        choice_set.cancel()


def json_chunk(obj: dict) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def draft_extension(draft: Draft, tokenizer) -> dict:
    """The ``diffusion`` object of a draft chunk (see the README's streaming section)."""
    return {
        "canvas": draft.canvas,
        "step": draft.step,
        "max_steps": draft.max_steps,
        "draft": tokenizer.decode(list(draft.token_ids), skip_special_tokens=True),
        "changed": list(draft.changed),
        "changed_token_ids": [draft.token_ids[p] for p in draft.changed],
    }


class SSEResponse(EventSourceResponse):
    """``EventSourceResponse`` with OpenAI's framing (``data: ...\\n\\n``) and a guaranteed cleanup.

    ``on_close`` runs however the response ends (finished, client gone, server shutting down), even
    when the body iterator never started, so the engine requests are always released.
    """

    def __init__(self, content, on_close, ping_seconds: float = 15.0, **kwargs):
        super().__init__(content, sep="\n", ping=ping_seconds, **kwargs)
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


def sse(data: str) -> ServerSentEvent:
    return ServerSentEvent(data=data, sep="\n")
