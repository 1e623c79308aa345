"""MLA input preparation in one Triton kernel: kv_a RMSNorm, rope of q and k, latent-cache write.

Contract (the torch reference is the first half of `MLAttention.forward`): given q [T, h, N+R]
(q_proj output), kv [T, C+R] (kv_a_proj_with_mqa output), the kv_a_layernorm weight [C], cos/sin
[T, R/2] (float32, from `RotaryEmbedding.cos_sin`), slot_mapping [T] and the layer's paged cache
[num_blocks, block_size, C+R]:
- writes cache[slot] = [rmsnorm(kv[:, :C]) * weight | rope(kv[:, C:])] in the cache's dtype;
- returns q_pe = rope(q[..., N:]) as a new [T, h, R] tensor (query's dtype), or written into
  `q_pe_out` when given: q[..., N:] itself for the prefill attention, which then reads q as the
  whole [T, h, N+R] query with no concatenation (one program per token reads the token's rope part,
  waits at a block barrier, then writes it: safe in place).
Rope follows `RotaryEmbedding.apply`: cos/sin rounded to the activations' dtype, interleaved pairs
(DeepSeek) or halves, the result written de-interleaved ([rotated evens | rotated odds]). The norm
and the rotation are computed in fp32 and rounded once.

Replaces ~25 small kernels per layer of the torch path (split/cast/multiply/concatenate for each of
q and k, the norm on a strided slice, index arithmetic, a concatenation and an index_put): one
program per token reads its row once and writes the cache row and q_pe once.
"""
from __future__ import annotations

import functools

import torch

from dynamo_dwdp.model.kernels import next_pow2


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def prep_kernel(Q, KV, NW, COS, SIN, SLOTS, CACHE, QPE,
                    stride_qt, stride_qh, stride_kvt, stride_cst, stride_cb, stride_ct,
                    stride_pt, stride_ph, H, eps,
                    N: tl.constexpr, C: tl.constexpr, HALF: tl.constexpr, HP: tl.constexpr, BS: tl.constexpr,
                    INTERLEAVE: tl.constexpr, IN_PLACE: tl.constexpr):
        t = tl.program_id(0)
        offs_c = tl.arange(0, C)
        offs_i = tl.arange(0, HALF)
        # cos/sin rounded to the activations' dtype first, as the torch path does
        c = tl.load(COS + t * stride_cst + offs_i).to(Q.dtype.element_ty).to(tl.float32)
        s = tl.load(SIN + t * stride_cst + offs_i).to(Q.dtype.element_ty).to(tl.float32)
        if INTERLEAVE:
            i1 = 2 * offs_i
            i2 = 2 * offs_i + 1
        else:
            i1 = offs_i
            i2 = offs_i + HALF
        # latent: RMSNorm (fp32), then the cache row
        lat = tl.load(KV + t * stride_kvt + offs_c).to(tl.float32)
        var = tl.sum(lat * lat, 0) / C
        w = tl.load(NW + offs_c).to(tl.float32)
        normed = (lat * tl.rsqrt(var + eps) * w).to(Q.dtype.element_ty)
        slot = tl.load(SLOTS + t)
        row = CACHE + (slot // BS) * stride_cb + (slot % BS) * stride_ct
        tl.store(row + offs_c, normed.to(CACHE.dtype.element_ty))
        # shared rotary key
        k1 = tl.load(KV + t * stride_kvt + C + i1).to(tl.float32)
        k2 = tl.load(KV + t * stride_kvt + C + i2).to(tl.float32)
        tl.store(row + C + offs_i, (k1 * c - k2 * s).to(Q.dtype.element_ty).to(CACHE.dtype.element_ty))
        tl.store(row + C + HALF + offs_i, (k2 * c + k1 * s).to(Q.dtype.element_ty).to(CACHE.dtype.element_ty))
        # per-head rotary query
        offs_h = tl.arange(0, HP)
        hmask = offs_h < H
        qrow = Q + t * stride_qt + offs_h[:, None] * stride_qh + N
        q1 = tl.load(qrow + i1[None, :], mask=hmask[:, None], other=0.0).to(tl.float32)
        q2 = tl.load(qrow + i2[None, :], mask=hmask[:, None], other=0.0).to(tl.float32)
        if IN_PLACE:          # QPE may be q's rope part: every thread's loads land before any thread stores
            tl.debug_barrier()
        prow = QPE + t * stride_pt + offs_h[:, None] * stride_ph
        tl.store(prow + offs_i[None, :], (q1 * c[None, :] - q2 * s[None, :]).to(QPE.dtype.element_ty),
                 mask=hmask[:, None])
        tl.store(prow + HALF + offs_i[None, :], (q2 * c[None, :] + q1 * s[None, :]).to(QPE.dtype.element_ty),
                 mask=hmask[:, None])

    return prep_kernel


def supported(latent_dim: int, rope_dim: int) -> bool:
    """The kernel tiles the latent and half the rotary width: powers of two (every DeepSeek model)."""
    return all(n >= 1 and n & (n - 1) == 0 for n in (latent_dim, rope_dim // 2)) and rope_dim % 2 == 0


def mla_prep(q: torch.Tensor, kv: torch.Tensor, norm_weight: torch.Tensor, eps: float, cos: torch.Tensor,
             sin: torch.Tensor, slot_mapping: torch.Tensor, kv_layer: torch.Tensor, nope_dim: int,
             interleave: bool, q_pe_out: torch.Tensor | None = None) -> torch.Tensor:
    """See the module docstring. q [T, h, N+R], kv [T, C+R] (last dims contiguous) -> q_pe [T, h, R]."""
    T, h, D = q.shape
    C = norm_weight.shape[0]
    R = D - nope_dim
    if q_pe_out is None:
        q_pe = torch.empty(T, h, R, device=q.device, dtype=q.dtype)
    elif q_pe_out.shape != (T, h, R) or q_pe_out.stride(2) != 1 or q_pe_out.dtype != q.dtype:
        raise ValueError(f"mla_prep: q_pe_out must be [{T}, {h}, {R}] in {q.dtype} with a contiguous last dim")
    else:
        q_pe = q_pe_out
    if T == 0:
        return q_pe
    if q.stride(2) != 1 or kv.stride(1) != 1 or kv_layer.stride(2) != 1 or cos.stride() != sin.stride() \
            or cos.stride(1) != 1:
        raise ValueError("mla_prep: the last dimension of q, kv, cos and the cache must be contiguous")
    if kv.shape[1] != C + R or kv_layer.shape[2] != C + R:
        raise ValueError(f"mla_prep: kv width {kv.shape[1]} / cache width {kv_layer.shape[2]} != {C}+{R}")
    _kernel()[(T,)](
        q, kv, norm_weight, cos, sin, slot_mapping, kv_layer, q_pe,
        q.stride(0), q.stride(1), kv.stride(0), cos.stride(0), kv_layer.stride(0), kv_layer.stride(1),
        q_pe.stride(0), q_pe.stride(1), h, float(eps),
        N=nope_dim, C=C, HALF=R // 2, HP=max(2, next_pow2(h)), BS=kv_layer.shape[1], INTERLEAVE=bool(interleave),
        IN_PLACE=q_pe_out is not None,
        num_warps=4)
    return q_pe
