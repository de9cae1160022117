"""Load a DiffusionGemma checkpoint, its tokenizer, its generation defaults and (when it has one) its
image processor through transformers."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace

import torch

from . import batch_invariant_ops, compressed_tensors, rowwise_attention, rowwise_experts
from .errors import CheckpointError, SettingsError
from .import_noise import quiet_torchao_import_noise
from .multimodal import load_processor
from .quantization import DEQUANTIZED_EXPERTS, quantization_config, register_dequantized_experts
from .sampling_params import SamplingParams
from .settings import DTYPE_NAMES, DUMMY_SEED, EngineSettings

_DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}
NVIDIA_DRIVER = "/proc/driver/nvidia/version"  # present where an NVIDIA kernel driver is loaded

logger = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def unused_gpu_note(driver_file: str) -> str | None:
    """Why ``device auto`` chose the CPU of a machine with an NVIDIA driver (``driver_file`` exists), or
    None (no driver, or torch can use the GPU): a CPU build of torch, or a CUDA build that sees no GPU."""
    if not os.path.exists(driver_file) or torch.cuda.is_available():
        return None
    if torch.version.cuda is None:
        return (f"this machine has an NVIDIA driver, but torch {torch.__version__} is a CPU build: install the "
                "CUDA build to serve on the GPU (docs/gpu.md), or pass --device cpu")
    return (f"this machine has an NVIDIA driver, but torch {torch.__version__} (CUDA {torch.version.cuda}) finds "
            "no GPU it can use: CUDA_VISIBLE_DEVICES may hide them, the container may lack access to them, or the "
            f"driver may not support CUDA {torch.version.cuda} (nvidia-smi shows the newest CUDA version it "
            "supports); or pass --device cpu")


def check_device(device: torch.device) -> None:
    """Refuse, in one line and before anything is read or downloaded, a CUDA device torch cannot use."""
    if device.type != "cuda":
        return
    if not torch.cuda.is_available():
        why = unused_gpu_note(NVIDIA_DRIVER) or (
            f"torch {torch.__version__} finds no CUDA GPU here"
            + (" (it is a CPU build)" if torch.version.cuda is None else "") + "; pass --device cpu")
        raise SettingsError(f"device {device}: {why}")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise SettingsError(f"device {device}: torch finds {torch.cuda.device_count()} CUDA GPU(s), numbered from 0")


_limited_devices: set[torch.device] = set()


def limit_memory(device: torch.device, limit_gib: float | None) -> None:
    """Cap this process's memory on a CUDA ``device`` at ``limit_gib`` before anything is loaded
    (``device_memory_limit_gib``; the plan reads the cap back in ``memory.available_bytes``). The cap
    is torch's, for the whole process: a later load without a limit lifts the one set here."""
    if limit_gib is None:
        if device in _limited_devices:
            torch.cuda.set_per_process_memory_fraction(1.0, device)
            _limited_devices.discard(device)
        return
    if device.type != "cuda":
        raise ValueError(f"device_memory_limit_gib applies to CUDA devices (the device is {device.type})")
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, limit_gib * 2**30 / total), device)
    _limited_devices.add(device)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of auto, {', '.join(_DTYPES)}")
    return _DTYPES[name]


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    defaults: SamplingParams
    device: torch.device
    dtype: torch.dtype
    quantization: str = "none"  # engine.quantization method the weights were loaded with
    batch_invariant: bool = False  # rows computed independently of their batch (rowwise_attention, rowwise_experts)
    processor: object | None = None  # images and text to model inputs (engine.multimodal); None: text only

    @property
    def dequantized_experts(self) -> bool:
        """Whether quantized experts are dequantized a layer at a time on each call (a transient the
        memory plan reserves): torchao's 8-bit experts under ``DEQUANTIZED_EXPERTS`` (not transformers'
        eager loop over their tensors), and compressed-tensors experts off the FP8 GPU path."""
        if self.quantization in compressed_tensors.METHOD_NAMES.values():  # off the FP8 GPU path
            experts = [m for m in self.model.modules() if isinstance(m, compressed_tensors.compressed_experts_class())]
            return not all(compressed_tensors.runs_fp8_gemm(e, self.device) for e in experts)
        return self.quantization != "none" and \
            self.model.config.get_text_config()._experts_implementation == DEQUANTIZED_EXPERTS


