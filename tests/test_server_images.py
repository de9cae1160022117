"""Images in chat requests, end to end: ``image_url`` parts (data URLs, or http(s) URLs when the server
fetches them) through a real server, with the ``openai`` SDK and raw HTTP.

The server's answer to an image request is what ``generate(..., pixel_values=...)`` makes of the same
messages on the same checkpoint (seeded, float32, the reference sampler), and every refusal is an
exact status and body, given before the work it would have caused.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import signal
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from engine import EngineCore, EngineSettings, SamplingParams
from engine.detokenizer import IncrementalDetokenizer
from engine.loader import load_model
from server import errors
from server.images import ImageReader
from tests.engine_helpers import reference_model, reference_run
from tests.test_server_metrics import wait_for
from tools.tiny_checkpoint import TinySpec, build_tiny_checkpoint

MODEL = "tiny-vision"
LIMITS = ["--max-images-per-prompt", "2", "--max-image-bytes", "20000", "--max-image-pixels", "40000"]
# fetching_server's image_fetch_timeout_seconds, and /half.png's delay: one /half.png fits the fetch time
# with seconds to spare on a loaded machine, two in a row do not
FETCH_SECONDS = 6
HALF_SECONDS = 4
# /slow-head.png's head takes this long to arrive: a fetch cut off at the fetch time is answered with
# FETCH_SECONDS to spare before SLOW_HEAD_SECONDS - 3, and one that waits for the whole head is not
SLOW_HEAD_SECONDS = 2 * FETCH_SECONDS + 3
IN_FLIGHT = ("diffusion_server:http_requests_in_flight", frozenset())


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return build_tiny_checkpoint(tmp_path_factory.mktemp("server_vision"), TinySpec(vision=True))


@pytest.fixture(scope="module")
def server(server_launcher, checkpoint):
    return server_launcher(["--model", str(checkpoint), "--served-model-name", MODEL, *LIMITS], model_name=MODEL)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key="none", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def reference(checkpoint):
    """The checkpoint loaded in this process through the same path (its processor included)."""
    settings = EngineSettings(model=str(checkpoint), max_num_seqs=1)
    return EngineCore(load_model(settings), settings)


def noise_image(height: int, width: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def encoded(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def image_message(*parts) -> list[dict]:
    """One user message: strings are text parts, anything else an image_url part with that URL."""
    content = [{"type": "text", "text": p} if not p.startswith(("data:", "http")) else
               {"type": "image_url", "image_url": {"url": p}} for p in parts]
    return [{"role": "user", "content": content}]


def expected_answer(reference: EngineCore, parts: list, params: SamplingParams) -> tuple[str, int, int]:
    """(text, prompt tokens, completion tokens) of generate over these message parts (strings, and PIL
    images as the server decodes them), detokenized canvas by canvas as the engine streams it."""
    content = [{"type": "text", "text": p} if isinstance(p, str) else {"type": "image"} for p in parts]
    images = [p for p in parts if not isinstance(p, str)]
    tokenizer, processor = reference.loaded.tokenizer, reference.loaded.processor
    text = tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                         add_generation_prompt=True)
    inputs = processor(text=[text], images=[images], add_special_tokens=False, return_tensors="pt")
    ids = inputs["input_ids"][0].tolist()
    resolved = reference.resolve(ids, params)
    tokens, _ = reference_run(reference_model(reference), ids, params.seed, resolved, pixel_values=inputs["pixel_values"],
                              image_position_ids=inputs["image_position_ids"],
                              mm_token_type_ids=inputs["mm_token_type_ids"])
    detok = IncrementalDetokenizer(tokenizer)
    canvas = reference.canvas_length
    answer = "".join(detok.add(tokens[i:i + canvas], final=i + canvas >= len(tokens))
                     for i in range(0, len(tokens), canvas))
    return answer, len(ids), len(tokens)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_image_chat_equals_generate(client, reference, fmt):
    image = noise_image(30, 40, 0)
    data = encoded(image, fmt)
    decoded = Image.open(io.BytesIO(data)).convert("RGB")  # a JPEG's pixels as the server decodes them
    answer, prompt_tokens, completion_tokens = expected_answer(
        reference, ["What is in ", decoded, "?"], SamplingParams(max_tokens=32, seed=7, ignore_eos=True))
    messages = image_message("What is in ", data_url(data, f"image/{fmt.lower()}"), "?")
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=32, seed=7,
                                       extra_body={"ignore_eos": True})
    assert r.choices[0].message.content == answer
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (prompt_tokens, completion_tokens)
    assert prompt_tokens > 20  # the image's placeholders are prompt tokens
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=32, seed=7, stream=True,
                                            extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == answer


def test_choices_share_the_image(client):
    """n=2: each choice is its own engine request over the same image; choice i is the request seeded seed + i."""
    messages = image_message("Name ", data_url(encoded(noise_image(30, 40, 4))), " twice.")
    body = dict(model=MODEL, messages=messages, max_tokens=16, extra_body={"ignore_eos": True})
    both = client.chat.completions.create(n=2, seed=20, **body)
    alone = [client.chat.completions.create(seed=seed, **body).choices[0].message.content for seed in (20, 21)]
    assert [c.message.content for c in both.choices] == alone and alone[0] != alone[1]
    assert both.usage.prompt_tokens == client.chat.completions.create(seed=20, **body).usage.prompt_tokens


def refusal(url: str, messages: list[dict], status: int = 400, headers: dict | None = None) -> dict:
    r = httpx.post(url + "/v1/chat/completions", json={"messages": messages, "max_tokens": 4}, headers=headers,
                   timeout=60)
    assert r.status_code == status, r.text
    return r.json()["error"]


def error(message: str, param: str, code: str | None) -> dict:
    return {"message": message, "type": "invalid_request_error", "param": param, "code": code}


PART = "messages[0].content[1].image_url"


def test_text_only_checkpoint_names_the_model(live_server):
    image = data_url(encoded(noise_image(8, 8, 0)))
    assert refusal(live_server.url, image_message("see ", image), headers=live_server.headers) == error(
        f"The model '{live_server.model_name}' does not take images: send text content only.", "messages",
        "unsupported_parameter")


def test_refusals(server):
    small = data_url(encoded(noise_image(8, 8, 0)))
    assert refusal(server.url, image_message("a", small, small, small)) == error(
        "Too many images: 3 in one request, the limit is 2 (setting max_images_per_prompt).", "messages",
        "limit_exceeded")
    big = encoded(noise_image(100, 100, 1))
    assert len(big) > 20000
    assert refusal(server.url, image_message("a", data_url(big))) == error(
        f"An image is {len(big)} bytes or more, the limit is 20000 (setting max_image_bytes).", PART,
        "limit_exceeded")
    wide = encoded(Image.new("RGB", (300, 200), (10, 20, 30)))  # few bytes, many pixels
    assert refusal(server.url, image_message("a", data_url(wide))) == error(
        "An image is 300x200 = 60000 pixels, the limit is 40000 (setting max_image_pixels).", PART, "limit_exceeded")
    assert refusal(server.url, image_message("a", "http://127.0.0.1:9/cat.png")) == error(
        "Image URLs are not fetched by this server (setting image_url_fetch is off): send the image inline as a data "
        "URL (data:image/png;base64,...).", PART, "unsupported_parameter")
    assert refusal(server.url, image_message("a", "data:text/plain;base64,aGVsbG8=")) == error(
        "An image_url must be a data URL (data:image/<type>;base64,<data>) or an http(s) URL.", PART, "invalid_image")
    assert refusal(server.url, image_message("a", "data:image/png;base64,not base64!")) == error(
        "The image's data URL is not valid base64.", PART, "invalid_image")
    assert refusal(server.url, image_message("a", data_url(b"GIF89a but not really an image"))) == error(
        "The image could not be read: it must be one of PNG, JPEG, WEBP, GIF.", PART, "invalid_image")
    # a progressive JPEG's last scan repeated: each scan decodes the whole image again
    buffer = io.BytesIO()
    noise_image(16, 16, 3).save(buffer, "JPEG", progressive=True)
    progressive = buffer.getvalue()
    last = progressive.rindex(b"\xff\xda")
    many_scans = progressive[:-2] + progressive[last:-2] * 100 + progressive[-2:]
    scans = many_scans.count(b"\xff\xda")
    assert scans > 100 and len(many_scans) < 20000
    assert refusal(server.url, image_message("a", data_url(many_scans, "image/jpeg"))) == error(
        f"A JPEG image has {scans} scans, the limit is 64 (setting max_jpeg_scans).", PART, "limit_exceeded")
    truncated = encoded(noise_image(30, 40, 2))[:300]
    assert refusal(server.url, image_message("a", data_url(truncated))) == error(
        "The image could not be decoded: its data is truncated or corrupt.", PART, "invalid_image")
    assert refusal(server.url, image_message("look at <|image|> and ", small)) == error(
        "These messages cannot take their images: the rendered prompt has 2 image tokens (<|image|>) for 1 images (a "
        "text part may not hold the image token).", "messages", None)
    audio = [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}]}]
    assert refusal(server.url, audio) == error(
        "Content parts must be text or image_url parts, got type 'input_audio'.", "messages[0].content[0]", None)
    assert refusal(server.url, [{"role": "user", "content": [{"type": "image_url"}]}]) == error(
        "This image_url content part has no 'image_url' field.", "messages[0].content[0]", None)
    # none of them took the server down or left work behind
    for image in (small, data_url(progressive, "image/jpeg")):  # an ordinary progressive JPEG passes
        ok = httpx.post(server.url + "/v1/chat/completions",
                        json={"messages": image_message("a", image), "max_tokens": 4}, timeout=60)
        assert ok.status_code == 200, ok.text
    assert server.wait_idle()


# -- http(s) image URLs, on a server that fetches them ------------------------------------------------

class _Images(BaseHTTPRequestHandler):
    """A loopback web server: /ok.png (the test image), /big.png (over max_image_bytes, with its
    Content-Length), /unsized.png (the same without), /slow.png (trickles for longer than the fetch
    timeout), /slow-head.png (trickles its status line and headers, each byte within a socket timeout,
    for SLOW_HEAD_SECONDS), /half.png (after HALF_SECONDS), /stall.png (when ``stall_release`` is set),
    /to-ftp.png (a redirect to ftp:), /big-redirect.png (a redirect to /ok.png with a 64 MiB body, the
    bytes it could send kept in ``redirect_sent``), anything else 404. Every request's path is kept in
    ``requested``, with whether ``stall_release`` was set when it came."""

    redirect_sent: list[int] = []
    requested: list[tuple[str, bool]] = []
    stall_entered = threading.Event()  # /stall.png: its fetch has begun
    stall_release = threading.Event()  # /stall.png: send the image now

    ok = encoded(noise_image(30, 40, 0))
    big = encoded(noise_image(100, 100, 1))

    def do_GET(self):
        _Images.requested.append((self.path, _Images.stall_release.is_set()))
        if self.path in ("/ok.png", "/big.png"):
            data = self.ok if self.path == "/ok.png" else self.big
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        elif self.path in ("/unsized.png", "/slow.png"):
            self.send_response(200)
            self.end_headers()
            if self.path == "/unsized.png":
                self.wfile.write(self.big)
                return
            for byte in self.ok[:80]:  # 80 bytes, one every FETCH_SECONDS / 40
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
                time.sleep(FETCH_SECONDS / 40)
        elif self.path == "/slow-head.png":
            head = b"HTTP/1.0 200 OK\r\nContent-Type: image/png\r\n\r\n"
            try:
                for byte in head:
                    self.wfile.write(bytes([byte]))
                    self.wfile.flush()
                    time.sleep(SLOW_HEAD_SECONDS / len(head))
                self.wfile.write(self.ok)
            except OSError:  # the fetch gave up
                pass
        elif self.path in ("/half.png", "/stall.png"):
            if self.path == "/stall.png":
                _Images.stall_entered.set()
                _Images.stall_release.wait(60)
            else:
                time.sleep(HALF_SECONDS)
            self.send_response(200)
            self.send_header("Content-Length", str(len(self.ok)))
            self.end_headers()
            self.wfile.write(self.ok)
        elif self.path == "/big-redirect.png":
            total, chunk, sent = 64 * 2**20, bytes(2**20), 0
            self.send_response(302)
            self.send_header("Location", "/ok.png")
            self.send_header("Content-Length", str(total))
            self.end_headers()
            try:
                while sent < total:
                    self.wfile.write(chunk)
                    sent += len(chunk)
            except OSError:  # the client closed it unread
                pass
            finally:
                _Images.redirect_sent.append(sent)
        elif self.path == "/to-ftp.png":
            self.send_response(302)
            self.send_header("Location", "ftp://127.0.0.1/x.png")
            self.end_headers()
        else:
            self.send_error(404)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def image_host():
    host = ThreadingHTTPServer(("127.0.0.1", 0), _Images)
    host.protocol_version = "HTTP/1.0"
    thread = threading.Thread(target=host.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{host.server_address[1]}"
    host.shutdown()


@pytest.fixture(scope="module")
def fetching_server(server_launcher, checkpoint):
    return server_launcher(["--model", str(checkpoint), "--served-model-name", MODEL, *LIMITS, "--image-url-fetch",
                            "--image-fetch-timeout-seconds", str(FETCH_SECONDS)], model_name=MODEL)


def test_fetched_image_equals_inline_image(fetching_server, image_host, client):
    body = dict(max_tokens=16, seed=3, extra_body={"ignore_eos": True})
    fetched = openai.OpenAI(base_url=fetching_server.base_url, api_key="none", max_retries=0, timeout=60)
    by_url = fetched.chat.completions.create(model=MODEL, messages=image_message("x", image_host + "/ok.png"), **body)
    inline = client.chat.completions.create(model=MODEL, messages=image_message("x", data_url(_Images.ok)), **body)
    assert by_url.choices[0].message.content == inline.choices[0].message.content
    assert by_url.usage.prompt_tokens == inline.usage.prompt_tokens


def test_text_that_cannot_fit_is_refused_before_its_image_is_fetched(fetching_server, image_host):
    _Images.requested.clear()
    err = refusal(fetching_server.url, image_message("x" * 1_000_000, image_host + "/ok.png"))
    assert err["param"] == "messages" and err["code"] == "context_length_exceeded", err
    assert err["message"].startswith("the prompt has at least "), err
    assert _Images.requested == []  # the host never heard of it


def test_fetch_limits(fetching_server, image_host):
    too_big = "the limit is 20000 (setting max_image_bytes)."
    assert refusal(fetching_server.url, image_message("x", image_host + "/big.png")) == error(
        f"An image is {len(_Images.big)} bytes or more, {too_big}", PART, "limit_exceeded")
    unsized = refusal(fetching_server.url, image_message("x", image_host + "/unsized.png"))  # counted as it arrives
    assert unsized["code"] == "limit_exceeded" and unsized["message"].endswith(f"bytes or more, {too_big}")
    assert refusal(fetching_server.url, image_message("x", image_host + "/slow.png")) == error(
        f"The image at {image_host}/slow.png did not arrive within {FETCH_SECONDS} seconds of the request's first "
        "fetch (setting image_fetch_timeout_seconds).", PART, "invalid_image")
    # the fetch time bounds the response's head too, not only each read of it
    started = time.monotonic()
    assert refusal(fetching_server.url, image_message("x", image_host + "/slow-head.png")) == error(
        f"The image at {image_host}/slow-head.png did not arrive within {FETCH_SECONDS} seconds of the request's "
        "first fetch (setting image_fetch_timeout_seconds).", PART, "invalid_image")
    assert time.monotonic() - started < SLOW_HEAD_SECONDS - 3  # not waited for the whole head
    assert refusal(fetching_server.url, image_message("x", image_host + "/none.png")) == error(
        f"The image at {image_host}/none.png could not be fetched: Not Found.", PART, "invalid_image")
    with socket.socket() as bound:  # bound and never listening: connections to its port are refused
        bound.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{bound.getsockname()[1]}/x.png"
        message = refusal(fetching_server.url, image_message("x", closed))["message"]
    assert message.startswith(f"The image at {closed} could not be fetched: ")
    # a redirect to another scheme is not followed
    assert refusal(fetching_server.url, image_message("x", image_host + "/to-ftp.png")) == error(
        f"The image at {image_host}/to-ftp.png could not be fetched: unknown url type: ftp.", PART,
        "invalid_image")
    # the fetch time is the request's: each image alone fits it, the second one no longer does
    one = httpx.post(fetching_server.url + "/v1/chat/completions", timeout=60,
                     json={"messages": image_message("x", image_host + "/half.png"), "max_tokens": 4})
    assert one.status_code == 200, one.text
    two = image_message("x", image_host + "/half.png", image_host + "/half.png")
    assert refusal(fetching_server.url, two) == error(
        f"The image at {image_host}/half.png did not arrive within {FETCH_SECONDS} seconds of the request's first "
        "fetch (setting image_fetch_timeout_seconds).", "messages[0].content[2].image_url", "invalid_image")


def test_a_slow_image_host_holds_up_only_image_fetches(server_launcher, checkpoint, image_host):
    """A fetch takes a turn of its own (image_fetch_concurrency), not a preprocessing turn: while a host
    withholds its image, requests that need preprocessing turns (here the only one) are served, and a
    second request to fetch waits for the only fetch turn: its image is asked for only once the first
    request's image has been sent."""
    server = server_launcher(["--model", str(checkpoint), "--served-model-name", MODEL, *LIMITS, "--image-url-fetch",
                              "--image-fetch-timeout-seconds", "60", "--preprocess-concurrency", "1",
                              "--image-fetch-concurrency", "1"], model_name=MODEL)
    answers: dict[str, httpx.Response] = {}
    _Images.stall_entered.clear()
    _Images.stall_release.clear()
    _Images.requested.clear()

    def send(name: str, url: str) -> None:
        answers[name] = httpx.post(server.url + "/v1/chat/completions", timeout=120, json={
            "model": MODEL, "messages": image_message("x", url), "max_tokens": 4, "seed": 0})

    stalled = threading.Thread(target=send, args=("stalled", image_host + "/stall.png"))
    stalled.start()
    try:
        assert _Images.stall_entered.wait(60)
        queued = threading.Thread(target=send, args=("queued", image_host + "/ok.png"))
        queued.start()
        wait_for(server, IN_FLIGHT, 2)  # the queued request is in the server, on its way to a fetch turn
        # more messages than are rendered on the event loop: rendered in the preprocessing turn (and then
        # run by the engine: time in which a queued request given a fetch turn would have asked for its image)
        many = [{"role": "user", "content": "hi"}] * 40
        rendered = httpx.post(server.url + "/v1/chat/completions", timeout=20,
                              json={"model": MODEL, "messages": many, "max_tokens": 4, "seed": 0})
        assert rendered.status_code == 200
        assert stalled.is_alive() and queued.is_alive() and not answers
        assert _Images.requested == [("/stall.png", False)], "the queued request fetched during the stall"
    finally:
        _Images.stall_release.set()
    stalled.join(60)
    queued.join(60)
    assert answers["stalled"].status_code == 200 and answers["queued"].status_code == 200
    # the queued image was asked for once, and only after /stall.png was let go
    assert _Images.requested == [("/stall.png", False), ("/ok.png", True)]


