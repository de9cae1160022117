"""The one serving path of the completion endpoints.

``serve(request, api)``: parse and limit the body, turn its prompts into one engine request per
choice, run them, and answer with one JSON response or a stream of server-sent events. What differs
between ``/v1/completions`` and ``/v1/chat/completions`` (the request model, how prompts are made,
the shape of a choice) is an ``Endpoint``: ``completions.py`` and ``chat.py`` only translate.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass
from typing import AsyncIterator, Callable, Protocol

from fastapi import Request
from starlette.responses import JSONResponse, Response

from engine.detokenizer import decode_text
from engine.errors import ContextLengthError, InvalidRequestError
from engine.outputs import Draft, RequestOutput
from engine.sampling_params import SamplingParams

from . import errors, sse
from .bodies import large_body, parse_body
from .preprocess import RequestTurns
from .choices import ChoiceResult, ChoiceSet, ChoiceSpec, collect, usage
from .engine_client import EngineClient
from .errors import APIError, ClientDisconnected
from .images import ImageReader
from .logprobs import TextPosition
from .protocol import CommonFields
from .request_limits import PromptLimit, check_request, check_resolved, context_length_error, where
from .request_log import CLIENT_GONE, RequestLog

logger = logging.getLogger("server")

# Echoed token prompts with more ids than this (all together) are decoded off the event loop.
DECODE_IN_THREAD_TOKENS = 20000


@dataclass
class Prompts:
    """A request's prompts, tokenized."""

    ids: list[list[int]]
    log_text: Callable[[], str]  # what ``--log-prompts`` writes (built only then)
    # text each choice of prompt i starts with (completions' echo); None for a token prompt until
    # ``decode_prefixes``, which waits for the engine to check its ids (the tokenizer fails on some)
    prefixes: list[str | None] | None = None
    suffix_ids: tuple[int, ...] = ()  # completions' infill suffix, pinned in the canvas
    images: list | None = None  # prompt i's images (engine.multimodal.ImageInputs, or None), when any has some

    async def decode_prefixes(self, tokenizer, gate) -> None:
        """Fill in the echo prefixes of token prompts (call once their ids are checked), off the event loop
        when they are long."""
        if self.prefixes is None:
            return

        def decode():
            return [t if t is not None else tokenizer.decode(p) for t, p in zip(self.prefixes, self.ids)]

        tokens = sum(len(p) for t, p in zip(self.prefixes, self.ids) if t is None)
        self.prefixes = await gate.run(decode) if tokens > DECODE_IN_THREAD_TOKENS else decode()


@dataclass(frozen=True)
class EndpointNames:
    """The names an OpenAI API gives its request and response objects."""

    name: str  # in the request log line
    id_prefix: str  # of response ids: "cmpl", "chatcmpl"
    request_model: type[CommonFields]
    object: str  # a response's "object"
    chunk_object: str  # a stream chunk's "object"
    prompt_param: str  # the field named by errors about the prompt
    alternatives_param: str = "logprobs"  # the field that asks for log-probability alternatives
    token_prompts: bool = False  # prompts may come as token ids (an array of numbers is then a prompt)


class Endpoint(Protocol):
    """What one OpenAI API adds to the serving path: translation, nothing else."""

    names: EndpointNames

    def check(self, req, settings) -> None:
        """Refuse fields this server does not support (a 400 ``unsupported_parameter``) and fields over
        the endpoint's own limits in ``settings``."""

    def num_prompts(self, req) -> int:
        """How many prompts the request has, before any tokenization."""

    def max_tokens(self, req) -> tuple[int | None, str]:
        """The requested completion length and the field that asked for it."""

    def logprobs(self, req) -> int | None:
        """Top alternatives per token the request asks for with its log-probabilities (None: none)."""

    def logprobs_object(self, entries, tokenizer, position: TextPosition) -> tuple[dict, TextPosition]:
        """The API's ``logprobs`` object for these committed tokens (``engine.outputs.TokenLogprob``),
        the first starting at ``position`` in the choice's text; and the position after them."""

    async def prompts(self, req, tokenizer, limit: PromptLimit, gate: RequestTurns,
                      images: ImageReader) -> Prompts:
        """Tokenize the request's prompts, each checked against ``limit``: its characters before it is
        tokenized, its tokens right after. Large ones are tokenized in a worker thread (``gate.run``).
        ``images`` reads the images of prompts that have some (chat's image_url parts)."""

    def opening(self, spec: ChoiceSpec, prompts: Prompts) -> dict | None:
        """The choice object a stream sends first for this choice, if any."""

    def chunk_choice(self, index: int, text: str, finish_reason: str | None = None, **extra) -> dict:
        """A stream chunk's choice object carrying the text delta ``text`` ("" for draft and finish chunks)."""

    def response_choice(self, spec: ChoiceSpec, result: ChoiceResult, prompts: Prompts) -> dict:
        """A (non-streamed) response's choice object."""

    def stream_choices(self, prompts: Prompts) -> StreamChoices:
        """The stream's choice objects for each committed output of a choice (``plain_stream_choices``
        unless the endpoint reshapes its text, as chat does with tool calls)."""


