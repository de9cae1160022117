"""docs/api.md, generated from the code: the routes (their docstrings), the request fields (the
pydantic models of ``server/protocol.py`` and their descriptions), the stream's frames and the
error statuses (``server/openapi.py``)."""

from __future__ import annotations

import typing

from pydantic.fields import FieldInfo

from tools.reference_docs import table_cell

# The error codes the server sends, by status (a test finds each in server/).
ERROR_CODES = {
    400: ("context_length_exceeded", "invalid_json", "json_too_deep", "limit_exceeded", "unsupported_parameter",
          "invalid_image", "invalid_http_request", "cors_preflight_refused"),
    401: ("invalid_api_key",),
    403: ("origin_not_allowed",),
    404: ("model_not_found", "not_found"),
    405: ("method_not_allowed",),
    408: ("request_timeout",),
    413: ("request_too_large",),
    429: ("queue_full", "server_busy"),
    431: ("request_header_too_large",),
    500: ("internal_error",),
    503: ("server_loading", "server_draining", "engine_unavailable", "engine_dead", "request_aborted",
          "too_many_connections"),
}

# Fields both endpoints take that are not OpenAI's own (the diffusion sampler and benchmarks).
EXTENSION_FIELDS = ("max_denoising_steps", "entropy_bound", "t_min", "t_max", "stability_threshold",
                    "confidence_threshold", "stream_drafts", "ignore_eos")


def _routes() -> list[tuple[str, str, str]]:
    """(methods, path, summary) of every documented route, in registration order."""
    from fastapi.routing import APIRoute

    from server.app import create_app
    from server.settings import ServerSettings

    app = create_app(ServerSettings(model="<model>"), engine_factory=lambda settings, sink: None)
    rows = []
    for route in app.routes:
        if isinstance(route, APIRoute) and route.include_in_schema:
            doc = " ".join((route.endpoint.__doc__ or "").split())
            rows.append((", ".join(sorted(route.methods)), route.path.replace(":path", ""), doc))
    return rows


def _type_name(annotation) -> str:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return " or ".join(_type_name(a) for a in args)
    if origin is typing.Annotated:
        return _type_name(typing.get_args(annotation)[0])
    if origin is list:
        (item,) = typing.get_args(annotation) or (typing.Any,)
        return f"list of {_type_name(item)}"
    if origin is dict:
        return "object"
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in typing.get_args(annotation))
    names = {str: "string", int: "integer", float: "number", bool: "boolean", typing.Any: "any"}
    if annotation in names:
        return names[annotation]
    return getattr(annotation, "__name__", str(annotation))


def _default(info: FieldInfo) -> str:
    if info.is_required():
        return "required"
    if info.default is None:
        return "unset"
    if isinstance(info.default, bool):
        return str(info.default).lower()
    return repr(info.default)


def _field_rows(model, names) -> list[str]:
    rows = []
    for name in names:
        info = model.model_fields[name]
        rows.append(f"| `{name}` | {table_cell(_type_name(info.annotation))} | {_default(info)} | {table_cell(info.description or '')} |")
    return rows


def _fields_table(model, names) -> str:
    head = ["| field | type | default | meaning |", "|---|---|---|---|"]
    return "\n".join(head + _field_rows(model, names))