def test_a_request_still_fetching_when_the_drain_ends_is_aborted(server_launcher, checkpoint, image_host):
    """SIGTERM with a request still fetching its image past the drain's time: once the drain has aborted
    what was in flight, that request is not started when its image arrives; it gets the 503
    request_aborted that every aborted request gets, and the server exits 0."""
    server = server_launcher(["--model", str(checkpoint), "--served-model-name", MODEL, *LIMITS, "--image-url-fetch",
                              "--image-fetch-timeout-seconds", "60", "--graceful-shutdown-seconds", "1"],
                             model_name=MODEL)
    _Images.stall_entered.clear()
    _Images.stall_release.clear()
    answer: dict[str, httpx.Response] = {}

    def send() -> None:
        answer["r"] = httpx.post(server.url + "/v1/chat/completions", timeout=120, json={
            "model": MODEL, "messages": image_message("x", image_host + "/stall.png"), "max_tokens": 4})

    fetching = threading.Thread(target=send)
    fetching.start()
    try:
        assert _Images.stall_entered.wait(60)
        server.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 30
        while "drain timeout" not in server.log():  # the drain's second is over: it aborts what is in flight
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        _Images.stall_release.set()
    fetching.join(60)
    assert answer["r"].status_code == 503
    assert answer["r"].json() == {"error": {"message": "The request was aborted: the server is shutting down.",
                                            "type": "server_error", "param": None, "code": "request_aborted"}}
    assert server.proc.wait(60) == 0


