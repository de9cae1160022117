"""Container entrypoint: check that ``DIFFUSION_SERVER_CONFIG`` names a file, then run ``diffusion-server``.

The server reads every ``DIFFUSION_SERVER_<FLAG>`` variable itself (docs/configuration.md): flags win
over variables, variables over the config file. Arguments given to the container are the server's
flags, so they win:

    docker run ... -e DIFFUSION_SERVER_MAX_NUM_SEQS=8 diffusion-server:gpu --log-level debug

What this adds for a container is a missing config file named at once, with the presets the image holds.
"""

from __future__ import annotations

import os
import sys

CONFIG_ENV = "DIFFUSION_SERVER_CONFIG"
PRESETS_DIR = "/etc/diffusion-server"


def check_config(environ: dict[str, str] | None = None) -> None:
    """Raise ``ValueError`` when ``DIFFUSION_SERVER_CONFIG`` names no file."""
    environ = os.environ if environ is None else environ
    value = environ.get(CONFIG_ENV, "").strip()
    if value and not os.path.isfile(value):
        raise ValueError(f"{CONFIG_ENV}={value!r}: no such file{_presets_hint()}")


def _presets_hint() -> str:
    try:
        names = sorted(n for n in os.listdir(PRESETS_DIR) if n.endswith(".yaml"))
    except OSError:
        return ""
    return f" (presets in the image: {', '.join(os.path.join(PRESETS_DIR, n) for n in names)})" if names else ""


def main() -> None:
    try:
        check_config()
    except ValueError as exc:
        print(f"entrypoint: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    # -P: the working folder is not on sys.path (a server/ or engine/ folder mounted there is not imported)
    os.execv(sys.executable, [sys.executable, "-P", "-m", "server", *sys.argv[1:]])


if __name__ == "__main__":
    main()
