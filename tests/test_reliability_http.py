"""The HTTP layer under hostile clients, against real server processes on loopback and raw sockets:
idle and slow connections, the connection cap below the open-file limit, accept() failures, request
framing (Content-Length with Transfer-Encoding), oversized and malformed heads, the trailing-slash
redirect, a client that half-closes, and a stream whose client never reads (docs/reliability.md,
"HTTP connections")."""

from __future__ import annotations

import json
import re
import socket
import sys
import time

import httpx
import pytest

from tests.conftest import LiveServer

SLOW = {"max_tokens": 4000, "ignore_eos": True, "max_denoising_steps": 64, "stability_threshold": 1000}
ABORT = ("diffusion_server:request_success_total", frozenset({("finished_reason", "abort")}))
LIVE = ("diffusion_server:engine_live_states", frozenset())
IN_FLIGHT = ("diffusion_server:http_requests_in_flight", frozenset())


def read_response(sock: socket.socket, buffered: bytes = b"") -> tuple[int, dict, bytes, bytes]:
    """One HTTP/1.1 response with a Content-Length from ``sock``: (status, headers, body, bytes after it)."""
    data = buffered
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before a response head: {data!r}"
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    length = int(headers["content-length"])
    while len(rest) < length:
        chunk = sock.recv(65536)
        assert chunk, "connection closed inside a response body"
        rest += chunk
    return status, headers, rest[:length], rest[length:]


def read_to_eof(sock: socket.socket) -> bytes:
    data = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk


def assert_openai_error(body: bytes, code: str) -> dict:
    err = json.loads(body)
    assert set(err) == {"error"} and set(err["error"]) == {"message", "type", "param", "code"}, err
    assert err["error"]["code"] == code, err
    return err["error"]


def connect(server, timeout: float = 30.0) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=timeout)
    sock.settimeout(timeout)
    return sock


@pytest.fixture(scope="module")
def http_server(server_launcher, server_tiny_checkpoint):
    return server_launcher(["--model", str(server_tiny_checkpoint), "--request-head-timeout-seconds", "1",
                            "--write-timeout-seconds", "1", "--request-body-timeout-seconds", "1"],
                           model_name=str(server_tiny_checkpoint))


# -- idle connections (issue 20, item 2) ------------------------------------------------------------


def test_connection_that_sends_nothing_is_closed(http_server):
    with connect(http_server) as sock:
        assert read_to_eof(sock) == b""  # closed by the server, silently: it never asked for anything


def test_partial_request_head_gets_408(http_server):
    with connect(http_server) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # never finished
        status, headers, body, rest = read_response(sock)
        assert status == 408 and headers["connection"] == "close"
        assert_openai_error(body, "request_timeout")
        assert rest + read_to_eof(sock) == b""


def test_stalled_request_body_gets_408_and_the_connection_closes(http_server):
    """A client that sends a head and part of its body, then stalls, holds its connection only until
    request_body_timeout_seconds (1 s here): then a 408 in OpenAI's shape, and the server closes."""
    with connect(http_server) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n{\"prompt\": \"hi\"")  # 15 of the 100 bytes
        status, headers, body, rest = read_response(sock)
        assert status == 408 and headers["connection"] == "close"
        err = assert_openai_error(body, "request_timeout")
        assert "request_body_timeout_seconds" in err["message"]
        assert rest + read_to_eof(sock) == b""


def test_a_declared_body_over_the_limit_with_expect_100_continue_is_refused_before_it_is_sent(http_server):
    """Expect: 100-continue with a Content-Length over max_request_body_bytes: the 413 comes first, never a
    100 Continue that would invite the client to send it."""
    with connect(http_server) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000000000\r\nExpect: 100-continue\r\n\r\n")
        status, headers, body, rest = read_response(sock)
        assert status == 413 and headers["connection"] == "close"
        assert_openai_error(body, "request_too_large")