def render(header: str) -> str:
    """The page, under ``header`` (the generated-page comment)."""
    from server.openapi import ERROR_STATUSES
    from server.protocol import ChatCompletionRequest, CommonFields, CompletionRequest, ContentPart, ImageURL
    from server.ui import MAX_DETOKENIZE_IDS

    common = [n for n in CommonFields.model_fields if n not in EXTENSION_FIELDS]
    only = {m: [n for n in m.model_fields if n not in CommonFields.model_fields]
            for m in (CompletionRequest, ChatCompletionRequest)}
    routes = "\n".join(f"| {m} | `{p}` | {table_cell(doc)} |" for m, p, doc in _routes())
    errors = "\n".join(f"| {status} | {text} |" for status, text in ERROR_STATUSES.items())
    codes = "; ".join(f"{status}: " + ", ".join(f"`{c}`" for c in names) for status, names in ERROR_CODES.items())
    return f"""{header}

# HTTP API reference

## Routes

| method | path | what it does |
|---|---|---|
{routes}

`GET /openapi.json` is the OpenAPI document of these routes. The live canvas page (README, "Live canvas
page"; `--no-ui` leaves it out) adds `GET /` and `/ui/static/*` (its files), `GET /ui/config` (the
model's name, canvas and context length and default diffusion parameters, and whether a key is needed)
and `POST /ui/detokenize` (`{{"ids": [...]}}` to `{{"texts": [...], "special": [...]}}`, each id decoded
on its own, at most {MAX_DETOKENIZE_IDS} ids; an id outside the vocabulary decodes to `""`).

With API keys configured (`--api-key`), every `/v1/` route, and every request elsewhere that is not a read
(GET, HEAD, OPTIONS), wants `Authorization: Bearer <key>`; `GET /ui/config` without it answers only
`{{"auth_required": true, "authorized": false}}`.
Every response carries `X-Request-Id` (the client's own, when it sent a sane one).

## Request fields

Unknown fields are accepted and ignored, as OpenAI clients and benchmark tools expect.

### Both endpoints

{_fields_table(CompletionRequest, common)}

### Diffusion extension fields (both endpoints)

From the `openai` SDK, pass them in `extra_body`. "unset" takes the checkpoint's
`generation_config.json`, failing that transformers' defaults.

{_fields_table(CompletionRequest, EXTENSION_FIELDS)}

### `POST /v1/completions` only

{_fields_table(CompletionRequest, only[CompletionRequest])}

### `POST /v1/chat/completions` only

{_fields_table(ChatCompletionRequest, only[ChatCompletionRequest])}

Tools (function calling): the format, the limits and what `tool_choice` does are in
[tools.md](tools.md).

### Content parts and images (chat)

A message's `content` may be a list of parts:

{_fields_table(ContentPart, list(ContentPart.model_fields))}

and an `image_url` is:

{_fields_table(ImageURL, list(ImageURL.model_fields))}

A message with images reaches the chat template as its parts (`{{"type": "text", "text": ...}}` and
`{{"type": "image"}}`, for which the template writes the processor's image token); the checkpoint's
processor expands each image token into the image's placeholder tokens and makes its pixel patches,
and the vision tower's features take the placeholders' place in the encoder prefill, as
`generate(..., pixel_values=...)` does. The placeholders are prompt tokens (`usage.prompt_tokens`,
context length, KV budget). Images are refused before they are decoded when there are too many
(`max_images_per_prompt`), when their data is too large (`max_image_bytes`), has too many pixels
(`max_image_pixels`, read from the header) or, as a progressive JPEG, too many scans (`max_jpeg_scans`); an
unreadable image is a 400 `invalid_image`.

## Responses

A completion's `usage` has OpenAI's exact counts (`prompt_tokens` counts each prompt once, however
large `n`, with an infill `suffix`; `completion_tokens` includes a final eos) and two extension counts, `denoising_steps`
and `canvases`. `finish_reason` is `stop` (eos or a stop string), `length` (`max_tokens`), or, in chat
with tools, `tool_calls` (the model stopped after calling a tool: `message.tool_calls`).

### Log-probabilities

A committed token's log-probability is log softmax(s)[token] at its canvas position, where s are the
logits of the denoising step whose argmax draft the canvas committed, soft-capped, biased
(`logit_bias`) and divided by that step's temperature: s = (softcap(z) + bias) / T(step). The
committed token is that step's argmax, so it is its own best alternative. They are computed on the
device, for the rows that ask only; every step of such a row costs a top-k over the vocabulary and
a transfer of [canvas, k] values. Among tokens of equal probability, which ones a top-k lists depends
on k; each request's comes from its own k, so what others ask for never changes its list. A value too
small for a float shows as -9999.0.

- Completions (`logprobs: k`, 0..5): `tokens`, `token_logprobs`, `top_logprobs` (per token a map of
  up to k + 1 entries: the top k and the chosen token) and `text_offset` (where each token's text
  starts in the choice's text). The prompt's tokens have none (the model gives
  no distribution over them), so `logprobs` with `echo` is refused (400 `unsupported_parameter`).
- Chat (`logprobs: true`, `top_logprobs: k`, 0..20): `logprobs.content[]` with `token`, `logprob`,
  `bytes` and `top_logprobs[]`.

A token whose text alone is not valid UTF-8 (a piece of a multi-byte character) shows as
`bytes:\\xNN...` (its chat `bytes` are the raw bytes), and its `text_offset` is where that character
starts; a special token the text skips (eos, pad) shows as itself, with no `bytes`, and adds no
characters. A final eos is a committed
token and has its entry. Streams carry each committed canvas's entries in the chunk
with its text delta (a chunk may have entries and no text while a character or a possible stop
string is held back). The tokens that complete a stop string keep their entries, as they count in
`usage.completion_tokens`: their `text_offset` is at or past the end of the text, which stops before
the stop string; tokens after them have none.

### logit_bias and the penalties

`logit_bias` maps token ids to a bias in [-100, 100], added to the soft-capped logits before the
temperature, so the draft, the sample, the entropies and the self-conditioning all see the biased
distribution (as a logits processor given to transformers' `generate`). The soft-capped logits lie
within the checkpoint's `final_logit_softcapping` (30 for DiffusionGemma), so -100 makes a token
practically impossible and +100 practically certain. `presence_penalty` and `frequency_penalty`
are range-checked and ignored: every position of a canvas is written at once, so there are no
earlier tokens of it to penalise.

### Infill

`suffix` (completions) writes the completion between the prompt and the suffix, in one canvas:
the suffix's tokens are pinned right after `max_tokens` free positions, held in every draft and
every canvas fed to the decoder (never renoised); their entropy counts 0 in the acceptance and they
are left out of the mean entropy that decides confidence. The free positions are denoised around
them; positions after the suffix are denoised too and dropped.

- `max_tokens` is the gap's length; unset, the gap fills the canvas up to the suffix
  (`canvas_length` minus the suffix's tokens). `max_tokens` plus the suffix's tokens must fit one
  canvas, else 400 (`param: suffix`).
- An eos inside the gap ends the completion there (`finish_reason: stop`); a filled gap also ends
  with `stop`. The text returned is the gap only, without the suffix.

## Streaming

With `"stream": true` the answer is `text/event-stream`, one `data: {{json chunk}}` frame per event:

1. chat only: a first chunk per choice with `delta.role`; completions with `echo`: the prompt's text;
2. the committed text as append-only deltas, as canvases commit (text that may still end a stop
   string or complete a character is held until the next commit settles it); in chat with tools, text
   that may begin a tool call is held until it is settled, and each complete call arrives as one
   `delta.tool_calls` item;
3. a chunk with `finish_reason`;
4. with `stream_options.include_usage`: a chunk with `choices: []` and `usage` (every chunk before it has `"usage": null`, as OpenAI sends);
5. `data: [DONE]`.

Every open stream gets a `: ping` comment every `sse_ping_seconds` (keep-alive, whether or not frames flow). An error after the stream started
is a `data: {{"error": {{...}}}}` frame followed by `data: [DONE]`.

### Draft stream

With `"stream_drafts": true` as well, every denoising step of every canvas arrives as a valid chunk
with empty text (completions) or an empty delta (chat), plus an extension object `diffusion`:
`canvas` (0-based), `step` (1-based), `max_steps`, `draft` (the text of the whole argmax canvas),
`changed` (positions that differ from the previous draft of that canvas; all at step 1) and
`changed_token_ids` (their new token ids). The last draft of a canvas is what it commits, before
the eos and length trims. A client that reads more slowly than the steps come gets merged drafts:
`step` may skip, and `changed` covers every position changed since the last draft it received, so
applying the drafts in order still rebuilds the canvas. The `openai` SDK reads it as
`choice.model_extra["diffusion"]`.

## Errors

Every error is `{{"error": {{"message", "type", "param", "code"}}}}`; `param` names the field at fault.

| status | when |
|---|---|
{errors}

`code` by status ({codes}). A 400 for a field's type or value (`n` 0, `temperature` 3, five stop
strings) has `code: null` and `param` naming the field. A `limit_exceeded`
names its setting (docs/configuration.md), except `/ui/detokenize`'s fixed {MAX_DETOKENIZE_IDS} ids a request (the canvas
page's own route, above). A
`context_length_exceeded` (the prompt and `max_tokens` over the context length) names `max_tokens` (or
`max_completion_tokens`) when the request set it; when it did not, it names the prompt (`prompt` or
`messages`) and says which default `max_tokens` got (one canvas) and the most it may be. A default
over a server limit (`max_completion_tokens`, `max_request_denoising_steps` set below the checkpoint's)
is named as the default, with the most the field may be; in a chat that sets neither length field,
the refusals name `max_completion_tokens`. A request over the KV budget for one request is a
`limit_exceeded` naming the prompt when it alone is over it, else the length field, with the most it
may be.
429 and 503 carry `Retry-After`.
"""
