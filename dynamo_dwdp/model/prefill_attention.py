"""MLA prefill attention: which kernel runs a prefill chunk, and the expanded form they share.

A prefill chunk of q new tokens after c - q cached ones attends in the *expanded* form: each cached
latent is expanded through kv_b_proj into every head's k_nope and value (one GEMM over the chunk's
context), the rotated shared key k_pe joins every head, and query position c - q + i sees keys
0..c - q + i (bottom-right causal). Implementations of one sequence's attention (`attend`):

- "triton": the flash-attention kernel of `kernels/mla_prefill.py` (q and k in their nope/rope
  parts, k_pe read once for all heads, no concatenation or per-head copy);
- "cudnn": torch SDPA with the cuDNN backend chosen explicitly (q/k 192, v 128);
- "flash_pad": torch SDPA's flash backend with v zero-padded to the q/k head dim (flash needs equal
  dims), the padding sliced off the output;
- "sdpa": torch SDPA's own choice (the memory-efficient kernel for these dims).
The SDPA ones fall back to the memory-efficient kernel for chunks after cached tokens (bottom-right
causal), which only that kernel takes without a materialised mask.

`DWDP_PREFILL_ATTENTION` (read per call) picks one on CUDA. The default there, for 16-bit inputs, is
"triton" (with Triton; "sdpa" without, and for fp32, whose SDPA path is the exact math reference):
served prompts have a new length almost every time, and torch's SDPA runs these head dims on cuDNN,
which builds an execution graph for every new (query, key) length. On one H200 a prefill step of
about 15K tokens of prompts 1K-8K long spent ~0.43 s of host time in its launch that way, and ~0.12 s
with the Triton kernel, whose GPU span was ~0.18 s (the same workload through the engine alone:
docs/performance.md, "Serving on one H200", 2026-12-02). The kernel is compiled once for every length
(`warm_up`, at start-up; $DWDP_PREFILL_TILE picks another of its tiles, for measurements). In
scripts/gpu_prefill.py's timings on one H200 (docs/results/gpu_prefill_tiles_h200_2026-12-02.md, two
rounds) it runs a fresh causal 8K prompt in 0.732 / 0.735 ms per layer against cuDNN's 0.801 / 0.801,
a causal 16K one in 2.645 / 2.606 ms against 2.445 / 2.560, and a 2K chunk after 6K cached tokens in
0.358 / 0.345 ms against SDPA's memory-efficient kernel's 1.241 / 1.242.
"""
from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right

from dynamo_dwdp.errors import UserError
from dynamo_dwdp.model import kernels as fused_kernels
from dynamo_dwdp.model.batch import ForwardBatch
from dynamo_dwdp.model.kernels import mla_prefill

IMPLS = ("triton", "cudnn", "flash_pad", "sdpa")
ENV = "DWDP_PREFILL_ATTENTION"
log = logging.getLogger(__name__)
_triton_failed: str | None = None      # set by `warm_up` when the kernel does not build here: SDPA by default


def impl_for(x: torch.Tensor) -> str:
    """The implementation a prefill chunk on x's device runs: $DWDP_PREFILL_ATTENTION on CUDA
    (default "triton" for 16-bit x where Triton is available, else "sdpa"); "sdpa" off CUDA."""
    want = os.environ.get(ENV, "")
    if want and want not in IMPLS:
        raise UserError(f"{ENV}={want!r} is not one of {', '.join(IMPLS)}")
    if not x.is_cuda:
        return "sdpa"
    if want == "triton" and not fused_kernels.available():
        raise UserError(f"{ENV}=triton needs Triton (not importable here, or DWDP_FUSED_KERNELS=0)")
    if want == "triton" and _triton_failed:
        raise UserError(f"{ENV}=triton: the kernel did not build on this GPU ({_triton_failed})")
    default_ok = fused_kernels.available() and x.dtype != torch.float32 and not _triton_failed
    impl = want or ("triton" if default_ok else "sdpa")
    if impl == "triton":
        try:
            mla_prefill.gpu_tile()          # $DWDP_PREFILL_TILE, if set, names one of the kernel's tiles
        except ValueError as exc:
            raise UserError(str(exc)) from None
    return impl


def warm_up(heads: int, nope: int, rope: int, v_dim: int, latent_dim: int, dtype: torch.dtype,
            device: torch.device) -> bool:
    """Compile the Triton kernel for this model's dims and dtype now (engine start-up), in the layouts
    the engine passes (`expanded_prefill_attention`: k_nope and v views of one expansion, k_pe a view
    of the gathered cache rows), so that no prompt waits for a compile. True if the kernel ran. A kernel
    that does not build here (a GPU whose shared memory the tile exceeds, a Triton without this target)
    is logged and the default becomes SDPA for this process; an explicit $DWDP_PREFILL_ATTENTION=triton
    is then refused with that reason."""
    global _triton_failed
    if impl_for(torch.empty(0, dtype=dtype, device=device)) != "triton":
        return False
    T = 2
    q_nope = torch.zeros(T, heads, nope + rope, dtype=dtype, device=device)[..., :nope]
    q_pe = torch.zeros(T, heads, rope, dtype=dtype, device=device)
    kv = torch.zeros(T, heads, nope + v_dim, dtype=dtype, device=device)
    k_pe = torch.zeros(T, latent_dim + rope, dtype=dtype, device=device)[:, latent_dim:]
    try:
        mla_prefill.mla_prefill_attention(q_nope, q_pe, kv[..., :nope], k_pe, kv[..., nope:], 1.0)
    except Exception as exc:        # the kernel's compile or launch failed: fall back, and say why
        first = str(exc).splitlines()[0][:200] if str(exc) else ""
        _triton_failed = f"{type(exc).__name__}: {first}"
        log.warning("prefill attention: the Triton kernel did not build (%s); SDPA runs prefill attention",
                    _triton_failed)
        return False
    return True


