"""chat_template_kwargs can feed the checkpoint's template but never replace it (a Jinja bomb)."""

from __future__ import annotations

import httpx
import pytest

from tests.test_server_errors import assert_error

BOMB = "{% for a in range(100000) %}{% for b in range(100000) %}x{% endfor %}{% endfor %}"


@pytest.mark.parametrize("kwargs,fragment", [
    ({"chat_template": BOMB}, "may not set 'chat_template'"),
    ({"tokenize": True}, "may not set 'tokenize'"),
    ({"add_generation_prompt": False}, "may not set 'add_generation_prompt'"),
    ({"custom": {"nested": [1, 2]}}, "must be a string"),
    ({"custom": "y" * 2000}, "the limit is 1024 (setting max_template_kwarg_chars)"),
])
def test_template_replacement_and_odd_values_are_rejected(live_server, kwargs, fragment):
    body = {"model": live_server.model_name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
            "chat_template_kwargs": kwargs}
    r = httpx.post(live_server.url + "/v1/chat/completions", json=body, headers=live_server.headers, timeout=30)
    err = assert_error(r, 400, param="chat_template_kwargs")
    assert fragment in err["message"]
    assert httpx.get(live_server.url + "/health", timeout=10).status_code == 200


def test_template_variables_reach_the_template(server_variant):
    """A template variable and a flag from chat_template_kwargs are rendered into the prompt: the prompt
    grows by exactly their text (byte tokenizer: one token per byte) and the logged prompt shows it."""
    url = server_variant.base_url + "/chat/completions"
    base = {"model": server_variant.model_name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
            "seed": 1}
    plain = httpx.post(url, json=base, timeout=30)
    assert plain.status_code == 200, plain.text
    note = "ask-me-later"
    r = httpx.post(url, json={**base, "chat_template_kwargs": {"note": note, "enable_thinking": True}}, timeout=30)
    assert r.status_code == 200, r.text
    added = len(f"[note: {note}]") + len("[thinking]")
    assert r.json()["usage"]["prompt_tokens"] == plain.json()["usage"]["prompt_tokens"] + added
    line = next(ln for ln in server_variant.log().splitlines() if r.json()["id"] in ln)
    assert f"[note: {note}][thinking]<start_of_turn>user" in line  # --log-prompts: the rendered prompt
    off = httpx.post(url, json={**base, "chat_template_kwargs": {"note": "", "enable_thinking": False}}, timeout=30)
    assert off.json()["usage"]["prompt_tokens"] == plain.json()["usage"]["prompt_tokens"]


def test_generation_prompt_and_continued_final_message(server_variant):
    """add_generation_prompt false renders no opening of the model's turn; continue_final_message renders
    the last (assistant) message open, for the model to go on with it (docs/api.md)."""
    import ast

    url = server_variant.base_url + "/chat/completions"
    base = {"model": server_variant.model_name, "max_tokens": 4, "seed": 1}
    user = [{"role": "user", "content": "hi"}]

    def rendered(body) -> str:  # the prompt as the request's log line shows it (--log-prompts)
        r = httpx.post(url, json={**base, **body}, timeout=30)
        assert r.status_code == 200, r.text
        line = next(ln for ln in server_variant.log().splitlines() if r.json()["id"] in ln)
        return ast.literal_eval(line.split(" prompt=", 1)[1].split(" outputs=", 1)[0])

    turn = "<bos><start_of_turn>user\nhi<end_of_turn>\n"
    assert rendered({"messages": user}) == turn + "<start_of_turn>model\n"
    assert rendered({"messages": user, "add_generation_prompt": False}) == turn
    started = [*user, {"role": "assistant", "content": "The answer is"}]
    assert rendered({"messages": started, "continue_final_message": True,
                     "add_generation_prompt": False}) == turn + "<start_of_turn>model\nThe answer is"


def test_an_assistant_refusal_part_reads_as_its_text(server_variant):
    """OpenAI's answers may carry refusal parts: replayed in an assistant message they render as that
    text; in another role they are a 400."""
    url = server_variant.base_url + "/chat/completions"
    base = {"model": server_variant.model_name, "max_tokens": 4, "seed": 1}
    said = {"role": "assistant", "content": "I can't help with that."}
    refused = {"role": "assistant", "content": [{"type": "refusal", "refusal": "I can't help with that."}]}
    user = {"role": "user", "content": "hi"}
    as_text, as_refusal = (httpx.post(url, json={**base, "messages": [user, m, user]}, timeout=30)
                           for m in (said, refused))
    assert as_refusal.status_code == 200, as_refusal.text
    assert as_refusal.json()["choices"] == as_text.json()["choices"]
    assert as_refusal.json()["usage"] == as_text.json()["usage"]
    r = httpx.post(url, json={**base, "messages": [{"role": "user", "content": refused["content"]}]}, timeout=30)
    err = assert_error(r, 400, param="messages[0].content[0]")
    assert err["message"] == "Content parts must be text or image_url parts, got type 'refusal'."


def test_every_string_a_template_may_write_makes_a_chat_large():
    """Names and call ids count towards the size that sends a chat's rendering off the event loop (Gemma's
    template writes a tool message's name): none of them makes a long render run on the loop."""
    from server.chat import message_chars
    from server.completions import TOKENIZE_IN_THREAD_CHARS
    from server.protocol import ChatCompletionRequest

    long = "n" * (TOKENIZE_IN_THREAD_CHARS + 1)
    call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    for messages in ([{"role": "user", "content": "hi", "name": long}],
                     [{"role": "tool", "tool_call_id": long, "content": "ok"}],
                     [{"role": "assistant", "content": None, "tool_calls": [{**call, "id": long}]}]):
        assert message_chars(ChatCompletionRequest.model_validate({"messages": messages})) > TOKENIZE_IN_THREAD_CHARS
