"""Routed experts for small M, and FP8-resident dense linears, as Triton kernels.

`routed_experts_fused(x, ids, weights, banks)` computes what `model/experts.routed_experts`
computes (sum over k of w[t,k] * SwiGLU-expert_{ids[t,k]}(x[t]); pairs whose expert is in no bank give
0) in 2 + 2 x banks launches, with no sort, no gather copy and no host sync:
1. `align_kernel` (one program per expert): a counting sort of the (token, k) pairs by expert id
   (each program counts the pairs of lower ids, then writes its own pairs in order): `order[pos]` = pair index, `offs[e]` =
   first sorted position of expert e (ids outside [0, E) land in a trailing bucket that no bank
   reads). Replaces torch's radix sort (a multi-kernel CUB sort, ~26 us per layer on an H100) and the
   searchsorted/cumsum index arithmetic.
2. `grouped_kernel` in SwiGLU mode, once per bank: program (n tile, expert) streams its expert's
   gate and up rows once per M tile of the expert's pairs and multiplies them (rows gathered straight from
   x through `order`: no sorted copy of x), silu(gate) * up in the epilogue -> h [pairs, I].
3. `grouped_kernel` in plain mode, once per bank: h @ down^T, each row stored at its pair index
   (the inverse permutation happens in the store).
4. `pair_sum_kernel` sums each token's k outputs with their weights (fp32 accumulation, one rounding),
   as the torch path's batched product does: deterministic, no atomics; pairs of experts in no bank
   are skipped by id, so y needs no zero fill.
Experts that received no pair cost one program launch that returns at once: no weight bytes read.
Shared experts folded in (`SharedExperts`, small batches, `model/moe.py`): the program rows past the bank's
experts read a second weight tensor in place (the dense MLP's [gate; up] and down, by their own strides), so
that the always-selected shared experts share the routed experts' two launches.
Work list (`TileConfig.work_list`, bf16 experts; on by `routed_tiles` above a mean of 8 rows per expert,
i.e. from 128 tokens of v2-lite): instead of one row of programs per expert looping over the expert's M
tiles (an expert with more rows than the tile streams its weights once per tile, from HBM again in
practice, and its programs end the launch as a tail), one row per M tile of an expert, found on the
device from `offs` (each program sums the tile counts; no host sync, capturable: the grid depends on
the token count only); the grid holds the most tiles there can be (experts + rows / block_m) and rows
past the list do nothing. An expert's tiles are adjacent rows, so the programs that read one weight
tile run at the same time and all but the first read it from L2. Measured (one H200, 2026-12-02, the
bench model's routing replayed; `routed_tiles` has the figures): at 256 tokens, where the most loaded
expert holds 3-4x the mean rows, the work list with 128-row weight tiles takes 291 us per MoE layer
against 328 for the previous rule (the per-expert loop at M 64), 87% of copy bandwidth; at 64 tokens it is 2% slower
than the loop, so it stays off there. Running the experts most-loaded-first (2026-12-01) gained nothing.

Weights are bf16 or FP8 e4m3 with the official 128x128 block scales (`model/fp8.py`); FP8 tiles are
converted to bf16 in registers (exact: e4m3 is a subset of bf16; on the GPU with integer operations,
`FP8_TO_BF16_ASM`, since the hardware converter's rate bounded the kernel) and each K tile's partial product
is multiplied by its block scale in fp32 (K tiles never straddle a 128-wide scale block), so results
equal the dequantized model up to rounding (it rounds q * scale to bf16 per weight; this does not)
and accumulation order; fp32 activations (an fp32 engine) take IEEE dots, never Triton's TF32
default. W8A16: decode reads half the weight bytes; the activations stay bf16. `fp8_linear` is the same kernel with one
"expert" and no gather (K split over several programs when the matrix gives too few tiles), for
the dense layers; above FP8_LINEAR_MAX_ROWS rows (prefill) it
dequantizes the weight and uses cuBLAS instead, where the GEMM is compute-bound.

Why hand-written: torch._grouped_mm needs the rows physically sorted (a sort and a gather) and has
no block-scaled FP8 form in the installed torch; Inductor does not generate grouped GEMMs.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from types import SimpleNamespace

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
    def grouped_kernel(A, ORDER, OFFS, W, WS, OUT, PART, first, n_groups, dense_rows, N, K, topk,
                       stride_am, stride_we, stride_wn, stride_se, stride_sn, stride_om, stride_ps, stride_pm,
                       SWIGLU: tl.constexpr, GATHER: tl.constexpr, SCATTER: tl.constexpr, DENSE: tl.constexpr,
                       FP8: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       SWAP: tl.constexpr, FAST_CVT: tl.constexpr, CVT_ASM: tl.constexpr,
                       SPLIT_K: tl.constexpr, IEEE: tl.constexpr, WORK_LIST: tl.constexpr,
                       WB, n_a, stride_we_b, stride_wn_b, up_a, up_b, TWO_BANKS: tl.constexpr):
        pn = tl.program_id(0)
        el = tl.program_id(1)
        if WORK_LIST > 0:       # program row el = the el-th M tile of the bank's work list (no tile: nothing)
            j = tl.arange(0, WORK_LIST)
            jm = j < n_groups
            lo_j = tl.load(OFFS + first + j, mask=jm, other=0)
            hi_j = tl.load(OFFS + first + j + 1, mask=jm, other=0)
            tiles = tl.where(jm, tl.cdiv(hi_j - lo_j, BLOCK_M), 0)
            ends = tl.cumsum(tiles, 0)
            mine = j == tl.sum((ends <= el).to(tl.int32), 0)          # the expert whose tiles hold el
            tile = el - tl.sum(tl.where(mine, ends - tiles, 0), 0)
            el = tl.sum(tl.where(mine, j, 0), 0)
            wl_lo = tl.sum(tl.where(mine, lo_j, 0), 0) + tile * BLOCK_M
            wl_hi = tl.minimum(wl_lo + BLOCK_M, tl.sum(tl.where(mine, hi_j, 0), 0))   # past the list: 0, no rows
        ks = tl.program_id(2)                       # split-K (dense only): this program's K range
        k_per = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
        k_lo = ks * k_per
        k_hi = tl.minimum(K, k_lo + k_per)
        if DENSE:                                   # axis 1 tiles the rows of a dense GEMM
            lo = el * BLOCK_M
            hi = tl.minimum(lo + BLOCK_M, dense_rows)
        elif WORK_LIST > 0:
            lo = wl_lo
            hi = wl_hi
        else:
            lo = tl.load(OFFS + first + el)
            hi = tl.load(OFFS + first + el + 1)
        offs_n = pn * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = offs_n < N
        if TWO_BANKS:         # groups n_a.. read a second weight tensor (the shared experts' own, in place)
            if el >= n_a:
                w_base = WB + (el - n_a).to(tl.int64) * stride_we_b
                s_wn = stride_wn_b
                up_off = up_b
            else:
                w_base = W + el.to(tl.int64) * stride_we
                s_wn = stride_wn
                up_off = up_a
        else:
            w_base = W + el.to(tl.int64) * stride_we          # dense: stride_we = stride_se = 0
            s_wn = stride_wn
            up_off = 0
        s_base = WS + el * stride_se
        for m0 in range(lo, hi, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            mmask = offs_m < hi
            if GATHER:
                arow = tl.load(ORDER + offs_m, mask=mmask, other=0) // topk
            else:
                arow = offs_m
            if SWAP:                               # acc^T = W x^T: the weight rows fill the MMA's M side
                acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
                acc2 = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
            else:
                acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
                acc2 = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            for k0 in range(k_lo, k_hi, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                kmask = offs_k < K
                a = tl.load(A + arow[:, None].to(tl.int64) * stride_am + offs_k[None, :],
                            mask=mmask[:, None] & kmask[None, :], other=0.0)
                wmask = nmask[:, None] & kmask[None, :]
                w = tl.load(w_base + offs_n[:, None] * s_wn + offs_k[None, :], mask=wmask, other=0.0)
                if FP8:      # e4m3 is exact in bf16; the block scale (one per output row in this K tile) after the dot
                    sc = tl.load(s_base + (offs_n // 128) * stride_sn + k0 // 128, mask=nmask, other=0.0)
                    if FAST_CVT:
                        w = tl.inline_asm_elementwise(CVT_ASM, "=r,=r,r", [w.to(tl.uint8, bitcast=True)],
                                                      dtype=tl.bfloat16, is_pure=True, pack=4)
                    else:
                        w = w.to(tl.bfloat16)
                    w = w.to(A.dtype.element_ty)
                if SWAP:
                    if IEEE:     # fp32 operands: exact products (Triton's default for fp32 is TF32, 10-bit mantissas)
                        part = tl.dot(w, tl.trans(a), input_precision="ieee")
                    else:
                        part = tl.dot(w, tl.trans(a))
                    if FP8:
                        part = part * sc[:, None]
                else:
                    if IEEE:
                        part = tl.dot(a, tl.trans(w), input_precision="ieee")
                    else:
                        part = tl.dot(a, tl.trans(w))
                    if FP8:
                        part = part * sc[None, :]
                acc += part
                if SWIGLU:
                    if TWO_BANKS:     # up rows up_off elements after the gate rows
                        w2 = tl.load(w_base + up_off + offs_n[:, None] * s_wn + offs_k[None, :], mask=wmask,
                                     other=0.0)
                    else:
                        w2 = tl.load(w_base + (N + offs_n)[:, None] * stride_wn + offs_k[None, :], mask=wmask,
                                     other=0.0)
                    if FP8:
                        sc2 = tl.load(s_base + ((N + offs_n) // 128) * stride_sn + k0 // 128, mask=nmask, other=0.0)
                        if FAST_CVT:
                            w2 = tl.inline_asm_elementwise(CVT_ASM, "=r,=r,r", [w2.to(tl.uint8, bitcast=True)],
                                                           dtype=tl.bfloat16, is_pure=True, pack=4)
                        else:
                            w2 = w2.to(tl.bfloat16)
                        w2 = w2.to(A.dtype.element_ty)
                    if SWAP:
                        if IEEE:
                            part2 = tl.dot(w2, tl.trans(a), input_precision="ieee")
                        else:
                            part2 = tl.dot(w2, tl.trans(a))
                        if FP8:
                            part2 = part2 * sc2[:, None]
                    else:
                        if IEEE:
                            part2 = tl.dot(a, tl.trans(w2), input_precision="ieee")
                        else:
                            part2 = tl.dot(a, tl.trans(w2))
                        if FP8:
                            part2 = part2 * sc2[None, :]
                    acc2 += part2
            if SWAP:
                acc = tl.trans(acc)
                acc2 = tl.trans(acc2)
            if SCATTER:
                orow = tl.load(ORDER + offs_m, mask=mmask, other=0)
            else:
                orow = offs_m
            omask = mmask[:, None] & nmask[None, :]
            if SPLIT_K > 1:                         # fp32 partial sums; splitk_reduce_kernel finishes
                p_ptr = PART + ks * stride_ps + orow[:, None].to(tl.int64) * stride_pm + offs_n[None, :]
                tl.store(p_ptr, acc, mask=omask)
                if SWIGLU:
                    tl.store(p_ptr + N, acc2, mask=omask)
            else:
                if SWIGLU:
                    y = acc / (1.0 + tl.exp(-acc)) * acc2
                else:
                    y = acc
                tl.store(OUT + orow[:, None].to(tl.int64) * stride_om + offs_n[None, :], y.to(OUT.dtype.element_ty),
                         mask=omask)

    @triton.jit
    def splitk_reduce_kernel(PART, OUT, N, stride_ps, stride_pm, stride_om,
                             SPLIT_K: tl.constexpr, SWIGLU: tl.constexpr, BLOCK: tl.constexpr):
        # out[row] = sum over the splits (then silu(gate) * up for SWIGLU), in a fixed order: deterministic
        row = tl.program_id(0)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < N
        base = PART + row.to(tl.int64) * stride_pm + offs
        acc = tl.zeros([BLOCK], tl.float32)
        acc2 = tl.zeros([BLOCK], tl.float32)
        for s in tl.static_range(SPLIT_K):
            acc += tl.load(base + s * stride_ps, mask=mask, other=0.0)
            if SWIGLU:
                acc2 += tl.load(base + s * stride_ps + N, mask=mask, other=0.0)
        if SWIGLU:
            acc = acc / (1.0 + tl.exp(-acc)) * acc2
        tl.store(OUT + row.to(tl.int64) * stride_om + offs, acc.to(OUT.dtype.element_ty), mask=mask)

    @triton.jit
    def pair_sum_kernel(Y, WTS, IDS, OUT, N, topk, lo0, hi0, lo1, hi1, lo2, hi2, lo3, hi3, stride_y, stride_o,
                        ACCUM: tl.constexpr, BLOCK: tl.constexpr):
        # out[t] = sum_j bf16(w[t, j]) * y[t * topk + j] over the pairs whose expert lies in a bank (the
        # others' rows were never written), fp32 sum in slot order, rounded once; ACCUM: out += that, rounded
        t = tl.program_id(0).to(tl.int64)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        m = offs < N
        dt = OUT.dtype.element_ty
        acc = tl.zeros([BLOCK], tl.float32)
        for j in range(0, topk):
            e = tl.load(IDS + t * topk + j)
            w = tl.load(WTS + t * topk + j).to(dt).to(tl.float32)
            inside = ((e >= lo0) & (e < hi0)) | ((e >= lo1) & (e < hi1)) | ((e >= lo2) & (e < hi2)) | \
                     ((e >= lo3) & (e < hi3))
            n_read = tl.where(inside, N, 0)                 # outside every bank: nothing read
            y = tl.load(Y + (t * topk + j) * stride_y + offs, mask=offs < n_read, other=0.0).to(tl.float32)
            acc += w * y
        c = acc.to(dt)
        if ACCUM:
            c = (tl.load(OUT + t * stride_o + offs, mask=m, other=0.0).to(tl.float32) + c.to(tl.float32)).to(dt)
        tl.store(OUT + t * stride_o + offs, c, mask=m)

    return align_kernel, grouped_kernel, splitk_reduce_kernel, pair_sum_kernel


def align(flat_ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Counting sort of pair expert ids: (order [rows] int32, offs [num_experts + 2] int32), see step 1."""
    align_kernel = _kernels()[0]
    rows = flat_ids.numel()
    order = torch.empty(rows, dtype=torch.int32, device=flat_ids.device)
    offs = torch.empty(num_experts + 2, dtype=torch.int32, device=flat_ids.device)
    align_kernel[(num_experts + 1,)](flat_ids, order, offs, rows, num_experts,
                                     BLOCK_R=max(16, min(1024, next_pow2(rows))), num_warps=4)
    return order, offs


