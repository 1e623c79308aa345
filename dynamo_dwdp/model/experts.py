"""Routed-expert compute over *expert banks* (mechanism, no policy).

An `ExpertBank` is a run of consecutive global expert ids stored contiguously
(w13[i] = [gate; up] of expert first+i, w2[i] = down). A rank's experts may live in several banks
(DWDP: its own shard plus the remote part of a prefetch slot), and the kernel walks the banks
instead of merging them: no per-step merge copy (the paper's "split-weight management").

The combine order (ascending expert id, weight applied before the index_add) follows the reference
so that fp32 results agree to rounding.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dynamo_dwdp.model import kernels
from dynamo_dwdp.model.kernels import moe_prefill, moe_sort
from dynamo_dwdp.model.kernels.moe_fp8a8 import routed_experts_fp8a8
from dynamo_dwdp.model.kernels.moe_gemm import bank_ranges, routed_experts_fused


@dataclass
class ExpertBank:
    first: int              # global id of row 0
    w13: torch.Tensor       # [n, 2*I, H]
    w2: torch.Tensor        # [n, H, I]
    # FP8-resident banks (CUDA): w13/w2 are float8_e4m3fn and these their 128x128 block scale_inv
    # [n, ceil(2I/128), ceil(H/128)] / [n, ceil(H/128), ceil(I/128)] (model/fp8.py's format)
    w13_scale: torch.Tensor | None = None
    w2_scale: torch.Tensor | None = None
    fp8_activations: bool = False   # FP8 banks computed W8A8 (kernels/moe_fp8a8.py; weight_format fp8-block-a8)

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
    if use_fused_experts(x, topk_ids, banks):
        if banks and all(b.fp8_activations for b in banks):
            return routed_experts_fp8a8(x, topk_ids, topk_weights, banks, out)
        return routed_experts_fused(x, topk_ids, topk_weights, banks, out)
    if any(b.w13_scale is not None for b in banks):
        raise RuntimeError("FP8-resident expert banks need the fused CUDA kernels (Triton)")
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


# decode-size GPU path: "triton" (kernels/moe_gemm.py) or "grouped_mm" (torch); scripts/gpu_perf.py measures both
EXPERT_GEMM = os.environ.get("DWDP_EXPERT_GEMM", "triton")


def use_fused_experts(x: torch.Tensor, topk_ids: torch.Tensor, banks: list[ExpertBank]) -> bool:
    """The Triton experts (one counting sort, fused SwiGLU, scattered store) on CUDA: always for FP8
    banks, for bf16 up to SYNC_FREE_MAX_ROWS pairs when EXPERT_GEMM is "triton" (larger batches
    are compute-bound: torch._grouped_mm)."""
    if not (x.is_cuda and kernels.available()):
        return False
    if any(b.w13_scale is not None for b in banks):
        return True
    return EXPERT_GEMM == "triton" and topk_ids.numel() <= SYNC_FREE_MAX_ROWS and x.dtype == torch.bfloat16


def grouped_mm_available(x: torch.Tensor) -> bool:
    return x.is_cuda and hasattr(torch, "_grouped_mm") and x.dtype == torch.bfloat16


SYNC_FREE_MAX_ROWS = 8192   # (token, k) pairs up to which the GPU path avoids the host sync (decode sizes)


def routed_experts_grouped(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                           banks: list[ExpertBank], out: torch.Tensor | None = None) -> torch.Tensor:
    """GPU path of `routed_experts`: one grouped GEMM per bank and projection (torch._grouped_mm),
    the banks read in place (no merge).

    The (token, k) pairs are sorted by expert id once (int32 keys: half the radix passes of int64)
    and x is gathered into that order once. Small batches (<= SYNC_FREE_MAX_ROWS pairs, i.e. decode)
    take the sync-free form that CUDA graphs can capture: every bank runs over all sorted pairs,
    pairs below the bank's first expert fall into its first group and pairs above into its last, and
    only the bank's own rows are kept (wasted rows, no wasted weight bytes: decode is bound by
    reading the weights). Larger batches with one bank that starts at expert 0 run it over the
    sorted pairs with no host sync (rows past the bank are left as they are and never read); with
    several banks they sync the host once for the per-bank row ranges and compute only their own rows.

    On CUDA with Triton above SYNC_FREE_MAX_ROWS pairs (prefill) the sort, the gather of x, the group
    ends and each pair's sorted row come from one three-kernel counting sort (`kernels/moe_sort.py`,
    `_grouped_counting_sort`): the same stable order, so the same result bit for bit, in 3 kernels
    instead of ~13 (measured on one H200: docs/performance.md, "Prefill routed experts (2026-12-02)").

    Combine: out[t] = sum_k w[t,k] * y_sorted[pos[t,k]], pos the pair's sorted row, -1 for a pair
    whose expert is in no bank (contributes 0). On CUDA with Triton that is one kernel
    (`kernels/moe_prefill.combine`: fp32 accumulation in k order, deterministic) and the SwiGLU
    between the GEMMs is one pass too (`kernels/moe_prefill.swiglu`); otherwise torch ops (zero the
    rows of no bank, scatter back to (token, k) order, one batched product per token)."""
    T, k = topk_ids.shape
    if T == 0 or not banks:
        return torch.zeros_like(x) if out is None else out
    fused = use_prefill_kernels(x)
    flat = topk_ids.reshape(-1).to(torch.int32)
    rows = flat.numel()
    if fused and rows > SYNC_FREE_MAX_ROWS and prefill_sort() == "counting":
        ranges = bank_ranges(banks)
        if len(ranges) <= moe_sort.MAX_RANGES:
            return _grouped_counting_sort(x, flat, topk_weights, banks, ranges, out)
    sorted_ids, order = torch.sort(flat, stable=True)
    xs = x[order // k]
    E = max(b.first + b.count for b in banks)
    # ends[e] = number of pairs with expert id <= e (searchsorted, unlike bincount, never syncs)
    ends = torch.searchsorted(sorted_ids, torch.arange(E, device=x.device, dtype=sorted_ids.dtype),
                              right=True).to(torch.int32)
    if rows <= SYNC_FREE_MAX_ROWS:
        y_sorted = torch.zeros_like(xs)
        for bank in banks:
            lo_id, hi_id = bank.first, bank.first + bank.count
            offs = torch.cat([ends[lo_id:hi_id - 1], ends.new_full((1,), rows)])
            y = _expert_ffn_grouped(xs, bank, offs, fused)
            mine = ((sorted_ids >= lo_id) & (sorted_ids < hi_id)).unsqueeze(1)
            y_sorted = torch.where(mine, y, y_sorted)
    else:
        y_sorted = _banks_over_sorted_rows(xs, banks, ends, fused)
    held = _held(sorted_ids, banks)
    if fused:
        pos = torch.where(held, torch.arange(rows, device=x.device, dtype=torch.int32), -1)
        pos = torch.empty_like(pos).scatter_(0, order, pos)                        # sorted row of each pair
        return moe_prefill.combine(y_sorted, pos.view(T, k), topk_weights, out)
    y_sorted = torch.where(held.unsqueeze(1), y_sorted, 0.0)
    y_pairs = torch.empty_like(y_sorted).index_copy_(0, order, y_sorted)          # back to (token, k) order
    combined = torch.bmm(topk_weights.to(x.dtype).view(T, 1, k), y_pairs.view(T, k, -1)).view(T, -1)
    return combined if out is None else out.add_(combined)


# prefill sizes (> SYNC_FREE_MAX_ROWS pairs) with the Triton kernels: "counting" (kernels/moe_sort.py, default;
# more than moe_sort.MAX_RANGES separate bank ranges fall back to "torch") or "torch" (torch.sort and index ops,
# the previous form); scripts/gpu_routed_prefill.py times both
PREFILL_SORTS = ("counting", "torch")
PREFILL_SORT: str | None = None          # None: $DWDP_PREFILL_SORT, default "counting" (`prefill_sort`)


def prefill_sort() -> str:
    """PREFILL_SORT, or the environment's value when it is None (checked: one of PREFILL_SORTS). The model
    build calls it once (`MoEBlock`), so a bad value stops start-up with a one-line error."""
    if PREFILL_SORT is not None:
        return PREFILL_SORT
    return kernels.env_choice("DWDP_PREFILL_SORT", PREFILL_SORTS)


def _grouped_counting_sort(x: torch.Tensor, flat: torch.Tensor, topk_weights: torch.Tensor,
                           banks: list[ExpertBank], ranges: list[tuple[int, int]],
                           out: torch.Tensor | None) -> torch.Tensor:
    """`routed_experts_grouped` at prefill sizes on CUDA: the sort, group ends, x gather and each pair's
    sorted row from `moe_sort.sort_pairs` (three kernels; the same stable order as torch.sort, so the same
    result bit for bit), then the same grouped GEMMs and combine. `ranges`: the banks' merged id ranges."""
    T, k = topk_weights.shape
    E = max(b.first + b.count for b in banks)
    starts, _, pos, xs = moe_sort.sort_pairs(flat, E, x, k, ranges)
    ends = starts[1:E + 1]                              # ends[e] = pairs with expert id <= e
    y_sorted = _banks_over_sorted_rows(xs, banks, ends, True)
    return moe_prefill.combine(y_sorted, pos.view(T, k), topk_weights, out)


