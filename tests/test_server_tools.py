"""Tools (function calling) on /v1/chat/completions: Gemma 4's function-call format read out of the
model's text (whole and streamed in pieces), the response and stream shapes the SDK parses, the
declarations and the tool-call history rendered into real prompts, and the exact refusals."""

from __future__ import annotations

import json
import shutil

import httpx
import openai
import pytest
from openai.lib.streaming.chat import ChatCompletionStreamState
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from engine.detokenizer import FUNCTION_CALL_MARKERS, IncrementalDetokenizer
from engine.outputs import RequestOutput
from server.chat import CHAT, ChatPrompts
from server.choices import ChoiceResult, ChoiceSpec
from server.default_model import EMBEDDED_SERVED_NAME
from server.tool_calls import ToolCallStream
from server.tool_calls import parse as parse_declared
from tests.test_server_errors import assert_error
from tools.sudoku.common import BUCKETS, EVAL_SEED, eval_set
from tools.tiny_checkpoint import build_byte_tokenizer

Q = '<|"|>'  # Gemma 4's string quote
# the functions the format tests declare ("bad name" is no valid name; "undeclared" is never declared)
DECLARED = frozenset({"get_weather", "get_time", "f", "f-1_x", "g", "a", "b", "ping"})


def parse(text: str, declared: frozenset[str] = DECLARED):
    return parse_declared(text, declared)


# -- the format --------------------------------------------------------------------------------


def calls_of(calls) -> list[tuple[str, dict]]:
    return [(c.name, json.loads(c.arguments)) for c in calls]


def test_single_call():
    content, calls = parse(f"<|tool_call>call:get_weather{{city:{Q}Paris{Q},days:3}}<tool_call|>")
    assert content == ""
    assert calls_of(calls) == [("get_weather", {"city": "Paris", "days": 3})]
    assert calls[0].arguments == '{"city": "Paris", "days": 3}'
    assert calls[0].id.startswith("call_") and len(calls[0].id) == len("call_") + 24


def test_several_calls_and_the_text_around_them():
    text = (f"Let me look.\n<|tool_call>call:get_weather{{city:{Q}Paris{Q}}}<tool_call|>"
            f"<|tool_call>call:get_time{{zone:{Q}CET{Q}}}<tool_call|> Done.")
    content, calls = parse(text)
    assert content == "Let me look.\n Done."
    assert calls_of(calls) == [("get_weather", {"city": "Paris"}), ("get_time", {"zone": "CET"})]
    assert len({c.id for c in calls}) == 2


def test_every_kind_of_value():
    args = (f"{{text:{Q}a, b: {{c}} [d]{Q},n:-2,x:1.5e3,yes:true,no:false,nothing:null,none:None,"
            f"word:celsius,json:\"quoted\",nested:{{deep:{{k:[1,{Q}two{Q},{{z:false}}]}}}},empty:{{}},list:[],"
            f"{Q}odd key{Q}:1,big:1e999}}")
    content, calls = parse(f"<|tool_call>call:f-1_x{args}<tool_call|>")
    assert content == ""
    assert calls_of(calls) == [("f-1_x", {
        "text": "a, b: {c} [d]", "n": -2, "x": 1500.0, "yes": True, "no": False, "nothing": None, "none": None,
        "word": "celsius", "json": "quoted", "nested": {"deep": {"k": [1, "two", {"z": False}]}}, "empty": {},
        "list": [], "odd key": 1, "big": "1e999"})]


def test_an_escaped_half_surrogate_stays_the_text_it_was():
    """``"\\ud800"`` decodes to half a surrogate pair, which no UTF-8 response can carry: the value is its text."""
    content, calls = parse('<|tool_call>call:f{a:"\\ud800",b:"\\ud83d\\ude00"}<tool_call|>')
    assert calls_of(calls) == [("f", {"a": '"\\ud800"', "b": "\U0001f600"})]
    calls[0].arguments.encode("utf-8")


@pytest.mark.parametrize("block", [
    "<|tool_call>get_weather{city:1}<tool_call|>",  # no call: prefix
    "<|tool_call>call:bad name{}<tool_call|>",  # a name OpenAI would not accept
    "<|tool_call>call:{}<tool_call|>",  # no name
    "<|tool_call>call:f<tool_call|>",  # no arguments
    f"<|tool_call>call:f{{city:{Q}Paris}}<tool_call|>",  # unterminated string
    "<|tool_call>call:f{a:1<tool_call|>",  # unbalanced
    "<|tool_call>call:f{a:[1,2}<tool_call|>",
    "<|tool_call>call:f{a}<tool_call|>",  # a key without a value
    "<|tool_call>call:f{a:}<tool_call|>",
    "<|tool_call>call:f{a:1,,b:2}<tool_call|>",
    "<|tool_call>call:f{a:1} and more<tool_call|>",  # text after the arguments
    "<|tool_call>call:f{a:1}",  # never closed
    "<|tool_call>call:f{a:" + "[" * 65 + "]" * 65 + "}<tool_call|>",  # nested deeper than MAX_ARGUMENT_DEPTH
    "<|tool_call>call:f{a:" + "[" * 5000 + "<tool_call|>",  # far deeper than Python's recursion limit
])
def test_a_malformed_call_stays_text(block):
    text = f"before {block} after"
    content, calls = parse(text)
    assert (content, calls) == (text, [])