@dataclass(frozen=True)
class TileConfig:
    """One launch's tiling: rows (tokens) per tile, weight rows per tile, K per step, warps, pipeline
    stages (0: as deep as shared memory allows, at most 4), `swap` (compute W x^T, so that the
    weight rows are the MMA's M side) and, for a dense launch, `split_k` (K split over that many
    programs, fp32 partials summed by a second kernel: more programs in flight when a small matrix
    gives too few N x M tiles); for routed experts `work_list` (one row of programs per M tile of an
    expert instead of one per expert, see the module docstring)."""
    block_m: int
    block_n: int
    block_k: int = 128
    warps: int = 4
    stages: int = 0
    swap: bool = False
    split_k: int = 1
    work_list: bool = False


# Benchmark hooks (scripts/gpu_kernels.py): {"swiglu" | "down" | "dense": TileConfig} replaces choose_tiles;
# FAST_FP8_CONVERT = False falls back to Triton's own e4m3 -> bf16 conversion.
TILE_OVERRIDE: dict[str, TileConfig] = {}
FAST_FP8_CONVERT = True

# FP8 e4m3 -> bf16 for 4 packed bytes with full-rate integer ops (Triton's own conversion compiles to
# conversion-unit instructions, F2FP + F2F, which bounded the FP8 kernels: docs/performance.md):
# sign to bit 15, the 7 exponent | mantissa bits shifted into bf16's fields (an e4m3 value times
# 2^-120, exact, subnormals included), then one bf16x2 multiply by 2^120 (0x7B80) restores the bias.
# The two NaN codes (0x7F, 0xFF) come out as +-480; quantized weights never hold them. CI executes
# these instructions by their PTX definitions (tests/model/test_fused_kernels.py).
FP8_TO_BF16_ASM = """{
.reg .b32 z, s0, s1, m0, m1, k, nz;
mov.b32 z, 0;
mov.b32 k, 0x7B807B80;
mov.b32 nz, 0x80008000;
prmt.b32 s0, $2, z, 0x1404;
prmt.b32 s1, $2, z, 0x3424;
shr.b32 m0, s0, 4;
shr.b32 m1, s1, 4;
and.b32 m0, m0, 0x07F007F0;
and.b32 m1, m1, 0x07F007F0;
and.b32 s0, s0, 0x80008000;
and.b32 s1, s1, 0x80008000;
or.b32 s0, s0, m0;
or.b32 s1, s1, m1;
fma.rn.bf16x2 $0, s0, k, nz;
fma.rn.bf16x2 $1, s1, k, nz;
}"""


