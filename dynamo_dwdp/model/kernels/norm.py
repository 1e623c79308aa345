"""Residual add + RMSNorm in one Triton kernel (the torch reference: `residual + delta`, then
`model/layers.RMSNorm` on the sum).

Contract: delta [T, H] and residual [T, H] of one dtype, weight [H] -> (h, normed), both [T, H] in
that dtype, with h = residual + delta rounded to the dtype once (bitwise the torch add) and
normed = h * rsqrt(mean(h^2) + eps) * weight computed in fp32 from the rounded h and rounded once (as
the fused CUDA `F.rms_norm` computes it; the sum of squares is taken in another order, so normed can
differ from it by one rounding step). An optional second delta (`delta2`) is added first, rounded
to the dtype, as `residual + (delta + delta2)` in torch.

Why: a decoder layer's two residual adds and two norms were four kernels (two elementwise adds and
two norm kernels, each reading and writing the [T, H] stream); here they are two, each reading the
stream once. One program per row (decode: <= 256 rows, H a few thousand wide).
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
    def add_rmsnorm_kernel(D, D2, RES, W, H_OUT, N_OUT, cols, eps, stride_d, stride_d2, stride_r, stride_o,
                           TWO: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        c = tl.arange(0, BLOCK)
        m = c < cols
        dt = H_OUT.dtype.element_ty
        d = tl.load(D + row * stride_d + c, mask=m, other=0.0).to(tl.float32)
        if TWO:                                           # (delta + delta2) rounded, as torch adds them first
            d = (d + tl.load(D2 + row * stride_d2 + c, mask=m, other=0.0).to(tl.float32)).to(dt).to(tl.float32)
        h = (tl.load(RES + row * stride_r + c, mask=m, other=0.0).to(tl.float32) + d).to(dt)
        tl.store(H_OUT + row * stride_o + c, h, mask=m)
        hf = h.to(tl.float32)
        rstd = tl.rsqrt(tl.sum(hf * hf, axis=0) / cols + eps)
        y = hf * rstd * tl.load(W + c, mask=m, other=0.0).to(tl.float32)
        tl.store(N_OUT + row * stride_o + c, y.to(dt), mask=m)

    return add_rmsnorm_kernel


def supported(delta: torch.Tensor, residual: torch.Tensor, delta2: torch.Tensor | None = None) -> bool:
    """2-D tensors of one dtype and shape whose rows are contiguous."""
    ts = (delta, residual) if delta2 is None else (delta, residual, delta2)
    return all(t.dim() == 2 and t.shape == residual.shape and t.dtype == residual.dtype and t.stride(1) == 1
               for t in ts)


def add_rmsnorm(delta: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                delta2: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """See the module docstring. `weight` is used in the stream's dtype (as RMSNorm does). No host
    sync (CUDA-graph capturable)."""
    if not supported(delta, residual, delta2):
        raise ValueError(f"add_rmsnorm: delta {tuple(delta.shape)} {delta.dtype} and residual "
                         f"{tuple(residual.shape)} {residual.dtype} need one dtype, one 2-D shape, contiguous rows")
    T, H = residual.shape
    h = torch.empty(T, H, dtype=residual.dtype, device=residual.device)
    normed = torch.empty_like(h)
    if T == 0:
        return h, normed
    w = weight.to(residual.dtype)
    block = next_pow2(H)
    d2 = delta if delta2 is None else delta2
    _kernel()[(T,)](delta, d2, residual, w, h, normed, H, float(eps), delta.stride(0), d2.stride(0),
                    residual.stride(0), h.stride(0), TWO=delta2 is not None, BLOCK=block,
                    num_warps=4 if block <= 4096 else 8)
    return h, normed
