"""Will one rank's weights plus its KV cache fit its device? Checked before anything is loaded.

`rank_memory` estimates what a rank of a strategy holds (in the engine dtype: FP8 checkpoints are
dequantized at load), `check_memory_fit` compares it with the device's free memory (CUDA:
`mem_get_info`; CPU: MemAvailable) and refuses in one line that says what would fit: the smallest
group of the same strategy, or the most KV blocks at this size. Activations and the CUDA context are
not counted, so a run the check lets through can still run out of memory with a tight margin.

What a rank holds (E experts per MoE layer, N ranks, L = DWDP experts per rank):
  single / dp   every tensor
  dwdp          every non-expert tensor; L experts per layer; two prefetch slots of E - L experts
  dep           every non-expert tensor; ceil(E / N) experts per layer
  tp            embeddings and lm_head whole, the other non-expert tensors and all experts / N
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from dynamo_dwdp.errors import UserError
from dynamo_dwdp.model.config import ModelConfig

SKIP_ENV = "DWDP_SKIP_MEMORY_CHECK"


@dataclass(frozen=True)
class RankMemory:
    weights: int
    kv_cache: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache


def _element_counts(cfg: ModelConfig) -> tuple[int, int, int]:
    """(embedding + lm_head elements, other non-expert elements, elements of one routed expert): the
    tensors of the official layout (the loader's names), counted from the config."""
    H, V, heads = cfg.hidden_size, cfg.vocab_size, cfg.num_attention_heads
    nope, rope, v, kv = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
    q_out = heads * (nope + rope)
    if cfg.q_lora_rank is None:
        attn = q_out * H
    else:
        attn = cfg.q_lora_rank * H + cfg.q_lora_rank + q_out * cfg.q_lora_rank   # q_a, its norm, q_b
    attn += (kv + rope) * H + kv + heads * (nope + v) * kv + H * heads * v         # kv_a, its norm, kv_b, o
    other = H                                                                        # final norm
    for layer in range(cfg.num_hidden_layers):
        other += attn + 2 * H                                                        # + the two layer norms
        if cfg.is_moe_layer(layer):
            other += cfg.n_routed_experts * H + (cfg.n_routed_experts if cfg.uses_correction_bias else 0)
            other += 3 * H * cfg.moe_intermediate_size * cfg.n_shared_experts
        else:
            other += 3 * H * cfg.intermediate_size
    return 2 * V * H, other, 3 * cfg.hidden_size * cfg.moe_intermediate_size


def dwdp_default_experts_per_rank(experts: int, ranks: int) -> int:
    """L of the default DWDP placement (dwdp/placement.py: P = E // N, L = E - (N - 1) P)."""
    return experts - (ranks - 1) * (experts // ranks) if ranks > 1 else experts


def rank_memory(cfg: ModelConfig, strategy: str, ranks: int, dtype: torch.dtype, num_kv_blocks: int,
                block_size: int, experts_per_rank: int | None = None) -> RankMemory:
    """Bytes one rank of `strategy` x `ranks` holds (see the module docstring)."""
    size = torch.empty(0, dtype=dtype).element_size()
    replicated, other, per_expert = _element_counts(cfg)
    E, layers = cfg.n_routed_experts, len(cfg.moe_layers)
    if strategy == "dwdp" and ranks > 1:
        L = experts_per_rank or dwdp_default_experts_per_rank(E, ranks)
        experts = layers * L + min(2, layers) * (E - L)
        elems = replicated + other + experts * per_expert
    elif strategy == "dep":
        elems = replicated + other + layers * math.ceil(E / ranks) * per_expert
    elif strategy == "tp":
        elems = replicated + (other + layers * E * per_expert) // ranks
    else:
        elems = replicated + other + layers * E * per_expert
    kv = num_kv_blocks * cfg.num_hidden_layers * block_size * cfg.kv_cache_dim * size
    return RankMemory(weights=elems * size, kv_cache=kv)


def device_free_bytes(device: torch.device) -> int | None:
    """Free memory of `device` (CUDA), or the host's available memory (CPU); None if unknown."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


def check_memory_fit(cfg: ModelConfig, strategy: str, ranks: int, dtype: torch.dtype, num_kv_blocks: int,
                     block_size: int, device: torch.device, experts_per_rank: int | None = None,
                     capacity: int | None = None) -> RankMemory:
    """Raise `UserError` (one line) if a rank's weights + KV cache exceed `capacity` (default: what the
    device has free); the message says the smallest group of this strategy, or the KV blocks, that fit.
    Set DWDP_SKIP_MEMORY_CHECK=1 to skip it."""
    need = rank_memory(cfg, strategy, ranks, dtype, num_kv_blocks, block_size, experts_per_rank)
    if os.environ.get(SKIP_ENV) == "1":
        return need
    cap = device_free_bytes(device) if capacity is None else capacity
    if cap is None or need.total <= cap:
        return need
    hints = []
    if strategy in ("dwdp", "dep", "tp"):
        for n in range(ranks + 1, 8 * max(ranks, 8) + 1):
            if strategy == "tp" and (cfg.num_attention_heads % n or cfg.moe_intermediate_size % n):
                continue
            if rank_memory(cfg, strategy, n, dtype, num_kv_blocks, block_size).total <= cap:
                hints.append(f"{strategy} x{n}")
                break
    else:
        for alt in ("dwdp", "dep"):
            for n in range(2, 65):
                if rank_memory(cfg, alt, n, dtype, num_kv_blocks, block_size).total <= cap:
                    hints.append(f"{alt} x{n}")
                    break
    per_block = need.kv_cache // max(num_kv_blocks, 1)
    if need.weights < cap and per_block:
        hints.append(f"num_kv_blocks <= {(cap - need.weights) // per_block} at x{ranks}")
    fits = "; fits with " + " or ".join(hints) if hints else "; no group size up to 64 fits"
    raise UserError(f"memory: a {strategy} x{ranks} rank needs {_gib(need.total)} (weights {_gib(need.weights)} "
                    f"in {str(dtype).removeprefix('torch.')} + KV cache {_gib(need.kv_cache)}) but {device} has "
                    f"{_gib(cap)} free{fits} (set {SKIP_ENV}=1 to skip this check)")
