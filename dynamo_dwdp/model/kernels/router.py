"""DeepSeek-V3 noaux_tc router in two Triton kernels (the torch reference: `model/moe.py` Router).

Contract: x [T, H] (any float dtype), weight [E, H] float32, bias [E] and skew [E] float32 ->
(ids [T, k] int64, weights [T, k] float32), the same function as the reference: fp32 logits
x @ W^T, sigmoid scores, selection scores = scores + bias + skew, groups scored by the sum of their
top-2 selection scores, the best `topk_group` groups kept, the top-k experts among them picked,
weights = their unbiased scores (normalised if `norm_topk_prob`) times `routed_scaling_factor`.
The k ids come out in descending selection order (the reference's order is unspecified); ties go to
the lower expert id.

1. `logits_kernel`: fp32 x @ W^T over a grid of
   (token tile, expert tile, K split); each K split writes its own partial sum, so that a decode
   step of one token still spreads the router weight's bytes over the whole GPU, deterministically.
   fp32 x: IEEE fp32 dots (FMA units). bf16 x (the bf16 model): each fp32 weight tile is split in
   registers into three bf16 parts whose sum is exactly the weight (hi = bf16(w), mid = bf16(w - hi),
   lo = w - hi - mid, each exact) and x is multiplied with each on tensor cores: bf16 x bf16 products
   are exact in fp32, so the logits are the fp32 product up to summation order, like cuBLAS's, at
   tensor-core speed (the IEEE dots took 25 us per layer at 256 tokens on an H200).
2. `select_kernel`: sums the partials in a fixed order and does the whole selection in registers.
   Up to FUSED_SELECT_MAX_ROWS tokens and FUSED_SELECT_MAX_EXPERTS experts (measured below) it is no second
   launch: each
   logits program counts itself in on its token tile's counter (an acq_rel atomic, which publishes its partial sums) and the last one
   to arrive runs the same selection code (bitwise the same result; one launch instead of two, the
   second being a few-microsecond latency-bound launch in every layer of a small decode batch).
Replaces ~20 small torch kernels per layer (casts, sigmoid, adds, two top-k, scatter, masked_fill,
gather, normalisation); Inductor fuses the elementwise part but not the selections.

Above LOGITS_KERNEL_MAX_ROWS tokens (prefill) the logits come from cuBLAS instead: the logits kernel's
16x16 tiles suit decode's few rows, and at 8192 rows it took 647 us per layer on an H200 (profile of an
8K-token prefill, 2026-12-01), about 3 TFLOP/s. For bf16 x the same exact three-way split runs as one bf16
GEMM with fp32 output against the stacked parts [hi; mid; lo] (`stacked_split3`, cached per weight), the three
products being three "partials" that `select_kernel` sums; otherwise one fp32 GEMM (the fp32 GEMM ran
on FMA units: 1.6 ms of an 8K prefill's 100 ms in the same profile).
"""
from __future__ import annotations

import functools

import torch

from dynamo_dwdp.model.kernels import env_count, next_pow2, sm_count


_MM_OUT_DTYPE = "dtype" in torch.ops.aten.mm.overloads()      # torch >= 2.8: bf16 mm with an fp32 result (CUDA)


