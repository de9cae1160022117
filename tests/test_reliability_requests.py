"""Requests that are large, oddly shaped or ill-timed, against real server processes: memory bounds
before tokenizing and before parsing, the /ui body checks, the served name in /v1/models, null as
"unset", and all-or-none admission of a request's choices (docs/reliability.md, "Large requests"
and "Admission")."""

from __future__ import annotations

import json
import re
import shutil
import socket
import time

import httpx
import openai
import pytest

from bench.rss import proc_status, reset_peak
from tests.test_reliability_http import assert_openai_error, read_response
from tests.test_server_metrics import wait_for

SLOW = {"max_tokens": 4000, "ignore_eos": True, "max_denoising_steps": 64, "stability_threshold": 1000}
ABORT = ("diffusion_server:request_success_total", frozenset({("finished_reason", "abort")}))
RUNNING = ("diffusion_server:num_requests_running", frozenset())
WAITING = ("diffusion_server:num_requests_waiting", frozenset())
IN_FLIGHT = ("diffusion_server:http_requests_in_flight", frozenset())


def memory(pid: int) -> dict[str, int]:
    """The server's resident memory now (VmRSS) and at its peak (VmHWM), in MiB."""
    return {key: value // 2**20 for key, value in proc_status(pid).items()}


@pytest.fixture(scope="module")
def default_server(server_launcher, server_tiny_checkpoint):
    """Default limits (16 MiB bodies, prompts bounded by the 4096-token context)."""
    return server_launcher(["--model", str(server_tiny_checkpoint), "--served-model-name", "served-tiny"],
                           model_name="served-tiny")


# -- item 1: prompts that cannot fit are refused before they are tokenized ---------------------------


def _answered_call(call_id: str = "c1", name: str | None = None) -> list[dict]:
    """A user message, an assistant's tool call and the tool message that answers it."""
    call = {"id": call_id, "type": "function", "function": {"name": "f", "arguments": "{}"}}
    tool = {"role": "tool", "tool_call_id": call_id, "content": "ok", **({"name": name} if name else {})}
    return [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None, "tool_calls": [call]}, tool]


@pytest.mark.parametrize("case,body,param,needle", [
    ("15M-characters", {"prompt": "x" * 15_000_000}, "prompt", "at least"),
    ("256-prompts-of-60KB", {"prompt": ["y" * 60_000] * 256}, "prompt", "prompt 0 has at least"),
    ("chat-14M-characters", {"messages": [{"role": "user", "content": "z" * 7_000_000}] * 2}, "messages", "at least"),
    ("7M-token-ids", {"prompt": [1] * 7_000_000}, "prompt", "array of 7000000 numbers"),
])
def test_prompt_that_cannot_fit_costs_no_memory(default_server, case, body, param, needle):
    """Today's code tokenized such a prompt first: 30 s and 6 GB for 15M characters. Now the refusal
    comes from the characters (or the array) alone, and the process does not grow."""
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    payload = json.dumps(body, separators=(",", ":")).encode()
    pid = default_server.proc.pid
    reset_peak(pid)  # the peak, to the current size
    before = memory(pid)
    r = httpx.post(default_server.url + path, content=payload, headers={"Content-Type": "application/json"}, timeout=120)
    after = memory(pid)
    assert r.status_code == 400, r.text[:300]
    err = assert_openai_error(r.content, "context_length_exceeded")
    assert err["param"] == param and needle in err["message"], err
    assert "context length is 4096" in err["message"], err
    # the body itself is parsed once (tens of MiB at the peak); no tokenizer output, and all of it returned
    assert after["VmHWM"] - before["VmRSS"] < 300, (before, after)
    assert after["VmRSS"] - before["VmRSS"] < 48, (before, after)
    assert httpx.get(default_server.url + "/health", timeout=10).status_code == 200


@pytest.mark.parametrize("long", [dict(name="n" * 5_000_000), dict(call_id="i" * 5_000_000)], ids=["name", "call-id"])
def test_strings_the_template_leaves_out_do_not_count(default_server, long):
    """A tool message's 5M-character name or call id, which this checkpoint's template does not write: the
    rendered prompt decides, the same as without them (counting every string the template might write
    refused such a conversation as "at least" a million tokens)."""
    def chat(messages):
        r = httpx.post(default_server.base_url + "/chat/completions", timeout=120,
                       json={"messages": messages, "max_tokens": 4, "seed": 1})
        assert r.status_code == 200, r.text[:300]
        return r.json()["usage"]["prompt_tokens"]

    assert chat(_answered_call(**long)) == chat(_answered_call())


