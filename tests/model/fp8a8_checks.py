"""Run by tests/model/test_fp8a8.py in a fresh process with TRITON_INTERPRET=1: the W8A8 routed-expert
kernels (dynamo_dwdp/model/kernels/moe_fp8a8.py) against torch references (tests/model/fp8a8_reference.py),
fresh random inputs each run. The interpreter runs FP8 x FP8 `tl.dot`s exactly (products of e4m3
values, fp32 sums) and, with tests/model/interpreter_numerics.py, rounds fp32 -> e4m3 as the GPU does.
Prints "ok fp8a8 <n> checks" when all pass."""
from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"

from tests.model import interpreter_numerics  # noqa: E402

interpreter_numerics.install()

from tests.model.check_inputs import fresh_generator  # noqa: E402
from dynamo_dwdp.model import experts  # noqa: E402
from dynamo_dwdp.model.experts import ExpertBank  # noqa: E402
from dynamo_dwdp.model.fp8 import (dequantize_act_fp8, dequantize_block_fp8, quantize_act_fp8,  # noqa: E402
                                   quantize_block_fp8)
from dynamo_dwdp.model.kernels import moe_fp8a8, moe_gemm  # noqa: E402
from dynamo_dwdp.model.kernels.moe_fp8a8 import A8Tiles  # noqa: E402
from tests.model.fp8a8_reference import dequantized_experts, emulated_experts  # noqa: E402

GEN = fresh_generator()   # fresh inputs every run, the seed printed
TIGHT = 1e-5       # fp32, one stage fed the kernel's own FP8 input vs float64
FLIPS = 0.002      # h elements allowed one e4m3 step off the emulation (fp32 vs float64 near a rounding midpoint;
                   # 0 of ~34,000 in three runs)
END_TO_END = 3e-3  # fp32 outputs vs the emulation, end to end: what such flips can move (quantization itself: ~4e-2)
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


def _bank_of(banks, e):
    for b in banks:
        if b.first <= e < b.first + b.count:
            return b, e - b.first
    return None