def defaults_from_generation_config(gen, canvas_length: int) -> SamplingParams:
    """The checkpoint's generation config as fully resolved ``SamplingParams``.

    Unset fields take transformers' own global defaults (``_get_default_generation_params``).
    """
    from transformers.models.diffusion_gemma.generation_diffusion_gemma import DiffusionGemmaGenerationConfig

    fallback = DiffusionGemmaGenerationConfig._get_default_generation_params()

    def pick(name):
        value = getattr(gen, name, None)
        return fallback.get(name) if value is None else value

    sampler = getattr(gen, "sampler_config", None) or fallback["sampler_config"]
    eos = getattr(gen, "eos_token_id", None)
    eos_ids = () if eos is None else tuple(eos) if isinstance(eos, (list, tuple)) else (eos,)
    return SamplingParams(
        max_tokens=pick("max_new_tokens") or canvas_length,
        eos_token_ids=eos_ids,
        max_denoising_steps=pick("max_denoising_steps"),
        entropy_bound=float(sampler.entropy_bound),
        t_min=float(pick("t_min")),
        t_max=float(pick("t_max")),
        stability_threshold=int(pick("stability_threshold")),
        confidence_threshold=float(pick("confidence_threshold")),
    )


def _dummy_model(path: str, device: torch.device, kwargs: dict):
    """``load_format=dummy``: the folder's config with random weights, initialised on ``device``
    (no weight file is read or needed), and its generation config when it has one."""
    from transformers import AutoConfig, DiffusionGemmaForBlockDiffusion
    from transformers.models.diffusion_gemma.generation_diffusion_gemma import DiffusionGemmaGenerationConfig

    config = AutoConfig.from_pretrained(path)
    # the same weights in every process (engine replicas, a benchmark's baselines), without moving
    # the caller's random state
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(DUMMY_SEED)
        with torch.device(device):
            model = DiffusionGemmaForBlockDiffusion._from_config(config, **kwargs)
    try:
        model.generation_config = DiffusionGemmaGenerationConfig.from_pretrained(path)
    except OSError:
        pass  # transformers' defaults
    return model


def local_folder(model: str) -> str:
    """``model`` as transformers must be given it: a folder in a home directory (``~/...``) expanded, which it
    would read as a hub id. Refuses, in one line, a ``model`` that names a local folder (an absolute path, one
    starting with ``./``, ``../`` or ``~``, or one that exists) without a checkpoint there, which transformers
    would answer with a hub id's rules."""
    path = os.path.expanduser(model)
    if not (model.startswith(("/", "./", "../", "~")) or os.path.exists(path)):
        return model  # a hub id
    if not os.path.isdir(path):
        raise CheckpointError(f"{model}: no such folder (a local checkpoint folder, or a hub id such as org/name)")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise CheckpointError(f"{model}: no config.json in this folder (a checkpoint folder holds config.json and "
                              "the weights)")
    return path