def test_a_long_number_array_in_a_chat_names_no_prompt_field(default_server):
    """Chat takes no token ids, so a long array of numbers (here a tool's enum) is refused before parsing
    without naming messages as the field at fault."""
    tool = {"type": "function", "function": {"name": "pick", "parameters": {
        "type": "object", "properties": {"n": {"type": "integer", "enum": list(range(5000))}}}}}
    r = httpx.post(default_server.url + "/v1/chat/completions", timeout=60,
                   json={"messages": [{"role": "user", "content": "hi"}], "tools": [tool]})
    assert r.status_code == 400
    err = assert_openai_error(r.content, "context_length_exceeded")
    assert err["param"] is None and err["message"] == (
        "The request body has an array of 5000 numbers, longer than any this server accepts: no array of numbers "
        "may be longer than a prompt, and this model's maximum context length is 4096 tokens, prompt and completion "
        "together, so a prompt may have at most 4095."), err


@pytest.mark.parametrize("path,body,param,most", [
    # the max_prompts_per_request longest arrays + max_json_values
    ("/v1/completions", {"prompt": [[0] * 1000] * 400}, "prompt", 256 * 1000 + 65536),
    ("/v1/completions", {"prompt": [[0] * 4000] + [[0] * 10] * 40000}, "prompt", 4000 + 255 * 10 + 65536),
    # max_tools_chars / 2 + max_json_values; the arrays in a field chat ignores
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "junk": [[0] * 1000] * 300}, None,
     262144 // 2 + 65536),
    ("/ui/detokenize", {"ids": [1], "junk": [[0] * 1000] * 300}, "ids", 4096 + 65536),
])
def test_more_numbers_than_an_endpoint_takes_are_refused_before_parsing(default_server, path, body, param, most):
    """Many short arrays of numbers pass the value count and the longest-array bound, and parsing millions of
    numbers holds the GIL for most of a second: the numbers in all are bounded by what the endpoint can take."""
    raw = json.dumps(body, separators=(",", ":")).encode()
    r = httpx.post(default_server.url + path, content=raw, timeout=60, headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text[:300]
    err = assert_openai_error(r.content, "limit_exceeded")
    numbers = sum(len(a) for a in body.get("junk", body.get("prompt")))  # the refusal's count is a little lower
    found = re.fullmatch(rf"The request body has at least (\d+) numbers; the most this endpoint takes is {most} "
                         r"\(.*\)\.", err["message"])
    assert err["param"] == param and found and numbers - 8 <= int(found.group(1)) <= numbers, err


# -- item 3: bodies with very many values are refused before they are parsed -------------------------


def test_very_many_messages_are_refused_before_parsing(default_server):
    body = json.dumps({"messages": [{"role": "user", "content": "hi"}] * 300_000}).encode()
    r = httpx.post(default_server.url + "/v1/chat/completions", content=body, timeout=120,
                   headers={"Content-Type": "application/json"})
    err = assert_openai_error(r.content, "limit_exceeded")
    assert r.status_code == 400 and "max_json_values" in err["message"] and "1200001" in err["message"], err
    # under the limit, a long conversation is fine
    messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": "hi"} for i in range(201)]
    r = httpx.post(default_server.url + "/v1/chat/completions", json={"messages": messages, "max_tokens": 4}, timeout=120)
    assert r.status_code == 200, r.text[:300]


def test_a_body_with_too_many_values_is_not_kept(default_server):
    """The marks are counted as the body arrives: once it has more values than the limit for certain,
    the rest is drained without being stored, and the refusal comes from the counts (the same message
    as from the whole body). Keeping the 10.5 MB body and joining it took over 20 MiB at the peak."""
    body = json.dumps({"messages": [{"role": "user", "content": "hi"}] * 300_000}).encode()
    pid = default_server.proc.pid
    httpx.post(default_server.url + "/v1/chat/completions", content=body, timeout=120)  # first-use allocations
    reset_peak(pid)  # the peak, to the current size
    before = memory(pid)
    r = httpx.post(default_server.url + "/v1/chat/completions", content=body, timeout=120,
                   headers={"Content-Type": "application/json"})
    after = memory(pid)
    err = assert_openai_error(r.content, "limit_exceeded")
    assert r.status_code == 400 and "at least 1200001 strings" in err["message"], err
    assert after["VmHWM"] - before["VmRSS"] < 8, (before, after)


def test_a_stalled_body_gives_its_memory_back_after_its_408(server_launcher, server_tiny_checkpoint):
    """A 15 MiB upload that stalls until its 408: the stored bytes are freed and returned to the system
    (malloc_trim) once it is answered, not kept until the next large request or collection."""
    server = server_launcher(["--model", str(server_tiny_checkpoint), "--request-body-timeout-seconds", "2"])
    size = 15 * 2**20
    head = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % (size + 10))
    pid = server.proc.pid

    def stall() -> int:
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
            sock.sendall(head + b" " * size)
            data = b""
            while b"\r\n" not in data:
                chunk = sock.recv(4096)
                assert chunk, f"closed without an answer: {data!r}"
                data += chunk
            return int(data.split(b" ", 2)[1])

    assert httpx.post(server.url + "/v1/completions", timeout=60,  # first-use allocations
                      json={"model": server.model_name, "prompt": "hi", "max_tokens": 2}).status_code == 200
    before = memory(pid)
    assert stall() == 408
    time.sleep(0.5)
    after = memory(pid)
    assert after["VmRSS"] - before["VmRSS"] < 8, (before, after)


