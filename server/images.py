"""Images in chat messages: ``image_url`` content parts read into pictures for the checkpoint's processor.

Every image is refused before work it would cause: a checkpoint without a processor answers 400 at
once (naming the model), and so does a request with more images than ``max_images_per_prompt``,
before any is decoded; a data URL's decoded size (``max_image_bytes``) is known from its length
before it is decoded, and its pixel count (``max_image_pixels``) from its header before its pixels
are. ``http(s)`` URLs are fetched only when ``image_url_fetch`` is on, within ``max_image_bytes`` and
``image_fetch_timeout_seconds``; otherwise they are a 400 that says to send the image inline. Fetches
take turns of their own (``ImageFetches``), and so does decoding (``image_decode_concurrency``), apart
from the preprocessing turns that parse and render.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import http.client
import io
import re
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass

from . import errors
from .preprocess import RequestTurns
from .request_limits import limit_error

# The picture formats decoded (OpenAI's list); anything else is refused without decoding it.
FORMATS = ("PNG", "JPEG", "WEBP", "GIF")
_DATA_URL = re.compile(r"data:image/[A-Za-z0-9.+-]+;base64,", re.ASCII)
_BASE64 = re.compile(r"[A-Za-z0-9+/]*={0,2}", re.ASCII)
_FETCH_CHUNK = 64 * 1024
_JPEG_START = b"\xff\xd8"
# a marker as libjpeg finds one: 0xFF (after any other bytes, and fill 0xFF) and a byte that is not a stuffed
# zero or a restart marker (RST0-7, inside a scan's entropy-coded data)
_JPEG_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")


class _Watchdog:
    """Ends one fetch at its deadline wherever it is blocked: connecting (each address of each
    connection, redirects included, within what is left), in a TLS handshake, or waiting for a
    response's head or body. A socket's own timeout bounds only each operation, and a host that trickles
    its head would otherwise hold the fetch far past the deadline. When the deadline passes, the
    connections' sockets are shut down through duplicates of them (the same socket after TLS wraps it,
    and a descriptor no other thread can be given before ``cancel`` closes it). Name lookups keep the
    system resolver's own timeouts."""

    def __init__(self, deadline: float):
        self.deadline = deadline
        self.expired = False
        self._done = False
        self._watched: list[socket.socket] = []  # a duplicate of each connection's socket
        self._lock = threading.Lock()
        self._timer = threading.Timer(max(0.0, deadline - time.monotonic()), self._expire)
        self._timer.daemon = True
        self._timer.start()

    def connect(self, address, timeout=None, source_address=None) -> socket.socket:
        """``socket.create_connection`` for ``http.client``: each address within what is left of the
        deadline, and the connected socket watched."""
        host, port = address
        error: OSError | None = None
        for family, kind, proto, _, where in socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM):
            left = self.deadline - time.monotonic()
            if left <= 0 or self.expired:
                raise TimeoutError("past the fetch's deadline")
            sock = socket.socket(family, kind, proto)
            try:
                sock.settimeout(min(timeout, left) if isinstance(timeout, (int, float)) else left)
                if source_address:
                    sock.bind(source_address)
                sock.connect(where)
            except OSError as exc:
                sock.close()
                error = exc
                continue
            with self._lock:
                if self.expired or self._done:
                    sock.close()
                    raise TimeoutError("past the fetch's deadline")
                self._watched.append(sock.dup())
            return sock
        raise error or OSError(f"no address found for {host}")

    def _expire(self) -> None:
        with self._lock:
            if self._done:
                return
            self.expired = True
            for sock in self._watched:
                try:
                    sock.shutdown(socket.SHUT_RDWR)  # a blocked read or handshake returns at once
                except OSError:
                    pass

    def cancel(self) -> None:
        """Stop watching (the fetch is over): no socket is shut down after this returns."""
        with self._lock:
            self._done = True
            for sock in self._watched:
                sock.close()
            self._watched.clear()
        self._timer.cancel()


class _WatchedHTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, watchdog: _Watchdog):
        super().__init__()
        self._watchdog = watchdog

    def http_open(self, req):
        return self.do_open(_watched(http.client.HTTPConnection, self._watchdog), req)


class _WatchedHTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, watchdog: _Watchdog):
        super().__init__()
        self._watchdog = watchdog

    def https_open(self, req):
        return self.do_open(_watched(http.client.HTTPSConnection, self._watchdog), req, context=self._context)


def _watched(connection: type, watchdog: _Watchdog):
    def make(*args, **kwargs):
        conn = connection(*args, **kwargs)
        conn._create_connection = watchdog.connect  # what connect() opens its socket with
        return conn

    return make


