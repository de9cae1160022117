"""Server settings: every flag of ``diffusion-server`` with its default and help text.

``OPTIONS`` is the single source for the command line (``cli.py``), the YAML config keys and the
documentation. A YAML config uses the same names as the flags, with ``-`` or ``_``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

DEFAULT_MAX_REQUEST_BODY_BYTES = 16 * 1024 * 1024

# Request limits (see docs/reliability.md). A request over any of them gets a 400; nothing is clamped.
DEFAULT_MAX_N = 64
DEFAULT_MAX_PROMPTS_PER_REQUEST = 256
DEFAULT_MAX_REQUEST_TOKENS = 262144
DEFAULT_MAX_STOP_LENGTH = 256
DEFAULT_MAX_JSON_DEPTH = 32
DEFAULT_MAX_REQUEST_DENOISING_STEPS = 1024


@dataclass
class ServerSettings:
    model: str | None = None
    served_model_name: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    api_keys: list[str] = field(default_factory=list)
    dtype: str = "auto"
    device: str = "auto"
    max_num_seqs: int = 16
    max_waiting: int = 256
    max_model_len: int | None = None
    max_num_kv_tokens: int | None = None
    memory_fraction: float = 0.8
    num_threads: int | None = None
    quantization: str = "none"
    sampling_tile_bytes: int | None = None
    cuda_graph_max_batch: int | None = None
    max_request_body_bytes: int = DEFAULT_MAX_REQUEST_BODY_BYTES
    log_prompts: bool = False
    log_level: str = "info"
    access_log: bool = False
    sse_ping_seconds: float = 15.0
    graceful_shutdown_seconds: float = 30.0
    ui: bool = True
    max_prompt_tokens: int | None = None
    max_completion_tokens: int | None = None
    max_n: int = DEFAULT_MAX_N
    max_prompts_per_request: int = DEFAULT_MAX_PROMPTS_PER_REQUEST
    max_request_tokens: int = DEFAULT_MAX_REQUEST_TOKENS
    max_stop_length: int = DEFAULT_MAX_STOP_LENGTH
    max_json_depth: int = DEFAULT_MAX_JSON_DEPTH
    max_request_denoising_steps: int = DEFAULT_MAX_REQUEST_DENOISING_STEPS
    cors_allow_origins: list[str] = field(default_factory=list)

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
        for name in ("sse_ping_seconds", "graceful_shutdown_seconds"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or value < 0 or value != value:
                raise ValueError(f"{name} must be a number >= 0 (got {value!r})")
        for name in ("max_request_body_bytes", "max_n", "max_prompts_per_request", "max_request_tokens",
                     "max_stop_length", "max_json_depth", "max_request_denoising_steps", "max_prompt_tokens",
                     "max_completion_tokens"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"{name} must be a positive integer (got {value!r})")
        if any(not k for k in self.api_keys):
            raise ValueError("api keys must not be empty")
        # the engine's own settings (dtype, device, budgets), with the model still unresolved
        self.engine_settings_for(self.model or "<default model>").validate()

    def engine_settings(self):
        """The ``EngineSettings`` for these server settings (threads default to 1 on CPU)."""
        if self.model is None:
            raise ValueError("model is not set")
        return self.engine_settings_for(self.model)

    def engine_settings_for(self, model: str):
        from engine.settings import EngineSettings

        num_threads = self.num_threads
        if num_threads is None and resolves_to_cpu(self.device):
            num_threads = 1
        return EngineSettings(
            model=model,
            dtype=self.dtype,
            device=self.device,
            max_num_seqs=self.max_num_seqs,
            max_waiting=self.max_waiting,
            max_model_len=self.max_model_len,
            max_num_kv_tokens=self.max_num_kv_tokens,
            memory_fraction=self.memory_fraction,
            num_threads=num_threads,
            quantization=self.quantization,
            sampling_tile_bytes=self.sampling_tile_bytes,
            cuda_graph_max_batch=self.cuda_graph_max_batch,
        )


def resolves_to_cpu(device: str) -> bool:
    if device == "cpu":
        return True
    if device == "auto":
        import torch

        return not torch.cuda.is_available()
    return False


# (flag, settings field, type, help). Type "bool" is a switch, "list" a repeatable string.
OPTIONS: list[tuple[str, str, str, str]] = [
    ("--model", "model", "str",
     "Checkpoint to serve: a local folder or a Hugging Face hub id of a DiffusionGemmaForBlockDiffusion model. "
     "Default: the embedded model folder engine/default_model if present, else a tiny random test model "
     "built once into the cache folder (its outputs are noise)."),
    ("--served-model-name", "served_model_name", "str",
     "Name shown by /v1/models and expected in the request's 'model' field (the --model value is accepted too). "
     "Default: the engine's model name."),
    ("--host", "host", "str", "Address to listen on (default 127.0.0.1; use 0.0.0.0 for all interfaces)."),
    ("--port", "port", "int", "TCP port to listen on (default 8000)."),
    ("--api-key", "api_keys", "list",
     "Require 'Authorization: Bearer KEY' on /v1/*. Repeat for several keys. Also read from the environment "
     "variable DIFFUSION_SERVER_API_KEY (comma-separated). /health and /metrics stay open."),
    ("--config", "", "str",
     "YAML file whose keys mirror these flags (e.g. max-num-seqs: 8 or max_num_seqs: 8; api-key may be a list). "
     "Flags given on the command line override it."),
    ("--dtype", "dtype", "str", "Weights dtype: auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16, float16, float64."),
    ("--device", "device", "str", "auto (CUDA when available, else CPU), cpu, cuda, cuda:N."),
    ("--max-num-seqs", "max_num_seqs", "int", "Most canvases (running requests) in one decoder pass (default 16)."),
    ("--max-waiting", "max_waiting", "int",
     "Most requests queued beyond the running ones; past it requests get 429 with Retry-After: 1 at once, "
     "rather than waiting unboundedly (default 256). A request with several choices needs room for all of them."),
    ("--max-model-len", "max_model_len", "int",
     "Context limit for prompt + max_tokens (default: the model's max_position_embeddings). Longer requests get 400."),
    ("--max-num-kv-tokens", "max_num_kv_tokens", "int",
     "KV-cache tokens reserved by all running requests together (default: derived from free memory at start-up)."),
    ("--memory-fraction", "memory_fraction", "float",
     "Fraction of free accelerator memory the engine may budget at start-up (default 0.8)."),
    ("--num-threads", "num_threads", "int",
     "torch intra-op threads on CPU (default 1 on CPU: OpenMP threads spin-waiting on a shared machine cost "
     "an order of magnitude; raise it on an idle many-core host)."),
    ("--quantization", "quantization", "str",
     "Weight-only quantization of the MoE experts (about 90% of DiffusionGemma's weights) at load time, through "
     "torchao: none (default), fp8-experts (float8 e4m3 + a scale per row) or int8-experts (int8 + a scale and zero "
     "point per row). Other weights stay in --dtype (bfloat16 or float32). Needs torchao (the 'quant' extra)."),
    ("--sampling-tile-bytes", "sampling_tile_bytes", "int",
     "Bound on the sampling step's memory: canvases go through the lm head and the sampler in tiles of as many "
     "rows as fit, and a row in chunks of positions when one row does not (smaller is slower: each chunk re-reads "
     "the lm head). Default: 10% of the memory free after the weights (the GPU's, or the host's on CPU), between "
     "512 MiB and 8 GiB."),
    ("--cuda-graph-max-batch", "cuda_graph_max_batch", "int",
     "On CUDA, decoder passes of at most this many canvases replay a captured CUDA graph (one per batch size, "
     "captured on first use and again after the KV buffers are reallocated); small batches are launch-bound "
     "otherwise. 0 keeps every pass eager. Needs bfloat16 weights, unquantized experts and a GPU of compute "
     "capability 9.x/10.x (H100, H200, B200); elsewhere a value given is ignored with a warning. Must not exceed "
     "--max-num-seqs. Default: 4 (at most --max-num-seqs) where capture works, eager elsewhere."),
    ("--max-request-body-bytes", "max_request_body_bytes", "int",
     f"Largest request body accepted; larger ones get 413 (default {DEFAULT_MAX_REQUEST_BODY_BYTES})."),
    ("--log-prompts", "log_prompts", "bool", "Include prompts and generated text in the per-request log lines (off by default)."),
    ("--log-level", "log_level", "str", "Logging level: debug, info, warning, error (default info)."),
    ("--access-log", "access_log", "bool", "Also write uvicorn's access log (one line per HTTP request; off by default)."),
    ("--sse-ping-seconds", "sse_ping_seconds", "float",
     "Interval of SSE keep-alive comments (': ping') on idle streams; 0 disables them (default 15)."),
    ("--graceful-shutdown-seconds", "graceful_shutdown_seconds", "float",
     "On SIGTERM/SIGINT: /health answers 503 at once and new requests get 503 (server_draining) with Retry-After "
     "while the server keeps listening; in-flight requests and streams get up to this long to finish, then the "
     "rest are aborted (a 503 request_aborted, or that error chunk and [DONE] on a stream) and the process exits 0 "
     "(default 30). A second SIGINT exits at once."),
    ("--ui", "ui", "bool",
     "Serve the live canvas page at / (assets under /ui/; on by default). --no-ui turns it off: / answers 404."),
    ("--max-prompt-tokens", "max_prompt_tokens", "int",
     "Most tokens in one prompt (after tokenization or the chat template); longer prompts get 400 "
     "(default: no limit beyond the context length)."),
    ("--max-completion-tokens", "max_completion_tokens", "int",
     "Largest max_tokens / max_completion_tokens a request may ask for (checked after the checkpoint's default "
     "is filled in); larger ones get 400 (default: no limit beyond the context length)."),
    ("--max-n", "max_n", "int", f"Largest n (choices per prompt); larger ones get 400 (default {DEFAULT_MAX_N})."),
    ("--max-prompts-per-request", "max_prompts_per_request", "int",
     f"Most prompts in one /v1/completions request (a list of strings or of token lists); more get 400 "
     f"(default {DEFAULT_MAX_PROMPTS_PER_REQUEST})."),
    ("--max-request-tokens", "max_request_tokens", "int",
     "Most completion tokens one request may ask for in all: prompts x n x max_tokens; more get 400 "
     f"(default {DEFAULT_MAX_REQUEST_TOKENS})."),
    ("--max-stop-length", "max_stop_length", "int",
     f"Longest stop string, in characters (at most 4 stop strings); longer ones get 400 (default {DEFAULT_MAX_STOP_LENGTH})."),
    ("--max-json-depth", "max_json_depth", "int",
     f"Deepest nesting of arrays and objects in a request body; deeper bodies get 400 (default {DEFAULT_MAX_JSON_DEPTH})."),
    ("--max-request-denoising-steps", "max_request_denoising_steps", "int",
     "Largest max_denoising_steps a request may ask for (a canvas may take up to that many decoder passes); "
     f"larger ones get 400 (default {DEFAULT_MAX_REQUEST_DENOISING_STEPS})."),
    ("--cors-allow-origin", "cors_allow_origins", "list",
     "Allow cross-origin browser requests from this origin (e.g. https://app.example.com, or * for any). "
     "Repeat for several. Default: none (no CORS headers; browsers block cross-origin calls)."),
]


def settings_field_names() -> set[str]:
    return {f.name for f in fields(ServerSettings)}