def stages_match_emulation() -> None:
    """Stage by stage, pair by pair, each tiling family: h's scales within 1e-5 of the emulation's
    (gate/up and SwiGLU in float64 over the quantized x, `quantize_act_fp8` of the fp32 result) and its
    e4m3 values equal but for at most FLIPS one-step rounding flips; then the down stage, fed the
    kernel's own h, within TIGHT of float64 over that h. Two banks with a gap, ids past the last bank,
    I = 160 (partial weight blocks and h groups), a hot expert (several M tiles)."""
    H, I, E, k, T = 256, 160, 9, 3, 29
    banks = _fp8_banks(((0, 5), (6, 2)), H, I, 0.1)
    for tiles in ({}, {"swiglu": A8Tiles(0, 64, swap=False), "down": A8Tiles(0, 64, swap=False)},
                  {"swiglu": A8Tiles(16, 32), "down": A8Tiles(32, 128)}):
        moe_fp8a8.TILE_OVERRIDE.clear()
        moe_fp8a8.TILE_OVERRIDE.update(tiles)
        x = torch.randn(T, H, generator=GEN)
        ids = torch.stack([torch.randperm(E + 1, generator=GEN)[:k] for _ in range(T)])
        ids[:, 0] = 1
        hid = moe_fp8a8.expert_hidden(x, ids, banks)
        xd = dequantize_act_fp8(*quantize_act_fp8(x)).double()
        flat = ids.reshape(-1)
        y_ref = torch.zeros(flat.numel(), H, dtype=torch.float64)
        flips = total = 0
        for p in range(flat.numel()):
            pair = int(hid.order[p])
            found = _bank_of(banks, int(flat[pair]))
            if found is None:
                continue
            b, i = found
            gate, up = (xd[pair // k] @ dequantize_block_fp8(b.w13[i], b.w13_scale[i]).double().T).chunk(2)
            rq, rs = quantize_act_fp8((F.silu(gate) * up).float()[None], hid.group)
            assert torch.allclose(hid.h_scale[p], rs[0], rtol=1e-5, atol=0), (tiles, p)
            got, want = hid.h[p].float(), rq[0].float()
            one_step = torch.maximum(got.abs(), want.abs()) * 2.0 ** -3 + 2.0 ** -9   # e4m3 spacing; subnormal 2^-9
            assert ((got - want).abs() <= one_step).all(), (tiles, p)
            flips += int((got != want).sum())
            total += I
            h = dequantize_act_fp8(hid.h[p:p + 1], hid.h_scale[p:p + 1], hid.group).double()
            y_ref[pair] = (h @ dequantize_block_fp8(b.w2[i], b.w2_scale[i]).double().T)[0]
        assert flips <= FLIPS * total, (tiles, flips, total)
        y = moe_fp8a8.expert_down(hid, banks, H, k, torch.float32)
        assert rel(y, y_ref) < TIGHT, (tiles, rel(y, y_ref))
    moe_fp8a8.TILE_OVERRIDE.clear()


def experts_match_emulation_and_dequantized() -> list[float]:
    """End to end, two banks with a gap (expert 5 in no bank, ids past the last bank), I = 160, each
    tiling family (swapped / plain, h groups of 64 and 128, 16-row tiles with several M tiles per
    expert): fp32 output within END_TO_END of the emulation and within DEQUANT of the dequantized
    model; bf16 x and output within 1e-2 of the emulation."""
    H, I, E, k = 256, 160, 9, 3
    banks = _fp8_banks(((0, 5), (6, 2)), H, I, 0.1)
    errs = []
    for tiles in ({}, {"swiglu": A8Tiles(0, 64), "down": A8Tiles(16, 32)},
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
            assert e < END_TO_END, (tiles, T, e)
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
    """The checks above can fail: the emulation with one scale per h row instead of per group is off from the
    kernel by far more than END_TO_END: the comparison sees how h is rounded (I = 256: two h groups)."""
    H, I = 128, 256
    banks = _fp8_banks(((0, 2),), H, I, 0.1)
    x = torch.randn(5, H, generator=GEN)
    ids = torch.randint(0, 2, (5, 1), generator=GEN)
    w = torch.ones(5, 1)
    got = moe_fp8a8.routed_experts_fp8a8(x, ids, w, banks)
    assert rel(got, emulated_experts(x, ids, w, banks, moe_fp8a8.h_group(2.5))) < END_TO_END
    assert rel(got, emulated_experts(x, ids, w, banks, 1 << 20)) > 3 * END_TO_END   # one group per row: ~2e-2


def dispatch_follows_the_banks() -> None:
    """experts.routed_experts on the fused path (forced here: on a GPU it is taken for every FP8 bank)
    runs the W8A8 kernels for banks marked fp8_activations and the W8A16 kernels otherwise."""
    H, I = 128, 128
    banks = _fp8_banks(((0, 3),), H, I, 0.1)
    x = torch.randn(4, H, generator=GEN)
    ids = torch.randint(0, 3, (4, 2), generator=GEN)
    w = torch.rand(4, 2, generator=GEN)
    saved = experts.use_fused_experts
    experts.use_fused_experts = lambda *a: True
    try:
        w8a16 = experts.routed_experts(x, ids, w, banks)
        for b in banks:
            b.fp8_activations = True
        w8a8 = experts.routed_experts(x, ids, w, banks)
    finally:
        experts.use_fused_experts = saved
    assert torch.equal(w8a16, moe_gemm.routed_experts_fused(x, ids, w, banks))
    assert torch.equal(w8a8, moe_fp8a8.routed_experts_fp8a8(x, ids, w, banks))
    assert rel(w8a8, w8a16) > 1e-2                     # the two paths really differ (activation rounding)


if __name__ == "__main__":
    act_quant_matches_torch()
    stages_match_emulation()
    errs = experts_match_emulation_and_dequantized()
    quantization_error_is_seen()
    dispatch_follows_the_banks()
    print(f"dequantized-model rel err: max {max(errs):.3e} min {min(errs):.3e}")
    print("ok fp8a8 5 checks")
    sys.exit(0)