def attend(impl: str, q_nope: torch.Tensor, q_pe: torch.Tensor, k_nope: torch.Tensor, k_pe: torch.Tensor,
           v: torch.Tensor, scale: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """One sequence: q_nope [T, h, N], q_pe [T, h, R], k_nope [S, h, N], k_pe [S, R], v [S, h, V]
    -> [T, h, V]; the T queries are the last T of S positions (bottom-right causal). `out` [T, h, V]:
    the result is written there (the Triton kernel writes it directly, no copy) and returned."""
    if impl == "triton":
        return mla_prefill.mla_prefill_attention(q_nope, q_pe, k_nope, k_pe, v, scale, out=out)
    if impl not in IMPLS:
        raise UserError(f"prefill attention {impl!r} is not one of {', '.join(IMPLS)}")
    T, h, _ = q_nope.shape
    S, v_dim = k_nope.shape[0], v.shape[-1]
    q = torch.cat([q_nope, q_pe], dim=-1).transpose(0, 1).unsqueeze(0)                      # [1, h, T, N+R]
    k = torch.cat([k_nope, k_pe.unsqueeze(1).expand(S, h, k_pe.shape[-1])], dim=-1).transpose(0, 1).unsqueeze(0)
    vv = v.transpose(0, 1).unsqueeze(0)                                                      # [1, h, S, V]
    causal = T == S
    if impl == "flash_pad" and causal:
        vv = F.pad(vv, (0, q.shape[-1] - v_dim))
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            o = F.scaled_dot_product_attention(q, k, vv, is_causal=True, scale=scale)[..., :v_dim]
    elif impl == "cudnn" and causal:
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            o = F.scaled_dot_product_attention(q, k, vv, is_causal=True, scale=scale)
    elif causal:
        o = F.scaled_dot_product_attention(q, k, vv, is_causal=True, scale=scale)
    else:
        o = F.scaled_dot_product_attention(q, k, vv, attn_mask=causal_lower_right(T, S), scale=scale)
    o = o[0].transpose(0, 1)
    return o if out is None else out.copy_(o)


def cached_sequences(batch: ForwardBatch, kv_layer: torch.Tensor, latent_dim: int, dtype: torch.dtype):
    """Each sequence of the batch that has new tokens: (its rows of the batch's queries, its cached
    latents [ctx, C], its rotated shared keys k_pe [ctx, R]), gathered by block table, in `dtype`.
    ctx counts the cached and the new tokens (the new ones' cache rows are written before attention)."""
    bs = kv_layer.shape[1]
    start = 0
    for b, q_len in enumerate(batch.query_lens):
        ctx = batch.context_lens_list[b]
        rows = slice(start, start + q_len)
        start += q_len
        if q_len == 0:
            continue
        n_blocks = (ctx + bs - 1) // bs
        lat = kv_layer[batch.block_tables[b, :n_blocks]].reshape(n_blocks * bs, -1)[:ctx]
        yield rows, lat[:, :latent_dim].to(dtype), lat[:, latent_dim:].to(dtype)


def expanded_prefill_attention(impl: str, q_nope: torch.Tensor, q_pe: torch.Tensor, batch: ForwardBatch,
                               kv_layer: torch.Tensor, w_kv_b: torch.Tensor, scale: float) -> torch.Tensor:
    """Every sequence of the batch with new tokens, one at a time: gather its cached [latent | k_pe]
    rows by block table, expand the latents through w_kv_b [h, N+V, C] in one GEMM (k_nope and v are
    strided views of its output), attend with `impl`. q_nope [T, h, N], q_pe [T, h, R] -> [T, h, V]."""
    T, h, N = q_nope.shape
    C = w_kv_b.shape[-1]
    v_dim = w_kv_b.shape[1] - N
    w = w_kv_b.reshape(h * (N + v_dim), C)
    out = q_nope.new_empty(T, h, v_dim)
    for rows, latent, k_pe in cached_sequences(batch, kv_layer, C, q_nope.dtype):
        kv = (latent @ w.t()).view(latent.shape[0], h, N + v_dim)
        attend(impl, q_nope[rows], q_pe[rows], kv[..., :N], k_pe, kv[..., N:], scale, out=out[rows])
    return out
