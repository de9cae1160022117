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
    ({"custom": "y" * 2000}, "must be a string (at most 1024 characters)"),
])
def test_template_replacement_and_odd_values_are_rejected(live_server, kwargs, fragment):
    body = {"model": live_server.model_name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
            "chat_template_kwargs": kwargs}
    r = httpx.post(live_server.url + "/v1/chat/completions", json=body, headers=live_server.headers, timeout=30)
    err = assert_error(r, 400, param="chat_template_kwargs")
    assert fragment in err["message"]
    assert httpx.get(live_server.url + "/health", timeout=10).status_code == 200


def test_plain_template_variables_still_pass(live_server):
    body = {"model": live_server.model_name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
            "seed": 1, "chat_template_kwargs": {"enable_thinking": False, "custom": "x"}}
    r = httpx.post(live_server.url + "/v1/chat/completions", json=body, headers=live_server.headers, timeout=30)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] >= 1