# (choice index, a committed output: text delta and/or finish) -> the stream's choice objects for it
StreamChoices = Callable[[int, RequestOutput], list[dict]]


def plain_stream_choices(api: Endpoint) -> StreamChoices:
    """A choice object for the text delta, then one with the finish reason."""

    def choices(index: int, out: RequestOutput) -> list[dict]:
        found = [api.chunk_choice(index, out.text)] if out.text else []
        if out.finished:
            found.append(api.chunk_choice(index, "", out.finish_reason))
        return found

    return choices


async def serve(request: Request, api: Endpoint) -> Response:
    """Answer one completion request of ``api``'s kind. Every failure is an ``APIError``."""
    state = request.app.state.server
    request_id, engine_prefix = _request_ids(request, api.names.id_prefix)
    log = RequestLog(request_id, api.names.name, state.settings.log_prompts)
    try:
        return await _serve(request, api, state, request_id, engine_prefix, log)
    except ClientDisconnected:  # before the engine stage
        log.finish(CLIENT_GONE, note="client disconnected")
        return Response(status_code=499)
    except APIError as exc:
        log.finish(exc.status, note=exc.code or exc.type)
        raise
    except Exception as exc:  # a bug: answered inside the middleware (request id, CORS) and logged
        logger.exception("internal error on %s %s", request.method, request.url.path)
        err = errors.internal_error()
        log.finish(err.status, note=err.code or err.type)
        raise err from exc