def test_bodies_held_at_once_are_bounded(server_launcher, server_tiny_checkpoint):
    """max_body_bytes_in_flight: while one connection holds most of the budget with a body still arriving,
    another whose body would pass it is read on, dropped and answered 429 server_busy; a small body (its
    first 64 KiB do not count) is still served. Whatever way a request ends (answered, 408, 413, a client
    gone mid-body), its bytes are free again: a body of most of the budget is served after each."""
    server = server_launcher(["--model", str(server_tiny_checkpoint), "--served-model-name", "tiny",
                              "--max-request-body-bytes", "300000", "--max-body-bytes-in-flight", "300000",
                              "--request-body-timeout-seconds", "5"], model_name="tiny")
    prompt = json.dumps({"model": "tiny", "prompt": "hi", "max_tokens": 2, "user": "x" * 250_000}).encode()
    head = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % len(prompt))

    def post(body: bytes) -> httpx.Response:
        return httpx.post(server.url + "/v1/completions", content=body, timeout=30,
                          headers={"Content-Type": "application/json"})

    def body_of(size: int) -> bytes:
        bare = json.dumps({"model": "tiny", "prompt": "hi", "max_tokens": 2, "user": ""}).encode()
        return json.dumps({"model": "tiny", "prompt": "hi", "max_tokens": 2, "user": "x" * (size - len(bare))}).encode()

    def head_of(body: bytes) -> bytes:
        return (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n" % len(body))

    # two stalled uploads count 299,000 - 65,536 and 130,000 - 65,536 bytes: about 2 KB left, and a 4 KB
    # request (its first 64 KiB free) is still served
    first, second = body_of(299_000), body_of(130_000)
    with connect(server) as one, connect(server) as two:
        one.sendall(head_of(first) + first[:-10])
        two.sendall(head_of(second) + second[:-10])
        time.sleep(0.5)
        assert post(body_of(4_000)).status_code == 200
        one.sendall(first[-10:])
        two.sendall(second[-10:])
        assert read_response(one)[0] == 200 and read_response(two)[0] == 200

    with connect(server) as holder:
        holder.sendall(head + prompt[:-10])  # 250 KB held (184 KB counted), the body not complete
        time.sleep(0.5)
        r = post(prompt)
        assert r.status_code == 429 and r.headers["retry-after"] == "1", r.text
        assert r.json()["error"]["code"] == "server_busy"
        assert "max_body_bytes_in_flight" in r.json()["error"]["message"]
        assert post(json.dumps({"model": "tiny", "prompt": "hi", "max_tokens": 2}).encode()).status_code == 200
        holder.sendall(prompt[-10:])
        status, _, body, _ = read_response(holder)
        assert status == 200, body
    assert post(prompt).status_code == 200
    with connect(server) as stalled:  # 408
        stalled.sendall(head + prompt[:-10])
        assert read_response(stalled)[0] == 408
    assert post(prompt).status_code == 200
    with connect(server) as too_large:  # 413, as the bytes arrive
        too_large.sendall(head.replace(b"%d" % len(prompt), b"400000") + prompt + b" " * (400000 - len(prompt)))
        assert read_response(too_large)[0] == 413
    assert post(prompt).status_code == 200
    with connect(server) as gone:  # a client gone mid-body
        gone.sendall(head + prompt[:200_000])
        time.sleep(0.3)
    time.sleep(0.3)
    assert post(prompt).status_code == 200


def test_keep_alive_connection_serves_then_closes_when_idle(http_server):
    with connect(http_server) as sock:
        for _ in range(2):  # the head timeout starts again after each response
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            status, _, body, rest = read_response(sock)
            assert status == 200 and json.loads(body) == {"status": "ok"} and rest == b""
        assert read_to_eof(sock) == b""


# ``python -m server`` with an open-file limit of 256 (soft and hard), as a LiveServer command
FILE_LIMITED = [sys.executable, "-c", "import resource, sys; resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256)); "
                "from server.cli import main; sys.exit(main(sys.argv[1:]))"]


@pytest.fixture
def file_limited(server_launcher, server_tiny_checkpoint):
    def launch(*args: str) -> LiveServer:
        return server_launcher(["--model", str(server_tiny_checkpoint), *args], command=FILE_LIMITED)

    return launch


def test_idle_sockets_past_the_file_limit_leave_health_answering(file_limited):
    """300 idle connections to a server allowed 256 files: the oldest idle ones are closed to make room
    (the cap is below the file limit), so /health still answers and accept() never fails."""
    server = file_limited("--request-head-timeout-seconds", "60")
    socks = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(300)]
    try:
        r = httpx.get(server.url + "/health", timeout=10)
        assert r.status_code == 200 and r.json() == {"status": "ok"}
        closed = 0
        for s in socks:
            s.settimeout(0.0)
            try:
                closed += s.recv(1) == b""
            except BlockingIOError:
                pass
        assert closed >= 300 - 192  # the cap: 256 files less a reserve of 64
    finally:
        for s in socks:
            s.close()
    log = server.log()
    assert "Traceback" not in log and "cannot accept" not in log and "out of system resource" not in log