def test_a_call_to_a_function_not_declared_stays_text():
    """A client dispatches calls by the names it declared: a well-formed call to another name is
    content as written, whole and streamed in any two pieces."""
    text = f"a <|tool_call>call:undeclared{{x:1}}<tool_call|> b <|tool_call>call:f{{y:2}}<tool_call|>"
    content, calls = parse(text)
    assert (content, calls_of(calls)) == ("a <|tool_call>call:undeclared{x:1}<tool_call|> b ", [("f", {"y": 2})])
    for cut in range(len(text) + 1):
        got, got_calls, _ = streamed([text[:cut], text[cut:]])
        assert (got, calls_of(got_calls)) == (content, calls_of(calls)), cut


def test_arguments_nested_to_the_limit_are_read():
    text = "<|tool_call>call:f{a:" + "[" * 64 + "]" * 64 + "}<tool_call|>"
    content, calls = parse(text)
    assert content == "" and json.loads(calls[0].arguments)["a"] == nested_list(63)


def nested_list(depth: int) -> list:
    value: list = []
    for _ in range(depth):
        value = [value]
    return value


def test_a_malformed_call_does_not_hide_a_good_one():
    text = "<|tool_call>call:f{a:}<tool_call|>x<|tool_call>call:g{b:2}<tool_call|>"
    content, calls = parse(text)
    assert content == "<|tool_call>call:f{a:}<tool_call|>x"
    assert calls_of(calls) == [("g", {"b": 2})]


def test_an_abandoned_call_does_not_hide_the_next_one():
    """A call the model leaves unclosed before starting the next: the abandoned part stays text, and
    the next call is read, whole or streamed in any pieces."""
    abandoned = f"<|tool_call>call:get_weather{{city:{Q}Paris{Q}"
    text = f"{abandoned}<|tool_call>call:get_time{{tz:{Q}UTC{Q}}}<tool_call|> ok"
    content, calls = parse(text)
    assert (content, calls_of(calls)) == (abandoned + " ok", [("get_time", {"tz": "UTC"})])
    for cut in range(1, len(text)):
        got, got_calls, _ = streamed([text[:cut], text[cut:]])
        assert (got, calls_of(got_calls)) == (content, calls_of(calls)), cut


SAMPLE = (f"Checking. <|tool_call>call:get_weather{{city:{Q}Paris, {{FR}}{Q},days:2,opts:{{metric:true}}}}<tool_call|>"
          f" and <|tool_call>call:bad name{{}}<tool_call|><|tool_call>call:ping{{}}<tool_call|> done <|tool")


def streamed(pieces) -> tuple[str, list, list]:
    """(content, calls, events) of a text fed to ``ToolCallStream`` in ``pieces``."""
    reader = ToolCallStream(DECLARED)
    events = [e for p in pieces for e in reader.feed(p)] + reader.finish()
    content = "".join(e for e in events if isinstance(e, str))
    return content, [e for e in events if not isinstance(e, str)], events


def test_sample_parse():
    content, calls = parse(SAMPLE)
    assert content == "Checking.  and <|tool_call>call:bad name{}<tool_call|> done <|tool"
    assert calls_of(calls) == [("get_weather", {"city": "Paris, {FR}", "days": 2, "opts": {"metric": True}}),
                               ("ping", {})]


def test_every_split_point_gives_the_whole_text_result():
    content, calls = parse(SAMPLE)
    for cut in range(len(SAMPLE) + 1):
        got_content, got_calls, _ = streamed([SAMPLE[:cut], SAMPLE[cut:]])
        assert (got_content, calls_of(got_calls)) == (content, calls_of(calls)), cut
    got_content, got_calls, _ = streamed(list(SAMPLE))  # one character at a time
    assert (got_content, calls_of(got_calls)) == (content, calls_of(calls))


