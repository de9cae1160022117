"""Memory arithmetic from a model config: KV and state bytes per request, the sampling transient,
and the KV token budget derived from free memory at start-up."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import cgroups
from .kv_budget import kv_tokens_needed
from .quantization import expert_dequant_bytes


# sampling_tile_bytes=None (the default) picks the tile budget from the memory free after the weights,
# so that whole canvas rows fit where memory allows. A row chunked into position slices re-reads the
# lm head and the embedding matrix (vocab x hidden, 1.5 GB in bf16 for DiffusionGemma) once per slice,
# where whole rows read each once per tile.
SAMPLING_TILE_FRACTION = 0.10
SAMPLING_TILE_MIN_BYTES = 512 * 2**20
SAMPLING_TILE_MAX_BYTES = 8 * 2**30


def auto_sampling_tile_bytes(free_bytes: int) -> int:
    """The default sampling tile budget: ``SAMPLING_TILE_FRACTION`` of the memory free after the
    weights (accelerator memory, or the host's available memory on CPU), within
    [``SAMPLING_TILE_MIN_BYTES``, ``SAMPLING_TILE_MAX_BYTES``]."""
    share = int(free_bytes * SAMPLING_TILE_FRACTION)
    return max(SAMPLING_TILE_MIN_BYTES, min(SAMPLING_TILE_MAX_BYTES, share))


@dataclass(frozen=True)
class MemoryPlan:
    kv_bytes_per_token: int  # full-attention layers, per committed token
    attention_bytes_per_token: int  # beside the KV, the most one full-attention layer's attention holds (plan_memory)
    sliding_kv_bytes_per_request: int  # sliding layers hold at most window-1 tokens
    state_bytes_per_request: int  # canvas, soft embeddings, argmax history
    sampling_transient_bytes: int  # largest transient of one sampling tile
    decoder_transient_bytes: int  # one layer's activations: decoder batch or encoder call, or both (plan_memory)
    expert_dequant_bytes: int = 0  # one layer's 8-bit experts dequantized (engine.quantization), 0 unquantized

    def per_request_bytes(self, tokens: int) -> int:
        """KV and state of one request of ``tokens`` tokens, plus its share of the per-layer transients
        of attention (``attention_bytes_per_token``)."""
        return (tokens * (self.kv_bytes_per_token + self.attention_bytes_per_token)
                + 2 * self.sliding_kv_bytes_per_request + self.state_bytes_per_request)


def activation_bytes_per_token(text_config, elem: int) -> int:
    """The most activation memory one token holds inside a layer: the dense MLP's (gate, up, their product
    and the output), or the MoE block's, which keeps for each of the token's ``top_k`` experts its gathered
    input and its output in the weights' dtype and, weighted by the float32 routing weights, two float32
    copies (transformers' grouped_mm experts)."""
    hidden = text_config.hidden_size
    dense = 4 * max(text_config.intermediate_size, hidden) * elem
    top_k = getattr(text_config, "top_k_experts", None) or 0
    # beside the experts the layer holds the dense MLP's output, its normed copy, the residual and the
    # experts' normed input: four more hidden vectors
    moe = top_k * hidden * (2 * elem + 2 * 4) + 4 * hidden * elem if top_k else 0
    return max(dense, moe)


def attention_copies(num_attention_heads: int, num_key_value_heads: int) -> int:
    """Copies of one layer's K and V that its attention holds beside the cache, per token slot, as an
    upper bound: the [KV ; new] (decoder: [KV ; canvas]) concatenation; where query heads share KV heads,
    K and V repeated to every query head (transformers' sdpa does that whenever a mask is given or the
    head is wider than 256, as DiffusionGemma's full-attention layers are); and one more layer's worth
    for what sits beside them at some point (the encoder's gathered rows, the new tokens' columns, the
    mask)."""
    groups = num_attention_heads // num_key_value_heads
    return 2 + (groups if groups > 1 else 0)


def plan_memory(text_config, canvas_length: int, dtype: torch.dtype, *, sampling_transient_bytes: int, max_num_seqs: int,
                dequantized_experts: bool = False, expert_copies: int = 1,
                max_encoder_tokens: int = 0, encoder_beside_decoder: bool = False) -> MemoryPlan:
    """``expert_copies``: how many forwards may hold a layer's dequantized experts at once (on CPU, one
    per row group running side by side: ``ModelRunner.forward_threads``). The activations are one layer's
    over the larger of a full decoder batch and an encoder call (``max_encoder_tokens``), or over both
    where decoder rows run beside the encoder (``encoder_beside_decoder``: a traced CPU pass). Attention
    works on one layer at a time: each token slot is counted with the most ``attention_copies`` of a
    full-attention layer; sliding-window layers with twice their KV per row."""
    elem = torch.finfo(dtype).bits // 8
    full = sliding = attention = 0
    for i, layer_type in enumerate(text_config.layer_types):
        cfg = text_config.per_layer_config[i]
        per_token = 2 * cfg.num_key_value_heads * cfg.head_dim * elem  # K and V
        if layer_type == "sliding_attention":
            sliding += per_token * (text_config.sliding_window - 1)
        else:
            full += per_token
            attention = max(attention, per_token * attention_copies(cfg.num_attention_heads, cfg.num_key_value_heads))
    hidden = text_config.hidden_size
    state = canvas_length * 8 + canvas_length * hidden * elem + canvas_length * 8  # + the canvas's last draft
    decoder = max_num_seqs * canvas_length
    tokens = decoder + max_encoder_tokens if encoder_beside_decoder else max(decoder, max_encoder_tokens)
    activations = tokens * activation_bytes_per_token(text_config, elem)
    dequant = expert_copies * expert_dequant_bytes(text_config, elem) if dequantized_experts else 0
    return MemoryPlan(full, attention, sliding, state, sampling_transient_bytes, activations, dequant)


MEMINFO = "/proc/meminfo"


def available_bytes(device: torch.device, *, meminfo: str = MEMINFO, cgroup_root: str = cgroups.CGROUP_ROOT,
                    proc_cgroup: str = cgroups.PROC_CGROUP) -> int:
    """Memory this process may still allocate on ``device``: the GPU's free memory, within the process's
    cap where one is set (``device_memory_limit_gib``); on CPU the host's available memory, within its
    cgroups' memory limit where one is set (``engine.cgroups``: a container's, which the host's figure does
    not show)."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        fraction = torch.cuda.get_per_process_memory_fraction(device)
        if fraction < 1:  # what is left under the cap, the allocator's cache counted as used
            free = min(free, int(total * fraction) - torch.cuda.memory_reserved(device))
        return max(0, int(free))
    host = 8 * 2**30
    try:
        with open(meminfo) as fh:
            host = next(int(line.split()[1]) * 1024 for line in fh if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        pass
    limited = cgroups.memory_available(cgroup_root, proc_cgroup)
    return host if limited is None else min(host, limited)


def derive_kv_budget(plan: MemoryPlan, device: torch.device, *, fraction: float, max_num_seqs: int,
                     max_model_len: int) -> int:
    """KV token slots for all running requests together, from free memory now (after weights).

    The scheduler spends them on the runner's slot buffers (``engine.kv_budget``: the next power of
    two of the running count, times the longest reservation), which the decoder reads in place.
    Besides the buffers, attention works one layer at a time on copies of it (``attention_copies``), so
    every token slot is counted with ``attention_bytes_per_token`` more; sliding-window layers count
    twice. Reallocating the buffers swaps them layer by layer."""
    usable = int(available_bytes(device) * fraction)
    usable -= plan.sampling_transient_bytes + plan.decoder_transient_bytes + plan.expert_dequant_bytes
    usable -= 2 * max_num_seqs * plan.sliding_kv_bytes_per_request + max_num_seqs * plan.state_bytes_per_request
    tokens = usable // max(1, plan.kv_bytes_per_token + plan.attention_bytes_per_token)
    most = kv_tokens_needed([max_model_len] * max_num_seqs, max_num_seqs)  # every row at the longest
    return int(max(0, min(tokens, most)))
