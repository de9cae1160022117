"""Container entrypoint: map ``DIFFUSION_SERVER_*`` environment variables to ``diffusion-server`` flags.

Every flag of ``server.settings.OPTIONS`` has a variable: ``--max-num-seqs`` is
``DIFFUSION_SERVER_MAX_NUM_SEQS``, ``--config`` is ``DIFFUSION_SERVER_CONFIG``, and so on. Switches
take true/false (1/0, yes/no, on/off); repeatable flags take a comma-separated list. ``DIFFUSION_SERVER_API_KEY`` (comma-separated) is read by the
server itself. Empty variables are ignored. Arguments given to the container come after the mapped
flags, so they win:

    docker run ... -e DIFFUSION_SERVER_MAX_NUM_SEQS=8 diffusion-server:gpu --log-level debug
"""

from __future__ import annotations

import os
import sys

PREFIX = "DIFFUSION_SERVER_"
READ_BY_SERVER = {"--api-key"}  # the server reads DIFFUSION_SERVER_API_KEY itself
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def env_name(flag: str) -> str:
    return PREFIX + flag.lstrip("-").upper().replace("-", "_")


def flags_from_env(environ: dict[str, str] | None = None) -> list[str]:
    """The flags the environment asks for, in ``OPTIONS`` order. Raises ``ValueError`` on a bad switch value."""
    from server.settings import OPTIONS

    environ = os.environ if environ is None else environ
    argv: list[str] = []
    for flag, _dest, kind, _help in OPTIONS:
        if flag in READ_BY_SERVER:
            continue
        value = environ.get(env_name(flag), "").strip()
        if not value:
            continue
        if kind == "bool":
            low = value.lower()
            if low in _TRUE:
                argv.append(flag)
            elif low in _FALSE:
                argv.append("--no-" + flag.lstrip("-"))
            else:
                raise ValueError(f"{env_name(flag)}={value!r}: expected true or false")
        else:
            if flag == "--config" and not os.path.isfile(value):
                raise ValueError(f"{env_name(flag)}={value!r}: no such file{_presets_hint()}")
            if kind == "list":  # comma-separated, one flag per item
                for item in (v.strip() for v in value.split(",")):
                    if item:
                        argv += [flag, item]
            else:
                argv += [flag, value]
    return argv


def _presets_hint() -> str:
    folder = "/etc/diffusion-server"
    try:
        names = sorted(n for n in os.listdir(folder) if n.endswith(".yaml"))
    except OSError:
        return ""
    return f" (presets in the image: {', '.join(os.path.join(folder, n) for n in names)})" if names else ""


def main() -> None:
    try:
        argv = flags_from_env()
    except ValueError as exc:
        print(f"entrypoint: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    os.execv(sys.executable, [sys.executable, "-m", "server", *argv, *sys.argv[1:]])


if __name__ == "__main__":
    main()
