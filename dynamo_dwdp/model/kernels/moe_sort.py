"""Stable counting sort of the routed (token, k) pairs by expert id at prefill sizes, in three Triton kernels.

`sort_pairs(flat_ids, E, x, topk, ranges)` returns what the grouped expert path (`model/experts.py`) built
from torch.sort + a gather + searchsorted + compares + a scatter (~13 kernels per MoE layer):
- `starts` [E + 2] int32: starts[e] = first sorted row of expert e, starts[E] = first row of the ids outside
  [0, E) (one trailing bucket), starts[E + 1] = rows; `starts[1:E + 1]` are the grouped GEMM's group ends;
- `order` [rows] int32: the pair index of each sorted row;
- `pos` [rows] int32: each pair's sorted row, -1 for a pair whose expert lies in none of `ranges`;
- `xs` [rows, H]: x's row of each sorted pair whose expert lies in a range (other rows are not written).
The order is torch.sort(stable=True)'s for ids in [0, E): pairs of one expert keep their pair order.

1. `count_kernel`, one program per block of BLOCK pairs: the block's histogram over the E + 1 buckets,
   stored expert-major (counts[e, block]).
2. `scan_kernel`, one program: the exclusive prefix sum over (expert, block) in that order, in place, is
   each (expert, block)'s first sorted row; the blocks of bucket 0 give `starts`.
3. `place_kernel`, one program per (block of pairs, column chunk of x): a pair's sorted row is its
   (expert, block) base plus the number of earlier pairs of its block with the same expert (a
   [BLOCK, BLOCK] comparison: independent of E); the chunk-0 programs write order and pos, every
   program copies its columns of x's rows into xs (the gather, in the same pass).

Why hand-written Triton: torch.sort is a CUB radix sort (4 kernels and memsets per layer) and the index
bookkeeping around it is ~9 more small kernels; Inductor lowers a sort to the same radix sort. The
counting sort needs no host sync (capturable) and scales with the pairs: every program reads its own
block only (the single-kernel counting sort of `moe_gemm.align`, where each expert's program scans all
pairs, measured 2.67 ms a step at 8K tokens, more than the radix sort it replaced). Runs under
Triton's CPU interpreter, as CI checks it.
"""
from __future__ import annotations

import functools

import torch

from dynamo_dwdp.model.kernels import next_pow2

BLOCK = 128          # pairs per program (the rank comparison is BLOCK x BLOCK)
MAX_RANGES = 4       # id ranges that `pos` can tell apart (merged banks); more: the caller's torch path