def load_model(settings: EngineSettings) -> LoadedModel:
    """Load model + tokenizer with transformers' ``from_pretrained`` (local folder or hub id)."""
    settings = replace(settings, model=local_folder(settings.model))  # before any other work: a bad path is one line
    quiet_torchao_import_noise()
    device = resolve_device(settings.device)
    check_device(device)
    note = unused_gpu_note(NVIDIA_DRIVER) if settings.device == "auto" and device.type == "cpu" else None
    if note is not None:
        logger.warning("serving on the CPU: %s", note)
    dtype = resolve_dtype(settings.dtype, device)
    limit_memory(device, settings.device_memory_limit_gib)
    from transformers import DiffusionGemmaForBlockDiffusion

    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(settings.model)  # before any weight is read: what it refuses costs nothing
    check_tokenizer_files(settings.model)
    trained = config.get_text_config().max_position_embeddings
    if settings.max_model_len is not None and settings.max_model_len > trained:
        raise SettingsError(f"max_model_len {settings.max_model_len} is over the model's context of {trained} "
                            "tokens (max_position_embeddings): positions past it were never trained")
    compressed = _compressed_config(settings, config, device)  # quantized by LLM Compressor, or None
    if compressed is not None and settings.trace_decoder:
        raise SettingsError("trace_decoder cannot record this checkpoint's quantized experts (compressed-tensors): "
                            "they dequantize in loops over their sizes on every call")
    invariant = settings.batch_invariant
    if invariant is None:
        invariant = device.type == "cpu" and settings.quantization == "none"
    experts = settings.experts_implementation
    if invariant and experts not in (None, rowwise_experts.ROWWISE_EXPERTS):
        # transformers' experts run a request's few tokens at an expert with other requests' tokens
        if settings.batch_invariant:
            raise SettingsError(f"batch_invariant needs the engine's row-wise experts: experts_implementation "
                                f"{experts!r} would make a row's logits depend on its batch (leave "
                                "experts_implementation unset, or set batch_invariant false)")
        logger.warning("experts_implementation %r: batch invariance is off (it needs the row-wise experts)", experts)
        invariant = False
    if invariant and device.type == "cuda":
        if dtype not in batch_invariant_ops.SUPPORTED_DTYPES:
            raise SettingsError(f"batch_invariant on CUDA runs bfloat16, float16 or float32, not {dtype}")
        if compressed is not None:
            raise SettingsError("batch_invariant on CUDA needs unquantized weights: this checkpoint is "
                                "compressed-tensors (its FP8 products do not go through the batch-invariant "
                                "kernels)")
        # fixed-order matrix products and means in place of cuBLAS's and torch's (engine.batch_invariant_ops)
        batch_invariant_ops.enable("CUDA")
    if experts == rowwise_experts.ROWWISE_EXPERTS or (experts is None and invariant):
        # a token's result must not depend on how many tokens share its expert (rowwise_experts);
        # grouped_mm has no float64 kernel anyway
        rowwise_experts.register()
        experts = rowwise_experts.ROWWISE_EXPERTS
    elif experts is None and dtype == torch.float64:
        experts = "eager"  # grouped_mm has no float64 kernel
    elif experts is None and settings.quantization != "none":
        experts = DEQUANTIZED_EXPERTS  # grouped_mm over each layer's experts dequantized whole
    if experts == DEQUANTIZED_EXPERTS:
        register_dequantized_experts()
    # batch invariance: row-wise attention over unpadded keys, so a row's logits do not depend on its batch
    attention = "sdpa"
    if invariant:
        rowwise_attention.register()
        attention = rowwise_attention.ROWWISE_SDPA
    kwargs = dict(dtype=dtype, attn_implementation=attention)
    quantization = quantization_config(settings.quantization)
    if quantization is not None:
        kwargs["quantization_config"] = quantization
    if experts is not None:
        kwargs["experts_implementation"] = experts
    method = settings.quantization
    dummy = settings.load_format == "dummy"
    if compressed is not None:  # a checkpoint quantized by LLM Compressor (engine.compressed_tensors)
        model, method = compressed_tensors.load_compressed_model(settings.model, compressed, kwargs, device, dummy,
                                                                 settings.fp8_gemm)
    elif dummy:
        model = _dummy_model(settings.model, device, kwargs)
    else:
        if device.type != "cpu":
            kwargs["device_map"] = str(device)  # load straight onto the accelerator (via accelerate), no host copy
        # mismatched shapes come back in the loading info (refused below) rather than as a bare RuntimeError
        model, info = DiffusionGemmaForBlockDiffusion.from_pretrained(
            settings.model, output_loading_info=True, ignore_mismatched_sizes=True, **kwargs)
        refuse_incomplete(settings.model, info)
    model.to(device)  # a no-op when device_map already placed it
    model.eval()
    model.requires_grad_(False)
    tokenizer, processor = load_tokenizer(settings.model, model.config)
    defaults = defaults_from_generation_config(model.generation_config, model.config.canvas_length)
    return LoadedModel(model=model, tokenizer=tokenizer, defaults=defaults, device=device, dtype=dtype,
                       quantization=method, batch_invariant=invariant, processor=processor)


