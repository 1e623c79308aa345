"""Paged MLA decode attention as one Triton kernel pair (split-K "flash decoding").

Contract: the decode case of `attention.paged_latent_attention` (one query row per sequence):
query [B, h, C+R] (absorbed query: latent part C | rotary part R), kv_layer [num_blocks, block_size,
C+R], block_tables [B, >= ceil(ctx/bs)] long, context_lens [B] long -> out [B, h, C] in query's
dtype, softmax(scale * q.k) over keys 0..ctx-1 times the keys' latent part; ctx == 0 gives 0.

Why: the torch path gathers each sequence's cache into a padded copy and runs two batched GEMVs
(about 9x the cache bytes of one read on an H100 at batch 32, docs/performance.md); this reads
every cached latent once, straight through the block table. Grid (sequence, head group, context
split); each program keeps an online-softmax state for its split in fp32; a second kernel merges
the splits (with one split the first writes the output). Tile, warps, stages and split count:
`decode_config`, chosen on an H200 (`scripts/gpu_decode_kernels.py --only mla_sweep`). No host
sync, fixed grid per (batch, splits): CUDA-graph capturable.

Loads in flight: each program runs over its own split's tiles (a run-time trip count: no masked
tiles, no recompilation as contexts grow) and fetches the block-table entries of the
*next* tile one iteration ahead, into registers. Without that, Triton's software pipeliner sees the
cache load as one level of indirection (table -> cache) and keeps a single shared-memory buffer at
the default 3 stages, so each tile's load waited for the previous tile's dots (split + merge read the
cache at 44-59% of the H200's copy rate at batch 64-256); with the table one tile ahead, 3 stages
double-buffer the cache tile (two 32x576 buffers in the compiled TTGIR and a wait that leaves the
next tile's copy in flight: tests/model/test_mla_decode_pipelining.py): 53-81% (docs/performance.md).

Runs on CPU under Triton's interpreter (TRITON_INTERPRET=1), which is how CI tests it.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

MIN_BLOCK_H = 16      # tl.dot needs >= 16 rows


@dataclass(frozen=True)
class DecodeConfig:
    """Tunables of the split kernel: cached tokens per tile, warps (0: 4 for 16-head groups, 8 for
    32), software-pipeline stages (3: two cache-tile buffers, one load in flight while the dots run;
    4: three; 2 or fewer: none) and `waves`, the programs per multiprocessor the context split aims
    at (more splits: more loads in flight, a larger merge), with at least `min_tiles` tiles per
    split. One split writes the output directly (no merge kernel). Benchmarks pass one to
    `mla_decode_attention(config=...)` in place of `decode_config`'s choice."""
    block_n: int = 32
    warps: int = 0
    stages: int = 3
    waves: int = 2
    min_tiles: int = 4


def decode_config(batch: int, head_groups: int) -> DecodeConfig:
    """Chosen from `scripts/gpu_decode_kernels.py --only mla_sweep` on one H200 (16 heads, bf16 cache,
    contexts 1000 and 4000, docs/performance.md): up to 32 sequences x head groups, twice the splits
    (4 waves, >= 2 tiles per split; measured at batch 1: 14.6 us vs 15.6 before this kernel, 13.6 with
    >= 1 tile but 27.6 vs 22.0 at context 4000); 33-64, the default (2 waves); above 64, one wave
    (batch 256: one split, no merge, 87.4 vs 101.1 us at context 1000). 3 stages everywhere (2: no
    overlap, 4: one program per SM; both slower); 8 warps, 16- and 64-token tiles were slower at every
    batch. Warps stay automatic (32-head groups, DeepSeek-V3, were not measured)."""
    programs = batch * head_groups
    if programs <= 32:
        return DecodeConfig(32, 0, 3, 4, 2)
    if programs <= 64:
        return DecodeConfig()
    return DecodeConfig(waves=1)