async def _serve(request: Request, api: Endpoint, state, request_id: str, engine_prefix: str, log: RequestLog):
    settings = state.settings
    names = api.names
    limits = state.body_limits(names.prompt_param if names.token_prompts else None)
    engine = state.engine_or_503()  # before the body is parsed: nothing to parse it for while loading
    req: CommonFields = await parse_body(request, names.request_model, limits, state.preprocess_gate)
    turns = state.preprocess_gate.for_request(request.receive)  # the body is read: a client gone ends a wait
    model_name = state.check_model(req.model)
    if large_body(request):  # an endpoint's checks read the whole request (a chat's tools as JSON)
        await turns.run(lambda: api.check(req, settings))
    else:
        api.check(req, settings)
    max_tokens, max_tokens_param = api.max_tokens(req)
    check_request(settings, req, api.num_prompts(req), max_tokens, max_tokens_param)  # before tokenizing
    images = ImageReader.of(settings, engine.processor, model_name, state.image_fetches,
                            state.image_decodes.for_request(request.receive))
    prompts = await api.prompts(req, engine.tokenizer, state.prompt_limit(engine), turns, images)
    if settings.log_prompts:
        log.prompt_text = prompts.log_text()
    options = dict(logprobs=api.logprobs(req), infill_suffix=prompts.suffix_ids,
                   logit_bias=tuple((req.logit_bias or {}).items()))
    specs = _choice_specs(engine, prompts.ids, req, max_tokens, max_tokens_param, names.prompt_param, engine_prefix,
                          options, prompts.images)
    check_resolved(settings, specs[0].params, num_prompts=len(prompts.ids), n=req.n,
                   max_tokens_given=max_tokens is not None, max_tokens_param=max_tokens_param,
                   alternatives_param=names.alternatives_param)
    await prompts.decode_prefixes(engine.tokenizer, turns)

    if state.aborting:  # prepared after the drain aborted the requests in flight
        raise errors.request_aborted()
    choice_set = ChoiceSet(engine, specs, state.metrics.on_choice_finished, state.live_choice_sets)
    await choice_set.start()
    base = {"id": request_id, "object": names.chunk_object, "created": int(time.time()), "model": model_name}
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        if include_usage:  # as OpenAI: every chunk has the key, null until the usage chunk
            base = {**base, "usage": None}
        opening = [c for c in (api.opening(s, prompts) for s in specs) if c is not None]
        offsets = {s.index: TextPosition() for s in specs}
        frames = _stream(api, state, engine, choice_set, base, opening, offsets, include_usage, log,
                         api.stream_choices(prompts))
        return sse.SSEResponse(frames, on_close=choice_set.cancel, ping_seconds=settings.sse_ping_seconds)

    try:
        results = await collect(choice_set, request.receive)
    except ClientDisconnected:
        log.finish(CLIENT_GONE, specs, choice_set.results, "client disconnected")
        return Response(status_code=499)
    except APIError as exc:
        log.finish(exc.status, specs, choice_set.results, exc.code or "")
        raise
    log.finish(200, specs, results)
    choices = [api.response_choice(s, results[s.index], prompts) for s in specs]
    logprobs = {s.index: results[s.index].logprobs for s in specs if results[s.index].logprobs is not None}
    if logprobs:  # up to max_logprob_entries of them: formatted in a worker thread, in a preprocessing turn
        objects = await state.preprocess_gate.run(lambda: {  # the answer is there: the drain does not abort it
            i: api.logprobs_object(entries, engine.tokenizer, TextPosition())[0] for i, entries in logprobs.items()},
            abortable=False)
        for spec, choice in zip(specs, choices):
            if spec.index in objects:
                choice["logprobs"] = objects[spec.index]
    return JSONResponse({**base, "object": names.object, "choices": choices, "usage": usage(specs, results)})


def unsupported(**fields: tuple[bool, str]) -> None:
    """Refuse the first field whose condition holds: ``name=(refused, message)``."""
    for name, (refused, message) in fields.items():
        if refused:
            raise errors.bad_request(message, name, "unsupported_parameter")


def _request_ids(request: Request, prefix: str) -> tuple[str, str]:
    """(response id, prefix of the engine request ids) for this HTTP request.

    The response id comes from ``RequestIdMiddleware`` (``<prefix>-<X-Request-Id>`` when the client
    sent a sane one). Engine ids must be unique while a client may reuse its X-Request-Id, so a
    client-chosen id gets a random suffix there.
    """
    state = request.scope.get("state") or {}
    rid = state.get("request_id")
    if not rid:
        rid = f"{prefix}-{uuid.uuid4().hex}"
        return rid, rid
    if state.get("request_id_from_client"):
        return rid, f"{rid}-{uuid.uuid4().hex[:8]}"
    return rid, rid


def _choice_specs(engine: EngineClient, prompts: list[list[int]], req: CommonFields, max_tokens: int | None,
                  max_tokens_param: str, prompt_param: str, engine_prefix: str, options: dict,
                  images: list | None = None) -> list[ChoiceSpec]:
    """One resolved engine request per choice. Choice ``i`` (prompt ``i // n``) gets ``seed + i``;
    ``options``: the endpoint's other ``SamplingParams`` fields (logprobs, logit_bias, infill suffix).

    Raises a 400 for any parameter the engine refuses (context length included), before anything
    is submitted.
    """
    specs = []
    for p, prompt_ids in enumerate(prompts):
        image_inputs = images[p] if images else None
        for j in range(req.n):
            index = p * req.n + j
            params = SamplingParams(
                max_tokens=max_tokens,
                stop=req.stop_tuple(),
                ignore_eos=req.ignore_eos,
                seed=None if req.seed is None else choice_seed(req.seed, index),
                stream_drafts=bool(req.stream_drafts and req.stream),
                max_denoising_steps=req.max_denoising_steps,
                entropy_bound=req.entropy_bound,
                t_min=req.t_min,
                t_max=req.t_max,
                stability_threshold=req.stability_threshold,
                confidence_threshold=req.confidence_threshold,
                **options,
            )
            try:
                # the prompt's tokens are checked once, not once per choice
                resolved = engine.resolve(prompt_ids, params, prompt_checked=j > 0, images=image_inputs)
            except ContextLengthError as exc:
                raise context_length_error(exc, max_tokens_param, max_tokens is not None, prompt_param,
                                           where(p, len(prompts)), max(map(len, prompts))) from None
            except InvalidRequestError as exc:
                err = errors.from_engine(exc)
                if err.param == "max_tokens":  # the field this request used
                    err.param = max_tokens_param
                    err.message = err.message.replace("max_tokens", max_tokens_param)
                elif err.param == "prompt":  # the endpoint's prompt field (a chat's messages)
                    err.param = prompt_param
                raise err from None
            specs.append(ChoiceSpec(index, p, list(prompt_ids), resolved, f"{engine_prefix}-{index}", image_inputs))
    return specs