def test_jpeg_scans_are_counted_in_the_first_image_only():
    """``max_jpeg_scans`` counts the scans of the image the decoder reads: not metadata, not what follows the
    image (a motion photo's video), and whatever Pillow names the file (an MPF segment makes it MPO)."""
    from server.images import jpeg_scans

    def saved(image: Image.Image, **options) -> bytes:
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", **options)
        return buffer.getvalue()

    photo = noise_image(64, 64, 5)
    baseline, progressive = saved(photo), saved(photo, progressive=True)
    payload = b"note \xff\xda\xff\xda"  # an application segment whose data holds a start-of-scan marker's bytes
    described = baseline[:2] + b"\xff\xef" + (2 + len(payload)).to_bytes(2, "big") + payload + baseline[2:]
    last = progressive.rindex(b"\xff\xda")
    many = progressive[:-2] + progressive[last:-2] * 100 + progressive[-2:]
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, "MPO", save_all=True, append_images=[Image.new("RGB", (8, 8))])
    mpo = buffer.getvalue()
    start = mpo.index(b"\xff\xe2")  # its MPF segment, in front of the many scans
    mpf = mpo[start:start + 2 + int.from_bytes(mpo[start + 2:start + 4], "big")]
    with_mpf = many[:2] + mpf + many[2:]
    assert Image.open(io.BytesIO(with_mpf)).format == "MPO"
    tail = b"\xff\xda" * 64 + bytes(range(256))  # after the end of the image: data that is not its
    app0 = 4 + int.from_bytes(many[4:6], "big")  # junk after a segment, which libjpeg passes over to the next
    junk = [many[:app0] + extra + many[app0:] for extra in (b"\x00", b"\xff\x00\xff\xff")]
    # a reserved marker (0x02-0xBF) has no length, whatever bytes follow it: what comes next is read
    hidden = many[:app0] + b"\xff\x02" + (4096).to_bytes(2, "big") + many[app0:]
    junk.append(hidden)
    assert [jpeg_scans(d) for d in (baseline, progressive, described, many, with_mpf, *junk, baseline + tail,
                                     progressive + tail)] == [1, 10, 1, 110, 110, 110, 110, 110, 1, 10]
    assert described.count(b"\xff\xda") == 3 and (baseline + tail).count(b"\xff\xda") == 65
    assert Image.open(io.BytesIO(described)).convert("RGB").size == (64, 64)
    reader = ImageReader(processor=None, model=MODEL, max_images=1, max_bytes=10**6, max_pixels=10**6, fetch=False,
                         fetch_timeout=1, max_jpeg_scans=64)
    with pytest.raises(errors.APIError, match="A JPEG image has 110 scans, the limit is 64"):
        reader.picture(with_mpf, "p")
    assert reader.picture(progressive + tail, "p").size == (64, 64)