class _RedirectHandler(urllib.request.HTTPRedirectHandler):
    """The standard redirects, without reading the redirect response's own body first (nothing would
    bound its size): the response is closed unread."""

    def http_error_302(self, req, fp, code, msg, headers):
        fp.read = lambda *args: b""
        return super().http_error_302(req, fp, code, msg, headers)

    http_error_301 = http_error_303 = http_error_307 = http_error_308 = http_error_302


def _opener(watchdog: _Watchdog) -> urllib.request.OpenerDirector:
    """http(s) only, redirects included (the default opener would follow a redirect to ftp: or file:),
    every connection watched by ``watchdog``."""
    opener = urllib.request.OpenerDirector()
    for handler in (urllib.request.ProxyHandler(), _WatchedHTTPHandler(watchdog), _WatchedHTTPSHandler(watchdog),
                    _RedirectHandler(), urllib.request.HTTPDefaultErrorHandler(),
                    urllib.request.HTTPErrorProcessor(), urllib.request.UnknownHandler()):
        opener.add_handler(handler)
    return opener


class ImageFetches:
    """Turns for requests that fetch http(s) images: ``concurrency`` at once (``image_fetch_concurrency``),
    their fetches in a thread pool of that size, apart from the preprocessing turns and the event loop's
    default executor, so that hosts that answer slowly hold up only other fetches. A request keeps its
    turn until its pictures are decoded: at most ``concurrency`` requests' fetched bytes are held."""

    def __init__(self, concurrency: int):
        self._turns = asyncio.Semaphore(concurrency)
        self._pool = ThreadPoolExecutor(concurrency, thread_name_prefix="image-fetch")  # threads start on use

    @asynccontextmanager
    async def turn(self):
        async with self._turns:
            yield

    async def run(self, work):
        """``work()`` in one of the pool's threads (call it within a ``turn``)."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, work)


def invalid_image(message: str, param: str) -> errors.APIError:
    return errors.bad_request(message, param, "invalid_image")


def jpeg_scans(data: bytes) -> int:
    """The scans of the first image in JPEG ``data``, as libjpeg reads it: from marker to marker (bytes between
    segments and a scan's entropy-coded data are passed over, as libjpeg passes them), each segment's
    payload skipped by its length, up to the end-of-image marker (what follows, such as a motion photo's
    video, is not the image's); the start-of-scan segments counted. Linear in the data's length."""
    scans, i = 0, len(_JPEG_START)
    while (found := _JPEG_MARKER.search(data, i)) is not None:
        i = found.start()
        marker = data[i + 1]
        if marker == 0xD9:  # end of image
            break
        if marker < 0xC0:  # TEM and reserved markers have no length: libjpeg passes over them, as over junk
            i += 2
            continue
        scans += marker == 0xDA
        i += 2 + int.from_bytes(data[i + 2:i + 4], "big")  # its payload, not searched (metadata may hold FF DA)
    return scans


@dataclass(frozen=True)
class ImageReader:
    """What one server allows of images and what it reads them with: the checkpoint's ``processor``
    (None: a text-only checkpoint), the served ``model`` name, and the settings."""

    processor: object | None
    model: str
    max_images: int  # engine setting max_images_per_prompt
    max_bytes: int
    max_pixels: int
    max_jpeg_scans: int
    fetch: bool
    fetch_timeout: float
    fetches: ImageFetches | None = None  # the server's fetch turns (``chat.image_prompts`` needs them)
    decodes: RequestTurns | None = None  # the server's decoding turns, for this request (``chat.image_prompts``)

    @classmethod
    def of(cls, settings, processor, model: str, fetches: ImageFetches, decodes: RequestTurns) -> "ImageReader":
        return cls(processor, model, settings.engine.max_images_per_prompt, settings.max_image_bytes,
                   settings.max_image_pixels, settings.max_jpeg_scans, settings.image_url_fetch,
                   settings.image_fetch_timeout_seconds, fetches, decodes)

    def check_count(self, count: int) -> None:
        """Before anything is read: the model takes images, and no more than the setting allows."""
        if self.processor is None:
            raise errors.bad_request(f"The model '{self.model}' does not take images: send text content only.",
                                     "messages", "unsupported_parameter")
        if count > self.max_images:
            raise limit_error(f"Too many images: {count} in one request, the limit is {self.max_images} "
                              "(setting max_images_per_prompt).", "messages")

    def fetch_deadline(self) -> float:
        """When the fetches of a request that starts reading its images now must be over."""
        return time.monotonic() + self.fetch_timeout

    def is_remote(self, url: str, param: str) -> bool:
        """Whether ``url`` is to be fetched (http(s)); such a URL is a 400 when fetching is off."""
        if not url.startswith(("http://", "https://")):
            return False
        if not self.fetch:
            raise errors.bad_request(
                "Image URLs are not fetched by this server (setting image_url_fetch is off): send the image "
                "inline as a data URL (data:image/png;base64,...).", param, "unsupported_parameter")
        return True

    def data_url_bytes(self, url: str, param: str) -> bytes:
        """A data URL's image data, its size checked before it is decoded."""
        head = _DATA_URL.match(url)
        if head is None:
            raise invalid_image("An image_url must be a data URL (data:image/<type>;base64,<data>) or an http(s) "
                                "URL.", param)
        payload = url[head.end():]
        if len(payload) % 4 or not _BASE64.fullmatch(payload):
            raise invalid_image("The image's data URL is not valid base64.", param)
        size = len(payload) // 4 * 3 - payload.count("=")
        self._check_bytes(size, param)
        try:
            return base64.b64decode(payload, validate=True)
        except binascii.Error:
            raise invalid_image("The image's data URL is not valid base64.", param) from None

    def fetch_bytes(self, url: str, param: str, deadline: float) -> bytes:
        """The body at an http(s) ``url``, within ``max_image_bytes`` and done by ``deadline`` (a
        ``time.monotonic`` value shared by the request's fetches, ``fetch_deadline``)."""
        left = deadline - time.monotonic()
        watchdog = _Watchdog(deadline) if left > 0 else None
        response = None
        try:
            if watchdog is None:
                raise TimeoutError
            response = _opener(watchdog).open(url, timeout=left)
            declared = response.headers.get("Content-Length")
            if declared is not None and declared.isdigit():
                self._check_bytes(int(declared), param)
            data = bytearray()
            while chunk := response.read1(_FETCH_CHUNK):  # what has arrived: the deadline holds
                data += chunk
                self._check_bytes(len(data), param)
                if time.monotonic() > deadline:
                    raise TimeoutError
            if watchdog.expired:  # shut down mid-body: what came is cut short
                raise TimeoutError
            return bytes(data)
        except errors.APIError:
            raise
        except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException) as exc:
            if isinstance(exc, urllib.error.HTTPError):
                exc.close()  # a 4xx/5xx answer holds its connection until closed
            timed_out = isinstance(exc, TimeoutError) or isinstance(getattr(exc, "reason", None), TimeoutError)
            if timed_out or (watchdog is not None and watchdog.expired):
                raise invalid_image(f"The image at {url} did not arrive within {self.fetch_timeout:g} seconds of "
                                    "the request's first fetch (setting image_fetch_timeout_seconds).", param) from None
            reason = getattr(exc, "reason", None) or exc
            raise invalid_image(f"The image at {url} could not be fetched: {reason}.", param) from None
        finally:
            if watchdog is not None:
                watchdog.cancel()  # first: the watchdog never shuts a socket that is being closed
            if response is not None:
                response.close()

    def _check_bytes(self, size: int, param: str) -> None:
        if size > self.max_bytes:
            raise limit_error(f"An image is {size} bytes or more, the limit is {self.max_bytes} (setting "
                              "max_image_bytes).", param)

    def picture(self, data: bytes, param: str):
        """Image ``data`` decoded to RGB, its format, pixel count and JPEG scans checked first."""
        from PIL import Image

        Image.MAX_IMAGE_PIXELS = None  # Pillow's own bound would override max_image_pixels, checked below
        try:
            picture = Image.open(io.BytesIO(data), formats=FORMATS)  # reads the header only
        except Exception:  # noqa: BLE001 - PIL raises several kinds for data it cannot read
            raise invalid_image(f"The image could not be read: it must be one of {', '.join(FORMATS)}.",
                                param) from None
        width, height = picture.size
        if width * height > self.max_pixels:
            raise limit_error(f"An image is {width}x{height} = {width * height} pixels, the limit is "
                              f"{self.max_pixels} (setting max_image_pixels).", param)
        if data.startswith(_JPEG_START):  # whatever Pillow names it (a JPEG with an MPF segment opens as MPO)
            scans = jpeg_scans(data)
            if scans > self.max_jpeg_scans:
                raise limit_error(f"A JPEG image has {scans} scans, the limit is {self.max_jpeg_scans} (setting "
                                  "max_jpeg_scans).", param)
        try:
            return picture.convert("RGB")  # decodes the pixels
        except Exception:  # noqa: BLE001 - truncated or corrupt data
            raise invalid_image("The image could not be decoded: its data is truncated or corrupt.", param) from None
