"""``diffusion-server`` / ``python -m server``: read the settings (flags, ``DIFFUSION_SERVER_*`` variables, a YAML
config; all derived from ``server.settings.options``), run uvicorn."""

from __future__ import annotations

import argparse
import difflib
import logging
import os
import re
import sys
from pathlib import Path

from .settings import ENV_PREFIX, GROUPS, Option, ServerSettings, options

logger = logging.getLogger("server")

EPILOG = """\
Every flag is also read from the environment variable DIFFUSION_SERVER_<FLAG> (--max-num-seqs is
DIFFUSION_SERVER_MAX_NUM_SEQS) and from the --config YAML file; flags win over variables, variables
over the file (docs/configuration.md).

Request extensions (both endpoints, also through the openai SDK's extra_body):
  max_denoising_steps, entropy_bound, t_min, t_max, stability_threshold, confidence_threshold,
  stream_drafts (stream each refinement step as a chunk with a "diffusion" object), ignore_eos.
temperature and top_p are accepted and ignored: the schedule t_max -> t_min governs sampling.
With a seed and several choices (n > 1 or several prompts), choice i uses seed + i.

Example:
  diffusion-server --model google/diffusiongemma-26B-A4B-it --host 0.0.0.0 --port 8000 --api-key sk-local
"""

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
_CONVERT = {"int": int, "float": float, "str": str}


def help_text(option: Option) -> str:
    """A setting's line in ``--help``: its help and its default."""
    return f"{option.help} Default: {option.default}."


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="diffusion-server",
        description="OpenAI-compatible HTTP server for text diffusion language models (DiffusionGemma).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        argument_default=argparse.SUPPRESS,
    )
    groups = {}
    for o in options():
        if o.group not in groups:
            groups[o.group] = parser.add_argument_group(GROUPS[o.group].lower())
        group = groups[o.group]
        help_ = help_text(o).replace("%", "%%")  # argparse formats help strings with %
        if o.kind == "bool":
            group.add_argument(o.flag, dest=o.name, action=argparse.BooleanOptionalAction, help=help_)
        elif o.kind == "list":
            group.add_argument(o.flag, dest=o.name, action="append", metavar=o.metavar or "VALUE", help=help_)
        else:
            metavar = o.metavar or (o.kind.upper() if o.kind != "str" else None)
            group.add_argument(o.flag, dest=o.name, type=_CONVERT[o.kind], metavar=metavar, help=help_)
    return parser


CONFIG_ERROR_STATUS = 2  # as argparse's for a bad flag: every configuration error exits with it


class ConfigError(SystemExit):
    """A configuration the server cannot use (a config file, a value, a combination): its message is one
    line. ``main`` prints it and exits with ``CONFIG_ERROR_STATUS``, as for a bad flag."""


def _coerce(option, key: str, value):
    """A YAML value as ``option``'s kind; an empty one (``key:``) only where None is a value of its own."""
    kind = option.kind
    if value is None:
        if option.optional:
            return None
        raise ConfigError(f"config: '{key}' has no value: give {'an' if kind == 'int' else 'a'} {kind} or leave the "
                         "key out")
    try:
        if kind == "bool":
            if isinstance(value, bool):
                return value
            raise ValueError
        if kind == "list":
            if isinstance(value, str):
                return [value]
            if isinstance(value, list) and all(isinstance(v, str) for v in value):
                return value
            raise ValueError
        if kind == "int":
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError
            return value
        if kind == "float":
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError
            return float(value)
        if isinstance(value, (list, dict, bool)):  # a text setting takes a scalar (YAML reads 8000 as a number)
            raise ValueError
        return str(value)
    except ValueError:
        raise ConfigError(f"config: '{key}' must be {'an' if kind == 'int' else 'a'} {kind}, got {value!r}") from None


