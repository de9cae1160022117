"""Container health check: exit 0 when ``GET /health`` answers 200 (503 while loading or draining).

It asks the port the server listens on, found as the server finds it: from the server's own arguments
(the entrypoint execs it as process 1, so container arguments such as ``--port 9000`` are there), the
``DIFFUSION_SERVER_*`` variables and the config file they name."""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request

DEFAULT_PORT = 8000


def _port_variable(environ) -> int:
    return int(environ.get("DIFFUSION_SERVER_PORT", "").strip() or DEFAULT_PORT)


def server_port(cmdline: bytes, environ) -> int:
    """The port of the server whose command line (``/proc/<pid>/cmdline``: NUL-separated) is ``cmdline``:
    the server's own (``python -m server FLAGS``), or under ``docker run --init`` the init's, which still
    shows the entrypoint's (``docker-init -- python .../entrypoint.py FLAGS``)."""
    args = [a for a in cmdline.decode(errors="replace").split("\0") if a]
    start = next((i + 1 for i, a in enumerate(args) if a == "server" or a.endswith("/entrypoint.py")), None)
    if start is not None:
        from server.cli import settings_from_args

        return settings_from_args(args[start:], environ=environ).port
    return _port_variable(environ)


def main() -> int:
    try:
        with open("/proc/1/cmdline", "rb") as f:
            port = server_port(f.read(), os.environ)
    except (OSError, ValueError, SystemExit):  # no /proc, or settings the server would not have started with
        port = _port_variable(os.environ)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as resp:
            return 0 if resp.status == 200 else 1
    except (urllib.error.URLError, OSError):
        return 1


if __name__ == "__main__":
    sys.exit(main())
