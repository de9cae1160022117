"""Server settings: every setting of ``diffusion-server``, with its default and help text, written once.

``ServerSettings`` holds the server's own settings and, in ``engine``, the engine's (``EngineSettings``).
Each setting is a dataclass field made by ``engine.settings.setting``; ``options()`` walks them (plus
``--config``) and is the one source of the command line (``cli.py``), the YAML keys, the
``DIFFUSION_SERVER_*`` environment variables and docs/configuration.md (``tools.reference_docs``).
"""

from __future__ import annotations

import re

from dataclasses import Field, dataclass, field, fields, replace

from engine.settings import EngineSettings, default_of, is_setting, setting

from .origins import normalized_origins

ENV_PREFIX = "DIFFUSION_SERVER_"
GROUPS = {"server": "Server settings", "engine": "Engine settings", "request limits": "Request limits"}  # name: title
KINDS = ("str", "int", "float", "bool", "list")  # "bool" is a switch, "list" a repeatable flag


def limit(default, help: str, **kwargs):
    """A request limit: a request over it gets a 400 (413 for the body size); nothing is clamped."""
    return setting(default, help, group="request limits", **kwargs)


@dataclass
class ServerSettings:
    """The server's settings. Build them from setting names side by side with ``from_flat``
    (``ServerSettings.from_flat(model="m", max_num_seqs=4)``), or nest ``engine=EngineSettings(...)``.

    ``model`` is the one model setting: ``engine.model`` stays ``None`` here, and ``engine_settings()``
    fills it in (``cli.main`` resolves the default model first when ``model`` is unset).
    """

    model: str | None = setting(
        None, "Checkpoint to serve: a local folder or a Hugging Face hub id of a DiffusionGemmaForBlockDiffusion "
        "model.", default_text="the embedded model folder engine/default_model if present, else a tiny random "
        "test model built once into the cache folder (its outputs are noise)")
    served_model_name: str | None = setting(
        None, "Name shown by /v1/models and expected in the request's 'model' field (the --model value is "
        "accepted too).", default_text="the engine's model name")
    host: str = setting("127.0.0.1", "Address to listen on (0.0.0.0 for all interfaces).")
    port: int = setting(8000, "TCP port to listen on.")
    api_keys: list[str] = setting(
        [], "Require 'Authorization: Bearer KEY' on /v1/* and on every request that is not a read (GET, HEAD, "
        "OPTIONS); /health, /metrics and the page stay open. Printable ASCII without spaces. Repeat for several keys.",
        flag="--api-key", metavar="KEY", default_text="none (no authentication)")
    log_prompts: bool = setting(False, "Include prompts and generated text in the per-request log lines.")
    log_level: str = setting("info", "Logging level: debug, info, warning, error or critical.")
    access_log: bool = setting(False, "Also write uvicorn's access log (one line per HTTP request).")
    sse_ping_seconds: float = setting(
        15.0, "Interval of SSE keep-alive comments (': ping'), sent on every open stream whether or not "
        "frames are flowing; 0 disables them.")
    graceful_shutdown_seconds: float = setting(
        30.0, "On SIGTERM/SIGINT: /health answers 503 at once and new requests get 503 (server_draining) with "
        "Retry-After while the server keeps listening; in-flight requests and streams get up to this long to "
        "finish, then the rest are aborted (a 503 request_aborted, or that error chunk and [DONE] on a stream) "
        "and the process exits 0. A second SIGINT exits at once.")
    exit_on_engine_death: bool = setting(
        False, "When the engine dies (its step loop broke, or a replica process exited), drain as on SIGTERM (the "
        "requests in flight have already failed) and exit with status 3, so that a supervisor restarts the "
        "server: Docker's and Compose's restart policies act on an exit, not on a failing health check. Off, the "
        "server stays up: /health answers 503 dead and new requests 503 engine_dead until it is restarted. On "
        "in the container images.")
    request_head_timeout_seconds: float = setting(
        10.0, "Close a connection that has not sent a complete request head (request line and headers) this long "
        "after it opened or after its previous response: silently if it sent nothing, with a 408 if it sent part "
        "of one. 0 disables it.")
    max_body_bytes_in_flight: int = setting(
        256 * 1024 * 1024, "Most bytes of request bodies held at once, all connections together: a body's bytes "
        "past its first 64 KiB count from their arrival until it has been parsed (a parse whose client has gone "
        "counts until it ends). A body that would pass it is read on and dropped, then answered 429 server_busy "
        "(Retry-After); slow uploads and bodies queued for their parse turn cannot grow the process past it, "
        "and a full budget refuses only bodies over 64 KiB. At least max-request-body-bytes.")
    request_body_timeout_seconds: float = setting(
        60.0, "Answer 408 and close when a request's body has not fully arrived this long after its head (a "
        "client trickling or stalling its upload holds a connection otherwise). 0 disables it.")
    write_timeout_seconds: float = setting(
        60.0, "Disconnect a client that keeps the server's send buffer full for this long: it stopped reading a "
        "response (a stream), or reads less than 48 KiB in that time. Its requests are aborted. 0 disables it.")
    max_connections: int | None = setting(
        None, "Most open client connections. A connection past it closes the oldest one with no request in "
        "progress; when every one has a request in progress, it gets a 503 and is closed.",
        default_text="the open-file limit (raised to its hard limit, at most 65536, at start-up) less a reserve "
        "of max(64, an eighth of it) for the model's files, logs and the engine")
    preprocess_concurrency: int = setting(
        2, "Requests whose large body is parsed and checked, whose prompts are tokenized or rendered through the "
        "chat template, or whose non-streamed log-probabilities are formatted, at the same time, each in a worker "
        "thread; the others wait their turn. Small bodies and short prompts are handled at once.")
    image_decode_concurrency: int = setting(
        2, "Requests whose images are decoded and run through the image processor at the same time, each in a "
        "worker thread of a pool of its own; the others wait their turn. Decoding does not take "
        "preprocess-concurrency's turns: a request of large images delays only other requests with images.")
    ui: bool = setting(True, "Serve the live canvas page at / (assets under /ui/). --no-ui turns it off: / answers 404.")
    cors_allow_origins: list[str] = setting(
        [], "Allow cross-origin browser requests from this origin (e.g. https://app.example.com, or * for any). "
        "Repeat for several.", flag="--cors-allow-origin", metavar="ORIGIN",
        default_text="none (no CORS headers; browsers block cross-origin calls)")
    image_url_fetch: bool = setting(
        False, "Fetch image_url parts given as http(s) URLs (each within max-image-bytes, all of a request's "
        "within image-fetch-timeout-seconds; redirects to other schemes are refused). Off: such a part gets 400 and images must come inline as data URLs. The "
        "server then makes requests to any address a client names, its own network included: turn it on only "
        "where that is acceptable.")
    image_fetch_concurrency: int = setting(
        4, "With image-url-fetch: requests whose http(s) images are fetched at the same time, each in a worker "
        "thread of its own; the others wait their turn. A request keeps its turn until its images are decoded, "
        "which bounds the fetched bytes held. Fetches do not take preprocess-concurrency's turns: a slow image "
        "host delays only requests that fetch.")
    image_fetch_timeout_seconds: float = setting(
        10.0, "With image-url-fetch: the longest all the image fetches of one request may take together, from "
        "the first connection to the last byte, redirects included (name lookups are bounded by the system "
        "resolver's own timeouts); past it the request gets 400.")
    engine: EngineSettings = field(default_factory=EngineSettings)
    max_request_body_bytes: int = limit(16 * 1024 * 1024, "Largest request body accepted, in bytes; larger ones get 413.")
    max_prompt_tokens: int | None = limit(
        None, "Most tokens in one prompt (after tokenization or the chat template); longer prompts get 400.",
        default_text="no limit beyond the context length")
    max_completion_tokens: int | None = limit(
        None, "Largest max_tokens / max_completion_tokens a request may ask for (checked after the checkpoint's "
        "default is filled in); larger ones get 400.", default_text="no limit beyond the context length")
    max_n: int = limit(64, "Largest n (choices per prompt); larger ones get 400.")
    max_prompts_per_request: int = limit(
        256, "Most prompts in one /v1/completions request (a list of strings or of token lists); more get 400.")
    max_choices_per_request: int = limit(
        256, "Most choices in one request: prompts x n, each one engine request; more get 400.")
    max_request_tokens: int = limit(
        262144, "Most completion tokens one request may ask for in all: prompts x n x max_tokens; more get 400.")
    max_logprob_entries: int = limit(
        524288, "Most log-probability entries one request may ask for in all, when it asks for them: prompts x n x "
        "max_tokens x (1 + the alternatives asked, logprobs or top_logprobs); more get 400. Each entry is kept and "
        "formatted until the response is sent.")
    max_stop_length: int = limit(
        256, "Longest stop string, in characters (at most 4 stop strings); longer ones get 400.")
    max_logit_bias: int = limit(300, "Most entries in one request's logit_bias; more get 400.")
    max_image_bytes: int = limit(
        8 * 1024 * 1024, "Largest image in a chat message, in bytes as encoded (a data URL's decoded data, or "
        "a fetched body); checked before it is decoded. Larger ones get 400.")
    max_image_pixels: int = limit(
        16_777_216, "Most pixels (width x height) in one image, read from its header before its pixels are "
        "decoded; larger ones get 400.")
    max_jpeg_scans: int = limit(
        64, "Most scans in one progressive JPEG image, counted from its markers before it is decoded; more get 400. "
        "Each scan walks the whole image again, so a small file of many empty scans would decode for minutes.")
    max_json_depth: int = limit(32, "Deepest nesting of arrays and objects in a request body; deeper bodies get 400.")
    max_json_values: int = limit(
        65536, "Most strings (object keys included), objects and arrays in a request body, counted before it is "
        "parsed; more get 400. Numbers are not counted: an array of token ids may be as long as a prompt may be.")
    max_tools: int = limit(128, "Most function declarations in a chat request's tools; more get 400.")
    max_tools_chars: int = limit(
        262144, "Most characters a chat request's tools may have in all (as compact JSON), checked before the "
        "template renders them; more get 400.")
    max_template_kwarg_chars: int = limit(
        1024, "Longest string value in a chat request's chat_template_kwargs, in characters; longer ones get 400.")
    max_request_denoising_steps: int = limit(
        1024, "Largest max_denoising_steps a request may ask for (a canvas may take up to that many decoder "
        "passes); larger ones get 400. Checked after the checkpoint's default is filled in.")

    def __post_init__(self):
        if self.engine.model is not None:
            raise ValueError("set ServerSettings.model, not engine.model")

    @classmethod
    def from_flat(cls, **values) -> ServerSettings:
        """Settings from the names of ``options()`` (server and engine settings side by side)."""
        engine_names = {o.name for o in options() if o.engine} | {f.name for f in code_only_settings()}
        engine = EngineSettings(**{name: values.pop(name) for name in list(values) if name in engine_names})
        return cls(engine=engine, **values)

    def flat(self) -> dict:
        """Every setting by name: ``from_flat``'s argument."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "engine"}
        out.update((f.name, getattr(self.engine, f.name)) for f in fields(self.engine) if is_setting(f))
        return out

    def model_names(self, engine_model_name: str | None = None) -> list[str]:
        """Names accepted in the ``model`` field; the first is shown by /v1/models."""
        names = []
        if self.served_model_name:
            names.append(self.served_model_name)
        for n in (engine_model_name, self.model):
            if n and n not in names:
                names.append(n)
        return names

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first setting that cannot work (checked at start-up, before loading)."""
        if not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in 0..65535 (got {self.port!r})")
        if self.log_level.lower() not in ("debug", "info", "warning", "error", "critical"):
            raise ValueError(f"log_level must be debug, info, warning, error or critical (got {self.log_level!r})")
        for name in ("sse_ping_seconds", "graceful_shutdown_seconds", "request_head_timeout_seconds",
                     "request_body_timeout_seconds", "write_timeout_seconds"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or value < 0 or value != value:
                raise ValueError(f"{name} must be a number >= 0 (got {value!r})")
        for f in fields(self):
            value = getattr(self, f.name)
            if f.metadata.get("group") == "request limits" and value is not None and (
                    not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"{f.name} must be a positive integer (got {value!r})")
        timeout = self.image_fetch_timeout_seconds
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < float("inf"):
            raise ValueError(f"image_fetch_timeout_seconds must be a finite number > 0 (got {timeout!r})")
        for name in ("max_connections", "preprocess_concurrency", "image_decode_concurrency",
                     "image_fetch_concurrency", "max_body_bytes_in_flight"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"{name} must be a positive integer (got {value!r})")
        if self.max_body_bytes_in_flight < self.max_request_body_bytes:
            raise ValueError(f"max_body_bytes_in_flight ({self.max_body_bytes_in_flight}) must be at least "
                             f"max_request_body_bytes ({self.max_request_body_bytes}): no body that size could pass")
        if any(not k for k in self.api_keys):
            raise ValueError("api keys must not be empty")
        if any(not re.fullmatch(r"[\x21-\x7e]+", k) for k in self.api_keys):
            # an HTTP client sends a header in ASCII, and the server strips the token's white space
            raise ValueError("api keys must be printable ASCII without spaces (a key with another character "
                             "could never be sent in an Authorization header)")
        normalized_origins(self.cors_allow_origins)
        # the engine's own settings (dtype, device, budgets), with the model still unresolved
        engine = replace(self.engine, model="<default model>" if self.model is None else self.model)
        engine.validate()
        # the checks that depend on the device, for the one auto picks here (only where a setting needs
        # them: resolving auto imports torch, which the container's health check should not wait for)
        bound = (engine.device_memory_limit_gib is not None or engine.trace_decoder or engine.data_parallel_size > 1
                 or engine.batch_invariant)
        if engine.device == "auto" and bound:
            replace(engine, device="cpu" if resolves_to_cpu("auto") else "cuda").validate()

    def engine_settings(self) -> EngineSettings:
        """The engine's settings: ``engine`` with the model filled in and, on CPU, one thread by default."""
        if self.model is None:
            raise ValueError("model is not set")
        threads = self.engine.num_threads
        if threads is None and resolves_to_cpu(self.engine.device):
            threads = 1  # see the --num-threads help
        return replace(self.engine, model=self.model, num_threads=threads)


def resolves_to_cpu(device: str) -> bool:
    if device == "cpu":
        return True
    if device == "auto":
        import torch

        return not torch.cuda.is_available()
    return False


def env_name(flag: str) -> str:
    """The environment variable of a flag: ``--max-num-seqs`` is ``DIFFUSION_SERVER_MAX_NUM_SEQS``."""
    return ENV_PREFIX + flag.lstrip("-").upper().replace("-", "_")


@dataclass(frozen=True)
class Option:
    """One setting as the command line, a YAML config and the environment spell it."""

    name: str  # the field name: a keyword of ServerSettings.from_flat
    flag: str
    kind: str  # one of KINDS
    help: str
    default: str  # the default, in words
    group: str  # one of GROUPS
    metavar: str | None = None
    engine: bool = False  # a field of ServerSettings.engine
    optional: bool = False  # None is a value of its own (``int | None``...), not only "no value given"

    @property
    def env(self) -> str:
        return env_name(self.flag)

    @property
    def key(self) -> str:
        """The YAML key (``_`` may replace ``-``)."""
        return self.flag[2:]


CONFIG = Option(
    "config", "--config", "str",
    "YAML file whose keys are these flags' names (e.g. max-num-seqs: 8 or max_num_seqs: 8; api-key may be a "
    "list). Environment variables and flags given on the command line override it.", "none", "server", "FILE")


def format_default(f: Field) -> str:
    """A field's default, in words."""
    if f.metadata["default_text"]:
        return f.metadata["default_text"]
    value = default_of(f)
    if isinstance(value, bool):
        return "on" if value else "off"
    if value is None or value == []:
        raise ValueError(f"setting {f.name}: say what its default means (default_text)")
    return f"{value:g}" if isinstance(value, float) else str(value)


def _option(f: Field, engine: bool) -> Option:
    kind = f.type.replace(" | None", "")
    kind = "list" if kind.startswith("list") else kind
    if kind not in KINDS:
        raise TypeError(f"setting {f.name}: no command-line kind for {f.type}")
    m = f.metadata
    return Option(f.name, m["flag"] or "--" + f.name.replace("_", "-"), kind, m["help"], format_default(f),
                  m["group"] or ("engine" if engine else "server"), m["metavar"], engine, f.type.endswith(" | None"))


def options() -> list[Option]:
    """Every setting of the command line, in ``GROUPS`` order: ``--config``, then the fields."""
    found = [CONFIG]
    for f in fields(ServerSettings):
        if f.name == "engine":
            found += [_option(g, engine=True) for g in fields(EngineSettings) if is_setting(g) and g.metadata["cli"]]
        elif is_setting(f):
            found.append(_option(f, engine=False))
    return sorted(found, key=lambda o: list(GROUPS).index(o.group))


def code_only_settings() -> list[Field]:
    """Engine settings without a flag (set in code: ``EngineSettings(...)``)."""
    return [f for f in fields(EngineSettings) if is_setting(f) and not f.metadata["cli"]]