def slow_jpeg(scans: int) -> bytes:
    """A 4096x4096 progressive JPEG whose last scan is repeated: each scan decodes all 16M pixels again."""
    buffer = io.BytesIO()
    Image.new("L", (4096, 4096), 128).save(buffer, "JPEG", progressive=True)
    data = buffer.getvalue()
    last = data.rindex(b"\xff\xda")
    return data[:-2] + data[last:-2] * scans + data[-2:]


def test_decoding_images_holds_up_only_image_requests(server_launcher, checkpoint):
    """Images decode in turns of their own (image_decode_concurrency): while the only decoding turn
    decodes for a long time, a completion with log-probabilities, formatted in the only preprocessing
    turn, is answered."""
    server = server_launcher(["--model", str(checkpoint), "--served-model-name", MODEL, "--max-jpeg-scans", "100000",
                              "--preprocess-concurrency", "1", "--image-decode-concurrency", "1"], model_name=MODEL)
    answer: dict[str, httpx.Response] = {}

    def send() -> None:
        with contextlib.suppress(httpx.HTTPError):  # the server is killed while it decodes
            answer["r"] = httpx.post(server.url + "/v1/chat/completions", timeout=300, json={
                "model": MODEL, "messages": image_message("x", data_url(slow_jpeg(6000), "image/jpeg")),
                "max_tokens": 4})

    decoding = threading.Thread(target=send, daemon=True)
    decoding.start()
    try:
        wait_for(server, IN_FLIGHT, 1)
        time.sleep(0.5)  # into its decoding (tens of seconds)
        started = time.monotonic()
        r = httpx.post(server.url + "/v1/completions", timeout=30,
                       json={"model": MODEL, "prompt": "hi", "max_tokens": 4, "logprobs": 1})
        assert r.status_code == 200, r.text
        assert time.monotonic() - started < 10
        assert len(r.json()["choices"][0]["logprobs"]["tokens"]) == r.json()["usage"]["completion_tokens"]
        assert decoding.is_alive() and not answer  # the image was decoding all along
    finally:
        server.proc.kill()  # the decode runs on in its thread: the process would exit after it


