"""POST /v1/chat/completions: messages through the checkpoint's chat template, chat-shaped choices
(served by ``serving.serve``)."""

from __future__ import annotations

import contextlib

import json
import re
from dataclasses import dataclass

from fastapi import Request
from pydantic import TypeAdapter

from engine.outputs import RequestOutput

from . import errors
from .choices import ChoiceResult, ChoiceSpec
from .logprobs import TextPosition, chat_logprobs
from .images import ImageReader
from .protocol import ChatCompletionRequest, Tool
from .completions import TOKENIZE_IN_THREAD_CHARS
from .request_limits import PromptLimit, limit_error
from .serving import EndpointNames, Prompts, plain_stream_choices, serve, unsupported
from .tool_calls import ToolCall, ToolCallStream, parse

# Conversations with more messages than this, more characters than TOKENIZE_IN_THREAD_CHARS, or tool
# declarations are rendered and tokenized off the event loop.
RENDER_IN_THREAD_MESSAGES = 32


class Chat:
    names = EndpointNames("chat", "chatcmpl", ChatCompletionRequest, "chat.completion", "chat.completion.chunk",
                          prompt_param="messages", alternatives_param="top_logprobs")

    def check(self, req: ChatCompletionRequest, settings) -> None:
        rf_type = (req.response_format or {}).get("type", "text")
        if req.top_logprobs is not None and not req.logprobs:
            raise errors.bad_request("top_logprobs needs logprobs to be true.", "top_logprobs")
        choice = req.tool_choice
        forced = "naming a function" if isinstance(choice, dict) else repr(choice)
        if choice is not None and not req.tools:  # as OpenAI: a choice among no tools is a mistake
            raise errors.bad_request("tool_choice is only allowed when tools are given.", "tool_choice")
        unsupported(
            tool_choice=(choice not in (None, "auto", "none"),
                         f"tool_choice {forced} is not supported: this server cannot force the model to call a "
                         "tool; use 'auto' (or 'none')."),
            response_format=(rf_type != "text", f"response_format type '{rf_type}' is not supported; only 'text'."),
            # the deprecated function-calling fields: never ignored, since the client expects calls
            functions=(bool(req.functions), "functions is deprecated and not supported: declare them in tools."),
            function_call=(req.function_call is not None,
                           "function_call is deprecated and not supported: use tool_choice with tools."),
        )
        check_tools(req, settings)
        template_kwargs(req.chat_template_kwargs, settings.max_template_kwarg_chars)  # before any tokenizing

    def num_prompts(self, req: ChatCompletionRequest) -> int:
        return 1

    def logprobs(self, req: ChatCompletionRequest) -> int | None:
        return (req.top_logprobs or 0) if req.logprobs else None

    def logprobs_object(self, entries, tokenizer, position: TextPosition) -> tuple[dict, TextPosition]:
        return chat_logprobs(entries, tokenizer), position

    def max_tokens(self, req: ChatCompletionRequest) -> tuple[int | None, str]:
        if req.max_tokens is not None and req.max_completion_tokens is None:  # the older field, as sent
            return req.max_tokens, "max_tokens"
        return req.max_completion_tokens, "max_completion_tokens"

    async def prompts(self, req: ChatCompletionRequest, tokenizer, limit: PromptLimit, gate,
                      images: ImageReader) -> ChatPrompts:
        if declares_tools(req) and not template_reads_tools(tokenizer):
            raise errors.bad_request("This model's chat template does not render tools (it never reads the 'tools' "
                                     "variable), so the model would not see them.", "tools", "unsupported_parameter")
        urls = image_urls(req)
        if urls:
            return await image_prompts(req, tokenizer, limit, gate, images, urls)

        def prepare():
            text = render_prompt(tokenizer, req, limit)
            return list(tokenizer(text, add_special_tokens=False)["input_ids"]), text

        # on large conversations (or any declarations, whose size is not known here) off the event loop
        large = len(req.messages) > RENDER_IN_THREAD_MESSAGES or declares_tools(req) \
            or message_chars(req) > TOKENIZE_IN_THREAD_CHARS
        ids, text = await gate.run(prepare) if large else prepare()
        limit.check_tokens(len(ids), "messages", "the prompt")
        return ChatPrompts([ids], lambda: text, tool_names=declared_names(req))

    def opening(self, spec: ChoiceSpec, prompts: Prompts) -> dict | None:
        # with tools the answer may be calls alone, whose content is null (as in response_choice)
        content = None if prompts.parse_tool_calls else ""
        return self.chunk_choice(spec.index, "", delta={"role": "assistant", "content": content})

    def chunk_choice(self, index: int, text: str, finish_reason: str | None = None, delta: dict | None = None,
                     **extra) -> dict:
        """``text`` becomes ``delta.content`` (an empty delta when there is none)."""
        if delta is None:
            delta = {"content": text} if text else {}
        return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason, **extra}

    def response_choice(self, spec: ChoiceSpec, result: ChoiceResult, prompts: ChatPrompts) -> dict:
        message = {"role": "assistant", "content": result.text}
        calls: list[ToolCall] = []
        if prompts.parse_tool_calls:
            content, calls = parse(result.text, prompts.tool_names)
            message["content"] = content or None
            if calls:
                message["tool_calls"] = [c.as_openai() for c in calls]
        return {
            "index": spec.index,
            "message": message,
            "logprobs": None,
            "finish_reason": finish_reason(result.finish_reason, bool(calls)),
        }

    def stream_choices(self, prompts: ChatPrompts):
        if not prompts.parse_tool_calls:
            return plain_stream_choices(self)
        return ToolCallChoices(self, prompts.tool_names).choices