def test_bodies_whose_clients_left_leave_the_parse_queue(server_launcher, server_tiny_checkpoint, tmp_path):
    """Large bodies wait for a parse turn (here the only one, held by a chat whose template renders for
    ever): one whose client goes away leaves the queue at once, logged client_gone, without being parsed,
    and gives its share of max_body_bytes_in_flight back."""
    folder = tmp_path / "slow-template"
    shutil.copytree(server_tiny_checkpoint, folder)
    (folder / "chat_template.jinja").write_text(
        "{% if slow %}{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}{% endif %}"
        "{% for m in messages %}{{ m['content'] }}{% endfor %}")
    server = server_launcher(["--model", str(folder), "--served-model-name", "slow", "--preprocess-concurrency", "1",
                              "--max-request-body-bytes", "200000", "--max-body-bytes-in-flight", "200000"],
                             model_name="slow")
    holder = json.dumps({"model": "slow", "messages": [{"role": "user", "content": "hi"}] * 40,  # rendered in a turn
                         "chat_template_kwargs": {"slow": True}, "max_tokens": 2}).encode()
    large = json.dumps({"model": "slow", "prompt": "hi", "max_tokens": 2, "user": "x" * 100_000}).encode()

    def request(path: str, body: bytes) -> bytes:
        return (b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
                % (path.encode(), len(body)) + body)

    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as rendering:
            rendering.sendall(request("/v1/chat/completions", holder))
            wait_for(server, IN_FLIGHT, 1)
            for _ in range(3):
                with socket.create_connection(("127.0.0.1", server.port), timeout=30) as waiting:
                    waiting.sendall(request("/v1/completions", large))
                    time.sleep(0.5)  # read whole, waiting for the parse turn
            deadline = time.monotonic() + 10
            while server.log().count("status=client_gone") < 3 and time.monotonic() < deadline:
                time.sleep(0.1)
            assert server.log().count("status=client_gone") == 3, server.log()[-2000:]
            assert server.metrics().get(IN_FLIGHT) == 1  # the chat still renders
            # their shares (100,000 - 65,536 bytes each) are back: a 180,000-byte body (114,464 counted) is
            # taken and queued for the parse turn, not answered 429 server_busy
            probe = json.dumps({"model": "slow", "prompt": "hi", "max_tokens": 2, "user": "x" * 179_900}).encode()
            with socket.create_connection(("127.0.0.1", server.port), timeout=2) as queued:
                queued.sendall(request("/v1/completions", probe))
                with pytest.raises(socket.timeout):
                    queued.recv(4096)
    finally:
        server.proc.kill()  # the render runs on in its thread