@functools.cache
def available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def split_kernel(Q, QPE, KV, TABLES, CTX, ACC, ML, OUT,
                     stride_qb, stride_qh, stride_pb, stride_ph, stride_kv_blk, stride_kv_tok, stride_tb,
                     stride_ab, stride_as, stride_ah, stride_mb, stride_ms, stride_ob, stride_oh,
                     H, scale, splits,
                     C: tl.constexpr, R: tl.constexpr, BS: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_H: tl.constexpr, ONE_SPLIT: tl.constexpr, IEEE: tl.constexpr):
        b = tl.program_id(0)
        hg = tl.program_id(1)
        s = tl.program_id(2)
        ctx = tl.load(CTX + b).to(tl.int32)
        per = tl.cdiv(tl.cdiv(ctx, splits), BLOCK_N) * BLOCK_N
        start = s * per
        end = tl.minimum(start + per, ctx)
        offs_h = hg * BLOCK_H + tl.arange(0, BLOCK_H)
        hmask = offs_h < H
        offs_c = tl.arange(0, C)
        offs_r = tl.arange(0, R)
        q_row = Q + b * stride_qb + offs_h[:, None] * stride_qh
        q_lat = tl.load(q_row + offs_c[None, :], mask=hmask[:, None], other=0.0)
        q_pe = tl.load(QPE + b * stride_pb + offs_h[:, None] * stride_ph + offs_r[None, :], mask=hmask[:, None],
                       other=0.0)
        m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_H], tl.float32)
        acc = tl.zeros([BLOCK_H, C], tl.float32)
        # the next tile's table entries are loaded one iteration ahead (module docstring: this is what
        # lets the pipeliner double-buffer the cache tile)
        offs_n = start + tl.arange(0, BLOCK_N)
        blk_next = tl.load(TABLES + b * stride_tb + offs_n // BS, mask=offs_n < end, other=0)
        for i in range(tl.cdiv(end - start, BLOCK_N)):      # empty when the split starts past ctx
            offs_n = start + i * BLOCK_N + tl.arange(0, BLOCK_N)
            nmask = offs_n < end
            blk = blk_next
            blk_next = tl.load(TABLES + b * stride_tb + (offs_n + BLOCK_N) // BS, mask=offs_n + BLOCK_N < end,
                               other=0)
            row = blk * stride_kv_blk + (offs_n % BS) * stride_kv_tok
            k_lat = tl.load(KV + row[:, None] + offs_c[None, :], mask=nmask[:, None], other=0.0)
            k_pe = tl.load(KV + row[:, None] + C + offs_r[None, :], mask=nmask[:, None], other=0.0)
            if IEEE:
                qk = tl.dot(q_lat, tl.trans(k_lat), input_precision="ieee")
                qk += tl.dot(q_pe, tl.trans(k_pe), input_precision="ieee")
            else:
                qk = tl.dot(q_lat, tl.trans(k_lat))
                qk += tl.dot(q_pe, tl.trans(k_pe))
            qk = tl.where(nmask[None, :], qk * scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)   # nothing valid yet: no NaN
            alpha = tl.exp(m_i - m_use)
            p = tl.exp(qk - m_use[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            if IEEE:
                pv = tl.dot(p.to(k_lat.dtype), k_lat, input_precision="ieee")
            else:
                pv = tl.dot(p.to(k_lat.dtype), k_lat)
            acc = acc * alpha[:, None] + pv
            m_i = m_new
        if ONE_SPLIT:                                       # the output itself, no merge
            out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]   # no context: 0
            o_ptr = OUT + b * stride_ob + offs_h[:, None] * stride_oh + offs_c[None, :]
            tl.store(o_ptr, out.to(OUT.dtype.element_ty), mask=hmask[:, None])
        else:
            a_ptr = ACC + b * stride_ab + s * stride_as + offs_h[:, None] * stride_ah + offs_c[None, :]
            tl.store(a_ptr, acc, mask=hmask[:, None])
            tl.store(ML + b * stride_mb + s * stride_ms + offs_h, m_i, mask=hmask)
            tl.store(ML + b * stride_mb + s * stride_ms + H + offs_h, l_i, mask=hmask)

    @triton.jit
    def combine_kernel(ACC, ML, OUT,
                       stride_ab, stride_as, stride_ah, stride_mb, stride_ms, stride_ob, stride_oh,
                       H, splits, BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr):
        # program (sequence, head group, latent chunk): the chunks split the fp32 partials' bytes over
        # more programs when there are few sequences (batch 1: one program read them all, 8 us)
        b = tl.program_id(0)
        hg = tl.program_id(1)
        offs_h = hg * BLOCK_H + tl.arange(0, BLOCK_H)
        hmask = offs_h < H
        offs_c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
        m_all = tl.full([BLOCK_H], float("-inf"), tl.float32)
        # loops, not static_range: unrolling up to 256 splits (batch 1, long contexts) took Triton minutes
        # to compile per variant, and the engine compiles every decode bucket while it starts
        for s in range(splits):
            m_s = tl.load(ML + b * stride_mb + s * stride_ms + offs_h, mask=hmask, other=float("-inf"))
            m_all = tl.maximum(m_all, m_s)
        safe = tl.where(m_all == float("-inf"), 0.0, m_all)
        total = tl.zeros([BLOCK_H], tl.float32)
        out = tl.zeros([BLOCK_H, BLOCK_C], tl.float32)
        for s in range(splits):
            m_s = tl.load(ML + b * stride_mb + s * stride_ms + offs_h, mask=hmask, other=float("-inf"))
            l_s = tl.load(ML + b * stride_mb + s * stride_ms + H + offs_h, mask=hmask, other=0.0)
            w = tl.exp(m_s - safe)                        # empty split: exp(-inf) = 0
            total += w * l_s
            a = tl.load(ACC + b * stride_ab + s * stride_as + offs_h[:, None] * stride_ah + offs_c[None, :],
                        mask=hmask[:, None], other=0.0)
            out += w[:, None] * a
        out = out / tl.where(total > 0, total, 1.0)[:, None]   # no context: 0
        o_ptr = OUT + b * stride_ob + offs_h[:, None] * stride_oh + offs_c[None, :]
        tl.store(o_ptr, out.to(OUT.dtype.element_ty), mask=hmask[:, None])

    return split_kernel, combine_kernel


def num_splits(batch: int, head_groups: int, max_context: int, sms: int = 132, waves: int = 2,
               block_n: int = 32, min_tiles: int = 4) -> int:
    """Context splits per sequence: enough programs for `waves` per SM, each split >= min_tiles tiles."""
    want = max(1, math.ceil(waves * sms / max(1, batch * head_groups)))
    most = max(1, max_context // (min_tiles * block_n))
    return 1 << (min(want, most).bit_length() - 1)          # a power of two <= both


def mla_decode_attention(query: torch.Tensor, kv_layer: torch.Tensor, block_tables: torch.Tensor,
                         context_lens: torch.Tensor, latent_dim: int, scale: float, max_context: int,
                         q_pe: torch.Tensor | None = None, config: DecodeConfig | None = None) -> torch.Tensor:
    """See the module docstring. `max_context` (a python int >= every context length) sizes the
    split count only; the kernel reads each sequence's own length from `context_lens`. With `q_pe`
    [B, h, R] given, `query` is the latent part alone [B, h, C] (no concatenation needed). `config`
    replaces `decode_config`'s choice (benchmarks)."""
    split_kernel, combine_kernel = _kernels()
    if q_pe is None:
        query, q_pe = query[..., :latent_dim], query[..., latent_dim:]
    B, H, C = query.shape
    R = q_pe.shape[-1]
    if C != latent_dim:
        raise ValueError(f"mla_decode_attention: query latent width {C} != {latent_dim}")
    bs = kv_layer.shape[1]
    if kv_layer.stride(2) != 1 or query.stride(2) != 1 or q_pe.stride(2) != 1:
        raise ValueError("mla_decode_attention: the last dimension of query and cache must be contiguous")
    # heads per program: the fp32 accumulator is block_h x C (16 x 512 = 32 KiB at 4 warps, as measured on
    # the H100 for 16 heads); wider head counts (DeepSeek-V3: 128) use 32-head groups at 8 warps (not yet
    # measured on a GPU)
    block_h = max(MIN_BLOCK_H, min(32, 1 << (H - 1).bit_length()))
    groups = -(-H // block_h)
    cfg = config or decode_config(B, groups)
    warps = cfg.warps or (8 if block_h > 16 else 4)
    sms = torch.cuda.get_device_properties(query.device).multi_processor_count if query.is_cuda else 8
    splits = num_splits(B, groups, max_context, sms, cfg.waves, cfg.block_n, cfg.min_tiles)
    q = query.to(kv_layer.dtype)
    q_pe = q_pe.to(kv_layer.dtype)
    out = torch.empty(B, H, C, device=query.device, dtype=query.dtype)
    if splits > 1:
        acc = torch.empty(B, splits, H, C, device=query.device, dtype=torch.float32)
        ml = torch.empty(B, splits, 2, H, device=query.device, dtype=torch.float32)
    else:
        acc = ml = out.new_empty(1, 1, 1, dtype=torch.float32)       # unused: the kernel writes `out`
    tables = block_tables if block_tables.stride(1) == 1 else block_tables.contiguous()
    split_kernel[(B, groups, splits)](
        q, q_pe, kv_layer, tables, context_lens, acc, ml, out,
        q.stride(0), q.stride(1), q_pe.stride(0), q_pe.stride(1), kv_layer.stride(0), kv_layer.stride(1),
        tables.stride(0), acc.stride(0), acc.stride(1), acc.stride(2), ml.stride(0), ml.stride(1),
        out.stride(0), out.stride(1),
        H, scale, splits, C=C, R=R, BS=bs, BLOCK_N=cfg.block_n, BLOCK_H=block_h, ONE_SPLIT=splits == 1,
        IEEE=kv_layer.dtype == torch.float32, num_warps=warps, num_stages=cfg.stages)
    if splits == 1:
        return out
    chunks = combine_chunks(B * groups, C, sms)
    combine_kernel[(B, groups, chunks)](
        acc, ml, out, acc.stride(0), acc.stride(1), acc.stride(2), ml.stride(0), ml.stride(1),
        out.stride(0), out.stride(1), H, splits, BLOCK_C=C // chunks, BLOCK_H=block_h,
        num_warps=warps if chunks == 1 else 4)
    return out


def combine_chunks(programs: int, latent: int, sms: int) -> int:
    """Latent chunks per (sequence, head group) in the merge: a power of two that brings the merge to
    about one program per multiprocessor, chunks at least 32 wide."""
    want = 1 << max(0, (-(-sms // max(1, programs)) - 1).bit_length())
    return max(1, min(want, latent // 32))
