"""What both endpoints share: body parsing, model check, sampling parameters, usage, request log."""

from __future__ import annotations

import json
import logging
import time
import uuid

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError

from engine.sampling_params import InvalidRequestError, SamplingParams

from . import errors
from .protocol import CommonFields
from .streaming import ChoiceResult, ChoiceSpec

logger = logging.getLogger("server.requests")

# A request's choices: prompts x n. Each is one engine request.
MAX_CHOICES = 256
LOG_TEXT_LIMIT = 2000


async def parse_body(request: Request, model: type[BaseModel]):
    """Parse the body as JSON whatever the Content-Type says (curl's -d sends form encoding)."""
    raw = await request.body()
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise errors.bad_request(f"The request body is not valid JSON: {exc}", None, "invalid_json") from None
    if not isinstance(data, dict):
        raise errors.bad_request("The request body must be a JSON object.", None, "invalid_json")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise errors.validation_error(RequestValidationError(exc.errors())) from None


def new_request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def diffusion_kwargs(req: CommonFields) -> dict:
    return dict(
        max_denoising_steps=req.max_denoising_steps,
        entropy_bound=req.entropy_bound,
        t_min=req.t_min,
        t_max=req.t_max,
        stability_threshold=req.stability_threshold,
        confidence_threshold=req.confidence_threshold,
    )


def make_specs(engine, prompts: list[list[int]], req: CommonFields, max_tokens: int | None, request_id: str) -> list[ChoiceSpec]:
    """One resolved engine request per choice. Choice ``i`` (prompt ``i // n``) gets ``seed + i``.

    Raises a 400 ``APIError`` for any parameter the engine refuses (context length included),
    before anything is submitted.
    """
    n = req.n
    if len(prompts) * n > MAX_CHOICES:
        raise errors.bad_request(
            f"Too many choices: {len(prompts)} prompts x n={n} is over the limit of {MAX_CHOICES}.", "n"
        )
    stop = req.stop_tuple()
    specs = []
    for p, prompt_ids in enumerate(prompts):
        for j in range(n):
            index = p * n + j
            params = SamplingParams(
                max_tokens=max_tokens,
                stop=stop,
                ignore_eos=req.ignore_eos,
                seed=None if req.seed is None else req.seed + index,
                stream_drafts=bool(req.stream_drafts and req.stream),
                **diffusion_kwargs(req),
            )
            try:
                resolved = engine.resolve(prompt_ids, params)
            except InvalidRequestError as exc:
                param = exc.param
                if param == "max_tokens" and getattr(req, "max_completion_tokens", None) is not None:
                    param = "max_completion_tokens"
                raise errors.bad_request(exc.message, param) from None
            specs.append(ChoiceSpec(index, p, list(prompt_ids), resolved, f"{request_id}-{index}"))
    return specs


def usage(specs: list[ChoiceSpec], results: dict[int, ChoiceResult]) -> dict:
    """Exact counts: each prompt once (however large ``n``), every choice's committed tokens."""
    prompt_tokens = {}
    for s in specs:
        prompt_tokens[s.prompt_index] = len(s.prompt_ids)
    prompt = sum(prompt_tokens.values())
    completion = sum(r.num_generated_tokens for r in results.values())
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "denoising_steps": sum(r.num_denoising_steps for r in results.values()),
        "canvases": sum(r.num_canvases for r in results.values()),
    }


def check_unsupported(**fields) -> None:
    for name, (value, message) in fields.items():
        if value:
            raise errors.bad_request(message, name, "unsupported_parameter")


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
        reasons = sorted({r.finish_reason or "-" for r in results.values()}) or ["-"]
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
