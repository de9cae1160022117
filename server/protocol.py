"""Request models (pydantic) for the OpenAI-compatible endpoints.

Unknown fields are accepted and ignored (benchmark clients send ``ignore_eos``,
``repetition_penalty`` and the like). Value checks that depend on the model (context length,
token ids, diffusion parameter ranges) are done by ``engine.resolve``; this module checks shapes.
Responses are built as plain dicts in ``completions.py`` / ``chat.py``.
"""

from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, ValidationInfo, field_validator

from .tool_calls import NAME_PATTERN

# OpenAI's limit on stop sequences. The other request limits are settings (``settings.py``), checked
# in ``request_limits.py``; ``n`` has only its lower bound here.
MAX_STOP = 4


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


def null_is_default(*names: str):
    """A validator for fields whose ``null`` means "unset", as in OpenAI's schema (the SDK sends
    ``"n": null`` for ``n=None``): ``None`` becomes the field's default. Declare such fields
    ``T | None`` with a non-None default, so the OpenAPI document shows them nullable."""

    def _default_for_null(cls, value, info: ValidationInfo):
        return cls.model_fields[info.field_name].default if value is None else value

    return field_validator(*names, mode="after")(classmethod(_default_for_null))


class StreamOptions(_Lenient):
    include_usage: bool = Field(False, description="Send a last chunk with `choices: []` and the request's `usage`.")


class DiffusionFields(_Lenient):
    """Extension fields shared by both endpoints. ``None`` takes the checkpoint's generation config."""

    max_denoising_steps: StrictInt | None = Field(None, description="Denoising steps N per canvas, at most.")
    entropy_bound: StrictFloat | None = Field(
        None, description="Each step accepts the k lowest-entropy positions while sum(H) - max(H) <= this bound.")
    t_min: StrictFloat | None = Field(
        None, description="Where the temperature schedule falls towards: the last step's is `t_min + (t_max - t_min) "
        "/ max_denoising_steps`, which must be at least 1e-6 (`t_max` > `t_min` >= 0).")
    t_max: StrictFloat | None = Field(
        None, description="Temperature of the first step; the schedule falls linearly towards `t_min`.")
    stability_threshold: StrictInt | None = Field(
        None, description="k: a canvas stops when k+1 successive argmax drafts are equal and ...")
    confidence_threshold: StrictFloat | None = Field(None, description="... its mean entropy is below this.")
    stream_drafts: StrictBool | None = Field(
        False, description="With `stream`: also send every refinement step as a draft chunk (see Draft stream).")

    _null_drafts = null_is_default("stream_drafts")


