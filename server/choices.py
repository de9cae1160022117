"""The engine requests of one HTTP request: one per choice (``n`` times each prompt).

``ChoiceSet.start`` submits them all at once (all or none: the engine admits every choice or none, so a
full queue refuses the whole request and queues nothing);
their outputs interleave in one queue in the order the engine produces them. Cancelling the set
(client gone, error, stream closed) closes the engine streams, which aborts those requests and
frees their slots.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections import deque
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable

from engine.outputs import Draft, RequestOutput, TokenLogprob
from engine.sampling_params import SamplingParams

from . import errors
from .engine_client import EngineClient


@dataclass
class ChoiceSpec:
    """One choice: prompt ``prompt_index``'s ``n``-th sample, as one engine request."""

    index: int
    prompt_index: int
    prompt_ids: list[int]
    params: SamplingParams  # resolved
    request_id: str
    images: object | None = None  # the prompt's engine.multimodal.ImageInputs, if it has images

    @property
    def num_prompt_tokens(self) -> int:
        """The model's input read at every step: the prompt and its infill suffix."""
        return len(self.prompt_ids) + len(self.params.infill_suffix or ())


@dataclass
class ChoiceResult:
    """What one choice produced, accumulated from its outputs."""

    index: int
    text_parts: list[str] = field(default_factory=list)
    finish_reason: str | None = None
    num_generated_tokens: int = 0
    num_denoising_steps: int = 0
    num_canvases: int = 0
    logprobs: list[TokenLogprob] | None = None  # when the request asked for them

    @property
    def text(self) -> str:
        return "".join(self.text_parts)

    def update(self, out: RequestOutput) -> None:
        if out.text:
            self.text_parts.append(out.text)
        if out.logprobs is not None:
            if self.logprobs is None:
                self.logprobs = []
            self.logprobs.extend(out.logprobs)
        self.num_generated_tokens = out.num_generated_tokens
        self.num_denoising_steps = out.num_denoising_steps
        self.num_canvases = out.num_canvases
        if out.finished:
            self.finish_reason = out.finish_reason


def usage(specs: list[ChoiceSpec], results: dict[int, ChoiceResult]) -> dict:
    """Exact counts: each prompt once (however large ``n``) with its infill suffix (model input too, read
    at every step), every choice's committed tokens, plus the diffusion extension counts."""
    prompt = sum({s.prompt_index: s.num_prompt_tokens for s in specs}.values())
    completion = sum(r.num_generated_tokens for r in results.values())
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "denoising_steps": sum(r.num_denoising_steps for r in results.values()),
        "canvases": sum(r.num_canvases for r in results.values()),
    }


# (finish reason, prompt tokens, generated tokens) of each choice that reached the engine
ChoiceFinished = Callable[[str, int, int], None]


def _draft_only(out: RequestOutput) -> bool:
    return out.draft is not None and not out.token_ids and not out.text and not out.finished


def merge_drafts(older: RequestOutput, newer: RequestOutput) -> RequestOutput:
    """``newer``, with ``changed`` covering every position changed since the draft before ``older``:
    a client that applies it gets the same canvas as one that applied both."""
    a, b = older.draft, newer.draft
    changed = tuple(sorted(set(a.changed) | set(b.changed)))
    return dataclasses.replace(newer, draft=Draft(b.canvas, b.step, b.max_steps, b.token_ids, changed))


class Outbox:
    """The outputs of a request's choices waiting for the response, in order. A draft still waiting
    when the next draft of the same choice and canvas arrives is merged into it (``merge_drafts``):
    while the client reads slowly, only committed text and one draft per choice wait here, however
    long the request runs."""

    def __init__(self):
        self._items: deque[list] = deque()  # [choice index, output, exception]
        self._waiting_draft: dict[int, list] = {}  # choice index -> its draft entry still in _items
        self._ready = asyncio.Event()

    def put(self, index: int, out: RequestOutput | None, exc: BaseException | None = None) -> None:
        if exc is None and _draft_only(out):
            entry = self._waiting_draft.get(index)
            if entry is not None and entry[1].draft.canvas == out.draft.canvas:
                entry[1] = merge_drafts(entry[1], out)
                return
            entry = [index, out, None]
            self._waiting_draft[index] = entry
        else:
            self._waiting_draft.pop(index, None)  # later drafts must not move ahead of this
            entry = [index, out, exc]
        self._items.append(entry)
        self._ready.set()

    async def get(self) -> tuple[int, RequestOutput | None, BaseException | None]:
        while not self._items:
            self._ready.clear()
            await self._ready.wait()
        entry = self._items.popleft()
        if self._waiting_draft.get(entry[0]) is entry:
            del self._waiting_draft[entry[0]]
        return entry[0], entry[1], entry[2]


