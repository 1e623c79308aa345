"""Routed experts W8A8: FP8 activations x FP8 block-scaled weights on FP8 tensor cores (Triton).

`routed_experts_fp8a8(x, ids, weights, banks)` computes what `moe_gemm.routed_experts_fused` computes
for FP8-resident banks, in 5 + 2 x banks launches and no host sync (CUDA-graph safe):
1. `act_quant_kernel`: x [T, H] -> e4m3 [T, H] + float32 scales [T, H/128], once per token (1 x 128
   groups: scale = amax / 448, q = x / scale rounded to nearest even), DeepSeek-V3's activation format;
2. `moe_gemm.align` (imported, the same counting sort): `order`, `offs`;
3. `grouped_a8_kernel` in SwiGLU mode, once per bank: program (n tile, expert) streams its expert's
   gate and up rows (e4m3) once against all the expert's pairs, rows of the quantized x gathered
   through `order`. Each 128-wide K step is one FP8 x FP8 `tl.dot` (fp32 accumulator started at 0),
   multiplied by the row's activation scale and the weight block's scale and added to an fp32
   accumulator (the scales are applied per K block, as in DeepSeek's kernels). Epilogue: silu(gate) *
   up in fp32, then each row's tile quantized to e4m3 with one fp32 scale per 1 x BLOCK_N group
   (`h_group`: the N tile of this launch, 128 by default, 64 or 32 when a tiling asks for it) ->
   h [pairs, I] e4m3 at the pair's sorted position;
4. `grouped_a8_kernel` in plain mode, once per bank: h @ down^T, K steps of `h_group` (so one
   activation scale per step; the weight block scale is the 128-block holding the step), each row
   stored in x's dtype at its pair index;
5. the combine: `moe_gemm.pair_sum` (one kernel: weights rounded to bf16, fp32 sum over the k outputs, rounded once).

Numerics (what is rounded where), against the dequantized model (weights `q * scale_inv`, bf16
activations): x rounded to e4m3 in 1 x 128 groups; h rounded to e4m3 in 1 x h_group groups; products
of e4m3 values are exact, sums within one K block run in the tensor core's accumulator (on Hopper a
reduced-precision adder, "around 14 bits" per the DeepSeek-V3 report's "Increasing Accumulation
Precision"; here a K block is at most 128), block sums promoted to fp32; each pair's output rounded
to x's dtype. e4m3 keeps 3 mantissa bits (rounding error up to 2^-4 relative), so the expert output
departs from the dequantized model by a few percent: stated tolerance 8e-2 relative; measured
3.8-4.8e-2 on random data under the interpreter (tests/model/fp8a8_checks.py) and 4.0-4.3e-2 on an
H200 at the v2-lite shapes, where the 3-layer engine's logits were 4.2e-2 off (W8A16: 1.1e-2).
Against a torch emulation of the same quantization (float64 otherwise, `tests/model/fp8a8_reference.py`):
h's scales agree to 1e-5 and its e4m3 values exactly but for rare one-step flips where the fp32 and
float64 values fall on either side of a rounding midpoint (tolerance 0.2% of elements, none seen in
~34,000); the down stage fed the same h agrees to 1e-5; end to end 3e-3 relative with fp32 outputs
(what a flip can move), 1e-2 with bf16 outputs (H200: 3.1-5.7e-3, the outputs' bf16 rounding and the
tensor core's accumulator).

Why hand-written: the same reasons as moe_gemm (no grouped block-scaled FP8 GEMM in the installed torch
that gathers rows; `torch._scaled_mm` is one dense matrix per call), and the SwiGLU + quantize epilogue.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import torch

from dynamo_dwdp.model.fp8 import ACT_GROUP, FP8_DTYPE
from dynamo_dwdp.model.kernels.moe_gemm import align, bank_ranges, pair_sum


@functools.cache
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def act_quant_kernel(X, Q, S, N, stride_x, stride_q, stride_s, GROUP: tl.constexpr):
        # program (row, group): one 1 x GROUP group of one row
        row = tl.program_id(0).to(tl.int64)
        g = tl.program_id(1)
        offs = g * GROUP + tl.arange(0, GROUP)
        m = offs < N
        x = tl.load(X + row * stride_x + offs, mask=m, other=0.0).to(tl.float32)
        amax = tl.max(tl.abs(x), 0)
        scale = tl.where(amax > 0, amax / 448.0, 1.0)
        q = tl.clamp(x / scale, -448.0, 448.0)
        tl.store(Q + row * stride_q + offs, q.to(tl.float8e4nv, fp_downcast_rounding="rtne"), mask=m)
        tl.store(S + row * stride_s + g, scale)

    @triton.jit
    def grouped_a8_kernel(A, AS, ORDER, OFFS, W, WS, OUT, OS, first, N, K, topk,
                          stride_am, stride_as, stride_we, stride_wn, stride_se, stride_sn, stride_om, stride_os,
                          SWIGLU: tl.constexpr, GATHER: tl.constexpr, SCATTER: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SWAP: tl.constexpr):
        # BLOCK_K is A's scale group (one activation scale per row per K step); it divides 128, so a
        # K step never straddles a weight scale block
        pn = tl.program_id(0)
        el = tl.program_id(1)
        lo = tl.load(OFFS + first + el)
        hi = tl.load(OFFS + first + el + 1)
        offs_n = pn * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = offs_n < N
        w_base = W + el.to(tl.int64) * stride_we
        s_base = WS + el * stride_se
        for m0 in range(lo, hi, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            mmask = offs_m < hi
            if GATHER:
                arow = tl.load(ORDER + offs_m, mask=mmask, other=0) // topk
            else:
                arow = offs_m
            arow = arow.to(tl.int64)
            if SWAP:                               # acc^T = W x^T: the weight rows fill the MMA's M side
                acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
                acc2 = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
            else:
                acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
                acc2 = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            for k0 in range(0, K, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                kmask = offs_k < K
                a = tl.load(A + arow[:, None] * stride_am + offs_k[None, :], mask=mmask[:, None] & kmask[None, :],
                            other=0.0)
                asc = tl.load(AS + arow * stride_as + k0 // BLOCK_K, mask=mmask, other=0.0)
                wmask = nmask[:, None] & kmask[None, :]
                w = tl.load(w_base + offs_n[:, None] * stride_wn + offs_k[None, :], mask=wmask, other=0.0)
                wsc = tl.load(s_base + (offs_n // 128) * stride_sn + k0 // 128, mask=nmask, other=0.0)
                if SWAP:
                    acc += tl.dot(w, tl.trans(a)) * wsc[:, None] * asc[None, :]
                else:
                    acc += tl.dot(a, tl.trans(w)) * asc[:, None] * wsc[None, :]
                if SWIGLU:
                    w2 = tl.load(w_base + (N + offs_n)[:, None] * stride_wn + offs_k[None, :], mask=wmask, other=0.0)
                    wsc2 = tl.load(s_base + ((N + offs_n) // 128) * stride_sn + k0 // 128, mask=nmask, other=0.0)
                    if SWAP:
                        acc2 += tl.dot(w2, tl.trans(a)) * wsc2[:, None] * asc[None, :]
                    else:
                        acc2 += tl.dot(a, tl.trans(w2)) * asc[:, None] * wsc2[None, :]
            if SWAP:
                acc = tl.trans(acc)
                acc2 = tl.trans(acc2)
            if SCATTER:
                orow = tl.load(ORDER + offs_m, mask=mmask, other=0).to(tl.int64)
            else:
                orow = offs_m.to(tl.int64)
            omask = mmask[:, None] & nmask[None, :]
            if SWIGLU:                             # h in e4m3, one scale per row of this tile (columns past N are 0)
                y = acc / (1.0 + tl.exp(-acc)) * acc2
                amax = tl.max(tl.abs(y), 1)
                sc = tl.where(amax > 0, amax / 448.0, 1.0)
                q = tl.clamp(y / sc[:, None], -448.0, 448.0)
                q = q.to(tl.float8e4nv, fp_downcast_rounding="rtne")
                tl.store(OUT + orow[:, None] * stride_om + offs_n[None, :], q, mask=omask)
                tl.store(OS + orow * stride_os + pn, sc, mask=mmask)
            else:
                tl.store(OUT + orow[:, None] * stride_om + offs_n[None, :], acc.to(OUT.dtype.element_ty), mask=omask)

    return act_quant_kernel, grouped_a8_kernel


@dataclass(frozen=True)
class A8Tiles:
    """One launch's tiling: rows (pairs) per tile (0: by the expected rows per expert), weight rows per
    tile (in SwiGLU mode also h's activation-scale group), warps, pipeline stages (0: as deep as shared
    memory allows, at most 4),
    `swap` (compute W x^T: the weight rows are the MMA's M side, Hopper's 64-row warpgroup MMA)."""
    block_m: int
    block_n: int
    warps: int = 4
    stages: int = 0
    swap: bool = True


# Benchmark hook: {"swiglu" | "down": A8Tiles} replaces choose_a8_tiles (scripts/gpu_fp8a8.py)
TILE_OVERRIDE: dict[str, A8Tiles] = {}


def choose_a8_tiles(kind: str, rows_per_group: float) -> A8Tiles:
    """The swapped orientation (weight rows on the warpgroup MMA's M side), gate/up tiles of 128 weight
    rows (so h's groups are 1 x 128, DeepSeek's), down tiles of 64; M by the expected rows per expert.
    Measured on one H200 at the v2-lite shapes (scripts/gpu_fp8a8.py, docs/performance.md) against
    64-row gate/up tiles (2-10% slower at 1-64 tokens, equal at 256) and the plain orientation with
    64-row tiles (5-18% slower)."""
    block_m = 16 if rows_per_group <= 16 else 32 if rows_per_group <= 32 else 64
    return A8Tiles(block_m, 128 if kind == "swiglu" else 64)


def quantize_act(x: torch.Tensor, group: int = ACT_GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """x [rows, n] -> (e4m3 [rows, n], float32 scales [rows, ceil(n / group)]); `model.fp8.quantize_act_fp8`
    is its torch statement. group must be a power of two."""
    act_quant_kernel = _kernels()[0]
    rows, n = x.shape
    if x.stride(1) != 1:
        x = x.contiguous()
    g = -(-n // group)
    q = torch.empty(rows, n, dtype=FP8_DTYPE, device=x.device)
    s = torch.empty(rows, g, dtype=torch.float32, device=x.device)
    if rows:
        act_quant_kernel[(rows, g)](x, q, s, n, x.stride(0), q.stride(0), s.stride(0), GROUP=group, num_warps=1)
    return q, s


def _launch(kind, a, a_scale, a_group, order, offs, w, ws, out, out_scale, first, groups, n, k, topk,
            rows_per_group):
    grouped_a8_kernel = _kernels()[1]
    cfg = TILE_OVERRIDE.get(kind) or choose_a8_tiles(kind, rows_per_group)
    if cfg.block_m == 0:
        cfg = replace(cfg, block_m=choose_a8_tiles(kind, rows_per_group).block_m)
    swiglu = kind == "swiglu"
    per_stage = (cfg.block_m + (2 if swiglu else 1) * cfg.block_n) * a_group
    stages = cfg.stages or max(1, min(4, 160 * 1024 // per_stage))
    if not a.is_cuda:
        stages = 1
    grouped_a8_kernel[(-(-n // cfg.block_n), groups)](
        a, a_scale, order, offs, w, ws, out, out_scale if out_scale is not None else out, first, n, k, topk,
        a.stride(0), a_scale.stride(0), w.stride(0), w.stride(1), ws.stride(0), ws.stride(1), out.stride(0),
        out_scale.stride(0) if out_scale is not None else 0,
        SWIGLU=swiglu, GATHER=swiglu, SCATTER=not swiglu, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        BLOCK_K=a_group, SWAP=cfg.swap, num_warps=cfg.warps, num_stages=stages)


def h_group(rows_per_group: float) -> int:
    """h's activation-scale group: the SwiGLU launch's N tile (it must divide 128)."""
    g = (TILE_OVERRIDE.get("swiglu") or choose_a8_tiles("swiglu", rows_per_group)).block_n
    if 128 % g:
        raise ValueError(f"W8A8 SwiGLU tile block_n={g} must divide 128 (it is h's activation-scale group)")
    return g


@dataclass
class Hidden:
    """Steps 1-3's result: the pairs' order and expert offsets (`moe_gemm.align`), and h = SwiGLU of
    each pair (row p holds pair order[p]; rows of pairs whose expert is in no bank are unwritten),
    e4m3 [pairs, I] with float32 scales [pairs, ceil(I / group)] in 1 x `group` groups."""
    order: torch.Tensor
    offs: torch.Tensor
    h: torch.Tensor
    h_scale: torch.Tensor
    group: int
    per_group: float


def expert_hidden(x: torch.Tensor, topk_ids: torch.Tensor, banks: list) -> Hidden:
    """Steps 1-3 of the module docstring: quantize x, sort the pairs, gate/up + SwiGLU + quantize h."""
    if any(b.w13_scale is None for b in banks):
        raise ValueError("W8A8 experts need FP8 banks (w13_scale / w2_scale set)")
    rows = topk_ids.numel()
    E = max(b.first + b.count for b in banks)
    xq, xs = quantize_act(x, ACT_GROUP)
    order, offs = align(topk_ids.reshape(-1), E)
    I = banks[0].w13.shape[1] // 2
    per_group = rows / max(1, E)
    hg = h_group(per_group)
    hq = torch.empty(rows, I, dtype=FP8_DTYPE, device=x.device)
    hs = torch.empty(rows, -(-I // hg), dtype=torch.float32, device=x.device)
    for b in banks:
        _launch("swiglu", xq, xs, ACT_GROUP, order, offs, b.w13, b.w13_scale, hq, hs, b.first, b.count, I,
                x.shape[1], topk_ids.shape[1], per_group)
    return Hidden(order, offs, hq, hs, hg, per_group)


def expert_down(hidden: Hidden, banks: list, hidden_size: int, topk: int, dtype: torch.dtype) -> torch.Tensor:
    """Step 4: h @ down^T of each pair's expert -> [pairs, hidden_size] in `dtype`, row = pair index
    (pairs whose expert is in no bank: 0)."""
    rows, I = hidden.h.shape
    y = torch.zeros(rows, hidden_size, dtype=dtype, device=hidden.h.device)
    for b in banks:
        _launch("down", hidden.h, hidden.h_scale, hidden.group, hidden.order, hidden.offs, b.w2, b.w2_scale, y, None,
                b.first, b.count, hidden_size, I, topk, hidden.per_group)
    return y


def routed_experts_fp8a8(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, banks: list,
                         out: torch.Tensor | None = None) -> torch.Tensor:
    """See the module docstring. banks: FP8 `model.experts.ExpertBank`s (w13/w2 e4m3 with scales)."""
    T, k = topk_ids.shape
    if T == 0 or not banks:
        return torch.zeros_like(x) if out is None else out
    Hd = x.shape[1]
    y = expert_down(expert_hidden(x, topk_ids, banks), banks, Hd, k, x.dtype)
    return pair_sum(y, topk_weights, topk_ids, bank_ranges(banks), out)      # moe_gemm's combine, one kernel
