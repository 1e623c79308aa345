"""Run by tests/model/test_moe_sort.py in a fresh process with TRITON_INTERPRET=1. The prefill counting
sort (dynamo_dwdp/model/kernels/moe_sort.py) against torch.sort(stable=True) and the index arithmetic it
replaces, and the grouped expert path with it against the same path with torch's sort, bit for bit.
Fresh random inputs every run. Prints "ok <n> checks"."""
from __future__ import annotations

import os

import torch

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"

from tests.model import interpreter_numerics  # noqa: E402

interpreter_numerics.install()

from tests.model.check_inputs import fresh_generator  # noqa: E402
from dynamo_dwdp.model import experts  # noqa: E402
from dynamo_dwdp.model.experts import ExpertBank, routed_experts_grouped  # noqa: E402
from dynamo_dwdp.model.kernels import moe_sort  # noqa: E402
from dynamo_dwdp.model.kernels.moe_gemm import bank_ranges  # noqa: E402

GEN = fresh_generator()
BF = torch.bfloat16


def _ids(T: int, k: int, n_ids: int, skew: bool) -> torch.Tensor:
    """[T, k] distinct ids per token in [0, n_ids); skew: most pairs on a few experts (the edges 0 and
    n_ids - 1 among them), else uniform."""
    if skew:
        p = torch.ones(n_ids)
        p[0], p[-1], p[n_ids // 2] = 40.0, 40.0, 20.0
        return torch.multinomial(p.expand(T, n_ids), k, replacement=False, generator=GEN)
    return torch.stack([torch.randperm(n_ids, generator=GEN)[:k] for _ in range(T)])


def sort_matches_torch() -> None:
    """starts, order, pos and the gathered rows vs torch.sort(stable=True), searchsorted and the held
    mask, for E 64 and 256, top-6 and top-8, rows under one block, off the block and over many blocks,
    ids past E (experts of no bank: one trailing bucket) and ranges that hold only part of [0, E)."""
    cases = [(5, 6, 64, 64, [(0, 64)], False), (150, 6, 64, 64, [(0, 64)], True),
             (97, 8, 256, 256, [(0, 256)], False), (64, 8, 256, 256, [(0, 100), (180, 256)], True),
             (77, 6, 64, 48, [(0, 48)], True), (41, 6, 64, 40, [(8, 16), (20, 24), (30, 33), (39, 40)], False)]
    for T, k, n_ids, E, ranges, skew in cases:
        ids = _ids(T, k, n_ids, skew)
        flat = ids.reshape(-1).to(torch.int32)
        rows = flat.numel()
        x = torch.randn(T, 24, generator=GEN).to(BF)
        starts, order, pos, xs = moe_sort.sort_pairs(flat, E, x, k, ranges)
        sorted_ids, ref_order = torch.sort(flat, stable=True)
        inside = int((flat < E).sum())
        assert torch.equal(order[:inside], ref_order[:inside].to(torch.int32)), (T, k, E)
        assert sorted(order[inside:].tolist()) == sorted(ref_order[inside:].tolist())
        ref_ends = torch.searchsorted(sorted_ids, torch.arange(E, dtype=torch.int32), right=True).to(torch.int32)
        assert starts[0] == 0 and torch.equal(starts[1:E + 1], ref_ends) and starts[E + 1] == rows, (T, k, E)
        held = torch.zeros(rows, dtype=torch.bool)
        for lo, hi in ranges:
            held |= (sorted_ids >= lo) & (sorted_ids < hi)
        ref_pos = torch.where(held, torch.arange(rows, dtype=torch.int32), -1)
        ref_pos = torch.empty_like(ref_pos).scatter_(0, ref_order, ref_pos)
        assert torch.equal(pos, ref_pos), (T, k, E, ranges)
        assert torch.equal(xs[held], x[ref_order // k][held]), (T, k, E)
    e, o, p, _ = moe_sort.sort_pairs(torch.empty(0, dtype=torch.int32), 8, None, 6, [(0, 8)])
    assert e.tolist() == [0] * 10 and o.numel() == p.numel() == 0
    try:
        moe_sort.sort_pairs(flat, E, None, k, [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9)])
        raise AssertionError("five ranges accepted")
    except ValueError as exc:
        assert "ranges" in str(exc)


def _banks(H: int, inter: int, cuts) -> list[ExpertBank]:
    return [ExpertBank(first, (torch.randn(n, 2 * inter, H, generator=GEN) * 0.2).to(BF),
                       (torch.randn(n, H, inter, generator=GEN) * 0.2).to(BF)) for first, n in cuts]


def grouped_path_bitwise_equal() -> None:
    """routed_experts_grouped at prefill sizes (SYNC_FREE_MAX_ROWS 0) with the prefill kernels as on CUDA:
    the counting sort vs torch's sort give the same bits, with and without `out`, for one bank from 0
    (all 64 / 256 experts, or a subset: pairs of no bank), several banks, banks that leave gaps."""
    experts.use_prefill_kernels = lambda x: True
    experts.SYNC_FREE_MAX_ROWS = 0
    H, inter = 32, 48
    # every case spans >= 2 blocks of moe_sort.BLOCK pairs (the multi-block sort itself: sort_matches_torch)
    for n_ids, k, T, cuts in ((64, 6, 44, [(0, 64)]), (256, 8, 33, [(0, 256)]), (64, 6, 30, [(0, 40)]),
                              (64, 6, 30, [(32, 32), (0, 32)]), (256, 8, 24, [(16, 64), (200, 40)])):
        assert T * k > moe_sort.BLOCK
        banks = _banks(H, inter, cuts)
        x = torch.randn(T, H, generator=GEN).to(BF)
        ids = _ids(T, k, n_ids, skew=T % 2 == 0)
        w = torch.rand(T, k, generator=GEN)
        base = torch.randn(T, H, generator=GEN).to(BF)
        got = {}
        for how in ("torch", "counting"):
            experts.PREFILL_SORT = how
            got[how] = (routed_experts_grouped(x, ids, w, banks), routed_experts_grouped(x, ids, w, banks,
                                                                                       out=base.clone()))
        assert got["torch"][0].abs().sum() > 0
        assert torch.equal(got["torch"][0], got["counting"][0]), (n_ids, cuts)
        assert torch.equal(got["torch"][1], got["counting"][1]), (n_ids, cuts)
    assert len(bank_ranges(_banks(4, 4, [(0, 1), (2, 1), (4, 1), (6, 1), (8, 1)]))) > moe_sort.MAX_RANGES


CHECKS = [sort_matches_torch, grouped_path_bitwise_equal]

if __name__ == "__main__":
    for check in CHECKS:
        check()
        print(check.__name__, "ok", flush=True)
    print(f"ok {len(CHECKS)} checks")