def test_a_request_whose_client_left_is_not_decoded(server_launcher, checkpoint):
    """A request waiting for the only decoding turn, its client gone: it leaves the queue at once (logged as
    client_gone), rather than having its images decoded for no one once the running decode ends."""
    server = server_launcher(["--model", str(checkpoint), "--served-model-name", MODEL, "--max-jpeg-scans", "100000",
                              "--image-decode-concurrency", "1"], model_name=MODEL)
    body = json.dumps({"model": MODEL, "messages": image_message("x", data_url(slow_jpeg(6000), "image/jpeg")),
                       "max_tokens": 4}).encode()
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body))
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as decoding:
            decoding.sendall(head + body)
            wait_for(server, IN_FLIGHT, 1)
            time.sleep(0.5)  # into its decode (tens of seconds)
            with socket.create_connection(("127.0.0.1", server.port), timeout=30) as waiting:
                waiting.sendall(head + body)
                wait_for(server, IN_FLIGHT, 2)
                time.sleep(0.5)
            deadline = time.monotonic() + 10
            while "status=client_gone" not in server.log() and time.monotonic() < deadline:
                time.sleep(0.1)
            assert server.log().count("status=client_gone") == 1, server.log()[-2000:]
            assert server.metrics().get(IN_FLIGHT) == 1  # the first one still decodes
    finally:
        server.proc.kill()  # the decode runs on in its thread


