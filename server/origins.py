"""Requests that web pages send: refused unless the page is the server's own or an allowed origin.

CORS only decides whether a page may *read* an answer. A page on any site can still *send* a "simple"
cross-origin POST (a text/plain body needs no preflight), and the server parses any body as JSON, so
without this check every site a user visits could run completions on a server without an API key on
their machine or network. A browser marks such a request with ``Origin`` (and ``Sec-Fetch-Site``);
curl and the SDKs send neither, so they are not affected.

``OriginGuardMiddleware`` lets a request through when it is a GET, HEAD or OPTIONS (no work; a
preflight is CORS's), has no ``Origin``, comes from an origin in ``cors_allow_origins`` (``*``: any),
carries an ``Authorization`` header on a server with API keys (a page can send one to another origin
only after a preflight that origin's CORS allowed; the key is then checked as usual), or comes from the
server's own page (``Sec-Fetch-Site: same-origin``, or where a browser does not send that header, an
``Origin`` whose host and port are the request's ``Host``, default ports included) under a name no
other site can take over (``trusted_host``). Others get 403 ``origin_not_allowed``.

The last two conditions keep out DNS rebinding: a page of ``evil.example`` whose name the attacker then
points at this server is, to the browser, the server's own page (same origin: it may send any header
and read the answers). Its requests name ``evil.example`` in ``Host``, so the server's own page counts
as such only where the ``Host`` is an IP address, ``localhost`` (or a name under it) or the ``host``
setting, and an ``Authorization`` header lets a page through only where a key is then checked. A page
served under another DNS name (a proxy's, a machine's name on the network) works once its origin is
listed in ``cors_allow_origins``, or with an API key, which the page sends. Reads stay open to pages as
to any client (the model list, the page's ``/ui/config``, ``/metrics``: no prompts, no outputs).
"""

from __future__ import annotations

import ipaddress
from typing import Callable
from urllib.parse import urlsplit

from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware

from .errors import APIError, error_response
from .middleware import READ_METHODS


def origin_not_allowed(origin: str) -> APIError:
    return APIError(
        403,
        f"Requests from web pages at {origin} are refused: a browser sends them for whatever site it shows. "
        "List the origins allowed with the setting cors_allow_origins (--cors-allow-origin).",
        "invalid_request_error",
        None,
        "origin_not_allowed",
    )


def preflight_refused(reason: str) -> APIError:
    return APIError(
        400,
        f"CORS preflight refused ({reason}): the origins allowed are the setting cors_allow_origins "
        "(--cors-allow-origin); the methods GET, POST and OPTIONS.",
        "invalid_request_error",
        None,
        "cors_preflight_refused",
    )


class CORSErrorMiddleware(CORSMiddleware):
    """Starlette's CORS, a refused preflight answered with an OpenAI error (Starlette's is plain text)."""

    def preflight_response(self, request_headers):
        response = super().preflight_response(request_headers)
        if response.status_code < 400:
            return response
        return error_response(preflight_refused(bytes(response.body).decode("utf-8", "replace")))


DEFAULT_PORTS = {"http": 80, "https": 443}


def normalized_origins(origins: list[str]) -> list[str]:
    """``cors_allow_origins`` as browsers write an ``Origin``: an http(s) one as ``scheme://host[:port]`` in
    lower case, its host name in punycode, without a default port or a trailing slash; another scheme's (an
    extension's or an app webview's page: ``chrome-extension://ID``, ``tauri://localhost``) with its scheme in
    lower case; ``null`` and ``*`` as given. The origin guard and CORS both take this list. ``ValueError`` for
    a value no browser would send."""
    out = []
    for origin in origins:
        origin = origin.strip()
        if origin in ("*", "null"):
            out.append(origin)
            continue
        scheme, _, rest = origin.rstrip("/").partition("://")
        scheme = scheme.lower()
        if scheme and scheme not in DEFAULT_PORTS and rest and "/" not in rest:
            out.append(f"{scheme}://{rest}")
            continue
        parts = urlsplit(origin.rstrip("/"))
        try:
            port = parts.port
        except ValueError:
            port = -1
        if (parts.scheme.lower() not in DEFAULT_PORTS or not parts.hostname or port == -1 or parts.path
                or parts.query or parts.fragment or parts.username or parts.password):
            raise ValueError(f"cors_allow_origins: {origin!r} is not an origin (scheme://host[:port], e.g. "
                             "https://app.example.com) or *")
        scheme = parts.scheme.lower()
        try:  # an internationalized name as browsers send it (punycode)
            hostname = parts.hostname.encode("idna").decode("ascii")
        except UnicodeError:
            raise ValueError(f"cors_allow_origins: {origin!r} has a host name that is not valid") from None
        host = f"[{hostname}]" if ":" in hostname else hostname
        shown = "" if port is None or port == DEFAULT_PORTS[scheme] else f":{port}"
        out.append(f"{scheme}://{host}{shown}")
    return out


def _hostname(url: str) -> str | None:
    """The host name of ``url`` in lower case, without brackets; None where it has none or is malformed."""
    try:
        return urlsplit(url).hostname
    except ValueError:  # an unbalanced "[" (an IPv6 literal cut short)
        return None


def trusted_host(host: str | None, bind_host: str) -> bool:
    """Whether a ``Host`` header names this server by a name a rebound DNS name cannot be: an IP address,
    ``localhost`` or a name under it, or ``bind_host`` (the ``host`` setting)."""
    hostname = _hostname(f"http://{host}") if host else None
    if hostname is None:
        return False
    if hostname == "localhost" or hostname.endswith(".localhost") or hostname == _hostname(f"http://{bind_host}"):
        return True
    try:
        ipaddress.ip_address(hostname)
    except ValueError:
        return False
    return True


def same_origin(origin: str, host: str | None, fetch_site: str | None, bind_host: str) -> bool:
    """Whether a request with these headers comes from a page the server itself served, under a trusted
    ``Host`` (``trusted_host``)."""
    if not trusted_host(host, bind_host):
        return False
    if fetch_site is not None:
        return fetch_site == "same-origin"
    try:
        page = urlsplit(origin)
        if page.scheme not in DEFAULT_PORTS:
            return False
        server = urlsplit(f"{page.scheme}://{host}")
        default = DEFAULT_PORTS[page.scheme]
        return (page.hostname, page.port or default) == (server.hostname, server.port or default)
    except ValueError:  # a malformed origin or host, or a port that is not a number
        return False


class OriginGuardMiddleware:
    def __init__(self, app, allowed_origins: list[str], bind_host: str, keys: bool,
                 on_reject: Callable[[int], None] | None = None):
        self.app = app
        self.allowed = set(allowed_origins)  # normalized_origins
        self.bind_host = bind_host  # the host setting: a name trusted_host accepts
        self.keys = keys  # whether the server checks API keys
        self.on_reject = on_reject

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in READ_METHODS or "*" in self.allowed:
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        origin = headers.get("origin")
        # a page can send an Authorization header to another origin only after a CORS preflight that
        # origin allowed: such a request (an extension, an app's webview) goes on to the key check, where
        # there is one (a rebound page is not cross-origin to the browser: it sends any header unasked)
        authorized = self.keys and "authorization" in headers
        if origin is None or origin in self.allowed or authorized or same_origin(
                origin, headers.get("host"), headers.get("sec-fetch-site"), self.bind_host):
            await self.app(scope, receive, send)
            return
        if self.on_reject is not None:
            self.on_reject(403)
        await error_response(origin_not_allowed(origin))(scope, receive, send)