def test_the_stream_holds_back_only_what_may_start_a_call():
    reader = ToolCallStream(DECLARED)
    assert reader.feed("Hi <") == ["Hi "]
    assert reader.feed("|tool_c") == []
    assert reader.feed("all>call:f{a:1}") == []  # an open block waits for its end
    call, text = reader.feed("<tool_call|> <b> <")
    assert (call.name, call.arguments, text) == ("f", '{"a": 1}', " <b> ")
    assert reader.feed("") == []
    assert reader.finish() == ["<"]
    reader = ToolCallStream(DECLARED)
    assert reader.feed("a <|tool_call>call:f{a:1}") == ["a "]
    assert reader.finish() == ["<|tool_call>call:f{a:1}"]  # never closed: text


def test_the_detokenizer_keeps_the_markers_of_a_gemma4_tokenizer():
    """Gemma 4's tokenizer has the markers as special tokens: the engine's text keeps them (and skips
    every other special token), so the calls can be read; other tokenizers decode as before."""
    plain = build_byte_tokenizer()
    assert IncrementalDetokenizer(plain).add(plain("a<eos>", add_special_tokens=False).input_ids) == "a"
    tok = build_byte_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": list(FUNCTION_CALL_MARKERS)})
    text = f"<bos>Sure.<|tool_call>call:f{{city:{Q}Paris{Q}}}<tool_call|><eos>"
    ids = tok(text, add_special_tokens=False).input_ids
    assert {tok.convert_tokens_to_ids(m) for m in FUNCTION_CALL_MARKERS} <= set(ids)  # one token each
    detok = IncrementalDetokenizer(tok)
    pieces = [detok.add(ids[:9]), detok.add(ids[9:12]), detok.add(ids[12:], final=True)]
    content, calls, _ = streamed(pieces)
    assert (content, calls_of(calls)) == ("Sure.", [("f", {"city": "Paris"})])
    assert "".join(pieces) == text.removeprefix("<bos>").removesuffix("<eos>")


def test_a_draft_shows_the_markers_its_canvas_commits():
    """A draft chunk's text is the canvas's text as committed, tool-call markers included (else a page
    showing drafts then the committed text would see the call jump)."""
    from engine.outputs import Draft
    from server.serving import _draft_extension

    tok = build_byte_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": list(FUNCTION_CALL_MARKERS)})
    text = f"Sure.<|tool_call>call:f{{city:{Q}Paris{Q}}}<tool_call|><eos>"
    ids = tuple(tok(text, add_special_tokens=False).input_ids)
    draft = _draft_extension(Draft(0, 3, 8, ids, tuple(range(len(ids)))), tok)["draft"]
    assert draft == IncrementalDetokenizer(tok).add(list(ids), final=True) == text.removesuffix("<eos>")


# -- the chat endpoint's shapes -----------------------------------------------------------------


def spec(index=0) -> ChoiceSpec:
    return ChoiceSpec(index, 0, [1, 2, 3], None, f"r-{index}")


def result(text: str, reason: str) -> ChoiceResult:
    r = ChoiceResult(0, [text])
    r.finish_reason = reason
    return r


def response(choice: dict) -> ChatCompletion:
    """The response around ``choice`` as the SDK parses it."""
    return ChatCompletion.model_validate(
        {"id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": "m", "choices": [choice]})


def test_response_with_tool_calls():
    text = f"Sure.<|tool_call>call:get_weather{{city:{Q}Paris{Q}}}<tool_call|>"
    choice = CHAT.response_choice(spec(), result(text, "stop"), ChatPrompts([[1]], "", tool_names=DECLARED))
    message = response(choice).choices[0].message
    assert response(choice).choices[0].finish_reason == "tool_calls"
    assert message.content == "Sure."
    (call,) = message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert (call.function.name, json.loads(call.function.arguments)) == ("get_weather", {"city": "Paris"})


def test_response_with_only_tool_calls_has_null_content():
    text = "<|tool_call>call:a{}<tool_call|><|tool_call>call:b{x:1}<tool_call|>"
    choice = CHAT.response_choice(spec(), result(text, "stop"), ChatPrompts([[1]], "", tool_names=DECLARED))
    assert choice["message"]["content"] is None
    assert [c["function"]["name"] for c in choice["message"]["tool_calls"]] == ["a", "b"]


@pytest.mark.parametrize("parse_calls,text,reason,content,finish", [
    (True, "no call here", "stop", "no call here", "stop"),  # no call: a plain message
    (True, "<|tool_call>call:a{}<tool_call|>", "length", None, "length"),  # cut short: length stays
    (False, "<|tool_call>call:a{}<tool_call|>", "stop", "<|tool_call>call:a{}<tool_call|>", "stop"),  # no tools
])
def test_response_finish_reason_and_content(parse_calls, text, reason, content, finish):
    names = DECLARED if parse_calls else frozenset()
    choice = CHAT.response_choice(spec(), result(text, reason), ChatPrompts([[1]], "", tool_names=names))
    assert (choice["message"]["content"], choice["finish_reason"]) == (content, finish)
    assert ("tool_calls" in choice["message"]) == (parse_calls and "<|tool_call>" in text)