@dataclass
class ChatPrompts(Prompts):
    tool_names: frozenset[str] = frozenset()  # the functions declared to the model (none: no tool calls read)

    @property
    def parse_tool_calls(self) -> bool:
        """Tools were declared: the output is read for calls to them."""
        return bool(self.tool_names)


def finish_reason(reason: str | None, called: bool) -> str | None:
    """OpenAI's ``tool_calls`` when the model stopped after calling a tool."""
    return "tool_calls" if called and reason == "stop" else reason


class ToolCallChoices:
    """The stream's choice objects with the text read for tool calls (``tool_calls.ToolCallStream``):
    content deltas, one ``delta.tool_calls`` item per complete call (``index`` counts the choice's
    calls), and ``finish_reason`` ``tool_calls`` after a call. Text that may begin a call is held
    until it is settled."""

    def __init__(self, chat: Chat, declared: frozenset[str]):
        self.chat = chat
        self.declared = declared
        self.readers: dict[int, ToolCallStream] = {}
        self.calls: dict[int, int] = {}  # choice index -> calls sent

    def choices(self, index: int, out: RequestOutput) -> list[dict]:
        reader = self.readers.setdefault(index, ToolCallStream(self.declared))
        events = reader.feed(out.text) if out.text else []
        if out.finished:
            events += reader.finish()
        found = []
        for event in events:
            if isinstance(event, str):
                found.append(self.chat.chunk_choice(index, event))
                continue
            n = self.calls.get(index, 0)
            self.calls[index] = n + 1
            found.append(self.chat.chunk_choice(index, "", delta={"tool_calls": [{"index": n, **event.as_openai()}]}))
        if out.finished:
            found.append(self.chat.chunk_choice(index, "", finish_reason(out.finish_reason, index in self.calls)))
        return found


CHAT = Chat()


async def create_chat_completion(request: Request):
    """OpenAI's chat completions: the messages through the checkpoint's chat template."""
    return await serve(request, CHAT)


def messages_as_dicts(req: ChatCompletionRequest) -> list[dict]:
    """The messages as the chat template takes them (transformers' conventions): ``content`` a string
    (text parts joined by newlines), or, with image parts, the parts ``{"type": "text", "text": ...}``
    and ``{"type": "image"}`` (the template writes the processor's image token for each); an
    assistant's ``tool_calls`` with ``function.arguments`` parsed into an object; a tool message with
    its ``tool_call_id`` and ``name`` (the called function's, when the client left it out)."""
    out = []
    called: dict[str, str] = {}  # tool call id -> function name, from the assistant messages so far
    for i, m in enumerate(req.messages):
        if m.content is None:
            content = ""
        elif isinstance(m.content, str):
            content = m.content
        else:
            parts = []
            for j, part in enumerate(m.content):
                text = part_text(part, m.role)
                if text is not None:
                    parts.append({"type": "text", "text": text})
                elif part.type == "image_url" and part.image_url is not None:
                    parts.append({"type": "image"})
                elif part.type in ("text", "image_url") or (part.type == "refusal" and m.role == "assistant"):
                    raise errors.bad_request(f"This {part.type} content part has no '{part.type}' field.",
                                             f"messages[{i}].content[{j}]")
                else:
                    raise errors.bad_request(f"Content parts must be text or image_url parts, got type '{part.type}'.",
                                             f"messages[{i}].content[{j}]")
            content = parts if any(p["type"] == "image" for p in parts) else "\n".join(p["text"] for p in parts)
        d = {"role": m.role, "content": content}
        if m.name:
            d["name"] = m.name
        if m.tool_calls:
            if m.role != "assistant":
                raise errors.bad_request("Only assistant messages may have tool_calls.", f"messages[{i}].tool_calls")
            d["tool_calls"] = [_template_call(call, i, j) for j, call in enumerate(m.tool_calls)]
            called.update((c["id"], c["function"]["name"]) for c in d["tool_calls"] if c["id"])
        if m.role == "tool":
            if not m.tool_call_id:
                raise errors.bad_request("A tool message needs the tool_call_id of the call it answers.",
                                         f"messages[{i}].tool_call_id")
            d["tool_call_id"] = m.tool_call_id
            if "name" not in d and m.tool_call_id in called:
                d["name"] = called[m.tool_call_id]
        out.append(d)
    return out


