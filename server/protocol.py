"""Request models (pydantic) for the OpenAI-compatible endpoints.

Unknown fields are accepted and ignored (benchmark clients send ``ignore_eos``,
``repetition_penalty`` and the like). Value checks that depend on the model (context length,
token ids, diffusion parameter ranges) are done by ``engine.resolve``; this module checks shapes.
Responses are built as plain dicts in ``completions.py`` / ``chat.py``.
"""

from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, field_validator

# OpenAI's limit on stop sequences. The other request limits are settings (``settings.py``), checked
# in ``handling.py``; ``n`` has only its lower bound here.
MAX_STOP = 4


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Lenient):
    include_usage: bool = False


class DiffusionFields(_Lenient):
    """Extension fields shared by both endpoints. ``None`` takes the checkpoint's generation config."""

    max_denoising_steps: StrictInt | None = None
    entropy_bound: float | None = None
    t_min: float | None = None
    t_max: float | None = None
    stability_threshold: StrictInt | None = None
    confidence_threshold: float | None = None
    stream_drafts: StrictBool = False


class CommonFields(DiffusionFields):
    model: str | None = None
    max_tokens: StrictInt | None = None
    # Accepted for compatibility. A diffusion model samples with the linear temperature schedule
    # t_max -> t_min over the denoising steps; ``temperature`` and ``top_p`` do not change it.
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    n: StrictInt = Field(default=1, ge=1)
    stop: Union[str, list[str], None] = None
    seed: StrictInt | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    ignore_eos: StrictBool = False

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
    prompt: PromptType
    echo: StrictBool = False
    logprobs: StrictInt | None = None
    suffix: str | None = None
    best_of: StrictInt | None = None


class TextPart(_Lenient):
    type: str
    text: str | None = None


class ChatMessage(_Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[TextPart], None] = None
    name: str | None = None


class ChatCompletionRequest(CommonFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = None
    logprobs: StrictBool | None = None
    top_logprobs: StrictInt | None = None
    tools: list[Any] | None = None
    response_format: dict[str, Any] | None = None
    # vLLM-style chat template controls.
    add_generation_prompt: StrictBool = True
    continue_final_message: StrictBool = False
    chat_template_kwargs: dict[str, Any] | None = None
