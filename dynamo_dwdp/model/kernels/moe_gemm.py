"""Routed experts for small M, and FP8-resident dense linears, as Triton kernels.

`routed_experts_fused(x, ids, weights, banks)` computes what `model/experts.routed_experts`
computes (sum over k of w[t,k] * SwiGLU-expert_{ids[t,k]}(x[t]); pairs whose expert is in no bank give
0) in 4 + 2 x banks launches, with no sort, no gather copy and no host sync:
1. `align_kernel` (one program per expert): a counting sort of the (token, k) pairs by expert id
   (each program counts the pairs of lower ids, then writes its own pairs in order): `order[pos]` = pair index, `offs[e]` =
   first sorted position of expert e (ids outside [0, E) land in a trailing bucket that no bank
   reads). Replaces torch's radix sort (a multi-kernel CUB sort, ~26 us per layer on an H100) and the
   searchsorted/cumsum index arithmetic.
2. `grouped_kernel` in SwiGLU mode, once per bank: program (n tile, expert) streams its expert's
   gate and up rows once and multiplies them with all the expert's pairs (rows gathered straight from
   x through `order`: no sorted copy of x), silu(gate) * up in the epilogue -> h [pairs, I].
3. `grouped_kernel` in plain mode, once per bank: h @ down^T, each row stored at its pair index
   (the inverse permutation happens in the store).
4. one batched product per token sums its k outputs with their weights (fp32 accumulation), as the
   torch path does: deterministic, no atomics.
Experts that received no pair cost one program launch that returns at once: no weight bytes read.

Weights are bf16 or FP8 e4m3 with the official 128x128 block scales (`model/fp8.py`); FP8 tiles are
converted to bf16 in registers (exact: e4m3 is a subset of bf16) and each K tile's partial product
is multiplied by its block scale in fp32 (K tiles never straddle a 128-wide scale block), so results
equal the dequantized model up to rounding (it rounds q * scale to bf16 per weight; this does not)
and accumulation order; fp32 activations (an fp32 engine) take IEEE dots, never Triton's TF32
default. W8A16: decode reads half the weight bytes; the activations stay bf16. `fp8_linear` is the same kernel with one
"expert" and no gather, for the dense layers; above FP8_LINEAR_MAX_ROWS rows (prefill) it
dequantizes the weight and uses cuBLAS instead, where the GEMM is compute-bound.

Why hand-written: torch._grouped_mm needs the rows physically sorted (a sort and a gather) and has
no block-scaled FP8 form in the installed torch; Inductor does not generate grouped GEMMs.
"""
from __future__ import annotations

import functools

import torch

from dynamo_dwdp.model.fp8 import dequantize_block_fp8
from dynamo_dwdp.model.kernels import next_pow2, sm_count

FP8_LINEAR_MAX_ROWS = 512      # rows up to which fp8_linear runs the W8A16 kernel (decode, small prefill chunks)
BF16_SWIGLU_MAX_ROWS = 64      # rows up to which a bf16 dense MLP runs dense_swiglu (above: cuBLAS is faster)