def stream_chunks(pieces: list[str], reason: str, parse_calls=True) -> list[ChatCompletionChunk]:
    """The chat endpoint's stream chunks for a choice whose committed text arrives in ``pieces``."""
    shape = CHAT.stream_choices(ChatPrompts([[1]], "", tool_names=DECLARED if parse_calls else frozenset()))
    outs = [RequestOutput("r", text=p) for p in pieces[:-1]]
    outs.append(RequestOutput("r", text=pieces[-1], finished=True, finish_reason=reason))
    return [ChatCompletionChunk.model_validate({"id": "c", "object": "chat.completion.chunk", "created": 0,
                                                "model": "m", "choices": [c]})
            for out in outs for c in shape(0, out)]


def test_stream_sends_content_then_whole_calls_then_tool_calls_finish():
    cut = SAMPLE.index("Paris")
    chunks = stream_chunks([SAMPLE[:cut], SAMPLE[cut:]], "stop")
    deltas = [c.choices[0].delta for c in chunks]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    content = "".join(d.content or "" for d in deltas)
    calls = [t for d in deltas for t in (d.tool_calls or [])]
    expected_content, expected_calls = parse(SAMPLE)
    assert content == expected_content
    assert [t.index for t in calls] == [0, 1]
    assert [(t.function.name, json.loads(t.function.arguments)) for t in calls] == calls_of(expected_calls)
    assert all(t.type == "function" and t.id.startswith("call_") for t in calls)
    assert deltas[0].content == "Checking. "  # text before a call is not held


@pytest.mark.parametrize("text", ["<|tool_call>call:a{}<tool_call|>", "Sure.<|tool_call>call:a{}<tool_call|>",
                                  "no call here"], ids=["calls-alone", "text-and-calls", "text"])
def test_the_sdk_accumulates_a_stream_into_the_response_message(text):
    """The openai SDK's accumulator over the opening chunk and the stream gives the response's content:
    null for calls alone (not an empty string), the text otherwise."""
    prompts = ChatPrompts([[1]], "", tool_names=DECLARED)
    opening = ChatCompletionChunk.model_validate({"id": "c", "object": "chat.completion.chunk", "created": 0,
                                                  "model": "m", "choices": [CHAT.opening(spec(), prompts)]})
    state = ChatCompletionStreamState()
    for chunk in [opening, *stream_chunks([text], "stop")]:
        state.handle_chunk(chunk)
    expected = CHAT.response_choice(spec(), result(text, "stop"), prompts)["message"]["content"]
    assert state.current_completion_snapshot.choices[0].message.content == expected


def test_stream_without_calls_is_plain_text():
    chunks = stream_chunks(["Hello <", "b> world"], "stop")
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "Hello <b> world"
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert not any(c.choices[0].delta.tool_calls for c in chunks)


def test_stream_without_tools_sends_text_as_it_comes():
    chunks = stream_chunks(["a <|tool_call>call:", "f{}<tool_call|>"], "stop", parse_calls=False)
    assert [c.choices[0].delta.content for c in chunks] == ["a <|tool_call>call:", "f{}<tool_call|>", None]
    assert chunks[-1].choices[0].finish_reason == "stop"


# -- real servers ---------------------------------------------------------------------------------

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather now",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
# WEATHER as the embedded model's template writes it (Gemma 4's declaration format)
WEATHER_DECLARED = (f"<|turn>system\n<|tool>declaration:get_weather{{description:{Q}Weather now{Q},"
                    f"parameters:{{properties:{{city:{{type:{Q}string{Q}}}}},required:[{Q}city{Q}],"
                    f"type:{Q}object{Q}}}}}<tool|><turn|>\n")


@pytest.fixture(scope="module")
def sudoku_server(server_launcher):
    """The embedded model (a character-level tokenizer: one token per character) with --log-prompts."""
    return server_launcher(["--log-prompts"], model_name=EMBEDDED_SERVED_NAME)


def logged_prompt(server, response_id: str) -> str:
    line = next(ln for ln in server.log().splitlines() if response_id in ln and " prompt=" in ln)
    return line.split(" prompt=", 1)[1].rsplit(" outputs=", 1)[0]