def routed_tiles(rows_per_group: float) -> TileConfig:
    """The bf16 routed experts' tiling (both projections) by the mean (token, k) rows per expert, from the
    routed-experts sweep under the bench model's routing (scripts/gpu_decode_kernels.py --only routed_routing
    --routing-counts docs/results/routed_routing_h200_2026-12-01.json; one H200, 2026-12-02,
    docs/performance.md "Routed experts at 256 tokens, real routing"; us per MoE layer, all 26 layers in one
    CUDA graph, against the previous rule in the same call):
    - mean <= 4 (1-32 tokens of v2-lite): M 16, K 128, stages by the shared-memory budget, as before (at 32
      tokens M 16 with K 64 x 8 stages measured 195.2 vs 197.2: 1%, not taken; batch 1 was not measured);
    - mean <= 8 (64 tokens): M 32, K steps of 64 in 8 stages (160 KB of copies in flight): 223.0 vs 225.7
      (-1.2%; uniform routing -1.1%);
    - mean <= 16 (128 tokens): the same with the work list (one program row per M tile of an expert: a
      loaded expert's passes run side by side and share its weight reads in L2): 251.9 vs 263.5 (-4.4%;
      uniform routing +0.7%);
    - above (256 tokens): the work list with 128 weight rows per tile (two warpgroups, 8 warps), K 64 x 5
      stages: 291.2 vs 327.6 (-11%, 86.6% of copy bandwidth; uniform routing 295.6 vs 335.0).
    Measured and not taken: deeper pipelines (K 64 x 10 stages, K 32 x 16, M 32 x 5 stages of K 128: 3-14%
    slower), the work list at M 16 and M 64, a 6-stage down projection alone. The most loaded expert holds
    3-4x the mean under this routing (77 rows of a mean 24 at 256 tokens), which is why the work list wins
    there and not at 64 tokens. Only the v2-lite shapes were measured (64 experts, top-6, H 2048, I 1408)."""
    if rows_per_group <= 4:
        return TileConfig(16, 64, swap=True)
    if rows_per_group <= 8:
        return TileConfig(32, 64, block_k=64, stages=8, swap=True)
    if rows_per_group <= 16:
        return TileConfig(32, 64, block_k=64, stages=8, swap=True, work_list=True)
    return TileConfig(32, 128, block_k=64, warps=8, stages=5, swap=True, work_list=True)


