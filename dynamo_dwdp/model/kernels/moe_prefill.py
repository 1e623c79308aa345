"""The memory-bound steps around the prefill-size GEMMs, one Triton pass each.

- `swiglu(h)`: h [rows, 2I] = [gate | up] (one GEMM's output) -> silu(gate) * up [rows, I], computed in
  fp32 and rounded once. Used after the routed experts' grouped GEMM (`model/experts.py`) and after
  the shared experts' / dense MLP's fused gate-up GEMM (`model/layers.py`) at prefill sizes. torch's
  `F.silu(gate) * up` on the two halves is two passes over strided views (non-vectorised kernels):
  this reads 2I and writes I once.
- `combine(y_sorted, pos, weights)`: out[t] = sum_k weights[t, k] * y_sorted[pos[t, k]] for the
  routed experts' outputs in expert-sorted order; pos[t, k] = -1 marks a pair whose expert is in no
  bank of this rank (it adds 0, whatever that row of y_sorted holds, so nothing needs zeroing).
  fp32 accumulation in the fixed order k = 0..K-1: deterministic, no atomics. Replaces the scatter
  back to (token, k) order (`index_copy`), the zeroing `where` and the per-token batched GEMV: one
  read of the expert outputs and one write of the result instead of four passes.

Why hand-written Triton and not torch.compile: Inductor would fuse each of these into one kernel
too (a pointwise op over two halves; an indirect load plus a k-reduction), but prefill row counts
change with every chunk, so it would need dynamic-shape compilation in every engine process (seconds
at start-up, guards on every call), and it cannot be checked under Triton's CPU interpreter the way
CI checks the project's other kernels. Both kernels are plain loads and stores with no tiling choice
that a compiler would make better.
"""
from __future__ import annotations

import functools

import torch

from dynamo_dwdp.model.kernels import next_pow2


@functools.cache
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def swiglu_kernel(H, OUT, rows, inter, stride_h, stride_o,
                      BLOCK_R: tl.constexpr, BLOCK_I: tl.constexpr):
        offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        offs_i = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
        mask = (offs_r < rows)[:, None] & (offs_i < inter)[None, :]
        src = H + offs_r.to(tl.int64)[:, None] * stride_h + offs_i[None, :]
        gate = tl.load(src, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(src + inter, mask=mask, other=0.0).to(tl.float32)
        y = gate / (1.0 + tl.exp(-gate)) * up
        tl.store(OUT + offs_r.to(tl.int64)[:, None] * stride_o + offs_i[None, :], y.to(OUT.dtype.element_ty),
                 mask=mask)

    @triton.jit
    def combine_kernel(Y, POS, W, OUT, hidden, stride_y, stride_o,
                       K: tl.constexpr, ACCUMULATE: tl.constexpr, BLOCK_H: tl.constexpr):
        t = tl.program_id(0)
        offs = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        hmask = offs < hidden
        acc = tl.zeros([BLOCK_H], dtype=tl.float32)
        for j in tl.static_range(K):                        # fixed order: deterministic
            p = tl.load(POS + t * K + j)
            w = tl.load(W + t * K + j)
            row = Y + tl.maximum(p, 0).to(tl.int64) * stride_y
            held = (tl.zeros([BLOCK_H], dtype=tl.int32) + p) >= 0
            y = tl.load(row + offs, mask=hmask & held, other=0.0).to(tl.float32)
            acc += w * y
        dst = OUT + t.to(tl.int64) * stride_o + offs
        if ACCUMULATE:
            acc += tl.load(dst, mask=hmask, other=0.0).to(tl.float32)
        tl.store(dst, acc.to(OUT.dtype.element_ty), mask=hmask)

    return swiglu_kernel, combine_kernel


def swiglu(h: torch.Tensor) -> torch.Tensor:
    """h [rows, 2I] (last dim contiguous) -> silu(h[:, :I]) * h[:, I:] as a new [rows, I] tensor."""
    if h.dim() != 2 or h.shape[1] % 2 or (h.numel() and h.stride(1) != 1):
        raise ValueError(f"swiglu: h must be [rows, 2I] with a contiguous last dim, got {tuple(h.shape)}")
    rows, inter = h.shape[0], h.shape[1] // 2
    out = torch.empty(rows, inter, device=h.device, dtype=h.dtype)
    if rows == 0 or inter == 0:
        return out
    block_i = min(256, next_pow2(inter))
    block_r = max(1, 2048 // block_i)
    grid = ((rows + block_r - 1) // block_r, (inter + block_i - 1) // block_i)
    _kernels()[0][grid](h, out, rows, inter, h.stride(0), out.stride(0), BLOCK_R=block_r, BLOCK_I=block_i,
                        num_warps=4)
    return out


def combine(y_sorted: torch.Tensor, pos: torch.Tensor, weights: torch.Tensor,
            out: torch.Tensor | None = None) -> torch.Tensor:
    """out[t] (+)= sum_k weights[t, k] * y_sorted[pos[t, k]] (fp32 sum in k order; pos -1 adds 0).

    y_sorted [rows, H] (last dim contiguous), pos [T, K] int32, weights [T, K] (cast to fp32). With
    `out` [T, H] the sum is added to it in place (one rounding); else a new tensor in y's dtype."""
    T, K = pos.shape
    hidden = y_sorted.shape[1]
    if weights.shape != pos.shape:
        raise ValueError(f"combine: weights {tuple(weights.shape)} != pos {tuple(pos.shape)}")
    accumulate = out is not None
    if out is None:
        out = torch.empty(T, hidden, device=y_sorted.device, dtype=y_sorted.dtype)
    elif out.shape != (T, hidden) or out.stride(1) != 1:
        raise ValueError(f"combine: out must be [{T}, {hidden}] with a contiguous last dim, got {tuple(out.shape)}")
    if T == 0 or hidden == 0:
        return out
    if y_sorted.stride(1) != 1:
        raise ValueError("combine: y_sorted's last dim must be contiguous")
    pos = pos.to(torch.int32).contiguous()
    weights = weights.to(torch.float32).contiguous()
    block_h = min(1024, next_pow2(hidden))
    grid = (T, (hidden + block_h - 1) // block_h)
    _kernels()[1][grid](y_sorted, pos, weights, out, hidden, y_sorted.stride(0), out.stride(0),
                        K=K, ACCUMULATE=accumulate, BLOCK_H=block_h, num_warps=4)
    return out