def _banks_over_sorted_rows(xs: torch.Tensor, banks: list[ExpertBank], ends: torch.Tensor,
                            fused: bool) -> torch.Tensor:
    """Prefill sizes: the expert-sorted rows xs through their banks; ends[e] = rows with expert id <= e.
    One bank from expert 0 (single rank, DP, DEP's first rank): its groups are the sorted rows as they
    are, the rows past its last expert (none unless it holds a subset) left out by the grouped GEMM and
    by the combine, and no host sync, so the host keeps launching ahead. Several banks: one host sync
    for their row ranges, each bank computes only its own rows (rows of no bank are never read)."""
    if len(banks) == 1 and banks[0].first == 0:
        return _expert_ffn_grouped(xs, banks[0], ends, fused)
    y_sorted = torch.empty_like(xs)
    bounds = [0] + ends.tolist()                        # the one host sync
    for bank in banks:
        lo, hi = bounds[bank.first], bounds[bank.first + bank.count]
        if hi > lo:
            y_sorted[lo:hi] = _expert_ffn_grouped(xs[lo:hi], bank, ends[bank.first:bank.first + bank.count] - lo,
                                                  fused)
    return y_sorted


def use_prefill_kernels(x: torch.Tensor) -> bool:
    """The grouped path's SwiGLU and combine as Triton kernels (kernels/moe_prefill.py): CUDA with Triton."""
    return x.is_cuda and kernels.available()


def _held(sorted_ids: torch.Tensor, banks: list[ExpertBank]) -> torch.Tensor:
    """Which sorted pairs have their expert in one of `banks` (bool, same length)."""
    held = None
    for bank in banks:
        mine = (sorted_ids >= bank.first) & (sorted_ids < bank.first + bank.count)
        held = mine if held is None else held | mine
    return held


def _expert_ffn_grouped(a: torch.Tensor, bank: ExpertBank, offs: torch.Tensor, fused: bool) -> torch.Tensor:
    """rows a[offs[i-1]:offs[i]] through expert i of `bank` (SwiGLU), one grouped GEMM per projection;
    `fused`: the activation as one Triton pass (kernels/moe_prefill.swiglu)."""
    h = torch._grouped_mm(a, bank.w13.transpose(1, 2), offs=offs)
    if fused:
        act = moe_prefill.swiglu(h)
    else:
        gate, up = h.chunk(2, dim=-1)
        act = F.silu(gate) * up
    return torch._grouped_mm(act, bank.w2.transpose(1, 2), offs=offs)