def test_a_request_still_decoding_when_the_drain_ends_is_answered_at_once(server_launcher, checkpoint):
    """SIGTERM with a request whose image takes far longer to decode than the drain and its abort grace
    (a progressive JPEG of many scans, let through by a raised max_jpeg_scans): once the drain's second is
    over, the request gets its 503 request_aborted, not whatever the server's close would leave it."""
    server = server_launcher(["--model", str(checkpoint), "--served-model-name", MODEL, "--max-jpeg-scans", "100000",
                              "--graceful-shutdown-seconds", "1"], model_name=MODEL)
    slow = slow_jpeg(1000)
    answer: dict[str, httpx.Response] = {}

    def send() -> None:
        answer["r"] = httpx.post(server.url + "/v1/chat/completions", timeout=120, json={
            "model": MODEL, "messages": image_message("x", data_url(slow, "image/jpeg")), "max_tokens": 4})

    decoding = threading.Thread(target=send)
    decoding.start()
    try:
        wait_for(server, IN_FLIGHT, 1)
        time.sleep(0.5)  # into its preprocessing (the outcome is the same if it still waits for its turn)
        server.proc.send_signal(signal.SIGTERM)
        decoding.join(60)
        assert answer["r"].status_code == 503
        assert answer["r"].json() == {"error": {"message": "The request was aborted: the server is shutting down.",
                                                "type": "server_error", "param": None, "code": "request_aborted"}}
    finally:
        server.proc.kill()  # the decode runs on in its thread: the process would exit after it