def test_declarations_reach_the_embedded_models_prompt(sudoku_server):
    """The SDK's tools are rendered into the prompt in Gemma 4's format: the prompt grows by exactly
    the declaration's characters and the logged prompt shows them; tool_choice none leaves them out."""
    client = openai.OpenAI(base_url=sudoku_server.base_url, api_key="none", max_retries=0, timeout=300)
    puzzle, _ = eval_set(1, seed=EVAL_SEED, buckets=[BUCKETS[0]])[BUCKETS[0][0]][0]
    kwargs = dict(model=EMBEDDED_SERVED_NAME, messages=[{"role": "user", "content": puzzle}], max_tokens=82, seed=3)
    plain = client.chat.completions.create(**kwargs)
    with_tools = client.chat.completions.create(tools=[WEATHER], **kwargs)
    assert plain.usage.prompt_tokens == 81
    assert with_tools.usage.prompt_tokens == 81 + len(WEATHER_DECLARED)
    assert logged_prompt(sudoku_server, with_tools.id) == repr(WEATHER_DECLARED + puzzle)
    assert with_tools.choices[0].message.tool_calls is None  # a Sudoku model answers digits
    assert with_tools.choices[0].finish_reason in ("stop", "length")
    none = client.chat.completions.create(tools=[WEATHER], tool_choice="none", **kwargs)
    assert none.usage.prompt_tokens == 81
    assert none.choices[0].message.content == plain.choices[0].message.content  # the same prompt, seed
    auto_stream = client.chat.completions.create(tools=[WEATHER], tool_choice="auto", stream=True, **kwargs)
    chunks = list(auto_stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == with_tools.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == with_tools.choices[0].finish_reason


# A Gemma-4-style template for the byte-level tiny checkpoint: declarations, calls, tool responses.
GEMMA4_STYLE_TEMPLATE = (
    "{%- macro value(v) -%}"
    "{%- if v is string -%}<|\"|>{{- v -}}<|\"|>"
    "{%- elif v is mapping -%}{{- '{' -}}{%- for k, item in v | dictsort -%}{{- k -}}:{{- value(item) -}}"
    "{{- ',' if not loop.last -}}{%- endfor -%}{{- '}' -}}"
    "{%- else -%}{{- v -}}{%- endif -%}"
    "{%- endmacro -%}"
    "{{- bos_token -}}"
    "{%- if tools -%}{{- '<|turn>system\\n' -}}{%- for tool in tools -%}<|tool>declaration:{{- tool.function.name -}}"
    "{description:<|\"|>{{- tool.function.description -}}<|\"|>}<tool|>{%- endfor -%}{{- '<turn|>\\n' -}}{%- endif -%}"
    "{%- for m in messages -%}"
    "{%- if m.role == 'tool' -%}<|tool_response>response:{{- m.name -}}{value:{{- value(m.content) -}}}<tool_response|>"
    "{%- else -%}{{- '<|turn>' + ('model' if m.role == 'assistant' else m.role) + '\\n' + m.content -}}"
    "{%- for c in m.tool_calls or [] -%}<|tool_call>call:{{- c.function.name -}}{{- value(c.function.arguments) -}}"
    "<tool_call|>{%- endfor -%}"
    "{%- if not m.tool_calls -%}{{- '<turn|>\\n' -}}{%- endif -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|turn>model\\n' -}}{%- endif -%}"
)
TOOLS_LIMITS = ["--max-tools", "2", "--max-tools-chars", "400"]


@pytest.fixture(scope="module")
def gemma4_style_server(server_launcher, server_tiny_checkpoint, tmp_path_factory):
    path = tmp_path_factory.mktemp("tools_server") / "model"
    shutil.copytree(server_tiny_checkpoint, path)
    (path / "chat_template.jinja").write_text(GEMMA4_STYLE_TEMPLATE)
    return server_launcher(["--model", str(path), "--served-model-name", "tiny-tools", "--log-prompts",
                            *TOOLS_LIMITS], model_name="tiny-tools")


HISTORY = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
        {"id": "call_2", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Lyon"}'}}]},
    {"role": "tool", "tool_call_id": "call_2", "content": "21C"},
    {"role": "tool", "tool_call_id": "call_1", "content": [{"type": "text", "text": "18C"}]},
]
HISTORY_PROMPT = (
    "<bos><|turn>system\n<|tool>declaration:get_weather{description:<|\"|>Weather now<|\"|>}<tool|><turn|>\n"
    "<|turn>user\nWeather in Paris?<turn|>\n<|turn>model\n"
    "<|tool_call>call:get_weather{city:<|\"|>Paris<|\"|>}<tool_call|>"
    "<|tool_call>call:get_weather{city:<|\"|>Lyon<|\"|>}<tool_call|>"
    "<|tool_response>response:get_weather{value:<|\"|>21C<|\"|>}<tool_response|>"
    "<|tool_response>response:get_weather{value:<|\"|>18C<|\"|>}<tool_response|>"
    "<|turn>model\n"
)


def test_history_with_tool_calls_and_results_renders(gemma4_style_server):
    """An assistant's tool_calls (arguments as the template's object) and the tool results, each named
    after the call its tool_call_id answers, go through the checkpoint's template: the logged prompt
    is exactly the Gemma 4 text and usage counts its tokens (byte tokenizer: <bos> and one per byte)."""
    srv = gemma4_style_server
    client = openai.OpenAI(base_url=srv.base_url, api_key="none", max_retries=0, timeout=60)
    r = client.chat.completions.create(model="tiny-tools", messages=HISTORY, tools=[WEATHER], max_tokens=4, seed=1)
    assert logged_prompt(srv, r.id) == repr(HISTORY_PROMPT)
    assert r.usage.prompt_tokens == 1 + len(HISTORY_PROMPT.removeprefix("<bos>").encode())
    none = client.chat.completions.create(model="tiny-tools", messages=HISTORY, tools=[WEATHER], tool_choice="none",
                                          max_tokens=4, seed=1)
    assert logged_prompt(srv, none.id) == repr(HISTORY_PROMPT.replace(
        "<|turn>system\n<|tool>declaration:get_weather{description:<|\"|>Weather now<|\"|>}<tool|><turn|>\n", ""))


# Tokens that each decode to a phrase: whole calls, pieces of calls and plain words. A random model over a
# vocabulary holding them writes tool calls, broken ones and text around them, through the real path.
PHRASES = [
    f"<|tool_call>call:get_weather{{city:{Q}Paris{Q}}}<tool_call|>",
    f"<|tool_call>call:get_weather{{city:{Q}Lyon{Q},days:2}}<tool_call|>",
    "<|tool_call>call:ping{}<tool_call|>",
    "<|tool_call>call:add{a:1,b:[2,3]}<tool_call|>",
    "<|tool_call>call:add{a:", "1}<tool_call|>", "<|tool_c", "all>", "<tool_call|>",
    " sunny ", "Let me check. ",
]


def phrase_tokenizer():
    """Characters one token each (prompts), plus one token per phrase of ``PHRASES``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from tools.tiny_checkpoint import SPECIAL_TOKENS

    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    for piece in ["\n"] + [chr(c) for c in range(32, 127)] + PHRASES:
        vocab.setdefault(piece, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="?"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(SPECIAL_TOKENS)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>")
    fast.chat_template = GEMMA4_STYLE_TEMPLATE
    return fast


@pytest.fixture(scope="module")
def phrase_server(server_launcher, tmp_path_factory):
    from tools.tiny_checkpoint import TinySpec, build_tiny_checkpoint

    path = build_tiny_checkpoint(tmp_path_factory.mktemp("phrase_model"), TinySpec(), tokenizer=phrase_tokenizer())
    return server_launcher(["--model", str(path), "--served-model-name", "tiny-phrases"], model_name="tiny-phrases")


def test_a_real_model_calls_tools_end_to_end(phrase_server):
    """A random model whose tokens include whole calls writes real tool calls: the chat response (and
    its stream) returns exactly the calls and content that the raw completion of the same prompt and
    seed holds, with finish_reason tool_calls when it stopped after a call."""
    srv = phrase_server
    client = openai.OpenAI(base_url=srv.base_url, api_key="none", max_retries=0, timeout=60)
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    prompt = phrase_tokenizer().apply_chat_template(messages, tools=[WEATHER], tokenize=False,
                                                    add_generation_prompt=True)
    seen = {"calls": 0, "tool_calls finish": 0, "text and calls": 0, "call markup kept as text": 0,
            "undeclared call kept as text": 0}
    for seed in range(12):
        raw = client.completions.create(model="tiny-phrases", prompt=prompt, max_tokens=48, seed=seed)
        chat = client.chat.completions.create(model="tiny-phrases", messages=messages, tools=[WEATHER],
                                              max_tokens=48, seed=seed)
        assert chat.usage.prompt_tokens == raw.usage.prompt_tokens
        content, calls = parse(raw.choices[0].text, frozenset({"get_weather"}))  # the declared tool only
        message = chat.choices[0].message
        got_calls = [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls or []]
        assert (message.content, got_calls) == (content or None, calls_of(calls)), seed
        finish = raw.choices[0].finish_reason
        assert chat.choices[0].finish_reason == ("tool_calls" if calls and finish == "stop" else finish)
        chunks = list(client.chat.completions.create(model="tiny-phrases", messages=messages, tools=[WEATHER],
                                                     max_tokens=48, seed=seed, stream=True))
        deltas = [c.choices[0].delta for c in chunks if c.choices]
        streamed_calls = [(t.function.name, json.loads(t.function.arguments))
                          for d in deltas for t in (d.tool_calls or [])]
        assert ("".join(d.content or "" for d in deltas), streamed_calls) == (content, calls_of(calls)), seed
        assert chunks[-1].choices[0].finish_reason == chat.choices[0].finish_reason
        seen["calls"] += bool(calls)
        seen["tool_calls finish"] += chat.choices[0].finish_reason == "tool_calls"
        seen["text and calls"] += bool(calls and content)
        seen["call markup kept as text"] += "<|tool_c" in content or "<tool_call|>" in content
        seen["undeclared call kept as text"] += "call:ping{}<tool_call|>" in content
    assert all(seen.values()), seen  # each case happens for some of these seeds


def test_each_choice_streams_its_own_calls(phrase_server):
    """n=2 with tools: each choice's stream holds exactly its plain response's content and calls (each
    choice reads its own text for calls), for seeds whose choices call tools."""
    client = openai.OpenAI(base_url=phrase_server.base_url, api_key="none", max_retries=0, timeout=60)
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    with_calls = 0
    for seed in range(6):
        kwargs = dict(model="tiny-phrases", messages=messages, tools=[WEATHER], max_tokens=48, seed=seed, n=2)
        whole = client.chat.completions.create(**kwargs)
        chunks = list(client.chat.completions.create(**kwargs, stream=True))
        for choice in whole.choices:
            deltas = [c.choices[0].delta for c in chunks if c.choices and c.choices[0].index == choice.index]
            calls = [(t.function.name, json.loads(t.function.arguments)) for d in deltas for t in (d.tool_calls or [])]
            expected = [(t.function.name, json.loads(t.function.arguments)) for t in choice.message.tool_calls or []]
            assert ("".join(d.content or "" for d in deltas) or None, calls) == (choice.message.content, expected), seed
            with_calls += bool(expected)
    assert with_calls  # some of these choices call a tool


def test_tool_call_streams_carry_every_logprob(phrase_server):
    """With tools and logprobs, the stream (which holds back text that may start a call) still carries
    each committed token's entry once, in order: the same entries as the response, for seeds whose
    output holds calls."""
    client = openai.OpenAI(base_url=phrase_server.base_url, api_key="none", max_retries=0, timeout=60)
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    with_calls = 0
    for seed in range(6):
        kwargs = dict(model="tiny-phrases", messages=messages, tools=[WEATHER], max_tokens=48, seed=seed,
                      logprobs=True, top_logprobs=2)
        whole = client.chat.completions.create(**kwargs)
        chunks = list(client.chat.completions.create(**kwargs, stream=True))
        streamed = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
        entries = whole.choices[0].logprobs.content
        assert len(entries) == whole.usage.completion_tokens
        assert [(t.token, t.logprob) for t in streamed] == [(t.token, t.logprob) for t in entries], seed
        with_calls += bool(whole.choices[0].message.tool_calls)
    assert with_calls  # some of these seeds call a tool


def post(srv, body: dict) -> httpx.Response:
    return httpx.post(srv.base_url + "/chat/completions", timeout=60,
                      json={"model": srv.model_name, "messages": [{"role": "user", "content": "hi"}],
                            "max_tokens": 2, **body})


def tool(name: str, description: str = "d") -> dict:
    return {"type": "function", "function": {"name": name, "description": description}}


UNSUPPORTED_CHOICE = "is not supported: this server cannot force the model to call a tool; use 'auto' (or 'none')."


@pytest.mark.parametrize("body,param,code,message", [
    ({"tools": [WEATHER], "tool_choice": "required"}, "tool_choice", "unsupported_parameter",
     "tool_choice 'required' " + UNSUPPORTED_CHOICE),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}, "tool_choice",
     "unsupported_parameter", "tool_choice naming a function " + UNSUPPORTED_CHOICE),
    ({"tool_choice": "auto"}, "tool_choice", None, "tool_choice is only allowed when tools are given."),
    ({"tools": [], "tool_choice": "none"}, "tool_choice", None, "tool_choice is only allowed when tools are given."),
    ({"tool_choice": "required"}, "tool_choice", None, "tool_choice is only allowed when tools are given."),
    ({"tools": [tool("a"), tool("b"), tool("c")]}, "tools", "limit_exceeded",
     "Too many tools: 3, the limit is 2 (setting max_tools)."),
    ({"tools": [tool("a", "x" * 400)]}, "tools", "limit_exceeded",  # 400 x and 62 characters of JSON
     "The tools are 462 characters long as JSON, the limit is 400 (setting max_tools_chars)."),
    ({"messages": HISTORY[:1] + [{**HISTORY[1], "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "[1]"}}]}]},
     "messages[1].tool_calls[0].function.arguments", None, "function.arguments must be a JSON object (as a string)."),
    ({"messages": HISTORY[:1] + [{**HISTORY[1], "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{oops"}}]}]},
     "messages[1].tool_calls[0].function.arguments", None, "function.arguments must be a JSON object (as a string)."),
    # nested past json's recursion limit (the body's own depth limit does not see inside a string)
    ({"messages": HISTORY[:1] + [{**HISTORY[1], "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "[" * 3000}}]}]},
     "messages[1].tool_calls[0].function.arguments", None, "function.arguments must be a JSON object (as a string)."),
    ({"messages": HISTORY[:2] + [{"role": "tool", "content": "18C"}]}, "messages[2].tool_call_id", None,
     "A tool message needs the tool_call_id of the call it answers."),
    ({"messages": [{"role": "user", "content": "x", "tool_calls": HISTORY[1]["tool_calls"]}]},
     "messages[0].tool_calls", None, "Only assistant messages may have tool_calls."),
])
def test_refusals(gemma4_style_server, body, param, code, message):
    err = assert_error(post(gemma4_style_server, body), 400, code=code, param=param, type_="invalid_request_error")
    assert err["message"] == message


@pytest.mark.parametrize("tools,param", [
    ([{"type": "function"}], "tools[0].function"),
    ([{"type": "retrieval", "function": {"name": "f"}}], "tools[0].type"),
    ([{"type": "function", "function": {"name": "has space"}}], "tools[0].function.name"),
    ([{"type": "function", "function": {"name": "x" * 65}}], "tools[0].function.name"),
    ([{"type": "function", "function": {"name": "f", "parameters": [1]}}], "tools[0].function.parameters"),
    ({"type": "function"}, "tools"),
])
def test_malformed_tools_are_schema_errors(gemma4_style_server, tools, param):
    err = assert_error(post(gemma4_style_server, {"tools": tools}), 400, param=param, type_="invalid_request_error")
    assert err["message"].startswith("Invalid request: " + param)


@pytest.mark.parametrize("name", ["has space", "x" * 65, "n" * 5_000_000])
def test_a_called_name_in_the_history_is_held_to_the_declarations_rule(gemma4_style_server, name):
    # the template writes it into the prompt, twice with its answer: a 5 MB one was tokenized on the event loop
    history = [HISTORY[0], {**HISTORY[1], "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": name, "arguments": "{}"}}]}]
    param = "messages[1].tool_calls[0].function.name"
    err = assert_error(post(gemma4_style_server, {"messages": history}), 400, param=param,
                       type_="invalid_request_error")
    assert err["message"].startswith("Invalid request: " + param)


@pytest.mark.parametrize("choice,message", [
    ("sometimes", "Invalid request: tool_choice: Value error, must be 'none', 'auto', 'required' or "
     '{"type": "function", "function": {"name": ...}}'),
    ({"type": "function", "function": {}}, 'Invalid request: tool_choice: Value error, a named tool choice is '
     '{"type": "function", "function": {"name": ...}}'),
    ({"type": "function", "name": "f"}, 'Invalid request: tool_choice: Value error, a named tool choice is '
     '{"type": "function", "function": {"name": ...}}'),
])
def test_malformed_tool_choice(gemma4_style_server, choice, message):
    err = assert_error(post(gemma4_style_server, {"tools": [WEATHER], "tool_choice": choice}), 400,
                       param="tool_choice", type_="invalid_request_error")
    assert (err["code"], err["message"]) == (None, message)


def test_a_template_without_tools_refuses_them(live_server):
    """The tiny checkpoint's template never reads `tools`: declaring tools would change nothing the model
    sees, so they are refused; tool_choice none (nothing to render) is answered."""
    body = {"model": live_server.model_name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
            "tools": [WEATHER]}
    r = httpx.post(live_server.base_url + "/chat/completions", json=body, headers=live_server.headers, timeout=60)
    err = assert_error(r, 400, code="unsupported_parameter", param="tools", type_="invalid_request_error")
    assert err["message"] == ("This model's chat template does not render tools (it never reads the 'tools' "
                              "variable), so the model would not see them.")
    r = httpx.post(live_server.base_url + "/chat/completions", json={**body, "tool_choice": "none"},
                   headers=live_server.headers, timeout=60)
    assert r.status_code == 200, r.text


def test_auto_and_none_are_answered(gemma4_style_server):
    for choice in ("auto", "none", None):
        r = post(gemma4_style_server, {"tools": [WEATHER], "tool_choice": choice})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["finish_reason"] in ("stop", "length")
    assert httpx.get(gemma4_style_server.url + "/health", timeout=10).status_code == 200