def stacked_split3(weight: torch.Tensor) -> torch.Tensor:
    """fp32 [E, H] -> bf16 [3E, H] = [hi; mid; lo] with hi + mid + lo == weight exactly (each part the
    bf16 rounding of what the parts before it left: 3 x 8 significand bits cover fp32's 24). Cached on
    the weight for its current storage and version (the router weight is read in every prefill layer)."""
    key = (weight.data_ptr(), weight._version, tuple(weight.shape))
    cached = getattr(weight, "_dwdp_split3", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    w = weight.float()
    hi = w.bfloat16()
    rest = w - hi.float()
    mid = rest.bfloat16()
    parts = torch.cat([hi, mid, (rest - mid.float()).bfloat16()])
    weight._dwdp_split3 = (key, parts)
    return parts


LOGITS_KERNEL_MAX_ROWS = 512      # decode's CUDA-graph batches (<= 256 rows) stay on the Triton logits kernel
# Rows (and experts) up to which the logits kernel's last program per token tile selects (one launch). One
# H200, 2026-12-02 (scripts/gpu_b1.py; CUDA graph, bitwise equal to the two kernels in 200 repeats): 64 experts,
# H 2048: 1 row 6.99 vs 7.81 us, 8 rows 7.01 vs 8.09, 64 rows 10.67 vs 8.76 (slower); 256 experts, H 7168: 41.1
# vs 25.5 us at 1 row, 45.9 vs 28.2 at 8 (slower: the last program's selection over 256 experts is serial
# work on one SM after the logits). The batch-1 decode step: 3.058 -> 3.026 ms (docs/performance.md).
FUSED_SELECT_MAX_ROWS: int | None = None   # None: $DWDP_ROUTER_FUSED_SELECT_ROWS, default 8 (`fused_select_max_rows`)
FUSED_SELECT_MAX_EXPERTS = 64


def fused_select_max_rows() -> int:
    """FUSED_SELECT_MAX_ROWS, or the environment's value when it is None (checked: a whole number >= 0)."""
    if FUSED_SELECT_MAX_ROWS is not None:
        return FUSED_SELECT_MAX_ROWS
    return _select_rows_from_env()


@functools.cache
def _select_rows_from_env() -> int:
    return env_count("DWDP_ROUTER_FUSED_SELECT_ROWS", 8)     # read once per process (every router call asks)
FUSED_SELECT_ROWS_TESTED = 64
SPLITS_OVERRIDE: int | None = None   # benchmark hook (scripts/gpu_decode_kernels.py): the logits kernel's K splits


@functools.cache
def _kernels():
    import triton
    import triton.language as tl

    global _select_tile
    _select_tile = _select_fn()

    @triton.jit
    def logits_kernel(X, W, P, T, E, K, K_PER, stride_xt, stride_we, stride_ps, stride_pt,
                      CNT, BIAS, SKEW, IDS, WTS, TOPK_GROUP, scaling,
                      BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT3: tl.constexpr,
                      FUSED: tl.constexpr, TOPK: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, EP: tl.constexpr,
                      NORM: tl.constexpr, KP: tl.constexpr, EXTRA: tl.constexpr, XP: tl.constexpr):
        pt = tl.program_id(0)
        pe = tl.program_id(1)
        s = tl.program_id(2)
        offs_t = pt * BLOCK_T + tl.arange(0, BLOCK_T)
        offs_e = pe * BLOCK_E + tl.arange(0, BLOCK_E)
        tmask = offs_t < T
        emask = offs_e < E
        acc = tl.zeros([BLOCK_T, BLOCK_E], tl.float32)
        k_lo = s * K_PER
        k_hi = tl.minimum(k_lo + K_PER, K)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            kmask = offs_k < k_hi
            x = tl.load(X + offs_t[:, None] * stride_xt + offs_k[None, :], mask=tmask[:, None] & kmask[None, :],
                        other=0.0)
            w = tl.load(W + offs_e[:, None] * stride_we + offs_k[None, :], mask=emask[:, None] & kmask[None, :],
                        other=0.0).to(tl.float32)
            if SPLIT3:      # bf16 x: w = hi + mid + lo exactly (3 x 8 significant bits), exact products on tensor cores
                w_hi = w.to(tl.bfloat16)
                r = w - w_hi.to(tl.float32)
                w_mid = r.to(tl.bfloat16)
                w_lo = (r - w_mid.to(tl.float32)).to(tl.bfloat16)
                acc += tl.dot(x, tl.trans(w_lo))
                acc += tl.dot(x, tl.trans(w_mid))
                acc += tl.dot(x, tl.trans(w_hi))
            else:
                acc += tl.dot(x.to(tl.float32), tl.trans(w), input_precision="ieee")
        tl.store(P + s * stride_ps + offs_t[:, None] * stride_pt + offs_e[None, :], acc,
                 mask=tmask[:, None] & emask[None, :])
        if FUSED:      # the last program of this token tile to finish does the selection (no second launch)
            n = tl.num_programs(1) * tl.num_programs(2)
            tl.debug_barrier()                   # every thread's partial store happens before the release below
            arrived = tl.atomic_add(CNT + pt, 1, sem="acq_rel", scope="gpu")     # releases the stores above
            if arrived == n - 1:
                tl.atomic_xchg(CNT + pt, 0, sem="relaxed", scope="gpu")         # ready for the next launch
                _select_tile(P, BIAS, SKEW, IDS, WTS, offs_t, T, E, tl.num_programs(2), TOPK_GROUP, stride_ps,
                             stride_pt, scaling, TOPK, G, GP, EP, BLOCK_T, NORM, KP, True, EXTRA, XP)

    @triton.jit
    def select_kernel(P, BIAS, SKEW, IDS, WTS, T, E, S, TOPK_GROUP, stride_ps, stride_pt, scaling,
                      K: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, EP: tl.constexpr,
                      BLOCK_T: tl.constexpr, NORM: tl.constexpr, KP: tl.constexpr, EXTRA: tl.constexpr,
                      XP: tl.constexpr):
        offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        _select_tile(P, BIAS, SKEW, IDS, WTS, offs_t, T, E, S, TOPK_GROUP, stride_ps, stride_pt, scaling,
                     K, G, GP, EP, BLOCK_T, NORM, KP, False, EXTRA, XP)

    return logits_kernel, select_kernel


@functools.cache
def _select_fn():
    import triton
    import triton.language as tl

    @triton.jit
    def _select_tile(P, BIAS, SKEW, IDS, WTS, offs_t, T, E, S, TOPK_GROUP, stride_ps, stride_pt, scaling,
                     K: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, EP: tl.constexpr,
                     BLOCK_T: tl.constexpr, NORM: tl.constexpr, KP: tl.constexpr, L2: tl.constexpr,
                     EXTRA: tl.constexpr, XP: tl.constexpr):
        # the selection of tokens offs_t from the S partial logits (L2: read past L1, other programs wrote them);
        # rows of K + EXTRA: the EXTRA always-on experts E.. E + EXTRA - 1 follow the k picks with weight 1
        offs_e = tl.arange(0, EP)
        tmask = offs_t < T
        emask = offs_e < E
        m2 = tmask[:, None] & emask[None, :]
        logits = tl.zeros([BLOCK_T, EP], tl.float32)
        for s in range(0, S):                                  # fixed order: deterministic
            p_ptr = P + s * stride_ps + offs_t[:, None] * stride_pt + offs_e[None, :]
            if L2:
                logits += tl.load(p_ptr, mask=m2, other=0.0, cache_modifier=".cg")
            else:
                logits += tl.load(p_ptr, mask=m2, other=0.0)
        scores = tl.sigmoid(logits)
        bias = tl.load(BIAS + offs_e, mask=emask, other=0.0) + tl.load(SKEW + offs_e, mask=emask, other=0.0)
        choice = tl.where(emask[None, :], scores + bias[None, :], float("-inf"))
        if G > 1:
            per = E // G
            grp = offs_e // per
            offs_g = tl.arange(0, GP)
            gscore = tl.full([BLOCK_T, GP], float("-inf"), tl.float32)
            for g in tl.static_range(G):
                c = tl.where((grp == g)[None, :], choice, float("-inf"))
                m1 = tl.max(c, 1)
                i1 = tl.min(tl.where(c == m1[:, None], offs_e[None, :], EP), 1)
                c = tl.where(offs_e[None, :] == i1[:, None], float("-inf"), c)
                top2 = m1 + tl.max(c, 1)
                gscore = tl.where(offs_g[None, :] == g, top2[:, None], gscore)
            keep = tl.zeros([BLOCK_T, GP], tl.int32)
            for _ in range(0, TOPK_GROUP):
                mg = tl.max(gscore, 1)
                ig = tl.min(tl.where(gscore == mg[:, None], offs_g[None, :], GP), 1)
                hit = offs_g[None, :] == ig[:, None]
                keep = tl.where(hit, 1, keep)
                gscore = tl.where(hit, float("-inf"), gscore)
            allowed = tl.zeros([BLOCK_T, EP], tl.int32)
            for g in tl.static_range(G):
                kg = tl.sum(tl.where(offs_g[None, :] == g, keep, 0), 1)          # [BLOCK_T]
                allowed = tl.where((grp == g)[None, :] & (kg[:, None] > 0), 1, allowed)
            choice = tl.where(allowed > 0, choice, float("-inf"))
        offs_k = tl.arange(0, KP)
        kmask = offs_k < K
        total = tl.zeros([BLOCK_T], tl.float32)
        id_all = tl.zeros([BLOCK_T, KP], tl.int64)
        w_all = tl.zeros([BLOCK_T, KP], tl.float32)
        for j in tl.static_range(K):
            m = tl.max(choice, 1)
            idx = tl.min(tl.where(choice == m[:, None], offs_e[None, :], EP), 1)
            hit = offs_e[None, :] == idx[:, None]
            w = tl.sum(tl.where(hit, scores, 0.0), 1)
            total += w
            id_all = tl.where(offs_k[None, :] == j, idx[:, None].to(tl.int64), id_all)
            w_all = tl.where(offs_k[None, :] == j, w[:, None], w_all)
            choice = tl.where(hit, float("-inf"), choice)
        if NORM:
            w_all = w_all * (scaling / (total + 1e-20))[:, None]
        else:
            w_all = w_all * scaling
        out = offs_t[:, None] * (K + EXTRA) + offs_k[None, :]
        omask = tmask[:, None] & kmask[None, :]
        tl.store(IDS + out, id_all, mask=omask)
        tl.store(WTS + out, w_all, mask=omask)
        if EXTRA > 0:
            offs_x = tl.arange(0, XP)
            xout = offs_t[:, None] * (K + EXTRA) + K + offs_x[None, :]
            xmask = tmask[:, None] & (offs_x < EXTRA)[None, :]
            tl.store(IDS + xout, tl.zeros([BLOCK_T, XP], tl.int64) + (E + offs_x)[None, :].to(tl.int64), mask=xmask)
            tl.store(WTS + xout, tl.full([BLOCK_T, XP], 1.0, tl.float32), mask=xmask)

    return _select_tile


def logits_tiles(T: int, E: int, dtype: torch.dtype) -> tuple[int, int, int, bool]:
    """(token tile, expert tile, K step, split3) of the logits kernel. bf16 activations take the
    three-way split of the fp32 weight on tensor cores (split3) with token tiles growing with the batch;
    fp32 activations take IEEE fp32 dots on 16-token tiles (expert tile 16 for <= 64 experts, more
    programs; v2-lite: 15.7 -> 11.9 us at 64 tokens on an H200, 64 above: V3's 256 experts 51.6 us at 64,
    98.0 us at 16)."""
    if dtype == torch.bfloat16:
        block_t = 16 if T <= 16 else 32 if T <= 64 else 64
        return block_t, 16 if E <= 64 and T <= 64 else 64, 64, True
    return 16, 16 if E <= 64 else 64, 64, False


def noaux_tc_route(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, skew: torch.Tensor,
                   top_k: int, n_group: int, topk_group: int, norm_topk_prob: bool,
                   routed_scaling_factor: float, always_on: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """See the module docstring. No host sync (CUDA-graph capturable). `always_on` > 0: rows of
    top_k + always_on, the last always_on columns the ids E .. E + always_on - 1 with weight 1.0 (the
    shared experts folded into the routed call, `model/moe.py`), written by the same kernel."""
    logits_kernel, select_kernel = _kernels()
    T, H = x.shape
    E = weight.shape[0]
    if E % n_group or top_k > E:
        raise ValueError(f"router: {E} experts do not split into {n_group} groups / top-{top_k}")
    ids = torch.empty(T, top_k + always_on, dtype=torch.long, device=x.device)
    wts = torch.empty(T, top_k + always_on, dtype=torch.float32, device=x.device)
    extra = dict(EXTRA=always_on, XP=max(2, next_pow2(always_on)))
    if T == 0:
        return ids, wts
    x = x if x.stride(1) == 1 else x.contiguous()
    if T > LOGITS_KERNEL_MAX_ROWS and x.dtype == torch.bfloat16 and (_MM_OUT_DTYPE or not x.is_cuda):
        # prefill, bf16: one tensor-core GEMM against [hi; mid; lo], fp32 out; [T, 3E] seen as 3 partials
        parts = stacked_split3(weight)
        both = (torch.mm(x, parts.t(), out_dtype=torch.float32) if x.is_cuda
                else x.float() @ parts.float().t())                   # CPU (interpreter tests): the same products
        partial = both.view(T, 3, E).transpose(0, 1)
        splits = 3
    elif T > LOGITS_KERNEL_MAX_ROWS:                                       # prefill: cuBLAS fp32 logits
        partial = torch.nn.functional.linear(x.float(), weight.float()).unsqueeze(0)
        splits = 1
    else:
        block_t, block_e, block_k, split3 = logits_tiles(T, E, x.dtype)
        tiles = -(-T // block_t) * -(-E // block_e)
        sms = sm_count(x.device)
        splits = max(1, min(-(-H // (2 * block_k)), -(-2 * sms // tiles)))      # >= 2 K tiles per split
        splits = SPLITS_OVERRIDE or splits
        k_per = -(-(-(-H // splits)) // block_k) * block_k
        splits = -(-H // k_per)
        partial = torch.empty(splits, T, E, dtype=torch.float32, device=x.device)
        tiles_t = -(-T // block_t)
        one_launch = T <= fused_select_max_rows() and E <= FUSED_SELECT_MAX_EXPERTS and block_t * next_pow2(E) <= 4096
        counters = _counters(weight) if one_launch else None
        logits_kernel[(tiles_t, -(-E // block_e), splits)](
            x, weight, partial, T, E, H, k_per, x.stride(0), weight.stride(0), partial.stride(0), partial.stride(1),
            counters if counters is not None else partial, bias, skew, ids, wts, topk_group,
            float(routed_scaling_factor), BLOCK_T=block_t, BLOCK_E=block_e, BLOCK_K=block_k, SPLIT3=split3,
            FUSED=counters is not None, TOPK=top_k, G=n_group, GP=max(2, next_pow2(n_group)), EP=next_pow2(E),
            NORM=bool(norm_topk_prob), KP=next_pow2(top_k), num_warps=4, **extra)
        if counters is not None:
            return ids, wts
    ep = next_pow2(E)
    sel_t = max(1, min(16, 2048 // ep))
    select_kernel[(-(-T // sel_t),)](
        partial, bias, skew, ids, wts, T, E, splits, topk_group, partial.stride(0), partial.stride(1),
        float(routed_scaling_factor), K=top_k, G=n_group, GP=max(2, next_pow2(n_group)), EP=ep,
        BLOCK_T=sel_t, NORM=bool(norm_topk_prob), KP=next_pow2(top_k), num_warps=4, **extra)
    return ids, wts


_COUNTERS: dict = {}


def _counters(weight: torch.Tensor) -> torch.Tensor | None:
    """The fused launch's arrival counters (one per token tile, zero between launches: the last
    program resets its own), one set per router weight (two models in one process never share one).
    None while a CUDA graph is being captured and none exists yet: the two-kernel path then (the
    engine's eager warm-up forwards run first and create them)."""
    key = (weight.device, weight.data_ptr())
    c = _COUNTERS.get(key)
    if c is None:
        if weight.is_cuda and torch.cuda.is_current_stream_capturing():
            return None
        c = _COUNTERS[key] = torch.zeros(-(-max(fused_select_max_rows(), FUSED_SELECT_ROWS_TESTED) // 16),
                                         dtype=torch.int32, device=weight.device)
    return c