def part_text(part, role: str) -> str | None:
    """A content part's text: a text part's, or a refusal part's in an assistant message (OpenAI's own
    answers carry them; read as text, as vLLM does); None for any other part."""
    if part.type == "text":
        return part.text
    if part.type == "refusal" and role == "assistant":
        return part.refusal
    return None


def _template_call(call, i: int, j: int) -> dict:
    """One ``tool_calls`` item for the template: Gemma 4's (and most) templates write the arguments
    from an object, so the JSON string is parsed; it must hold an object."""
    try:
        arguments = json.loads(call.function.arguments)
    except (ValueError, RecursionError):  # not JSON, or nested past the parser's recursion limit
        arguments = None
    if not isinstance(arguments, dict):
        raise errors.bad_request("function.arguments must be a JSON object (as a string).",
                                 f"messages[{i}].tool_calls[{j}].function.arguments")
    return {"id": call.id, "type": "function", "function": {"name": call.function.name, "arguments": arguments}}


def declares_tools(req: ChatCompletionRequest) -> bool:
    """Whether the template gets declarations (none with ``tool_choice: "none"``)."""
    return bool(req.tools) and req.tool_choice != "none"


def declared_names(req: ChatCompletionRequest) -> frozenset[str]:
    """The names of the functions the template declares (``declares_tools``); a call to another one is
    read as content."""
    return frozenset(t.function.name for t in req.tools) if declares_tools(req) else frozenset()


def template_tools(req: ChatCompletionRequest) -> list[dict] | None:
    """The declarations the template renders (``declares_tools``)."""
    return [t.model_dump(exclude_none=True) for t in req.tools] if declares_tools(req) else None


def template_reads_tools(tokenizer) -> bool:
    """Whether the checkpoint's chat template (any of its named templates) uses the ``tools`` variable."""
    template = getattr(tokenizer, "chat_template", None)
    sources = template.values() if isinstance(template, dict) else [template]
    return any(isinstance(t, str) and re.search(r"\btools\b", t) for t in sources)


def message_chars(req: ChatCompletionRequest) -> int:
    """The characters of every string of the messages a template may render (texts, names, call ids, the
    history's calls): what makes a conversation large."""
    chars = 0
    for m in req.messages:
        if isinstance(m.content, str):
            chars += len(m.content)
        elif m.content:
            chars += sum(len(text) for p in m.content if (text := part_text(p, m.role)) is not None)
        chars += len(m.name or "") + len(m.tool_call_id or "")
        chars += sum(len(c.id or "") + len(c.function.name) + len(c.function.arguments) for c in m.tool_calls or ())
    return chars


_TOOLS_JSON = TypeAdapter(list[Tool])


def check_tools(req: ChatCompletionRequest, settings) -> None:
    """The settings ``max_tools`` and ``max_tools_chars``, before anything is rendered."""
    if not req.tools:
        return
    if len(req.tools) > settings.max_tools:
        raise limit_error(f"Too many tools: {len(req.tools)}, the limit is {settings.max_tools} (setting max_tools).",
                          "tools")
    chars = len(_TOOLS_JSON.dump_json(req.tools, exclude_none=True).decode())  # compact, characters unescaped
    if chars > settings.max_tools_chars:
        raise limit_error(f"The tools are {chars} characters long as JSON, the limit is {settings.max_tools_chars} "
                          "(setting max_tools_chars).", "tools")


def image_urls(req: ChatCompletionRequest) -> list[tuple[str, str]]:
    """(url, param naming its part) of every image part, in the order the template meets them."""
    return [(part.image_url.url, f"messages[{i}].content[{j}].image_url")
            for i, m in enumerate(req.messages) if isinstance(m.content, list)
            for j, part in enumerate(m.content) if part.type == "image_url" and part.image_url is not None]