def _reader(timeout: float) -> ImageReader:
    return ImageReader(processor=None, model=MODEL, max_images=1, max_bytes=20000, max_pixels=10**6,
                       max_jpeg_scans=64, fetch=True, fetch_timeout=timeout)


def test_a_redirect_body_is_not_read(image_host):
    """A redirect's own body is closed unread (nothing would bound it): the host cannot send its 64 MiB,
    and the image it points to arrives."""
    reader = _reader(10)
    picture = reader.picture(reader.fetch_bytes(image_host + "/big-redirect.png", PART, reader.fetch_deadline()), PART)
    assert picture.size == (40, 30)
    deadline = time.monotonic() + 30
    while not _Images.redirect_sent:  # the host's handler ends once its writes fail
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert _Images.redirect_sent[-1] < 64 * 2**20


def test_an_https_fetch_ends_at_its_deadline(tmp_path, monkeypatch):
    """Over TLS too, a host that trickles its head is cut off at the fetch's deadline (the watchdog
    shuts the socket that TLS reads from), not when the head has arrived SLOW_HEAD_SECONDS later."""
    import ssl
    import subprocess

    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    server_side = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_side.load_cert_chain(cert, key)
    host = ThreadingHTTPServer(("127.0.0.1", 0), _Images)
    host.protocol_version = "HTTP/1.0"
    host.socket = server_side.wrap_socket(host.socket, server_side=True)
    threading.Thread(target=host.serve_forever, daemon=True).start()
    # the fetch trusts the test's certificate (urllib's https connections take this default context)
    monkeypatch.setattr(ssl, "_create_default_https_context", lambda: ssl.create_default_context(cafile=str(cert)))
    url = f"https://127.0.0.1:{host.server_address[1]}"
    reader = _reader(1)
    try:
        ok = reader.fetch_bytes(url + "/ok.png", PART, reader.fetch_deadline())
        assert reader.picture(ok, PART).size == (40, 30)  # TLS works
        started = time.monotonic()
        with pytest.raises(errors.APIError) as info:
            reader.fetch_bytes(url + "/slow-head.png", PART, reader.fetch_deadline())
        assert time.monotonic() - started < 6
        assert info.value.message == (f"The image at {url}/slow-head.png did not arrive within 1 seconds of the "
                                      "request's first fetch (setting image_fetch_timeout_seconds).")
    finally:
        host.shutdown()