@functools.cache
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def align_kernel(IDS, ORDER, OFFS, rows, E, BLOCK_R: tl.constexpr):
        # program e (0..E; E = ids outside [0, E)) finds its bucket's start and writes its pairs in order
        e = tl.program_id(0)
        start = tl.zeros([BLOCK_R], tl.int32)
        for r0 in range(0, rows, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            ids = tl.load(IDS + offs_r, mask=offs_r < rows, other=-1)
            bucket = tl.where((ids >= 0) & (ids < E), ids, E)
            start += ((bucket < e) & (offs_r < rows)).to(tl.int32)
        first = tl.sum(start, 0)
        base = first
        for r0 in range(0, rows, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            ids = tl.load(IDS + offs_r, mask=offs_r < rows, other=-1)
            bucket = tl.where((ids >= 0) & (ids < E), ids, E)
            hit = ((bucket == e) & (offs_r < rows)).to(tl.int32)
            dest = base + tl.cumsum(hit, 0) - 1
            tl.store(ORDER + dest, offs_r.to(tl.int32), mask=hit > 0)
            base += tl.sum(hit, 0)
        tl.store(OFFS + e, first)
        if e == E:
            tl.store(OFFS + E + 1, rows)

    @triton.jit
    def grouped_kernel(A, ORDER, OFFS, W, WS, OUT, first, dense_rows, N, K, topk,
                       stride_am, stride_we, stride_wn, stride_se, stride_sn, stride_om,
                       SWIGLU: tl.constexpr, GATHER: tl.constexpr, SCATTER: tl.constexpr, DENSE: tl.constexpr,
                       FP8: tl.constexpr, IEEE: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        pn = tl.program_id(0)
        el = tl.program_id(1)
        if DENSE:                                   # axis 1 tiles the rows of a dense GEMM
            lo = el * BLOCK_M
            hi = tl.minimum(lo + BLOCK_M, dense_rows)
        else:
            lo = tl.load(OFFS + first + el)
            hi = tl.load(OFFS + first + el + 1)
        offs_n = pn * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = offs_n < N
        w_base = W + el.to(tl.int64) * stride_we          # dense: stride_we = stride_se = 0
        s_base = WS + el * stride_se
        for m0 in range(lo, hi, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            mmask = offs_m < hi
            if GATHER:
                arow = tl.load(ORDER + offs_m, mask=mmask, other=0) // topk
            else:
                arow = offs_m
            acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            acc2 = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            for k0 in range(0, K, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                kmask = offs_k < K
                a = tl.load(A + arow[:, None].to(tl.int64) * stride_am + offs_k[None, :],
                            mask=mmask[:, None] & kmask[None, :], other=0.0)
                wmask = nmask[:, None] & kmask[None, :]
                w = tl.load(w_base + offs_n[:, None] * stride_wn + offs_k[None, :], mask=wmask, other=0.0)
                if FP8:      # e4m3 is exact in bf16
                    w = w.to(A.dtype.element_ty)
                if IEEE:     # fp32 operands: exact products (Triton's default for fp32 is TF32, 10-bit mantissas)
                    p = tl.dot(a, tl.trans(w), input_precision="ieee")
                else:
                    p = tl.dot(a, tl.trans(w))
                if FP8:      # the block scale (one per output row in this K tile) after the dot
                    p = p * tl.load(s_base + (offs_n // 128) * stride_sn + k0 // 128, mask=nmask, other=0.0)[None, :]
                acc += p
                if SWIGLU:
                    w2 = tl.load(w_base + (N + offs_n)[:, None] * stride_wn + offs_k[None, :], mask=wmask, other=0.0)
                    if FP8:
                        w2 = w2.to(A.dtype.element_ty)
                    if IEEE:
                        p2 = tl.dot(a, tl.trans(w2), input_precision="ieee")
                    else:
                        p2 = tl.dot(a, tl.trans(w2))
                    if FP8:
                        p2 = p2 * tl.load(s_base + ((N + offs_n) // 128) * stride_sn + k0 // 128, mask=nmask,
                                          other=0.0)[None, :]
                    acc2 += p2
            if SWIGLU:
                y = acc / (1.0 + tl.exp(-acc)) * acc2
            else:
                y = acc
            if SCATTER:
                orow = tl.load(ORDER + offs_m, mask=mmask, other=0)
            else:
                orow = offs_m
            tl.store(OUT + orow[:, None].to(tl.int64) * stride_om + offs_n[None, :], y.to(OUT.dtype.element_ty),
                     mask=mmask[:, None] & nmask[None, :])

    return align_kernel, grouped_kernel


def align(flat_ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Counting sort of pair expert ids: (order [rows] int32, offs [num_experts + 2] int32), see step 1."""
    align_kernel, _ = _kernels()
    rows = flat_ids.numel()
    order = torch.empty(rows, dtype=torch.int32, device=flat_ids.device)
    offs = torch.empty(num_experts + 2, dtype=torch.int32, device=flat_ids.device)
    align_kernel[(num_experts + 1,)](flat_ids, order, offs, rows, num_experts,
                                     BLOCK_R=max(16, min(1024, next_pow2(rows))), num_warps=4)
    return order, offs


def _tiles(rows_per_group: float, active_groups: int, n: int, elem_bytes: int, sms: int
           ) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_stages). M by the expected rows per group; N 64 when that still
    gives >= 4 programs per SM over the groups that have rows, else 32 (decode streams weights:
    parallelism is bandwidth); stages as deep as shared memory allows."""
    block_m = 16 if rows_per_group <= 16 else 32 if rows_per_group <= 32 else 64
    block_n = 64 if active_groups * -(-n // 64) >= 4 * sms else 32   # 16-row tiles measured slower at T=1
    block_n = min(block_n, max(16, next_pow2(n)))
    block_k = 128 if elem_bytes <= 2 else 64
    per_stage = (block_m + 2 * block_n) * block_k * max(2, elem_bytes)
    stages = max(1, min(4, 160 * 1024 // per_stage))
    return block_m, block_n, block_k, stages


def _launch(a, order, offs, w, ws, out, first, groups, dense_rows, n, k, topk, swiglu, gather, scatter,
            rows_per_group, active_groups):
    _, grouped_kernel = _kernels()
    fp8 = ws is not None
    block_m, block_n, block_k, stages = _tiles(rows_per_group, active_groups, n, a.element_size(), sm_count(a.device))
    if not a.is_cuda:
        stages = 1
    dense = offs is None
    if dense:
        groups = -(-dense_rows // block_m)
    dummy = out
    grouped_kernel[(-(-n // block_n), groups)](
        a, order if order is not None else dummy, offs if offs is not None else dummy, w,
        ws if fp8 else dummy, out, first, dense_rows, n, k, topk,
        a.stride(0), w.stride(0) if w.dim() == 3 else 0, w.stride(-2),
        (ws.stride(0) if ws.dim() == 3 else 0) if fp8 else 0, ws.stride(-2) if fp8 else 0, out.stride(0),
        SWIGLU=swiglu, GATHER=gather, SCATTER=scatter, DENSE=dense, FP8=fp8, IEEE=a.dtype == torch.float32,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4, num_stages=stages)


def routed_experts_fused(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, banks: list,
                         out: torch.Tensor | None = None) -> torch.Tensor:
    """See the module docstring. banks: `model.experts.ExpertBank`s (bf16, or FP8 with scales)."""
    T, k = topk_ids.shape
    if T == 0 or not banks:
        return torch.zeros_like(x) if out is None else out
    if x.stride(1) != 1:
        x = x.contiguous()
    Hd = x.shape[1]
    rows = T * k
    E = max(b.first + b.count for b in banks)
    order, offs = align(topk_ids.reshape(-1), E)
    I = banks[0].w13.shape[1] // 2
    h = torch.empty(rows, I, dtype=x.dtype, device=x.device)
    y = torch.zeros(rows, Hd, dtype=x.dtype, device=x.device)
    per_group = rows / max(1, E)
    active = min(rows, E)                                   # experts that can have rows
    for b in banks:
        _launch(x, order, offs, b.w13, b.w13_scale, h, b.first, b.count, 0, I, Hd, k, True, True, False, per_group,
                min(active, b.count))
    for b in banks:
        _launch(h, order, offs, b.w2, b.w2_scale, y, b.first, b.count, 0, Hd, I, k, False, False, True, per_group,
                min(active, b.count))
    combined = torch.bmm(topk_weights.to(x.dtype).view(T, 1, k), y.view(T, k, Hd)).view(T, Hd)
    return combined if out is None else out.add_(combined)


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, scale_inv: torch.Tensor) -> torch.Tensor:
    """y = x @ dequant(weight, scale_inv)^T for FP8 block-scaled weight [N, K] (128x128 blocks); x's dtype."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    M = x2.shape[0]
    N, K = weight.shape
    if M > FP8_LINEAR_MAX_ROWS or not x.is_cuda and not _interpreting():
        return torch.nn.functional.linear(x, dequantize_block_fp8(weight, scale_inv, dtype=x.dtype))
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M:
        _launch(x2, None, None, weight, scale_inv, out, 0, 1, M, N, K, 1, False, False, False, M, -(-M // 64))
    return out.view(*shape[:-1], N)


def dense_swiglu(x: torch.Tensor, w13: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """silu(x @ gate^T) * (x @ up^T) for w13 = [gate; up] [2I, H] (bf16, or FP8 with block scales), one
    kernel: the dense MLP's first half for small batches."""
    x2 = x if x.stride(-1) == 1 else x.contiguous()
    M = x2.shape[0]
    inter = w13.shape[0] // 2
    out = torch.empty(M, inter, dtype=x.dtype, device=x.device)
    if M:
        _launch(x2, None, None, w13, scale, out, 0, 1, M, inter, x2.shape[1], 1, True, False, False, M, -(-M // 64))
    return out


def _interpreting() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET") == "1"