async def image_prompts(req: ChatCompletionRequest, tokenizer, limit: PromptLimit, gate, images: ImageReader,
                        urls: list[tuple[str, str]]) -> Prompts:
    """A conversation with images: their number checked first, then (in a preprocessing turn, off the event
    loop) the template rendered and its text checked, then the http(s) ones fetched (in a fetch turn,
    ``ImageFetches``), then (in a decoding turn, ``ImageReader.decodes``) each decoded within the limits and
    the text and images through the processor."""
    images.check_count(len(urls))

    # a text that cannot fit is refused before any image is fetched or decoded
    text = await gate.run(lambda: render_prompt(tokenizer, req, limit))
    remote = [i for i, (url, param) in enumerate(urls) if images.is_remote(url, param)]
    async with images.fetches.turn() if remote else contextlib.nullcontext():
        def fetch() -> dict[int, bytes]:
            deadline = images.fetch_deadline()  # one for all the request's fetches
            return {i: images.fetch_bytes(*urls[i], deadline) for i in remote}

        fetched = await images.fetches.run(fetch) if remote else {}

        def work():
            from engine.multimodal import process_images  # torch: loaded with the engine, not with the server

            pictures = [images.picture(fetched[i] if i in fetched else images.data_url_bytes(url, param), param)
                        for i, (url, param) in enumerate(urls)]
            try:
                ids, inputs = process_images(images.processor, text, pictures)
            except ValueError as exc:  # e.g. the text holds more image tokens than there are images
                raise errors.bad_request(f"These messages cannot take their images: {exc}.", "messages") from None
            return ids, inputs

        ids, inputs = await images.decodes.run(work)
    limit.check_tokens(len(ids), "messages", "the prompt")
    return ChatPrompts([ids], lambda: text, images=[inputs], tool_names=declared_names(req))


# Keys of apply_chat_template that would let a client swap the template (arbitrary Jinja: a CPU and
# memory bomb) or change what the server renders; anything else is passed to the checkpoint's template.
RESERVED_TEMPLATE_KWARGS = frozenset({
    "chat_template", "tokenize", "return_dict", "return_tensors", "return_assistant_tokens_mask",
    "add_generation_prompt", "continue_final_message", "conversation", "messages", "tools", "documents",
    "padding", "truncation", "max_length", "tokenizer_kwargs",
})


def template_kwargs(raw: dict | None, max_chars: int | None = None) -> dict:
    """Extra variables for the checkpoint's own chat template: plain scalars only, no reserved keys, and
    strings of at most ``max_chars`` (``max_template_kwarg_chars``; checked with the other limits)."""
    kwargs = dict(raw or {})
    for key, value in kwargs.items():
        if key in RESERVED_TEMPLATE_KWARGS:
            raise errors.bad_request(f"chat_template_kwargs may not set '{key}'.", "chat_template_kwargs")
        if not (value is None or isinstance(value, (str, int, float, bool))):
            raise errors.bad_request(f"chat_template_kwargs['{key}'] must be a string, number, boolean or null.",
                                     "chat_template_kwargs")
        if max_chars is not None and isinstance(value, str) and len(value) > max_chars:
            raise limit_error(
                f"chat_template_kwargs['{key}'] is {len(value)} characters long, the limit is {max_chars} "
                "(setting max_template_kwarg_chars).", "chat_template_kwargs",
            )
    return kwargs


def render_prompt(tokenizer, req: ChatCompletionRequest, limit: PromptLimit) -> str:
    """The messages through the checkpoint's chat template, refused by ``limit`` if the text's characters
    prove it too long (the rendered text counts: a template may leave text out)."""
    messages = messages_as_dicts(req)
    if req.continue_final_message and messages[-1]["role"] != "assistant":
        raise errors.bad_request("continue_final_message needs the last message to be from the assistant.", "messages")
    kwargs = template_kwargs(req.chat_template_kwargs)
    try:
        text = tokenizer.apply_chat_template(
            messages,
            tools=template_tools(req),
            tokenize=False,
            add_generation_prompt=req.add_generation_prompt and not req.continue_final_message,
            continue_final_message=req.continue_final_message,
            **kwargs,
        )
    except Exception as exc:  # jinja2 errors, a template that raises on a role, missing template
        raise errors.bad_request(f"The chat template could not render these messages: {exc}", "messages") from None
    limit.check_text(text, "messages", "the prompt")
    return text
