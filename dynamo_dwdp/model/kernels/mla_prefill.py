"""MLA prefill attention (expanded form) as one Triton flash-attention kernel.

Contract: q_nope [T, h, N], q_pe [T, h, R], k_nope [S, h, N], k_pe [S, R] (the one rotated key all
heads share), v [S, h, V], any strides with a unit last dimension; returns out [T, h, V] in q's
dtype. The T queries are the last T of the S positions: query i sits at S - T + i and attends keys
0..S - T + i (bottom-right causal; T == S is plain causal prefill). Scores are
scale * (q_nope . k_nope + q_pe . k_pe); the softmax is online (running max and sum in fp32, exp2),
so no S x S score matrix exists. N, R and V must be powers of two (DeepSeek: 128, 64, 128).

Why hand-written: PyTorch's flash backend refuses the MLA head dims (qk 192, v 128), so SDPA falls
back to its memory-efficient kernel, and no flash_attn package is installed. This kernel
also reads the query as its two parts and k_pe once for all heads, so neither the query
concatenation nor a per-head copy of k_pe is built. Key blocks wholly below a query block's
diagonal run without masks; only the diagonal blocks are masked; programs start longest first over all
heads (`mla_prefill_kernel`). fp32 inputs use IEEE fp32 dots (the correctness reference path); 16-bit
inputs the tensor cores with fp32 accumulation.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

LOG2E = 1.4426950408889634


@dataclass(frozen=True)
class Tile:
    """One compiled form of the kernel: query rows and keys per block, warps, pipeline stages."""
    block_m: int
    block_n: int
    warps: int
    stages: int


# Tiles for 16-bit inputs on the GPU, which scripts/gpu_prefill.py checks and times; "default" runs
# unless $DWDP_PREFILL_TILE names another (for measurements). One fixed tile, not an autotuner:
# autotuning ran on a request's path (three compiles and timed runs the first time each context-length
# bucket came). On one H200 (docs/results/gpu_prefill_tiles_h200_2026-12-02.md) "default" ran a
# causal 8K prompt in 0.73 ms per layer, against 0.80 for cuDNN and 0.82-0.86 for this kernel before
# its grid order and fused scale; "stages4" and block_n 128 were slower. None of them spills.
GPU_TILES = {
    "default": Tile(128, 64, 8, 3),
    "stages4": Tile(128, 64, 8, 4),
    "block_n128": Tile(128, 128, 8, 2),
}
GPU_TILE = "default"
TILE_ENV = "DWDP_PREFILL_TILE"
# fp32 inputs (the correctness path) take one small tile: fp32 operands in large tiles spill so much
# that ptxas needs tens of seconds or more per variant
FP32_TILE = Tile(32, 32, 4, 1)
INTERPRETER_TILE = Tile(16, 16, 4, 1)


def gpu_tile() -> Tile:
    """The tile 16-bit inputs run on CUDA: $DWDP_PREFILL_TILE if set (a name of GPU_TILES), else GPU_TILE."""
    name = os.environ.get(TILE_ENV, "") or GPU_TILE
    if name not in GPU_TILES:
        raise ValueError(f"{TILE_ENV}={name!r} is not one of {', '.join(GPU_TILES)}")
    return GPU_TILES[name]


try:                                   # kernels at module level: Triton resolves helper calls as globals
    import triton
    import triton.language as tl
except ImportError:                    # no Triton: available() is False and nothing here is called
    triton = None

if triton is not None:
    @triton.jit
    def attend_block(acc, m_i, l_i, q_n, q_p, KN, KP, V, start_n, S, offset, offs_m, offs_n, offs_d, offs_r, offs_v,
                     qk_scale, s_kn_s, s_kp_s, s_v_s, MASK: tl.constexpr, IEEE: tl.constexpr):
        """One key block of the online softmax (KN, V: this head's base pointers); MASK: the block
        crosses the diagonal or the end of the keys. The scale is applied inside exp2's argument (one
        FMA per score; the row max is taken on the raw scores, scale > 0), and the 16-bit dots
        accumulate in place (the rope part onto the nope part's scores, p @ v onto the rescaled sum)."""
        keys = start_n + offs_n                 # int32 offsets (S * stride < 2**31, checked by the wrapper)
        key_ok = keys < S
        if MASK:
            k_n = tl.load(KN + keys[None, :] * s_kn_s + offs_d[:, None], mask=key_ok[None, :], other=0.0)
            k_p = tl.load(KP + keys[None, :] * s_kp_s + offs_r[:, None], mask=key_ok[None, :], other=0.0)
        else:
            k_n = tl.load(KN + keys[None, :] * s_kn_s + offs_d[:, None])
            k_p = tl.load(KP + keys[None, :] * s_kp_s + offs_r[:, None])
        if IEEE:
            s = tl.dot(q_n, k_n, input_precision="ieee") + tl.dot(q_p, k_p, input_precision="ieee")
        else:
            s = tl.dot(q_p, k_p, tl.dot(q_n, k_n))
        if MASK:
            v = tl.load(V + keys[:, None] * s_v_s + offs_v[None, :], mask=key_ok[:, None], other=0.0)
        else:
            v = tl.load(V + keys[:, None] * s_v_s + offs_v[None, :])
        if MASK:
            visible = (keys[None, :] <= (offset + offs_m)[:, None]) & key_ok[None, :]
            s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        p = tl.math.exp2(s * qk_scale - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        return acc, m_new, l_i

    @triton.jit(do_not_specialize=["T", "S"])     # one compiled kernel for every chunk and context length
    def mla_prefill_kernel(QN, QP, KN, KP, V, O, T, S, qk_scale,
                           s_qn_t, s_qn_h, s_qp_t, s_qp_h, s_kn_s, s_kn_h, s_kp_s, s_v_s, s_v_h, s_o_t, s_o_h,
                           N: tl.constexpr, R: tl.constexpr, DV: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr):
        """Grid (heads, query blocks), longest block first: the hardware starts programs in order, so
        every head's longest (causal) query block starts before any shorter one and the shortest run
        last (a grid of (query blocks, heads) started the last heads' longest blocks last: 11% slower
        at 8K causal tokens on one H200)."""
        num_m = tl.cdiv(T, BLOCK_M)
        head = tl.program_id(0)
        start_m = num_m - 1 - tl.program_id(1)
        offset = S - T                                    # cached keys before the chunk
        offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, N)
        offs_r = tl.arange(0, R)
        offs_v = tl.arange(0, DV)
        rows = offs_m.to(tl.int64)
        row_ok = offs_m < T
        q_n = tl.load(QN + rows[:, None] * s_qn_t + head * s_qn_h + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        q_p = tl.load(QP + rows[:, None] * s_qp_t + head * s_qp_h + offs_r[None, :], mask=row_ok[:, None], other=0.0)
        KN_h = KN + head.to(tl.int64) * s_kn_h
        V_h = V + head.to(tl.int64) * s_v_h
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, DV], tl.float32)
        first_pos = offset + start_m * BLOCK_M            # position of the block's first query
        full_end = ((first_pos + 1) // BLOCK_N) * BLOCK_N  # keys [0, full_end) are visible to every row (<= S)
        hi = tl.minimum(S, first_pos + BLOCK_M)
        for start_n in range(0, full_end, BLOCK_N):        # below the diagonal: no masks
            start_n = tl.multiple_of(start_n, BLOCK_N)
            acc, m_i, l_i = attend_block(acc, m_i, l_i, q_n, q_p, KN_h, KP, V_h, start_n, S, offset, offs_m, offs_n,
                                         offs_d, offs_r, offs_v, qk_scale, s_kn_s, s_kp_s, s_v_s, False, IEEE)
        for start_n in range(full_end, hi, BLOCK_N):       # the diagonal (and the last, partial) blocks
            start_n = tl.multiple_of(start_n, BLOCK_N)
            acc, m_i, l_i = attend_block(acc, m_i, l_i, q_n, q_p, KN_h, KP, V_h, start_n, S, offset, offs_m, offs_n,
                                         offs_d, offs_r, offs_v, qk_scale, s_kn_s, s_kp_s, s_v_s, True, IEEE)
        out = acc / l_i[:, None]
        tl.store(O + rows[:, None] * s_o_t + head * s_o_h + offs_v[None, :], out.to(O.dtype.element_ty),
                 mask=row_ok[:, None])


def _kernel():
    return mla_prefill_kernel


def _check(q_nope, q_pe, k_nope, k_pe, v) -> None:
    T, h, N = q_nope.shape
    S = k_nope.shape[0]
    R, DV = q_pe.shape[-1], v.shape[-1]
    want = {"q_pe": (T, h, R), "k_nope": (S, h, N), "k_pe": (S, R), "v": (S, h, DV)}
    for name, t in (("q_pe", q_pe), ("k_nope", k_nope), ("k_pe", k_pe), ("v", v)):
        if tuple(t.shape) != want[name]:
            raise ValueError(f"mla_prefill: {name} has shape {tuple(t.shape)}, expected {want[name]}")
    for name, t in (("q_nope", q_nope), ("q_pe", q_pe), ("k_nope", k_nope), ("k_pe", k_pe), ("v", v)):
        if t.stride(-1) != 1:
            raise ValueError(f"mla_prefill: {name} needs a unit stride in its last dimension")
    for name, d in (("nope dim", N), ("rope dim", R), ("v dim", DV)):
        if d < 16 or d & (d - 1):
            raise ValueError(f"mla_prefill: {name} {d} must be a power of two >= 16")
    if max((S - 1) * t.stride(0) + (h - 1) * t.stride(1) for t in (k_nope, v)) >= 2 ** 31:
        raise ValueError(f"mla_prefill: {S} keys exceed the kernel's 32-bit key offsets")
    if T > S:
        raise ValueError(f"mla_prefill: {T} queries but only {S} keys (the queries are the last T positions)")


def mla_prefill_attention(q_nope: torch.Tensor, q_pe: torch.Tensor, k_nope: torch.Tensor, k_pe: torch.Tensor,
                          v: torch.Tensor, scale: float, tile: Tile | str | None = None,
                          out: torch.Tensor | None = None) -> torch.Tensor:
    """out [T, h, V] (see the module docstring). tile: a Tile or a name of GPU_TILES; None takes
    `gpu_tile()` on CUDA for 16-bit inputs, FP32_TILE for fp32 and INTERPRETER_TILE under the
    interpreter. The lengths T and S are not specialized on: every length runs the kernel compiled
    once per tile, dtype and head dims (`warm_up`). `out`: where to write (e.g. a batch's rows of one
    sequence, any strides with a unit last one), instead of a new tensor."""
    _check(q_nope, q_pe, k_nope, k_pe, v)
    if not scale > 0:
        raise ValueError(f"mla_prefill: scale {scale} must be > 0 (the row max is taken before scaling)")
    T, h, N = q_nope.shape
    S = k_nope.shape[0]
    R, DV = q_pe.shape[-1], v.shape[-1]
    if out is None:
        out = torch.empty(T, h, DV, device=q_nope.device, dtype=q_nope.dtype)
    elif tuple(out.shape) != (T, h, DV) or out.dtype != q_nope.dtype or out.stride(-1) != 1:
        raise ValueError(f"mla_prefill: out must be {(T, h, DV)} {q_nope.dtype} with a unit last stride, got "
                         f"{tuple(out.shape)} {out.dtype}")
    if T == 0:
        return out
    ieee = q_nope.dtype == torch.float32
    if tile is None:
        tile = (FP32_TILE if ieee else gpu_tile()) if q_nope.is_cuda else INTERPRETER_TILE
    elif isinstance(tile, str):
        if tile not in GPU_TILES:
            raise ValueError(f"mla_prefill: tile {tile!r} is not one of {', '.join(GPU_TILES)}")
        tile = GPU_TILES[tile]
    if triton_cdiv(T, tile.block_m) > 65535:          # the grid's second dimension
        raise ValueError(f"mla_prefill: {T} queries exceed {65535 * tile.block_m} for one launch")
    args = (q_nope, q_pe, k_nope, k_pe, v, out, T, S, float(scale) * LOG2E,
            q_nope.stride(0), q_nope.stride(1), q_pe.stride(0), q_pe.stride(1), k_nope.stride(0), k_nope.stride(1),
            k_pe.stride(0), v.stride(0), v.stride(1), out.stride(0), out.stride(1))
    _kernel()[(h, triton_cdiv(T, tile.block_m))](*args, N=N, R=R, DV=DV, BLOCK_M=tile.block_m, BLOCK_N=tile.block_n,
                                                 IEEE=ieee, num_warps=tile.warps, num_stages=tile.stages)
    return out


def triton_cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def reference(q_nope, q_pe, k_nope, k_pe, v, scale) -> torch.Tensor:
    """float64 reference of the same contract: full scores, bottom-right causal mask, softmax."""
    T, S = q_nope.shape[0], k_nope.shape[0]
    qn, qp, kn, kp, vv = (t.double() for t in (q_nope, q_pe, k_nope, k_pe, v))
    scores = (torch.einsum("thn,shn->hts", qn, kn) + torch.einsum("thr,sr->hts", qp, kp)) * scale
    pos = torch.arange(T, device=scores.device).view(T, 1) + (S - T)
    scores = scores.masked_fill(torch.arange(S, device=scores.device).view(1, S) > pos, float("-inf"))
    return torch.einsum("hts,shv->thv", torch.softmax(scores, -1), vv)
