"""Fused GPU kernels for the decode path (Triton), each with a torch reference it is tested against.

- `router`: DeepSeek-V3 noaux_tc routing (fp32 logits, sigmoid, correction bias, group top-k, top-k,
  weights) in two kernels;
- `mla_prep`: kv_a RMSNorm + rope of q and k + latent-cache write in one kernel;
- `norm`: residual add + RMSNorm in one kernel (a decoder layer's adds and norms);
- `moe_gemm`: expert sorting without a sort, grouped SwiGLU and down GEMMs for small M over bf16 or
  FP8 block-scaled weights, and the same kernels as a dense linear for FP8-resident weights
  (split-K for small dense launches). Its tilings live in `moe_gemm.choose_tiles`, the MLA decode
  kernel's in `mla_decode.decode_config`, both chosen with `scripts/gpu_kernels.py` on an H200.
- `moe_prefill` (prefill sizes): the SwiGLU pass after a [gate; up] GEMM and the routed experts'
  weighted combine around `torch._grouped_mm` (its docstring says why Triton rather than Inductor);
- `moe_sort` (prefill sizes): the routed pairs' stable counting sort, group ends and x gather in three kernels.

Why Triton and not torch.compile here: the router's group/top-k selection and the expert sort are
data-dependent selections that Inductor lowers to several kernels (and a radix sort); the rest are
fusions across a GEMM epilogue or a scattered cache write that Inductor does not form. Every kernel
runs under Triton's CPU interpreter (TRITON_INTERPRET=1), which is how CI checks them.
"""
from __future__ import annotations

import functools
import os

from dynamo_dwdp.errors import UserError


@functools.cache
def available() -> bool:
    """Triton importable (GPU) and not switched off with DWDP_FUSED_KERNELS=0."""
    if os.environ.get("DWDP_FUSED_KERNELS", "1") == "0":
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def env_count(name: str, default: int) -> int:
    """A whole number >= 0 from the environment variable `name` (unset or empty: `default`); anything else
    is refused with a one-line error naming the variable."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    if not raw.isdigit():
        raise UserError(f"{name}={raw!r}: expected a whole number >= 0 (0 turns it off)")
    return int(raw)


def env_choice(name: str, choices: tuple[str, ...]) -> str:
    """One of `choices` from the environment variable `name` (unset or empty: the first); anything else is
    refused with a one-line error naming the variable."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return choices[0]
    if raw not in choices:
        raise UserError(f"{name}={raw!r}: expected one of {', '.join(choices)}")
    return raw


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


@functools.cache
def sm_count(device) -> int:
    """Multiprocessors of a CUDA device (8 for the CPU interpreter)."""
    import torch

    dev = torch.device(device)
    return torch.cuda.get_device_properties(dev).multi_processor_count if dev.type == "cuda" else 8