@functools.cache
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def count_kernel(IDS, COUNTS, rows, E, nblocks, BLOCK: tl.constexpr, EP: tl.constexpr):
        b = tl.program_id(0)
        offs = b * BLOCK + tl.arange(0, BLOCK)
        ids = tl.load(IDS + offs, mask=offs < rows, other=0)
        bucket = tl.where((ids >= 0) & (ids < E), ids, E)
        bucket = tl.where(offs < rows, bucket, EP - 1)             # EP - 1 > E: a bin never stored
        hist = tl.histogram(bucket, EP)
        e = tl.arange(0, EP)
        tl.store(COUNTS + e * nblocks + b, hist, mask=e <= E)

    @triton.jit
    def scan_kernel(COUNTS, STARTS, total, nblocks, E, rows, CHUNK: tl.constexpr):
        carry = tl.program_id(0) * 0                  # int32 scalar
        for c0 in range(0, total, CHUNK):
            offs = c0 + tl.arange(0, CHUNK)
            m = offs < total
            c = tl.load(COUNTS + offs, mask=m, other=0)
            excl = carry + tl.cumsum(c, 0) - c
            tl.store(COUNTS + offs, excl, mask=m)
            tl.store(STARTS + offs // nblocks, excl, mask=m & (offs % nblocks == 0))
            carry += tl.sum(c, 0)
        tl.store(STARTS + E + 1, rows)

    @triton.jit
    def place_kernel(IDS, BASES, X, XS, ORDER, POS, rows, E, nblocks, topk, hidden, stride_x, stride_xs,
                     lo0, hi0, lo1, hi1, lo2, hi2, lo3, hi3,
                     BLOCK: tl.constexpr, BLOCK_H: tl.constexpr, GATHER: tl.constexpr):
        b = tl.program_id(0)
        hc = tl.program_id(1)
        i = tl.arange(0, BLOCK)
        offs = b * BLOCK + i
        valid = offs < rows
        ids = tl.load(IDS + offs, mask=valid, other=0)
        bucket = tl.where((ids >= 0) & (ids < E), ids, E)
        bucket = tl.where(valid, bucket, -1)
        j = tl.arange(0, BLOCK)
        before = (bucket[:, None] == bucket[None, :]) & (j[None, :] < i[:, None])
        rank = tl.sum(before.to(tl.int32), 1)
        base = tl.load(BASES + tl.maximum(bucket, 0) * nblocks + b, mask=valid, other=0)
        dest = base + rank
        held = ((ids >= lo0) & (ids < hi0)) | ((ids >= lo1) & (ids < hi1)) | ((ids >= lo2) & (ids < hi2)) | \
               ((ids >= lo3) & (ids < hi3))
        held = held & valid
        if hc == 0:
            tl.store(ORDER + dest, offs, mask=valid)
            tl.store(POS + offs, tl.where(held, dest, -1), mask=valid)
        if GATHER:
            cols = hc * BLOCK_H + tl.arange(0, BLOCK_H)
            cm = held[:, None] & (cols < hidden)[None, :]
            tok = (offs // topk).to(tl.int64)
            v = tl.load(X + tok[:, None] * stride_x + cols[None, :], mask=cm, other=0.0)
            tl.store(XS + dest.to(tl.int64)[:, None] * stride_xs + cols[None, :], v, mask=cm)

    return count_kernel, scan_kernel, place_kernel


def sort_pairs(flat_ids: torch.Tensor, num_experts: int, x: torch.Tensor | None, topk: int,
               ranges: list[tuple[int, int]]):
    """(starts, order, pos, xs) as the module docstring says; x None: no gather (xs None).

    flat_ids [rows] (any integer dtype, pair t * topk + j), ranges: at most MAX_RANGES [lo, hi) id ranges
    whose pairs count as held (pos >= 0, row gathered)."""
    if len(ranges) > MAX_RANGES:
        raise ValueError(f"sort_pairs: at most {MAX_RANGES} id ranges, got {len(ranges)}")
    count_kernel, scan_kernel, place_kernel = _kernels()
    dev = flat_ids.device
    ids = flat_ids.to(torch.int32).contiguous()
    rows = ids.numel()
    E = int(num_experts)
    nblocks = max(1, -(-rows // BLOCK))
    counts = torch.empty((E + 1) * nblocks, dtype=torch.int32, device=dev)
    starts = torch.empty(E + 2, dtype=torch.int32, device=dev)
    order = torch.empty(rows, dtype=torch.int32, device=dev)
    pos = torch.empty(rows, dtype=torch.int32, device=dev)
    xs = None
    if x is not None:
        if x.stride(-1) != 1:
            x = x.contiguous()
        xs = torch.empty(rows, x.shape[1], dtype=x.dtype, device=dev)
    if rows == 0:
        starts.zero_()
        return starts, order, pos, xs
    count_kernel[(nblocks,)](ids, counts, rows, E, nblocks, BLOCK=BLOCK, EP=next_pow2(E + 2), num_warps=4)
    total = (E + 1) * nblocks
    scan_kernel[(1,)](counts, starts, total, nblocks, E, rows, CHUNK=min(4096, max(16, next_pow2(total))),
                      num_warps=8)
    flat = [v for r in ranges for v in r] + [0, 0] * (MAX_RANGES - len(ranges))
    hidden = x.shape[1] if x is not None else 0
    block_h = min(256, max(16, next_pow2(hidden))) if x is not None else 16
    chunks = -(-hidden // block_h) if x is not None else 1
    place_kernel[(nblocks, chunks)](ids, counts, x if x is not None else ids, xs if xs is not None else ids, order,
                                    pos, rows, E, nblocks, topk, hidden, x.stride(0) if x is not None else 0,
                                    xs.stride(0) if xs is not None else 0, *flat,
                                    BLOCK=BLOCK, BLOCK_H=block_h, GATHER=x is not None, num_warps=4)
    return starts, order, pos, xs
