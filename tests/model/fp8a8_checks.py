"""Run by tests/model/test_fp8a8.py in a fresh process with TRITON_INTERPRET=1: the W8A8 routed-expert
kernels (dynamo_dwdp/model/kernels/moe_fp8a8.py) against torch references (tests/model/fp8a8_reference.py),
fresh random inputs each run. The interpreter runs FP8 x FP8 `tl.dot`s exactly (products of e4m3
values, fp32 sums) and, with tests/model/interpreter_numerics.py, rounds fp32 -> e4m3 as the GPU does.
Prints "ok fp8a8 <n> checks" when all pass."""
from __future__ import annotations

import os
import sys

import torch

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"

from tests.model import interpreter_numerics  # noqa: E402

interpreter_numerics.install()

from dynamo_dwdp.model.experts import ExpertBank  # noqa: E402
from dynamo_dwdp.model.fp8 import quantize_act_fp8, quantize_block_fp8  # noqa: E402
from dynamo_dwdp.model.kernels import moe_fp8a8  # noqa: E402
from dynamo_dwdp.model.kernels.moe_fp8a8 import A8Tiles  # noqa: E402
from tests.model.fp8a8_reference import dequantized_experts, emulated_experts  # noqa: E402

GEN = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
TIGHT = 1e-4       # fp32 outputs: the kernel vs the emulation of its own quantization
DEQUANT = 8e-2     # the stated tolerance against the dequantized model (moe_fp8a8's docstring)


def rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def act_quant_matches_torch() -> None:
    """The activation quantizer gives the same bytes and scales as model.fp8.quantize_act_fp8 (partial
    last group, an all-zero row, values at several magnitudes, 64-wide groups)."""
    for rows, n, group in ((5, 256, 128), (3, 200, 128), (4, 160, 64)):
        x = torch.randn(rows, n, generator=GEN) * torch.logspace(-3, 2, rows)[:, None]
        x[1] = 0.0
        q, s = moe_fp8a8.quantize_act(x, group)
        rq, rs = quantize_act_fp8(x, group)
        assert torch.equal(s, rs), (rows, n, group)
        assert torch.equal(q.view(torch.uint8), rq.view(torch.uint8)), (rows, n, group)


def _fp8_banks(spans, H, I, scale=1.0):
    banks = []
    for first, n in spans:
        w13 = [quantize_block_fp8(torch.randn(2 * I, H, generator=GEN) * scale) for _ in range(n)]
        w2 = [quantize_block_fp8(torch.randn(H, I, generator=GEN) * scale) for _ in range(n)]
        banks.append(ExpertBank(first, torch.stack([q for q, _ in w13]), torch.stack([q for q, _ in w2]),
                                torch.stack([s for _, s in w13]), torch.stack([s for _, s in w2])))
    return banks


def experts_match_emulation_and_dequantized() -> list[float]:
    """Two banks with a gap (expert 5 in no bank, ids past the last bank), I = 160 (partial weight
    blocks and h groups), each tiling family (swapped / plain, h groups of 64 and 128, 16-row tiles
    with several M tiles per expert): fp32 output within TIGHT of the emulation and within DEQUANT of
    the dequantized model; bf16 x and output within 1e-2 of the emulation."""
    H, I, E, k = 256, 160, 9, 3
    banks = _fp8_banks(((0, 5), (6, 2)), H, I, 0.1)
    errs = []
    for tiles in ({}, {"swiglu": A8Tiles(0, 128), "down": A8Tiles(16, 32)},
                  {"swiglu": A8Tiles(16, 64, swap=False), "down": A8Tiles(16, 64, swap=False)},
                  {"swiglu": A8Tiles(32, 32), "down": A8Tiles(32, 128, swap=False)}):
        moe_fp8a8.TILE_OVERRIDE.clear()
        moe_fp8a8.TILE_OVERRIDE.update(tiles)
        for T in (7, 37):
            x = torch.randn(T, H, generator=GEN)
            ids = torch.stack([torch.randperm(E, generator=GEN)[:k] for _ in range(T)])
            if T > 20:
                ids[:, 0] = 1                                # a hot expert: several M tiles
            w = torch.rand(T, k, generator=GEN)
            got = moe_fp8a8.routed_experts_fp8a8(x, ids, w, banks)
            hg = moe_fp8a8.h_group(T * k / E)
            e = rel(got, emulated_experts(x, ids, w, banks, hg))
            assert e < TIGHT, (tiles, T, e)
            d = rel(got, dequantized_experts(x, ids, w, banks))
            assert d < DEQUANT, (tiles, T, d)
            errs.append(d)
        xb = x.bfloat16()
        got = moe_fp8a8.routed_experts_fp8a8(xb, ids, w, banks, out=torch.zeros_like(xb))
        e = rel(got, emulated_experts(xb, ids, w, banks, hg))
        assert got.dtype == torch.bfloat16 and e < 1e-2, (tiles, e)
    moe_fp8a8.TILE_OVERRIDE.clear()
    return errs


def quantization_error_is_seen() -> None:
    """The checks above can fail: the emulation without the h quantization (x only) is off from the
    kernel by more than TIGHT, so the tight comparison really sees h's rounding."""
    H, I = 128, 128
    banks = _fp8_banks(((0, 2),), H, I, 0.1)
    x = torch.randn(5, H, generator=GEN)
    ids = torch.randint(0, 2, (5, 1), generator=GEN)
    w = torch.ones(5, 1)
    got = moe_fp8a8.routed_experts_fp8a8(x, ids, w, banks)
    assert rel(got, emulated_experts(x, ids, w, banks, moe_fp8a8.h_group(2.5))) < TIGHT
    assert rel(got, emulated_experts(x, ids, w, banks, 1 << 20)) > 10 * TIGHT   # one group per row: other scales


if __name__ == "__main__":
    act_quant_matches_torch()
    errs = experts_match_emulation_and_dequantized()
    quantization_error_is_seen()
    print(f"dequantized-model rel err: max {max(errs):.3e} min {min(errs):.3e}")
    print("ok fp8a8 3 checks")
    sys.exit(0)