def load_config(path: str) -> dict:
    """Read a YAML config whose keys are the flag names (``-`` or ``_``, without the leading dashes)."""
    import yaml

    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"config {path}: cannot read it ({exc.strerror or exc})") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config {path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config {path}: expected a mapping of flag names to values")
    settings = [o for o in options() if o.name != "config"]
    by_key = {}
    for o in settings:
        for k in {o.key, o.key.replace("-", "_"), o.name, o.name.replace("_", "-")}:
            by_key[k] = o
    out = {}
    for key, value in data.items():
        if key not in by_key:
            known = sorted(o.key for o in settings)
            raise ConfigError(f"config {path}: unknown key '{key}'. Known keys: {', '.join(known)}")
        out[by_key[key].name] = _coerce(by_key[key], key, value)
    return out


def values_from_env(environ) -> dict:
    """The settings the ``DIFFUSION_SERVER_<FLAG>`` variables give (empty ones are ignored).

    Switches take true/false (1/0, yes/no, on/off), repeatable flags a comma-separated list.
    Raises ``ValueError`` naming the variable on a value of the wrong kind.
    """
    out = {}
    for o in options():
        value = environ.get(o.env, "").strip()
        if not value or _service_link(o.env, value):
            continue
        if o.kind == "bool":
            if value.lower() not in _TRUE | _FALSE:
                raise ValueError(f"{o.env}={value!r}: expected true or false")
            out[o.name] = value.lower() in _TRUE
        elif o.kind == "list":
            out[o.name] = [item for item in (v.strip() for v in value.split(",")) if item]
        else:
            try:
                out[o.name] = _CONVERT[o.kind](value)
            except ValueError:
                raise ValueError(f"{o.env}={value!r}: expected {'an' if o.kind == 'int' else 'a'} {o.kind}") from None
    return out


# DIFFUSION_SERVER_ variables that are not settings: read by server.default_model, by the Compose
# override (on the host), and Kubernetes' service links for a Service named diffusion-server[-...]; a
# link's bare ..._PORT holds the service's address (tcp://10.0.0.1:8000), which tells it from a setting
_OTHER_VARIABLES = re.compile(r"CACHE|CPU_CONFIG|(\w+_)?(SERVICE_HOST|SERVICE_PORT(_\w+)?|PORT_\d+_(TCP|UDP|SCTP)\w*)")
_LINK_PORT = re.compile(r"(\w+_)?PORT")
_LINK_ADDRESS = re.compile(r"(tcp|udp|sctp)://")


def _service_link(name: str, value: str) -> bool:
    """Whether ``name=value`` is a Kubernetes service link's bare ``..._PORT`` (``tcp://10.0.0.1:8000``): a
    Service named diffusion-server sets ``DIFFUSION_SERVER_PORT`` so, which is not a port to listen on."""
    return bool(_LINK_PORT.fullmatch(name.removeprefix(ENV_PREFIX)) and _LINK_ADDRESS.match(value))


def unknown_variables(environ) -> dict[str, str | None]:
    """Each ``DIFFUSION_SERVER_`` variable that names no setting, with the setting's variable it is
    closest to (None: none is close). Such a variable would be ignored without a word:
    ``..._API_KEYS`` would leave authentication off."""
    known = {o.env.removeprefix(ENV_PREFIX) for o in options()}
    unknown = {}
    for name in sorted(environ):
        rest = name.removeprefix(ENV_PREFIX)
        if (name.startswith(ENV_PREFIX) and rest not in known and not _OTHER_VARIABLES.fullmatch(rest)
                and not _service_link(name, environ[name])):
            close = difflib.get_close_matches(rest, known, n=1)
            unknown[name] = ENV_PREFIX + close[0] if close else None
    return unknown


def misspelt_variable(environ) -> str | None:
    """Why the server must not start: a variable that looks like a misspelt setting's (as an unknown
    YAML key stops it), or None."""
    for name, close in unknown_variables(environ).items():
        if close is not None:
            return f"{name} is not a setting (did you mean {close}?)"
    return None


def settings_from_args(argv: list[str] | None = None, environ=None) -> ServerSettings:
    """Settings from the flags, the environment (``os.environ`` unless given) and the YAML config.

    A flag wins over its variable, a variable over the config file, the file over the default. A
    repeatable flag replaces the file's list; its variable's items are added to either.
    """
    parser = build_parser()
    flags = vars(parser.parse_args(argv))
    environ = os.environ if environ is None else environ
    try:
        env = values_from_env(environ)
    except ValueError as exc:  # as argparse reports a bad flag, without the usage: the command line was fine
        parser.exit(2, f"{parser.prog}: error: {exc}\n")
    misspelt = misspelt_variable(environ)
    if misspelt is not None:
        parser.exit(2, f"{parser.prog}: error: {misspelt}\n")
    env_config = env.pop("config", None)
    config = flags.pop("config", None) or env_config
    values = load_config(config) if config else {}
    env_lists = {o.name: env.pop(o.name) for o in options() if o.kind == "list" and o.name in env}
    values.update(env)
    values.update(flags)
    for name, items in env_lists.items():
        values[name] = list(values.get(name) or []) + items
    try:
        settings = ServerSettings.from_flat(**values)
        settings.validate()
    except ValueError as exc:
        raise ConfigError(f"invalid setting: {exc}") from None
    return settings


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def main(argv: list[str] | None = None) -> int:
    try:
        settings = settings_from_args(argv)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return CONFIG_ERROR_STATUS
    configure_logging(settings.log_level)
    for name in unknown_variables(os.environ):  # none close to a setting's (those stop it): logged, ignored
        logger.warning("%s is not a setting: ignored", name)
    if settings.model is None:
        from .default_model import DefaultModelError, default_served_name, resolve_default_model

        try:
            settings.model = resolve_default_model()
        except DefaultModelError as exc:
            logger.error("exiting: %s", exc)
            return 1
        if settings.served_model_name is None:
            settings.served_model_name = default_served_name(settings.model)
        logger.warning("no --model given: serving %s as %s", settings.model, settings.served_model_name)

    from .http_server import run

    return run(settings)

if __name__ == "__main__":
    sys.exit(main())