def choice_seed(seed: int, index: int) -> int:
    """Choice ``index``'s seed: ``seed + index``, wrapping past 2**64 - 1 to 0 (a seed is 64 bits). A
    seed out of range stays as it is, for the engine to refuse."""
    shifted = seed + index
    return shifted - 2**64 if seed < 2**64 <= shifted else shifted


def _draft_extension(draft: Draft, tokenizer) -> dict:
    """The ``diffusion`` object of a draft chunk (docs/api.md, "Draft stream")."""
    return {
        "canvas": draft.canvas,
        "step": draft.step,
        "max_steps": draft.max_steps,
        "draft": decode_text(tokenizer, list(draft.token_ids)),  # as the committed text: tool-call markers kept
        "changed": list(draft.changed),
        "changed_token_ids": [draft.token_ids[p] for p in draft.changed],
    }


async def _stream(api: Endpoint, state, engine: EngineClient, choice_set: ChoiceSet, base: dict, opening: list[dict],
                  offsets: dict[int, TextPosition], include_usage: bool, log: RequestLog,
                  stream_choices: StreamChoices) -> AsyncIterator:
    """The SSE frames of one streamed request: the opening choices, then drafts, text deltas (shaped by
    ``stream_choices``, with the committed tokens' log-probabilities when asked; ``offsets``: each
    choice's text so far) and
    finish chunks as the engine produces them, the usage chunk when asked, and ``[DONE]``; a
    failure becomes an error chunk before ``[DONE]``."""
    err: APIError | None = None
    completed = False
    try:
        for c in opening:
            yield sse.chunk({**base, "choices": [c]})
        async for index, out in choice_set.events():
            if out.draft is not None:
                ext = _draft_extension(out.draft, engine.tokenizer)
                yield sse.chunk({**base, "choices": [api.chunk_choice(index, "", diffusion=ext)]})
            found = stream_choices(index, out) if out.text or out.finished else []
            if out.logprobs:
                logprobs, offsets[index] = api.logprobs_object(out.logprobs, engine.tokenizer, offsets[index])
                carrier = next((c for c in found if c.get("finish_reason") is None), None)
                if carrier is None:  # no text to carry them (held back): a chunk of their own
                    carrier = api.chunk_choice(index, "")
                    found.insert(0, carrier)
                carrier["logprobs"] = logprobs
            for c in found:
                yield sse.chunk({**base, "choices": [c]})
        if include_usage:
            yield sse.chunk({**base, "choices": [], "usage": usage(choice_set.specs, choice_set.results)})
        completed = True
    except APIError as exc:
        err = exc
    except Exception:  # noqa: BLE001 - a fault of ours: logged, sent without details
        logger.exception("%s stream %s failed", api.names.name, base["id"])
        err = errors.internal_error()
    finally:
        choice_set.cancel()
        if err is not None:
            log.finish(err.status, choice_set.specs, choice_set.results, err.code or "")
        elif completed:
            log.finish(200, choice_set.specs, choice_set.results)
        else:
            log.finish(CLIENT_GONE, choice_set.specs, choice_set.results, "client disconnected")
    if err is not None:
        state.metrics.count_error(err.status)
        yield sse.chunk(err.body())
    yield sse.done()
