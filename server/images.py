"""Images in chat messages: ``image_url`` content parts read into pictures for the checkpoint's processor.

Every image is refused before work it would cause: a checkpoint without a processor answers 400 at
once (naming the model), and so does a request with more images than ``max_images_per_prompt``,
before any is decoded; a data URL's decoded size (``max_image_bytes``) is known from its length
before it is decoded, and its pixel count (``max_image_pixels``) from its header before its pixels
are. ``http(s)`` URLs are fetched only when ``image_url_fetch`` is on, within ``max_image_bytes`` and
``image_fetch_timeout_seconds``; otherwise they are a 400 that says to send the image inline.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

from . import errors
from .request_limits import limit_error

# The picture formats decoded (OpenAI's list); anything else is refused without decoding it.
FORMATS = ("PNG", "JPEG", "WEBP", "GIF")
_DATA_URL = re.compile(r"data:image/[A-Za-z0-9.+-]+;base64,", re.ASCII)
_BASE64 = re.compile(r"[A-Za-z0-9+/]*={0,2}", re.ASCII)
_FETCH_CHUNK = 64 * 1024
# http(s) only, redirects included (the default opener would follow a redirect to ftp: or file:)
_HTTP_ONLY = urllib.request.OpenerDirector()
for _handler in (urllib.request.ProxyHandler(), urllib.request.HTTPHandler(), urllib.request.HTTPSHandler(),
                 urllib.request.HTTPRedirectHandler(), urllib.request.HTTPDefaultErrorHandler(),
                 urllib.request.HTTPErrorProcessor(), urllib.request.UnknownHandler()):
    _HTTP_ONLY.add_handler(_handler)


def invalid_image(message: str, param: str) -> errors.APIError:
    return errors.bad_request(message, param, "invalid_image")


@dataclass(frozen=True)
class ImageReader:
    """What one server allows of images and what it reads them with: the checkpoint's ``processor``
    (None: a text-only checkpoint), the served ``model`` name, and the settings."""

    processor: object | None
    model: str
    max_images: int  # engine setting max_images_per_prompt
    max_bytes: int
    max_pixels: int
    fetch: bool
    fetch_timeout: float

    @classmethod
    def of(cls, settings, processor, model: str) -> "ImageReader":
        return cls(processor, model, settings.engine.max_images_per_prompt, settings.max_image_bytes,
                   settings.max_image_pixels, settings.image_url_fetch, settings.image_fetch_timeout_seconds)

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

    def read(self, url: str, param: str, deadline: float):
        """The picture at ``url`` (a data URL, or http(s) when fetching is on, done by ``deadline``, a
        ``time.monotonic`` value shared by the request's images), decoded to RGB."""
        if url.startswith(("http://", "https://")):
            if not self.fetch:
                raise errors.bad_request(
                    "Image URLs are not fetched by this server (setting image_url_fetch is off): send the image "
                    "inline as a data URL (data:image/png;base64,...).", param, "unsupported_parameter")
            data = self._fetch(url, param, deadline)
        else:
            data = self._decode_data_url(url, param)
        return self._picture(data, param)

    def _decode_data_url(self, url: str, param: str) -> bytes:
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

    def _fetch(self, url: str, param: str, deadline: float) -> bytes:
        try:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            with _HTTP_ONLY.open(url, timeout=left) as response:
                declared = response.headers.get("Content-Length")
                if declared is not None and declared.isdigit():
                    self._check_bytes(int(declared), param)
                data = bytearray()
                while chunk := response.read1(_FETCH_CHUNK):  # what has arrived: the deadline holds
                    data += chunk
                    self._check_bytes(len(data), param)
                    if time.monotonic() > deadline:
                        raise TimeoutError
                return bytes(data)
        except errors.APIError:
            raise
        except TimeoutError:
            raise invalid_image(f"The image at {url} did not arrive within {self.fetch_timeout:g} seconds of the "
                                "request's first fetch (setting image_fetch_timeout_seconds).", param) from None
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", None) or exc
            raise invalid_image(f"The image at {url} could not be fetched: {reason}.", param) from None

    def _check_bytes(self, size: int, param: str) -> None:
        if size > self.max_bytes:
            raise limit_error(f"An image is {size} bytes or more, the limit is {self.max_bytes} (setting "
                              "max_image_bytes).", param)

    def _picture(self, data: bytes, param: str):
        from PIL import Image

        try:
            picture = Image.open(io.BytesIO(data), formats=FORMATS)  # reads the header only
        except Image.DecompressionBombError:
            raise limit_error(f"An image has more pixels than the limit of {self.max_pixels} (setting "
                              "max_image_pixels).", param) from None
        except Exception:  # noqa: BLE001 - PIL raises several kinds for data it cannot read
            raise invalid_image(f"The image could not be read: it must be one of {', '.join(FORMATS)}.",
                                param) from None
        width, height = picture.size
        if width * height > self.max_pixels:
            raise limit_error(f"An image is {width}x{height} = {width * height} pixels, the limit is "
                              f"{self.max_pixels} (setting max_image_pixels).", param)
        try:
            return picture.convert("RGB")  # decodes the pixels
        except Exception:  # noqa: BLE001 - truncated or corrupt data
            raise invalid_image("The image could not be decoded: its data is truncated or corrupt.", param) from None