def test_a_connection_past_the_cap_when_all_are_busy_gets_503(server_launcher, server_tiny_checkpoint):
    """Every connection has a request in progress: the next one is answered 503 too_many_connections with
    Retry-After: 1 and closed, and the server answers again once the busy ones are gone."""
    server = server_launcher(["--model", str(server_tiny_checkpoint), "--max-connections", "4"])
    body = json.dumps({"prompt": "busy", "stream": True, **SLOW}).encode()
    busy = [socket.create_connection(("127.0.0.1", server.port), timeout=30) for _ in range(4)]
    try:
        for sock in busy:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        for sock in busy:  # its stream has started: the request is in progress
            assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as extra:
            status, headers, answer, rest = read_response(extra)
            assert status == 503 and headers["retry-after"] == "1"
            err = assert_openai_error(answer, "too_many_connections")
            assert err["message"] == ("The server has 4 open connections, all busy (setting max_connections). "
                                      "Retry later.")
            assert rest + read_to_eof(extra) == b""
    finally:
        for sock in busy:
            sock.close()
    deadline = time.monotonic() + 60  # only bounds a hang: the closed streams release their connections
    while True:
        try:
            if httpx.get(server.url + "/health", timeout=10).status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_accept_failures_are_logged_once_per_interval(file_limited):
    """With the cap set above the file limit, accept() does run out of descriptors: the log gets one
    line per interval with a count (not a traceback per failed call), and the server recovers once
    the idle connections time out."""
    server = file_limited("--max-connections", "1000", "--request-head-timeout-seconds", "1")
    socks = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(300)]
    try:
        for s in socks:  # every one is accepted in time and closed by the head timeout
            s.settimeout(60)
            assert read_to_eof(s) == b""
    finally:
        for s in socks:
            s.close()
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200
    log = server.log()
    reports = [ln for ln in log.splitlines() if "cannot accept connections" in ln]
    assert 1 <= len(reports) <= 3, reports
    assert "Too many open files" in reports[0] and "max_connections is 1000" in reports[0]
    assert "Traceback" not in log and "out of system resource" not in log
    assert len(log) < 20000


# -- framing and malformed requests (items 5, 11) ---------------------------------------------------


def test_content_length_with_transfer_encoding_is_refused_and_closed(http_server):
    """The bytes after the chunked body must not be served as a second request (request smuggling)."""
    body = b'{"prompt": "hi", "max_tokens": 2}'
    request = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
               b"Content-Length: %d\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n"
               b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n") % (len(body), len(body), body)
    with connect(http_server) as sock:
        sock.sendall(request)
        status, headers, payload, rest = read_response(sock)
        assert status == 400 and headers["connection"] == "close"
        err = assert_openai_error(payload, "invalid_http_request")
        assert "Content-Length and Transfer-Encoding" in err["message"]
        assert rest + read_to_eof(sock) == b""  # no second response