def refuse_incomplete(folder: str, info: dict) -> None:
    """Raise ``CheckpointError`` where transformers' load left a weight uninitialised: it fills a tensor the
    checkpoint lacks (or holds in another shape) with random values, and only warns."""
    problems = [f"has no tensor {name}" for name in sorted(info.get("missing_keys") or ())]
    problems += [f"holds {name} in shape {list(found)}, expected {list(expected)}"
                 for name, found, expected in sorted(info.get("mismatched_keys") or ())]
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise CheckpointError(f"the checkpoint {folder} {problems[0]}{more}: the model would run with it uninitialised")


# A local checkpoint's tokenizer is in one of these (without one, transformers builds an empty tokenizer of
# a few special tokens, and every prompt would be one unknown token).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")


def check_tokenizer_files(path: str) -> None:
    """Refuse, in one line and before any weight is read, a local checkpoint folder with no tokenizer."""
    if os.path.isdir(path) and not any(os.path.isfile(os.path.join(path, f)) for f in TOKENIZER_FILES):
        raise CheckpointError(f"{path}: no tokenizer in this folder (one of {', '.join(TOKENIZER_FILES)})")


def load_tokenizer(path: str, config) -> tuple[object, object | None]:
    """The checkpoint's tokenizer, and its image processor (None: the checkpoint takes no images)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)  # its files were checked by load_model
    return tokenizer, load_processor(path, tokenizer, config)


def refuse_unknown_quantization(folder: str, config, device_map: str | None = None) -> None:
    """Raise ``CheckpointError`` for a ``quantization_config`` that transformers does not know: it would skip
    the quantization with a warning and load the quantized tensors as if they were plain weights. Known or
    not is transformers' own test (bitsandbytes, for one, is named by its load_in_4bit / load_in_8bit); a
    known one whose backend is missing here (a package, a GPU) is refused in one line too, checked for
    ``device_map`` as the load will pass it (None on CPU)."""
    from transformers.quantizers.auto import AutoHfQuantizer

    qc = compressed_tensors.quantization_config_dict(config)
    if qc is None:
        return
    method = qc.get("quant_method")
    method = getattr(method, "value", method)  # transformers' QuantizationMethod enum
    try:
        known = AutoHfQuantizer.supports_quant_method(qc)
    except ValueError:  # no quant_method at all
        known = False
    if not known:
        raise CheckpointError(f"the checkpoint {folder} is quantized with {method!r}, which neither this server "
                              f"(compressed-tensors) nor transformers can load")
    try:  # transformers' own check of its backend (a package, a GPU), before any weight is read
        quantizer = AutoHfQuantizer.from_config(qc, pre_quantized=True)
        quantizer.validate_environment(device_map=device_map, weights_only=True)
    except (ImportError, RuntimeError, AssertionError, TypeError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"the checkpoint {folder} is quantized with {method!r}, which transformers cannot "
                              f"load here: {reason}") from None


def _compressed_config(settings: EngineSettings, config, device: torch.device):
    """The checkpoint's ``config`` when it is quantized in the compressed-tensors format, else None."""
    if compressed_tensors.compressed_config(config) is None:
        refuse_unknown_quantization(settings.model, config, None if device.type == "cpu" else str(device))
        return None
    if settings.quantization != "none":
        raise CheckpointError(
            f"{settings.model} is already quantized (compressed-tensors): drop --quantization {settings.quantization}")
    return config