# -- item 4: the /ui endpoints parse bodies like /v1 ------------------------------------------------


def test_ui_detokenize_deep_json_is_a_400_and_keeps_the_connection(default_server):
    deep = b'{"ids": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    with socket.create_connection(("127.0.0.1", default_server.port), timeout=30) as sock:
        sock.sendall(b"POST /ui/detokenize HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(deep), deep))
        status, headers, payload, rest = read_response(sock)
        assert status == 400 and headers.get("connection") != "close"
        assert_openai_error(payload, "json_too_deep")
        ok = b'{"ids": [5, 77]}'
        sock.sendall(b"POST /ui/detokenize HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(ok), ok))  # the same connection still serves
        status, _, payload, _ = read_response(sock, rest)
        assert status == 200 and json.loads(payload)["texts"] == ["\x00", "H"]
    for raw, code in ((b'{"ids": [1, NaN]}', "invalid_json"), (b'{"ids": [' + b"1," * 5000 + b"1]}", "limit_exceeded")):
        r = httpx.post(default_server.url + "/ui/detokenize", content=raw, headers={"Content-Type": "application/json"},
                       timeout=30)
        assert r.status_code == 400
        assert_openai_error(r.content, code)
    assert "Traceback" not in default_server.log()


# -- item 6: /v1/models shows the served name only ---------------------------------------------------


def test_models_show_the_served_name_only(default_server, server_tiny_checkpoint):
    r = httpx.get(default_server.url + "/v1/models", timeout=10)
    assert r.status_code == 200
    assert str(server_tiny_checkpoint) not in r.text and "/" not in json.dumps(r.json()["data"][0]["root"])
    card = r.json()["data"][0]
    assert card["id"] == card["root"] == "served-tiny"
    assert httpx.get(default_server.url + "/v1/models/served-tiny", timeout=10).json()["id"] == "served-tiny"
    r = httpx.get(default_server.url + "/v1/models/" + str(server_tiny_checkpoint).lstrip("/"), timeout=10)
    assert r.status_code == 404
    assert_openai_error(r.content, "model_not_found")
    assert str(server_tiny_checkpoint) not in r.text.replace(str(server_tiny_checkpoint).lstrip("/"), "")


# -- what a request that leaves things out gets, as the docs say ----------------------------------------


def test_documented_defaults(default_server):
    """max_tokens defaults to one canvas, not the rest of the context (README); ``tools: []`` means no tools
    (docs/tools.md); /v1/models shows max_model_len (docs/api.md); and without --log-prompts the request's
    log line carries neither its prompt nor its text (docs/configuration.md)."""
    marker = "secret-marker-8c1f"
    r = httpx.post(default_server.url + "/v1/completions", json={"prompt": marker, "ignore_eos": True, "seed": 1},
                   timeout=60)
    assert r.status_code == 200, r.text
    usage = r.json()["usage"]
    assert (usage["completion_tokens"], usage["canvases"]) == (16, 1)  # the tiny checkpoint's canvas
    request_id = r.headers["x-request-id"]
    chat = httpx.post(default_server.url + "/v1/chat/completions", timeout=60, json={
        "messages": [{"role": "user", "content": marker}], "tools": [], "ignore_eos": True, "seed": 1})
    assert chat.status_code == 200, chat.text
    assert chat.json()["usage"]["completion_tokens"] == 16 and "tool_calls" not in chat.json()["choices"][0]["message"]
    card = httpx.get(default_server.url + "/v1/models", timeout=10).json()["data"][0]
    assert card["max_model_len"] == 4096
    log = default_server.log()
    line = next(line for line in log.splitlines() if request_id in line and "status=200" in line)
    assert "completion_tokens=16" in line
    assert marker not in log
    text = r.json()["choices"][0]["text"]
    assert len(text) < 8 or text not in log


# -- item 7: null is "unset" where OpenAI's schema allows it -----------------------------------------


def test_null_means_unset(default_server):
    nulls = {"n": None, "stream": None, "echo": None, "stream_options": None, "logprobs": None, "best_of": None,
             "seed": None, "stop": None, "temperature": None, "top_p": None, "user": None, "max_tokens": 4}
    r = httpx.post(default_server.url + "/v1/completions", json={"prompt": "hi", **nulls}, timeout=60)
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"]) == 1 and r.json()["object"] == "text_completion"
    chat = {"messages": [{"role": "user", "content": "hi"}], "n": None, "stream": None, "max_tokens": 4,
            "max_completion_tokens": None, "logprobs": None, "top_logprobs": None, "tools": None}
    r = httpx.post(default_server.url + "/v1/chat/completions", json=chat, timeout=60)
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"]) == 1 and r.json()["object"] == "chat.completion"
    client = openai.OpenAI(base_url=default_server.url + "/v1", api_key="unused", max_retries=0)
    reply = client.completions.create(model="served-tiny", prompt="hi", max_tokens=4, n=None, echo=None)
    assert len(reply.choices) == 1
    reply = client.chat.completions.create(model="served-tiny", messages=[{"role": "user", "content": "hi"}],
                                           max_tokens=4, n=None)
    assert len(reply.choices) == 1


# -- item 9: a request's choices are admitted all or none --------------------------------------------


@pytest.fixture(scope="module")
def small_queue(server_launcher, server_tiny_checkpoint):
    """Room for 1 running and 3 waiting requests."""
    return server_launcher(["--model", str(server_tiny_checkpoint), "--max-num-seqs", "1", "--max-waiting", "3"])


def test_refused_multi_choice_request_queues_and_aborts_nothing(small_queue):
    url = small_queue.url + "/v1/completions"
    before = small_queue.wait_idle()
    with httpx.Client(timeout=120) as client:
        with client.stream("POST", url, json={"prompt": "busy", "stream": True, "stream_drafts": True, **SLOW}) as r:
            lines = r.iter_lines()
            assert r.status_code == 200 and '"diffusion"' in next(line for line in lines if line.startswith("data: {"))
            # 3 places are free: n=4 needs 4, so none of its choices may be queued
            r4 = httpx.post(url, json={"prompt": "x", "n": 4, "max_tokens": 2}, timeout=60)
            assert r4.status_code == 429 and r4.headers["retry-after"] == "1"
            assert_openai_error(r4.content, "queue_full")
            m = wait_for(small_queue, RUNNING, 1)  # the gauges are published after the engine's next pass
            assert m[WAITING] == 0
            assert m.get(ABORT, 0) == before.get(ABORT, 0)  # today's code queued 3, then aborted them
            # n=3 fits exactly: all three wait behind the running request
            with httpx.Client(timeout=60) as other:
                with other.stream("POST", url, json={"prompt": "x", "n": 3, "max_tokens": 2, "stream": True}) as r3:
                    assert r3.status_code == 200
                    wait_for(small_queue, WAITING, 3)  # the gauge is published after the engine's next pass
    after = small_queue.wait_idle()
    assert after[ABORT] == before.get(ABORT, 0) + 4  # the two streams closed above, nothing else
    r = httpx.post(url, json={"prompt": "x", "n": 4, "max_tokens": 2}, timeout=60)  # all four fit now
    assert r.status_code == 200 and len(r.json()["choices"]) == 4


@pytest.mark.parametrize("body", [{"prompt": "x", "n": 5}, {"prompt": ["x", "y", "z"], "n": 2}])
def test_more_choices_than_the_server_holds_are_a_400_not_a_retry(small_queue, body):
    """A request no room could ever be made for (choices over max_num_seqs + max_waiting) is refused as
    a limit, on an idle server too, not answered 429 with Retry-After as if waiting would help."""
    small_queue.wait_idle()
    r = httpx.post(small_queue.url + "/v1/completions", json={**body, "max_tokens": 2}, timeout=60)
    choices = 5 if body["n"] == 5 else 6
    assert (r.status_code, r.headers.get("retry-after")) == (400, None)
    assert r.json() == {"error": {
        "message": f"This request has {choices} choices (prompts x n), more than the 4 requests this server holds at "
                   "once (settings max_num_seqs and max_waiting): send fewer in one request.",
        "type": "invalid_request_error", "param": "n", "code": "limit_exceeded"}}