def pipeline_stages(cfg: TileConfig, a_bytes: int, w_bytes: int, swiglu: bool) -> tuple[int, int]:
    """(K step, pipeline stages) of one launch: fp32 activations take K steps of at most 64; `cfg.stages`
    0 means as deep as 160 KB of shared memory allows (at most 4); an explicit depth is capped at 224 KB
    (an H200 gives one program at most 227 KB)."""
    block_k = cfg.block_k if a_bytes <= 2 else min(cfg.block_k, 64)
    per_stage = (cfg.block_m * a_bytes + (2 if swiglu else 1) * cfg.block_n * w_bytes) * block_k
    if cfg.stages:
        return block_k, max(1, min(cfg.stages, 224 * 1024 // per_stage))
    return block_k, max(1, min(4, 160 * 1024 // per_stage))


def choose_tiles(kind: str, rows_per_group: float, active_groups: int, n: int, fp8: bool, sms: int,
                 k: int = 0, rows: int = 0) -> TileConfig:
    """The tiling of one launch (kind "swiglu" / "down": routed experts, "dense": one weight matrix of
    n x k over `rows` rows), chosen from `scripts/gpu_kernels.py` on one H200 at the v2-lite shapes
    (docs/performance.md):
    - bf16 experts: the swapped orientation (weight rows on the warpgroup MMA's M side), best at 1-256
      tokens; M tile, weight rows, K step, depth and work list by `routed_tiles`;
    - FP8 experts: the plain orientation (the swapped one feeds the converted weights through
      registers and was 1.1-1.9x slower); N 64 when that gives >= 4 programs per SM over the experts
      that have rows, else 32;
    - FP8 dense at <= 64 rows: 16-row x 32-column tiles (more programs in flight; rows re-read from
      L2), K split in two or four while that keeps <= 2 programs per SM and >= 2 K steps per split
      (one row of a 2048 x 2048 matrix otherwise runs 64 programs on 132 SMs: 6.9 -> 5.7 us; eight
      splits and splits at 64 rows measured slower); bf16 dense and more rows: the FP8 expert rule.
    Otherwise M by the mean rows per group."""
    block_m = 16 if rows_per_group <= 16 else 32 if rows_per_group <= 32 else 64
    if kind == "dense" and fp8 and rows_per_group <= 64:
        block_n = min(32, max(16, next_pow2(n)))
        programs = -(-n // block_n) * -(-max(rows, 1) // 16)
        split = 1
        while split < 4 and 2 * split * programs <= 2 * sms and k >= 2 * split * 2 * 128:
            split *= 2
        return TileConfig(16, block_n, split_k=split)
    if kind != "dense" and not fp8 and n >= 64:
        return routed_tiles(rows_per_group)
    block_n = 64 if active_groups * -(-n // 64) >= 4 * sms else 32   # 16-row tiles measured slower at T=1
    block_n = min(block_n, max(16, next_pow2(n)))
    return TileConfig(block_m, block_n)


def _launch(kind, a, order, offs, w, ws, out, first, groups, dense_rows, n, k, topk, swiglu, gather, scatter,
            rows_per_group, active_groups, second: tuple | None = None):
    """One grouped_kernel launch (and its split-K reduce). `second` = (n_a, weight view, stride per expert, stride
    per weight row, up offset of `w`, up offset of the view): groups from n_a on read the view (bf16 only)."""
    _, grouped_kernel, splitk_reduce_kernel, _ = _kernels()
    fp8 = ws is not None
    cfg = TILE_OVERRIDE.get(kind) or choose_tiles(kind, rows_per_group, active_groups, n, fp8, sm_count(a.device),
                                                  k, dense_rows)
    block_k, stages = pipeline_stages(cfg, a.element_size(), w.element_size(), swiglu)
    if not a.is_cuda:
        stages = 1
    dense = offs is None
    if dense:
        groups = -(-dense_rows // cfg.block_m)
    split = cfg.split_k if dense and not scatter else 1
    part = (torch.empty(split, dense_rows, (2 if swiglu else 1) * n, dtype=torch.float32, device=a.device)
            if split > 1 else out)
    dummy = out
    fast_cvt = FAST_FP8_CONVERT and fp8 and a.is_cuda and not _interpreting()   # inline PTX: not in the interpreter
    work_list = cfg.work_list and not dense
    # work list: at most one partial M tile per expert plus the full ones (rows / block_m)
    programs = groups + -(-order.numel() // cfg.block_m) if work_list else groups
    grouped_kernel[(-(-n // cfg.block_n), programs, split)](
        a, order if order is not None else dummy, offs if offs is not None else dummy, w,
        ws if fp8 else dummy, out, part, first, groups, dense_rows, n, k, topk,
        a.stride(0), w.stride(0) if w.dim() == 3 else 0, w.stride(-2),
        (ws.stride(0) if ws.dim() == 3 else 0) if fp8 else 0, ws.stride(-2) if fp8 else 0, out.stride(0),
        part.stride(0) if split > 1 else 0, part.stride(1) if split > 1 else 0,
        SWIGLU=swiglu, GATHER=gather, SCATTER=scatter, DENSE=dense, FP8=fp8,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=block_k, SWAP=cfg.swap, FAST_CVT=fast_cvt,
        CVT_ASM=FP8_TO_BF16_ASM if fast_cvt else "", SPLIT_K=split,
        IEEE=a.dtype == torch.float32, WORK_LIST=max(2, next_pow2(groups)) if work_list else 0,
        WB=second[1] if second else w, n_a=second[0] if second else groups,
        stride_we_b=second[2] if second else 0, stride_wn_b=second[3] if second else 0,
        up_a=second[4] if second else 0, up_b=second[5] if second else 0, TWO_BANKS=second is not None,
        num_warps=cfg.warps, num_stages=stages)
    if split > 1:
        block = min(1024, max(16, next_pow2(n)))
        splitk_reduce_kernel[(dense_rows, -(-n // block))](part, out, n, part.stride(0), part.stride(1), out.stride(0),
                                                            SPLIT_K=split, SWIGLU=swiglu, BLOCK=block, num_warps=4)


@dataclass(frozen=True)
class SharedExperts:
    """A dense SwiGLU MLP of intermediate count * I (the MoE's shared experts) seen as `count` experts of
    intermediate I, read in place: gate_up [2 * count * I, H] = [gate; up], down [H, count * I]; expert j is gate
    rows jI.., up rows count * I + jI.., down columns jI... Its output is the sum of the `count` experts' outputs
    (SwiGLU is per intermediate row, the down projection a sum over them)."""
    gate_up: torch.Tensor
    down: torch.Tensor
    count: int

    @property
    def intermediate(self) -> int:
        return self.down.shape[1] // self.count


def routed_experts_fused(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, banks: list,
                         out: torch.Tensor | None = None, shared: SharedExperts | None = None) -> torch.Tensor:
    """See the module docstring. banks: `model.experts.ExpertBank`s (bf16, or FP8 with scales).

    `shared` (bf16 banks, bf16 shared experts of the banks' intermediate size): the shared experts run as
    always-selected experts E + j (E = the last bank's end: one expert past every routed id) in the same two
    launches as the last bank's experts (their programs fill the GPU beside the few routed experts of a small
    batch; the other banks, e.g. DWDP's local shard and prefetched peers, launch as before); topk_ids /
    topk_weights must then hold those ids with weight 1 (`kernels/router.noaux_tc_route(always_on=)`)."""
    T, k = topk_ids.shape
    if T == 0 or not banks:
        return torch.zeros_like(x) if out is None else out
    if x.stride(1) != 1:
        x = x.contiguous()
    Hd = x.shape[1]
    rows = T * k
    E = max(b.first + b.count for b in banks)
    I = banks[0].w13.shape[1] // 2
    last = max(banks, key=lambda bk: bk.first + bk.count)  # the bank the shared experts join
    second_up = second_down = None
    ranges = bank_ranges(banks)
    if shared is not None:
        if any(bk.w13_scale is not None for bk in banks) or shared.gate_up.dtype != last.w13.dtype \
                or shared.intermediate != I or shared.gate_up.stride(1) != 1 or shared.down.stride(1) != 1:
            raise ValueError("shared experts fold: needs bf16 banks and shared experts of their intermediate "
                             f"size {I} (got {shared.intermediate}, {shared.gate_up.dtype})")
        S, g = shared.count, shared.gate_up
        second_up = (last.count, g, I * g.stride(0), g.stride(0), I * last.w13.stride(1), S * I * g.stride(0))
        second_down = (last.count, shared.down, I, shared.down.stride(0), 0, 0)
        E += S
        ranges = bank_ranges(banks + [SimpleNamespace(first=E - S, count=S)])    # E - S = the last bank's end
    order, offs = align(topk_ids.reshape(-1), E)
    h = torch.empty(rows, I, dtype=x.dtype, device=x.device)
    # rows of pairs outside every bank are never written: pair_sum skips them by id (<= 4 id ranges), else zeros
    y = (torch.empty if len(ranges) <= 4 else torch.zeros)(rows, Hd, dtype=x.dtype, device=x.device)
    per_group = rows / max(1, E)
    active = min(rows, E)                                   # experts that can have rows
    for b in banks:
        extra = shared.count if shared is not None and b is last else 0
        _launch("swiglu", x, order, offs, b.w13, b.w13_scale, h, b.first, b.count + extra, 0, I, Hd, k, True, True,
                False, per_group, min(active, b.count + extra), second_up if extra else None)
    for b in banks:
        extra = shared.count if shared is not None and b is last else 0
        _launch("down", h, order, offs, b.w2, b.w2_scale, y, b.first, b.count + extra, 0, Hd, I, k, False, False,
                True, per_group, min(active, b.count + extra), second_down if extra else None)
    return pair_sum(y, topk_weights, topk_ids, ranges, out)


def bank_ranges(banks: list) -> list[tuple[int, int]]:
    """The banks' expert ids as merged [lo, hi) ranges, ascending."""
    merged: list[list[int]] = []
    for lo, hi in sorted((b.first, b.first + b.count) for b in banks):
        if merged and lo <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], hi)
        else:
            merged.append([lo, hi])
    return [(lo, hi) for lo, hi in merged]


def pair_sum(y: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, ranges: list[tuple[int, int]],
             out: torch.Tensor | None = None) -> torch.Tensor:
    """Step 4 in one kernel: out[t] = sum_j w[t, j] * y[t * k + j] with the weights rounded to y's
    dtype and an fp32 sum rounded once (what `torch.bmm(w.to(dtype)[T, 1, k], y[T, k, H])` computes, up
    to the order of the k terms); pairs whose id lies in none of `ranges` count 0 (their rows may hold
    anything when there are <= 4 ranges; more ranges: y must hold zeros there and every pair is read).
    `out` given: out += the sum (rounded once more, as `out.add_` does), in place. Replaces the weight
    cast, the zero fill of y, the batched product and the add (four kernels)."""
    T, k = topk_ids.shape
    N = y.shape[1]
    pair_sum_kernel = _kernels()[3]
    if len(ranges) > 4:
        ranges = [(-(1 << 62), 1 << 62)]
    flat = [v for r in ranges for v in r] + [0, 0] * (4 - len(ranges))
    res = torch.empty(T, N, dtype=y.dtype, device=y.device) if out is None else out
    if T == 0:
        return res
    sms = sm_count(y.device)
    block = min(next_pow2(N), 256 if T * -(-N // 1024) < 2 * sms else 1024)
    pair_sum_kernel[(T, -(-N // block))](y, topk_weights.contiguous(), topk_ids.contiguous(), res, N, k, *flat,
                                        y.stride(0), res.stride(0), ACCUM=out is not None, BLOCK=block, num_warps=4)
    return res


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
        _launch("dense", x2, None, None, weight, scale_inv, out, 0, 1, M, N, K, 1, False, False, False, M, -(-M // 64))
    return out.view(*shape[:-1], N)


def dense_swiglu(x: torch.Tensor, w13: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """silu(x @ gate^T) * (x @ up^T) for w13 = [gate; up] [2I, H] (bf16, or FP8 with block scales), one
    kernel: the dense MLP's first half for small batches."""
    x2 = x if x.stride(-1) == 1 else x.contiguous()
    M = x2.shape[0]
    inter = w13.shape[0] // 2
    out = torch.empty(M, inter, dtype=x.dtype, device=x.device)
    if M:
        _launch("dense", x2, None, None, w13, scale, out, 0, 1, M, inter, x2.shape[1], 1, True, False, False, M,
                -(-M // 64))
    return out


def _interpreting() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET") == "1"