class ChoiceSet:
    """The engine requests of one HTTP request, and what they produced so far (``results``)."""

    def __init__(self, engine: EngineClient, specs: list[ChoiceSpec], on_choice_finished: ChoiceFinished,
                 live: set):
        self.engine = engine
        self.specs = specs
        self.on_choice_finished = on_choice_finished
        self.live = live  # the server's running ChoiceSets (aborted together when a drain times out)
        self.results = {s.index: ChoiceResult(s.index) for s in specs}
        self._queue = Outbox()
        self._tasks: list[asyncio.Task] = []

    async def start(self) -> None:
        """Submit every choice, all or none: the engine reserves room for all of them first
        (``EngineClient.admit``), so a full queue (or a dead engine) refuses the request before any
        choice is queued. The engine's refusal is raised as an ``APIError``."""
        streams = []
        try:
            with self.engine.admit(len(self.specs)) as admission:
                for spec in self.specs:
                    streams.append(self.engine.generate(spec.prompt_ids, spec.params, spec.request_id,
                                                        prompt_checked=True, admission=admission, images=spec.images))
        except Exception as exc:  # noqa: BLE001 - the engine's refusal becomes the request's error
            for spec, stream in zip(self.specs, streams):  # only if the engine died between two choices
                await stream.aclose()
                self.on_choice_finished("abort", spec.num_prompt_tokens, 0)
            raise errors.from_engine(exc) from None
        self.live.add(self)
        for spec, stream in zip(self.specs, streams):
            self._tasks.append(asyncio.create_task(self._pump(spec, stream), name=spec.request_id))

    async def _pump(self, spec: ChoiceSpec, stream: AsyncIterator[RequestOutput]) -> None:
        reason, generated = "abort", 0
        try:
            async for out in stream:
                # an engine's death ends the stream with an output that counts none: keep what was committed
                generated = max(generated, out.num_generated_tokens)
                self._queue.put(spec.index, out)
                if out.finished:
                    reason = out.finish_reason or "stop"
                    break
            else:
                raise RuntimeError("the engine's stream ended without a finished output")
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - forwarded to the consumer
            reason = "error"
            self._queue.put(spec.index, None, exc)
        finally:
            await stream.aclose()
            self.on_choice_finished(reason, spec.num_prompt_tokens, generated)

    async def events(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Yield ``(choice index, output)`` until every choice finished; raise the ``APIError`` of
        the first failure (an engine exception, or an output that finished with an error)."""
        remaining = len(self.specs)
        while remaining:
            index, out, exc = await self._queue.get()
            failure = errors.from_engine(exc if exc is not None else out)
            if failure is not None:
                raise failure
            self.results[index].update(out)
            yield index, out
            if out.finished:
                remaining -= 1

    def cancel(self) -> None:
        """Stop listening: every unfinished choice is aborted in the engine (idempotent)."""
        self.live.discard(self)
        for task in self._tasks:
            if not task.done():
                task.cancel()

    def abort(self) -> None:
        """End the request for the server (the drain's time is up): its response gets a 503
        ``request_aborted`` (on a stream, that error chunk and ``[DONE]``) at once, whatever pass the
        engine is in, and every choice is aborted inside the engine."""
        self._queue.put(self.specs[0].index, None, errors.request_aborted())
        for spec in self.specs:
            self.engine.abort(spec.request_id)


async def collect(choice_set: ChoiceSet, receive) -> dict[int, ChoiceResult]:
    """Run every choice to the end (non-streaming); abort them all if the client goes away
    (``errors.ClientDisconnected``)."""

    async def consume():
        async for _ in choice_set.events():
            pass
        return choice_set.results

    consumer = asyncio.create_task(consume())
    watcher = asyncio.create_task(errors.wait_for_disconnect(receive))
    try:
        done, _ = await asyncio.wait({consumer, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if consumer in done:
            return consumer.result()
        raise errors.ClientDisconnected()
    finally:
        consumer.cancel()
        watcher.cancel()
        choice_set.cancel()
