"""Routed-expert compute over *expert banks* (mechanism, no policy).

An `ExpertBank` is a run of consecutive global expert ids stored contiguously
(w13[i] = [gate; up] of expert first+i, w2[i] = down). A rank's experts may live in several banks
(DWDP: its own shard plus the remote part of a prefetch slot), and the kernel walks the banks
instead of merging them: no per-step merge copy (the paper's "split-weight management").

The combine order (ascending expert id, weight applied before the index_add) follows the reference
so that fp32 results agree to rounding.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class ExpertBank:
    first: int              # global id of row 0
    w13: torch.Tensor       # [n, 2*I, H]
    w2: torch.Tensor        # [n, H, I]

    @property
    def count(self) -> int:
        return int(self.w13.shape[0])


def expert_mlp(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    gate, up = F.linear(x, w13).chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, w2)


def routed_experts(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                   banks: list[ExpertBank], out: torch.Tensor | None = None) -> torch.Tensor:
    """sum_k w[t,k] * expert_{ids[t,k]}(x[t]) over the (token, k) pairs whose expert lies in `banks`.

    Pairs whose expert is in no bank contribute nothing (DEP/TP use this: each rank holds a subset).
    `out` [T, H] accumulates in place when given.
    """
    if grouped_mm_available(x):
        return routed_experts_grouped(x, topk_ids, topk_weights, banks, out)
    T, k = topk_ids.shape
    if out is None:
        out = torch.zeros_like(x)
    if T == 0:
        return out
    flat = topk_ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    sorted_ids = flat[order]
    counts = torch.bincount(sorted_ids, minlength=max(b.first + b.count for b in banks) if banks else 1)
    offsets = torch.cumsum(counts, 0).tolist()
    counts_l = counts.tolist()
    tokens = order // k
    slots = order % k
    for bank in sorted(banks, key=lambda b: b.first):
        for i in range(bank.count):
            e = bank.first + i
            n = counts_l[e] if e < len(counts_l) else 0
            if n == 0:
                continue
            lo = offsets[e] - n
            tok = tokens[lo:lo + n]
            y = expert_mlp(x[tok], bank.w13[i], bank.w2[i])
            y = y * topk_weights[tok, slots[lo:lo + n], None].to(y.dtype)
            out.index_add_(0, tok, y.to(out.dtype))
    return out


def grouped_mm_available(x: torch.Tensor) -> bool:
    return x.is_cuda and hasattr(torch, "_grouped_mm") and x.dtype == torch.bfloat16


def routed_experts_grouped(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                           banks: list[ExpertBank], out: torch.Tensor | None = None) -> torch.Tensor:
    """GPU path of `routed_experts`: one grouped GEMM per bank and projection (torch._grouped_mm),
    the banks read in place (no merge). One host sync per call (the per-bank row ranges)."""
    T, k = topk_ids.shape
    if out is None:
        out = torch.zeros_like(x)
    if T == 0 or not banks:
        return out
    flat = topk_ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    sorted_ids = flat[order]
    tokens = order // k
    xs = x[tokens]
    ws = topk_weights.reshape(-1)[order].to(x.dtype)
    E = max(b.first + b.count for b in banks)
    counts = torch.bincount(sorted_ids, minlength=E)
    ends = torch.cumsum(counts, 0).to(torch.int32)
    bounds = [0] + ends.tolist()                       # the one host sync
    for bank in banks:
        lo, hi = bounds[bank.first], bounds[bank.first + bank.count]
        if hi == lo:
            continue
        offs = ends[bank.first:bank.first + bank.count] - lo
        a = xs[lo:hi]
        h = torch._grouped_mm(a, bank.w13.transpose(1, 2), offs=offs)
        gate, up = h.chunk(2, dim=-1)
        y = torch._grouped_mm(F.silu(gate) * up, bank.w2.transpose(1, 2), offs=offs)
        out.index_add_(0, tokens[lo:hi], y * ws[lo:hi, None])
    return out