@pytest.mark.parametrize("request_bytes,status,code", [
    (b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n", 431, "request_header_too_large"),
    (b"GARBAGE\r\n\r\n", 400, "invalid_http_request"),
    (b"GET /health HTTP/1.1\r\n\r\n", 400, "invalid_http_request"),  # no Host
    (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: nope\r\n\r\n", 400, "invalid_http_request"),
])
def test_malformed_requests_get_openai_errors(http_server, request_bytes, status, code):
    with connect(http_server) as sock:
        sock.sendall(request_bytes)
        got, headers, payload, rest = read_response(sock)
        assert got == status and headers["content-type"] == "application/json" and headers["connection"] == "close"
        assert re.fullmatch(r"req-[0-9a-f]{32}", headers["x-request-id"])  # every response carries one
        assert_openai_error(payload, code)
        assert rest + read_to_eof(sock) == b""  # a clean close after the answer, not a reset


def test_trailing_slash_is_not_redirected(http_server):
    """No 307 to a URL built from the Host header: the slash form is an unknown route."""
    for method, path in (("POST", "/v1/completions/"), ("POST", "/v1/chat/completions/"), ("GET", "/v1/models/")):
        r = httpx.request(method, http_server.url + path, headers={"Host": "evil.example"}, json={}, timeout=10)
        assert r.status_code == 404 and "location" not in r.headers, (path, r.status_code, r.headers)
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_head_answers_as_get_without_a_body(http_server):
    """HEAD on the read routes gets GET's status and headers, no body; on a POST route, a 405."""
    for path in ("/health", "/metrics", "/v1/models"):
        get, head = httpx.get(http_server.url + path, timeout=10), httpx.head(http_server.url + path, timeout=10)
        assert (head.status_code, head.headers["content-type"]) == (get.status_code, get.headers["content-type"]) \
            and get.status_code == 200 and head.content == b"", path
    r = httpx.head(http_server.url + "/v1/completions", timeout=10)
    assert r.status_code == 405 and r.content == b""


def test_a_websocket_upgrade_is_answered_as_plain_http(http_server):
    """No WebSocket route: an upgrade request is the HTTP request it is, answered in OpenAI's shape with a
    request id, not switched to a WebSocket handshake that ends in a bare 403."""
    upgrade = (b"Host: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
               b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
    with connect(http_server) as sock:
        sock.sendall(b"GET /v1/nothing HTTP/1.1\r\n" + upgrade)
        status, headers, body, _ = read_response(sock)
        assert status == 404 and headers["x-request-id"].startswith("req-")
        assert_openai_error(body, "not_found")
    with connect(http_server) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\n" + upgrade)
        status, _, body, _ = read_response(sock)
        assert (status, json.loads(body)) == (200, {"status": "ok"})
    assert "upgrade" not in http_server.log().lower()  # nothing to warn of (nor a WebSocket library to advise)


# -- half-closed and non-reading clients (decided, documented) --------------------------------------


def wait_for(server, key, value, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        m = server.metrics()
        if m.get(key, 0) >= value:
            return m
        assert time.monotonic() < deadline, (key, m.get(key), value)
        time.sleep(0.1)


def test_half_close_after_the_request_is_a_disconnect(http_server):
    """A client that shuts down its sending side after the request is taken as gone: its request is
    aborted and its slot freed (TCP cannot tell a half-close from a client that went away)."""
    before = http_server.wait_idle()
    body = json.dumps({"prompt": "half", **SLOW}).encode()
    with connect(http_server) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        wait_for(http_server, ("diffusion_server:num_requests_running", frozenset()), 1)
        sock.shutdown(socket.SHUT_WR)
        after = wait_for(http_server, ABORT, before.get(ABORT, 0) + 1)
    assert after[ABORT] == before.get(ABORT, 0) + 1


def test_stream_whose_client_never_reads_is_disconnected(http_server):
    """The client stops reading: once the server's buffers are full and nothing moves for
    --write-timeout-seconds, the connection is closed and the request aborted."""
    before = http_server.wait_idle()
    # 16 choices with drafts: enough bytes a second to fill the kernel's buffers (megabytes) quickly
    body = json.dumps({"prompt": "never read", "stream": True, "stream_drafts": True, "n": 16, **SLOW}).encode()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # small: the server's buffers fill sooner
    sock.connect(("127.0.0.1", http_server.port))
    try:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        after = wait_for(http_server, ABORT, before.get(ABORT, 0) + 16, timeout=120)
    finally:
        sock.close()
    assert after[ABORT] == before.get(ABORT, 0) + 16
    assert "its response stayed unread (send buffer full) for 1s" in http_server.log()
    clean = http_server.wait_idle()
    assert clean[LIVE] == 0


def test_slow_reader_gets_merged_drafts_that_still_add_up(live_server, server_tiny_checkpoint, server_sse):
    """While a client reads slower than the drafts come, a waiting draft is merged into the next one of
    the same canvas (the server holds one draft per choice, not every step): fewer draft chunks arrive,
    and applying each chunk's ``changed`` / ``changed_token_ids`` still rebuilds every draft exactly."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(server_tiny_checkpoint)
    canvases, steps, n = 10, 64, 16
    body = json.dumps({"model": live_server.model_name, "prompt": "slow reader", "stream": True, "stream_drafts": True,
                       "n": n, "max_tokens": 16 * canvases, "ignore_eos": True, "max_denoising_steps": steps,
                       "stability_threshold": 1000}).encode()
    live_server.wait_idle()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", live_server.port))
    with sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Authorization: Bearer %s\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s"
                     % (live_server.api_key.encode(), len(body), body))
        wait_for(live_server, ("diffusion_server:num_requests_running", frozenset()), 1)
        live_server.wait_idle(timeout=120)  # the engine finished while nothing was read
        sock.settimeout(60)
        raw = read_to_eof(sock)
    head, _, chunked = raw.partition(b"\r\n\r\n")
    assert b" 200 " in head.split(b"\r\n")[0]
    text = b""
    while chunked:  # undo the chunked transfer coding
        size, _, chunked = chunked.partition(b"\r\n")
        size = int(size, 16)
        text, chunked = text + chunked[:size], chunked[size + 2:]
    frames = server_sse.parse_json(text)
    drafts = [(c["index"], c["diffusion"]) for f in frames[:-1] for c in f.get("choices", []) if "diffusion" in c]
    assert len(drafts) < n * canvases * steps  # some were merged
    canvas_state: dict[tuple[int, int], list[int]] = {}
    for index, d in drafts:
        tokens = canvas_state.setdefault((index, d["canvas"]), [0] * 16)
        for pos, tok in zip(d["changed"], d["changed_token_ids"]):
            tokens[pos] = tok
        assert tokenizer.decode(tokens, skip_special_tokens=True) == d["draft"], (index, d["canvas"], d["step"])
    assert {key[0] for key in canvas_state} == set(range(n)) and {key[1] for key in canvas_state} == set(range(canvases))
    finished = [c for f in frames[:-1] for c in f.get("choices", []) if c.get("finish_reason")]
    assert sorted(c["index"] for c in finished) == list(range(n)) and {c["finish_reason"] for c in finished} == {"length"}
