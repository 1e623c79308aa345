"""Run by tests/model/test_routed_schedule.py in a fresh process with TRITON_INTERPRET=1. The bf16 routed
experts' decode tilings (`moe_gemm.routed_tiles`, `TileConfig.work_list`) against an fp64 loop over
the experts and against the torch path (`experts.routed_experts` on CPU), on skewed routing: uneven row
counts, experts with several M tiles, empty experts, two banks with a gap and ids past the last bank.
GPU arithmetic in the interpreter (tests/model/interpreter_numerics.py). Prints "ok routed schedule"."""
from __future__ import annotations

import os
import sys

import torch

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"

from tests.model import interpreter_numerics  # noqa: E402

interpreter_numerics.install()

from tests.model.check_inputs import fresh_generator  # noqa: E402
from dynamo_dwdp.model.experts import ExpertBank, routed_experts  # noqa: E402
from dynamo_dwdp.model.kernels import moe_gemm  # noqa: E402
from tests.model.fused_kernel_checks import _loop_reference, rel  # noqa: E402

GEN = fresh_generator()   # fresh inputs every run, the seed printed
TC = moe_gemm.TileConfig


def skewed_ids(T: int, k: int, n_ids: int) -> torch.Tensor:
    """[T, k] distinct ids per token drawn with weights 1, 2, 3, ... in a random order: uneven loads."""
    weight = torch.arange(1, n_ids + 1, dtype=torch.float64)[torch.randperm(n_ids, generator=GEN)]
    return torch.stack([torch.multinomial(weight, k, replacement=False, generator=GEN) for _ in range(T)])


def banks_of(dtype, H: int, I: int) -> list[ExpertBank]:
    """Experts 0..4 and 7..10 (5, 6 and 11.. in no bank)."""
    return [ExpertBank(first, (torch.randn(n, 2 * I, H, generator=GEN) / 8).to(dtype),
                       (torch.randn(n, H, I, generator=GEN) / 4).to(dtype)) for first, n in ((0, 5), (7, 4))]


def work_list_matches_reference() -> None:
    """fp32 (IEEE dots: the fused result equals the fp64 loop to 1e-5) and bf16 (within twice the torch
    path's error vs fp64, plus 2e-3), for each M tile with and without the work list and for each tiling
    `routed_tiles` gives (K steps of 64, 128-row weight tiles with 8 warps); at 29 tokens the most loaded
    experts hold several 16-row tiles. H 128 and I 192: two and three K steps of 64, and a partial
    128-row weight tile."""
    H, I, k = 128, 192, 3
    rule = list(dict.fromkeys(moe_gemm.routed_tiles(mean) for mean in (2, 6, 12, 24)))
    for dtype in (torch.float32, torch.bfloat16):
        banks = banks_of(dtype, H, I)
        for T in (1, 29):
            x = torch.randn(T, H, generator=GEN).to(dtype)
            ids = skewed_ids(T, k, 13)
            w = torch.rand(T, k, generator=GEN)
            ref = _loop_reference(x, ids, w, banks)
            torch_path = routed_experts(x, ids, w, banks)
            for cfg in [TC(16, 64, swap=True, work_list=True), TC(32, 64, swap=True, work_list=True),
                        TC(64, 64, swap=True, work_list=True), TC(16, 64, swap=True),
                        TC(16, 32, work_list=True)] + rule:
                moe_gemm.TILE_OVERRIDE.update(swiglu=cfg, down=cfg)
                try:
                    got = moe_gemm.routed_experts_fused(x, ids, w, banks)
                finally:
                    moe_gemm.TILE_OVERRIDE.clear()
                if dtype == torch.float32:
                    assert rel(got, ref) < 1e-5, (cfg, T, rel(got, ref))
                else:
                    e, e_torch = rel(got, ref), rel(torch_path, ref)
                    assert e < 1e-2 and e <= 2 * e_torch + 2e-3, (cfg, T, e, e_torch)


def work_list_covers_every_tile() -> None:
    """One expert per bank holding every pair (7 tiles of 16 rows in banks of 5 and 4 experts: more
    tiles than experts, so the grid's bound is needed), all experts one row each, and a bank no pair
    reaches: the work list's grid bound and its empty rows."""
    H, I, k = 64, 64, 2
    banks = banks_of(torch.float32, H, I)
    for ids in (torch.tensor([[8, 1]] * 100), torch.arange(0, 10).view(5, 2), torch.tensor([[0, 2], [3, 1]])):
        x = torch.randn(ids.shape[0], H, generator=GEN)
        w = torch.rand(ids.shape, generator=GEN)
        moe_gemm.TILE_OVERRIDE.update(swiglu=TC(16, 64, swap=True, work_list=True),
                                      down=TC(16, 64, swap=True, work_list=True))
        try:
            got = moe_gemm.routed_experts_fused(x, ids, w, banks)
        finally:
            moe_gemm.TILE_OVERRIDE.clear()
        assert rel(got, _loop_reference(x, ids, w, banks)) < 1e-5, ids


def default_rule_is_exercised() -> None:
    """The tiles choose_tiles gives bf16 experts at 1 / 32 / 64 / 128 / 256 tokens of v2-lite (64
    experts, top-6; the GPU sweep's best under the bench model's routing, `routed_tiles`), and the
    default path (no override) computing the fp64 loop's result in each of the rule's four bands of
    mean rows per expert (two banks up to id 11, top-4: 8 / 20 / 40 / 80 tokens)."""
    sms = 132
    want = {1: TC(16, 64, swap=True), 32: TC(16, 64, swap=True),
            64: TC(32, 64, block_k=64, stages=8, swap=True),
            128: TC(32, 64, block_k=64, stages=8, swap=True, work_list=True),
            256: TC(32, 128, block_k=64, warps=8, stages=5, swap=True, work_list=True)}
    for T, cfg in want.items():
        got = moe_gemm.choose_tiles("swiglu", T * 6 / 64, min(T * 6, 64), 1408, False, sms)
        assert got == cfg == moe_gemm.choose_tiles("down", T * 6 / 64, min(T * 6, 64), 2048, False, sms), (T, got)
    H, I, k = 128, 192, 4
    banks = banks_of(torch.float32, H, I)
    seen = set()
    for T in (8, 20, 40, 80):
        seen.add(moe_gemm.choose_tiles("swiglu", T * k / 11, min(T * k, 11), I, False, sms))
        x = torch.randn(T, H, generator=GEN)
        ids = skewed_ids(T, k, 12)
        w = torch.rand(T, k, generator=GEN)
        assert rel(moe_gemm.routed_experts_fused(x, ids, w, banks), _loop_reference(x, ids, w, banks)) < 1e-5, T
    assert seen == set(want.values()), seen


if __name__ == "__main__":
    for check in (work_list_matches_reference, work_list_covers_every_tile, default_rule_is_exercised):
        check()
        print("passed", check.__name__, flush=True)
    print("ok routed schedule")
    sys.exit(0)
