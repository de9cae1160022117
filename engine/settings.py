"""Engine settings: every budget and limit the engine enforces, with its default and help text.

Each setting is a dataclass field made by ``setting()``, so its default and its help are written once;
the server derives its flags, YAML keys, environment variables and docs/configuration.md from these
fields (``server.settings.options``). This module imports no torch: the loader maps ``DTYPE_NAMES`` to
torch dtypes.
"""

from __future__ import annotations

from dataclasses import MISSING, Field, dataclass, field

DTYPE_NAMES = ("float32", "bfloat16", "float16", "float64")
QUANTIZATION_METHODS = ("none", "fp8-experts", "int8-experts")
SAMPLERS = ("reference", "fast")  # engine.sampling
LOAD_FORMATS = ("auto", "dummy")  # engine.loader
DUMMY_SEED = 0  # load_format=dummy: the random weights' seed


def setting(default, help: str, *, default_text: str | None = None, flag: str | None = None,
            metavar: str | None = None, group: str | None = None, cli: bool = True):
    """A settings field: ``default``, and the ``help`` shown by ``--help`` and docs/configuration.md.

    ``default_text`` says in words what the default is where the value alone does not (``None``, a
    list); ``flag`` is the command-line flag (default ``--`` and the field name with ``-``); ``group``
    is the section of ``--help`` and of the docs; ``cli=False`` keeps a setting out of the server's
    flags (set it in code only).
    """
    metadata = {"help": help, "default_text": default_text, "flag": flag, "metavar": metavar, "group": group,
                "cli": cli}
    if isinstance(default, list):
        if default:
            raise ValueError("a list setting defaults to the empty list")
        return field(default_factory=list, metadata=metadata)
    return field(default=default, metadata=metadata)


def is_setting(f: Field) -> bool:
    return "help" in f.metadata


def default_of(f: Field):
    return f.default_factory() if f.default is MISSING else f.default