class CommonFields(DiffusionFields):
    model: str | None = Field(None, description="The served model name (`GET /v1/models`); may be left out.")
    max_tokens: StrictInt | None = Field(
        None, description="Most tokens to generate; the last canvas is trimmed (`finish_reason: length`). Default: the "
        "checkpoint's `max_new_tokens` (one canvas).")
    # Accepted for compatibility. A diffusion model samples with the linear temperature schedule
    # t_max -> t_min over the denoising steps; ``temperature`` and ``top_p`` do not change it.
    temperature: StrictFloat | None = Field(
        default=None, ge=0, le=2, description="Range-checked, then ignored: the `t_max` -> `t_min` schedule governs sampling.")
    top_p: StrictFloat | None = Field(default=None, ge=0, le=1, description="Range-checked, then ignored.")
    n: StrictInt | None = Field(default=1, ge=1, description="Choices per prompt (at most the setting `max_n`).")
    stop: Union[str, list[str], None] = Field(
        None, description=f"Up to {MAX_STOP} strings; the text ends before the first one found (`finish_reason: stop`).")
    seed: StrictInt | None = Field(
        None, description="Makes the request reproducible; choice i of a request uses `seed + i` "
                                "(past 2^64 - 1 it wraps to 0).")
    stream: StrictBool | None = Field(False, description="Answer with server-sent events (see Streaming).")
    stream_options: StreamOptions | None = Field(None, description="Only with `stream`: `{\"include_usage\": true}`.")
    presence_penalty: StrictFloat | None = Field(
        default=None, ge=-2, le=2, description="Range-checked, then ignored: a canvas is written in parallel, so there "
        "are no earlier tokens of it to penalise.")
    frequency_penalty: StrictFloat | None = Field(
        default=None, ge=-2, le=2, description="Range-checked, then ignored (as `presence_penalty`).")
    logit_bias: dict[str, StrictFloat] | None = Field(
        None, description="Token id (a string key, each id once) -> bias in [-100, 100], added to the soft-capped "
        "logits before the temperature; at most the setting `max_logit_bias` entries. -100 practically bans a token.")
    user: str | None = Field(None, description="Accepted and ignored.")
    ignore_eos: StrictBool | None = Field(False, description="Do not stop at eos (fixed-length outputs, for benchmarks).")

    _null_common = null_is_default("n", "stream", "ignore_eos")

    @field_validator("logit_bias")
    @classmethod
    def _token_id_keys(cls, v):
        """Keys are token ids written as strings (JSON object keys): returned as ints. Two keys naming one
        id ("70" and "070") are refused: which bias would win is not the client's to guess."""
        if v is None:
            return v
        out, keys = {}, {}
        for key, bias in v.items():
            if not key.strip().lstrip("-").isdigit():
                raise ValueError(f"logit_bias keys must be token ids (integers, as strings), got {key!r}")
            token = int(key)
            if token in out:
                raise ValueError(f"logit_bias names token {token} twice ({keys[token]!r} and {key!r})")
            out[token], keys[token] = bias, key
        return out

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, v):
        if isinstance(v, list) and len(v) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences are allowed, got {len(v)}")
        return v

    def stop_tuple(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        if isinstance(self.stop, str):
            return (self.stop,)
        return tuple(self.stop)


PromptType = Union[str, list[StrictInt], list[str], list[list[StrictInt]]]


class CompletionRequest(CommonFields):
    prompt: PromptType = Field(description="A string, a list of token ids, or a list of either (one choice set each).")
    echo: StrictBool | None = Field(False, description="Start each choice's text with its prompt (a prompt of "
                                                        "token ids as their decoded text, special tokens included).")
    logprobs: StrictInt | None = Field(
        None, ge=0, le=5, description="Return each committed token's log-probability and this many top alternatives "
        "(see Log-probabilities).")
    suffix: str | None = Field(
        None, description="Infill: the text after the completion. Its tokens are pinned right after `max_tokens` free "
        "positions of one canvas (see Infill).")
    best_of: StrictInt | None = Field(None, ge=1, description="Not supported: a value > 1 is a 400 (use `n`).")

    _null_echo = null_is_default("echo")


class ImageURL(_Lenient):
    url: str = Field(description="A data URL (`data:image/png;base64,...`; PNG, JPEG, WEBP or GIF), or an "
                     "http(s) URL when the server fetches them (setting `image_url_fetch`, off by default).")
    detail: str | None = Field(None, description="Accepted and ignored: the checkpoint's processor sizes the image.")


class ContentPart(_Lenient):
    type: str = Field(description="`text` or `image_url` (and in assistant messages `refusal`); any other type "
                      "is a 400.")
    text: str | None = Field(None, description="With `type: text`: the text.")
    refusal: str | None = Field(None, description="With `type: refusal`, in an assistant message (as OpenAI "
                                "returns one): read as its text.")
    image_url: ImageURL | None = Field(
        None, description="With `type: image_url`: an image, through the checkpoint's processor and vision tower "
        "into the prompt (a text-only checkpoint answers 400; limits: `max_images_per_prompt`, `max_image_bytes`, "
        "`max_image_pixels`, `max_jpeg_scans`).")


class FunctionDeclaration(_Lenient):
    name: str = Field(pattern=f"^{NAME_PATTERN}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON Schema object, passed to the template as it is


class Tool(_Lenient):
    type: Literal["function"]
    function: FunctionDeclaration


class FunctionCall(_Lenient):
    name: str = Field(pattern=f"^{NAME_PATTERN}$")  # the server answers only calls to declared functions
    arguments: str  # a JSON object, as OpenAI sends it


class ToolCallItem(_Lenient):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[ContentPart], None] = None
    name: str | None = None
    tool_calls: list[ToolCallItem] | None = None  # assistant messages
    tool_call_id: str | None = None  # tool messages: the call they answer


class ChatCompletionRequest(CommonFields):
    messages: list[ChatMessage] = Field(
        min_length=1, description="Rendered by the checkpoint's chat template; content is a string or a list of "
        "text and image_url parts. Assistant messages may carry `tool_calls` (content null), `tool` messages a "
        "`tool_call_id`.")
    max_completion_tokens: StrictInt | None = Field(None, description="The same as `max_tokens`, and wins over it.")
    logprobs: StrictBool | None = Field(
        None, description="Return each committed token's log-probability in `choices[].logprobs.content` (see "
        "Log-probabilities).")
    top_logprobs: StrictInt | None = Field(
        None, ge=0, le=20, description="With `logprobs`: this many top alternatives per token.")
    tools: list[Tool] | None = Field(
        None, description="Function declarations `{\"type\": \"function\", \"function\": {\"name\", \"description\", "
        "\"parameters\"}}`, rendered into the prompt by the chat template; the model's calls come back as "
        "`message.tool_calls` (docs/tools.md). At most the setting `max_tools`, `max_tools_chars` characters in all.")
    tool_choice: Union[str, dict[str, Any], None] = Field(
        None, description="`auto` (the default with tools) or `none` (the declarations are left out of the prompt and "
        "the output is plain text). `required` and a named function are a 400: nothing forces the model to call. "
        "Without `tools`, any value is a 400.")
    functions: list[Any] | None = Field(
        None, description="OpenAI's deprecated form of `tools`: a non-empty list is a 400 that says to use `tools`.")
    function_call: Union[str, dict[str, Any], None] = Field(
        None, description="OpenAI's deprecated form of `tool_choice`: any value is a 400 that says to use "
        "`tool_choice` with `tools`.")
    response_format: dict[str, Any] | None = Field(None, description="Only `{\"type\": \"text\"}`.")
    # vLLM-style chat template controls.
    add_generation_prompt: StrictBool = Field(True, description="End the prompt with the assistant turn's header.")
    continue_final_message: StrictBool = Field(
        False, description="Continue the last (assistant) message instead of starting a new turn.")
    chat_template_kwargs: dict[str, Any] | None = Field(
        None, description="Extra scalar variables for the chat template (not the template itself); strings of at "
        "most max_template_kwarg_chars.")

    @field_validator("tool_choice")
    @classmethod
    def _check_tool_choice(cls, v):
        """OpenAI's shapes: "none", "auto", "required", or {"type": "function", "function": {"name": ...}}."""
        if isinstance(v, str) and v not in ("none", "auto", "required"):
            raise ValueError("must be 'none', 'auto', 'required' or {\"type\": \"function\", \"function\": {\"name\": ...}}")
        if isinstance(v, dict) and not (v.get("type") == "function" and isinstance(v.get("function"), dict)
                                        and isinstance(v["function"].get("name"), str)):
            raise ValueError("a named tool choice is {\"type\": \"function\", \"function\": {\"name\": ...}}")
        return v