@dataclass
class EngineSettings:
    """Settings of one engine instance (``AsyncEngine``, ``EngineCore``)."""

    # The checkpoint: a local folder or a hub id of a DiffusionGemmaForBlockDiffusion model. Required by
    # the engine; not a setting of its own here because the server resolves it (ServerSettings.model).
    model: str | None = None
    dtype: str = setting("auto", "Weights dtype: auto (bfloat16 on CUDA, float32 on CPU), "
                         + ", ".join(DTYPE_NAMES) + ".")
    device: str = setting("auto", "Device: auto (CUDA when available, else CPU), cpu, cuda, cuda:N.")
    max_num_seqs: int = setting(16, "Most canvases (running requests) in one decoder pass.")
    max_waiting: int = setting(
        256, "Most requests queued beyond max_num_seqs: the engine holds at most max_num_seqs + max_waiting "
        "unfinished requests (where the KV budget runs fewer than max_num_seqs at once, the rest wait too); past it "
        "requests get 429 with Retry-After: 1 at once "
        "(the engine raises QueueFullError), rather than waiting unboundedly. A request with several choices "
        "needs room for all of them; one with more choices than max_num_seqs + max_waiting gets 400 "
        "limit_exceeded instead (no wait would make room).")
    max_model_len: int | None = setting(
        None, "Context limit for prompt + max_tokens; longer requests get 400. At most the model's "
        "max_position_embeddings (more is refused at load: positions past it were never trained). The last canvas "
        "is denoised whole, so its positions past max_tokens (dropped from the output) can reach up to "
        "canvas_length - 1 past this limit, as in transformers' generate.",
        default_text="the model's max_position_embeddings")
    # The KV slot buffers hold slot_rows(n) rows (the next power of two of the running count, at most
    # max_num_seqs) of the longest reservation (prompt + every canvas but the last).
    max_num_kv_tokens: int | None = setting(
        None, "KV-cache tokens reserved by all running requests together (in each engine replica, with "
        "--data-parallel-size). The running set takes the next power of "
        "two of its size (at most max-num-seqs) rows of its longest reservation (a request's prompt and every "
        "canvas but the last): one long request makes every row cost as much, and waiting requests start in "
        "arrival order.",
        default_text="derived from the memory free at start-up (memory-fraction of it)")
    memory_fraction: float = setting(
        0.8, "Fraction of the memory free at start-up that the engine may budget: the GPU's, or on CPU the host's "
        "available memory within the process's nearest cgroup memory limit (a container's, a systemd unit's) "
        "where one is set.")
    device_memory_limit_gib: float | None = setting(
        None, "On CUDA, the most GPU memory torch may allocate for this process, in GiB (weights, KV, "
        "transients and the allocator's cache; the CUDA context and libraries' own workspaces come on top): "
        "allocations past it fail, and the KV budget and sampling tile are planned within it, as on a GPU of "
        "that size (torch.cuda.set_per_process_memory_fraction). For sharing a GPU, or trying a smaller "
        "card's plan on a larger one. Refused on CPU.",
        default_text="the whole GPU")
    max_encoder_tokens: int = setting(
        2048, "Prompt tokens prefilled in one pass, over all requests, and padded tokens in one batched encoder "
        "call (prefill and commits; on CPU with batch invariance a call is at least 16 tokens wide, so a lower "
        "value still runs one prompt or chunk of up to 16 per call). Prompts are prefilled oldest first, a longer "
        "one in chunks of this size over several passes (a chunk waits for a pass with room), so that running "
        "requests take their steps meanwhile; a prompt with images is prefilled whole in one pass (alone if it is "
        "longer). Commits, a "
        "canvas per running request at most, are not held back, and a chunk that another request with the same "
        "prompt encodes in the same pass is copied, not counted.",
        cli=False)
    max_images_per_prompt: int = setting(
        8, "Most images in one prompt (a request with more gets 400). The vision tower runs over a prompt's "
        "images in one call when its prompt is encoded, so this bounds that call's memory: each image is at most "
        "the checkpoint's image processor's patch budget, and its placeholder tokens count as prompt tokens "
        "(context length, KV budget).")
    batch_invariant: bool | None = setting(
        None, "Make a row's logits bitwise the same whoever shares its pass (a seed then gives the same text "
        "under any load): attention over each row's own unpadded keys, each request's MoE expert groups "
        "and prompt computed as alone (the many-row matrix kernel, or exactly its rows for 1-3 tokens). "
        "On CUDA (opt-in) the matrix products and means run fixed-order Triton kernels "
        "instead of cuBLAS and torch's reductions, each row's attention runs as alone, and CUDA graphs are off: "
        "slower (engine.batch_invariant_ops).",
        default_text="on on CPU (unless --quantization is set), off on CUDA")
    load_format: str = setting(
        "auto", "How the weights load: auto (the checkpoint's weight files) or dummy (random weights built "
        "directly on the device from the folder's config.json, for benchmarks of a model's shape without "
        "its weights; outputs are noise). A compressed-tensors config gets its published layout: FP8 or "
        "NVFP4 experts and dense layers.")
    fp8_gemm: bool = setting(
        True, "Run an FP8 checkpoint's products as FP8 GEMMs where the GPU has them (compute capability 9.0 or "
        "10.x). --no-fp8-gemm dequantizes the weights a layer at a time instead, as on every other device: to try "
        "a card without FP8 GEMMs (an RTX 5090's memory plan under --device-memory-limit-gib) on an H100.")
    # engine.sampling: the default is engine.sampling.default_sampler
    sampler: str | None = setting(
        None, "The denoising step's sampler: reference (transformers' sampler op for op: a seeded request equals "
        "model.generate at batch 1 in float32 and float64; in bfloat16 and float16 with batch invariance, generate "
        "with transformers' eager experts, as its grouped_mm rounds otherwise) or fast (Gumbel-max with "
        "counter-based random numbers, one pass over vocabulary chunks: far less memory, and a row's result "
        "independent of its batch).",
        default_text="fast on CUDA, reference on CPU")
    # engine.sampling.reference.sampling_tiles: a row's whole-row exponential draws must fit, plus four
    # positions; the default is engine.memory.auto_sampling_tile_bytes.
    sampling_tile_bytes: int | None = setting(
        None, "Bound on the sampling step's memory: canvases go through the lm head and the sampler in tiles of "
        "as many rows as fit, and a row in chunks of positions when one row does not (smaller is slower: each "
        "chunk re-reads the lm head). Never less than one row's draws and four of its positions (fewer rows "
        "would run another matrix kernel than generate's), which the memory plan counts.",
        default_text="10% of the memory free after the weights (the GPU's, or on CPU the host's within a "
                     "cgroup memory limit), between 512 MiB and 8 GiB")
    # engine.decoder_graphs: one graph per batch size, recaptured when the KV buffers are reallocated;
    # capture_blocker says why capture cannot work; AUTO_CUDA_GRAPH_MAX_BATCH is the default.
    cuda_graph_max_batch: int | None = setting(
        None, "On CUDA, decoder passes of at most this many canvases replay a captured CUDA graph (one per batch "
        "size, captured on first use and again after the KV buffers are reallocated); small batches are "
        "launch-bound otherwise. 0 keeps every pass eager. Needs bfloat16 weights, unquantized experts and a GPU "
        "of compute capability 9.x/10.x (H100, H200, B200); elsewhere a value given is ignored with a warning. "
        "Must not exceed --max-num-seqs. The graphs keep the activations of one captured pass at that batch "
        "size allocated beside the KV budget: attention over every layer's whole KV buffer, so more than an "
        "eager pass over the KV in use; --memory-fraction's headroom holds them.",
        default_text="4 (at most --max-num-seqs) where capture works, eager elsewhere")
    # The engine leaves torch's default for None; the server makes it 1 on CPU (ServerSettings.engine_settings).
    num_threads: int | None = setting(
        None, "torch intra-op threads on CPU. OpenMP threads spin-waiting on a shared machine slow every pass "
        "down; raise it on an idle many-core host.", default_text="1 on CPU")
    forward_threads: int | None = setting(
        None, "On CPU, a decoder pass splits its canvases into up to this many groups of rows that run side by "
        "side, one thread each (with --num-threads intra-op threads inside each): any pass of two canvases or "
        "more when the decoder is traced (--trace-decoder), and otherwise only where each group gets "
        "enough work (engine.cpu_threads.MIN_GROUP_WORK canvas tokens x hidden size squared; smaller eager "
        "operators are bound by Python's one-at-a-time dispatch). A canvas's tokens do not depend on its "
        "group. Unlike OpenMP threads inside one operator, these threads do not spin-wait on each other, so a "
        "busy process beside the server slows it down in proportion. Ignored on CUDA.",
        default_text="the CPUs the process may use (its affinity, within its cgroups' CPU quota), divided by "
                     "--num-threads (and by --data-parallel-size: each copy's share)")
    # engine.traced_decoder: where a trace is exact, and why it is faster
    trace_decoder: bool | None = setting(
        None, "On CPU, run the decoder pass as a TorchScript trace of the eager modules' own operators: the "
        "same arithmetic (bitwise the same logits), without Python and its GIL between operators, so "
        "--forward-threads row groups run side by side without taking turns. Needs batch invariance with its "
        "row-wise experts (they keep the traced operators independent of the data), so a quantized checkpoint "
        "(compressed-tensors) runs eagerly; set explicitly, it is refused on CUDA and without them. A graph is "
        "traced on first use for each combination of padded rows and masked layer types; a pass that cannot be "
        "traced runs eagerly, with a warning.",
        default_text="on on CPU with batch invariance and its row-wise experts")
    data_parallel_size: int = setting(
        1, "On CPU, copies of the engine, each in a process of its own with its own copy of the weights, "
        "decoder batch (--max-num-seqs each), KV budget (--max-num-kv-tokens each) and share of --memory-fraction. "
        "One waiting queue (--max-waiting) feeds them: its oldest request goes to the copy with the fewest "
        "unfinished requests as soon as one has room (a place in its batch, and KV room beside what it holds: a short "
        "request does not wait behind a long one while another copy could take it). --num-threads, "
        "--forward-threads and --sampling-tile-bytes apply to each copy. Unlike "
        "--forward-threads row groups, processes do not take turns at Python's GIL between operators. A "
        "request's tokens do not depend on its copy (batch invariance). Refused on CUDA.")
    quantization: str = setting(
        "none", "Weight-only quantization of the MoE experts (most of DiffusionGemma's weights) at load time, "
        "through torchao: none, fp8-experts (float8 e4m3 + a scale per row) or int8-experts (int8 + a scale and "
        "zero point per row); see engine.quantization. Other weights stay in --dtype (bfloat16 or float32). "
        "Needs torchao (the 'quant' extra). Leave it none for a checkpoint already quantized in the "
        "compressed-tensors format (e.g. RedHatAI's FP8-dynamic and NVFP4 DiffusionGemma): it loads as stored "
        "(docs/quantized-checkpoints.md).")
    experts_implementation: str | None = setting(
        None, "transformers' experts_implementation for the MoE layers. Another than the row-wise experts turns "
        "batch invariance off (they run a request's few tokens at an expert beside other requests'); with "
        "batch_invariant true it is refused.",
        default_text="row-wise with batch invariance (the CPU default), else grouped_mm (eager for float64; the "
                     "dequantized grouped_mm for quantized experts)", cli=False)

    def validate(self) -> None:
        """Raise ``ValueError`` with a clear message for any setting the engine cannot use."""
        if not isinstance(self.model, str) or not self.model:
            raise ValueError("model must be a local folder or a hub id")
        if self.dtype not in ("auto", *DTYPE_NAMES):
            raise ValueError(f"dtype must be one of auto, {', '.join(DTYPE_NAMES)} (got {self.dtype!r})")
        if not (self.device in ("auto", "cpu", "cuda") or (self.device.startswith("cuda:") and self.device[5:].isdigit())):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N (got {self.device!r})")
        positive = {
            "max_num_seqs": self.max_num_seqs,
            "max_encoder_tokens": self.max_encoder_tokens,
            "max_images_per_prompt": self.max_images_per_prompt,
            "sampling_tile_bytes": self.sampling_tile_bytes,
            "max_model_len": self.max_model_len,
            "max_num_kv_tokens": self.max_num_kv_tokens,
            "num_threads": self.num_threads,
            "forward_threads": self.forward_threads,
            "data_parallel_size": self.data_parallel_size,
        }
        for name, value in positive.items():
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"{name} must be a positive integer (got {value!r})")
        if self.trace_decoder and (self.device.startswith("cuda") or self.quantization != "none"):
            raise ValueError("trace_decoder is for CPU serving of unquantized experts (CUDA replays captured graphs; "
                             "quantized experts run grouped_mm)")
        if self.trace_decoder and self.batch_invariant is False:
            raise ValueError("trace_decoder needs batch invariance (its row-wise attention and experts): other "
                             "experts branch on the routing, which a trace would freeze")
        if self.data_parallel_size > 1 and self.device.startswith("cuda"):
            raise ValueError("data_parallel_size applies to CPU serving (a GPU runs one engine)")
        if self.batch_invariant and self.device.startswith("cuda") and self.sampler == "reference":
            raise ValueError("batch_invariant on CUDA needs --sampler fast: the reference sampler's softmax and "
                             "entropy reduce over the vocabulary with torch's kernels, whose order depends on the "
                             "batch")
        if self.batch_invariant and self.device.startswith("cuda") and self.dtype == "float64":
            raise ValueError("batch_invariant on CUDA runs bfloat16, float16 or float32, not float64")
        if self.batch_invariant and self.quantization != "none":
            raise ValueError("batch_invariant needs unquantized experts (quantized ones run grouped_mm)")
        if self.load_format not in LOAD_FORMATS:
            raise ValueError(f"load_format must be one of {', '.join(LOAD_FORMATS)} (got {self.load_format!r})")
        if self.load_format == "dummy" and self.quantization != "none":
            raise ValueError("load_format dummy builds unquantized weights: use quantization none")
        if self.sampler is not None and self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)} (got {self.sampler!r})")
        if self.quantization not in QUANTIZATION_METHODS:
            raise ValueError(f"quantization must be one of {', '.join(QUANTIZATION_METHODS)} (got {self.quantization!r})")
        if self.quantization != "none" and self.dtype not in ("auto", "bfloat16", "float32"):
            raise ValueError(f"quantization {self.quantization} needs dtype auto, bfloat16 or float32 (got {self.dtype!r})")
        if self.cuda_graph_max_batch is not None and (
                not isinstance(self.cuda_graph_max_batch, int) or isinstance(self.cuda_graph_max_batch, bool)
                or not 0 <= self.cuda_graph_max_batch <= self.max_num_seqs):
            raise ValueError(f"cuda_graph_max_batch must be an integer from 0 to max_num_seqs ({self.max_num_seqs}) "
                             f"(got {self.cuda_graph_max_batch!r})")
        if not isinstance(self.max_waiting, int) or self.max_waiting < 0:
            raise ValueError(f"max_waiting must be an integer >= 0 (got {self.max_waiting!r})")
        limit = self.device_memory_limit_gib
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, (int, float)) or not 0 < limit < float("inf")):
            raise ValueError(f"device_memory_limit_gib must be a positive number of GiB (got {limit!r})")
        if limit is not None and self.device == "cpu":
            raise ValueError("device_memory_limit_gib applies to CUDA devices (the device is cpu)")
        if not (isinstance(self.memory_fraction, (int, float)) and 0 < self.memory_fraction <= 1):
            raise ValueError(f"memory_fraction must be in (0, 1] (got {self.memory_fraction!r})")
