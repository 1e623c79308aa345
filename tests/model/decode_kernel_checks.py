"""Run by tests/model/test_decode_kernels.py in a fresh process with TRITON_INTERPRET=1: the decode-step
kernels (fused residual add + RMSNorm, the router's bf16 logits on tensor cores, the routed experts'
weighted pair sum, the MLA merge split over latent chunks), each against the torch path and an fp64
reference on fresh random inputs, with the GPU's arithmetic (tests/model/interpreter_numerics.py).
Prints "ok <n> checks" when all pass."""
from __future__ import annotations

import os
import sys
from types import SimpleNamespace

import torch
import torch.nn.functional as F

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"

from tests.model import interpreter_numerics  # noqa: E402

interpreter_numerics.install()

from tests.model.check_inputs import fresh_generator  # noqa: E402
from dynamo_dwdp.model import mla_decode  # noqa: E402
from dynamo_dwdp.model.experts import ExpertBank, routed_experts  # noqa: E402
from dynamo_dwdp.model.kernels import moe_gemm, norm, router  # noqa: E402
from dynamo_dwdp.model.layers import RMSNorm  # noqa: E402
from dynamo_dwdp.model.moe import Router  # noqa: E402

GEN = fresh_generator()   # fresh inputs every run, the seed printed
BF = torch.bfloat16


def rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def within_one_rounding(got: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    """got (bf16) within one bf16 rounding step of the fp64 ref, elementwise."""
    err = (got.double() - ref).abs()
    bound = ref.abs() * 2.0 ** -8 + 1e-30
    assert bool((err <= bound).all()), f"{what}: {int((err > bound).sum())} elements off by more than a rounding"


def add_rmsnorm_matches_torch() -> None:
    """h bitwise equal to torch's residual + delta (and residual + (delta + delta2)); the norm within
    one rounding of fp64 and of torch's `F.rms_norm` of that h (bf16), 1e-6 in fp32; H not a power of
    two; `RMSNorm.add_and_norm`'s CPU path is the plain sequence."""
    for dtype in (BF, torch.float32):
        for T, H in ((1, 64), (5, 96), (3, 2048)):
            d, d2, r = (torch.randn(T, H, generator=GEN).to(dtype) for _ in range(3))
            w = (1 + 0.05 * torch.randn(H, generator=GEN)).to(dtype)
            for second in (None, d2):
                h, y = norm.add_rmsnorm(d, r, w, 1e-6, second)
                h_ref = r + d if second is None else r + (d + second)
                assert torch.equal(h, h_ref), (dtype, T, H)
                hd = h_ref.double()
                ref = hd * torch.rsqrt(hd.pow(2).mean(-1, keepdim=True) + 1e-6) * w.double()
                if dtype == BF:
                    within_one_rounding(y, ref, f"add_rmsnorm T={T} H={H}")
                    torch_path = F.rms_norm(h_ref, (H,), w, 1e-6)
                    assert (y.double() - torch_path.double()).abs().max() <= \
                        2 * (torch_path.double() - ref).abs().max() + ref.abs().max() * 2.0 ** -8
                else:
                    assert rel(y, ref) < 1e-6, (T, H, rel(y, ref))
    m = RMSNorm(32)
    m.weight.data = 1 + 0.1 * torch.randn(32, generator=GEN)
    d, r = torch.randn(4, 32, generator=GEN), torch.randn(4, 32, generator=GEN)
    h, y = m.add_and_norm(d, r)
    assert torch.equal(h, r + d) and torch.equal(y, m(r + d))


def _near_ties(x, r, picked, ref_picked, rows, tol: float = 1e-6) -> bool:
    """Rows whose expert sets differ from the reference's are ties within fp32 summation order: the two sets'
    selection scores (sigmoid of the float64 logits + bias), sorted, agree to `tol`. Both sets are then a
    correct top-k (the kernel's logits are the fp32 product up to summation order; inputs are fresh every run,
    so a near-tie turns up now and then at prefill sizes)."""
    if not picked.numel():
        return True
    score = torch.sigmoid(x[rows].double() @ r.weight.double().T) + r.e_score_correction_bias.double()
    mine, theirs = score.gather(1, picked).sort(1).values, score.gather(1, ref_picked).sort(1).values
    return bool(((mine - theirs).abs() <= tol).all()) and picked.shape[0] <= 2


def router_bf16_logits_pick_the_reference_experts() -> None:
    router.FUSED_SELECT_MAX_ROWS = router.FUSED_SELECT_ROWS_TESTED          # the one-launch form under test
    router.FUSED_SELECT_MAX_EXPERTS = 1 << 20                               # at 256 experts too
    """bf16 activations (the three-way bf16 split of the fp32 weight on tensor cores) at every token
    tile (1, 20, 70 tokens, and a prefill-sized batch: one GEMM against the stacked parts) vs the torch
    router on the same bf16 x (fp32 logits): same expert sets,
    same weights; flat 64 experts and grouped 256. The one-launch form (selection by the last logits
    program of a token tile) bitwise equal to the two-kernel form, bf16 and fp32 x, counters reset."""
    for E, G, TG, K, H, norm_p in ((64, 1, 1, 6, 256, False), (256, 8, 4, 8, 128, True)):
        cfg = SimpleNamespace(topk_method="noaux_tc", uses_correction_bias=True, n_routed_experts=E, hidden_size=H,
                              n_group=G, topk_group=TG, num_experts_per_tok=K, norm_topk_prob=norm_p,
                              routed_scaling_factor=2.5)
        r = Router(cfg)
        r.weight.data = torch.randn(E, H, generator=GEN) * 0.05
        r.e_score_correction_bias.copy_(torch.randn(E, generator=GEN) * 0.1)
        for T in (1, 20, 70, router.LOGITS_KERNEL_MAX_ROWS + 5):      # the last: prefill's stacked-split GEMM
            x = torch.randn(T, H, generator=GEN).to(BF)
            assert router.logits_tiles(T, E, BF)[3]
            ids, w = router.noaux_tc_route(x, r.weight, r.e_score_correction_bias, r.selection_skew, K, G, TG, norm_p,
                                           2.5)
            ref_ids, ref_w = r(x)
            a, b = ids.sort(1), ref_ids.sort(1)
            same = (a.values == b.values).all(1)
            assert _near_ties(x, r, a.values[~same], b.values[~same], ~same), (E, T)
            assert torch.allclose(w.gather(1, a.indices)[same], ref_w.gather(1, b.indices)[same], rtol=1e-5,
                                  atol=1e-6), (E, T)
            for xx in (x, x.float()):                   # the last-program selection vs the select kernel: bitwise
                fused = router.noaux_tc_route(xx, r.weight, r.e_score_correction_bias, r.selection_skew, K, G, TG,
                                              norm_p, 2.5)
                saved, router.FUSED_SELECT_MAX_ROWS = router.FUSED_SELECT_MAX_ROWS, 0
                two = router.noaux_tc_route(xx, r.weight, r.e_score_correction_bias, r.selection_skew, K, G, TG,
                                            norm_p, 2.5)
                router.FUSED_SELECT_MAX_ROWS = saved
                assert torch.equal(fused[0], two[0]) and torch.equal(fused[1], two[1]), (E, T, xx.dtype)
    assert router._COUNTERS and all(not c.any() for c in router._COUNTERS.values())   # every counter back at 0


def pair_sum_matches_the_batched_product() -> None:
    """The weighted sum of each token's k expert rows vs fp64 and vs torch's bmm of bf16 weights: rows
    of pairs outside the banks hold NaN and must not leak (2 ranges), > 4 ranges with zeroed rows,
    accumulation into `out` rounded as `out.add_` rounds; then the fused experts end to end in bf16
    against routed_experts' torch path with experts outside every bank."""
    T, k, N = 7, 4, 96
    ids = torch.stack([torch.randperm(12, generator=GEN)[:k] for _ in range(T)])
    wts = torch.rand(T, k, generator=GEN)
    y = torch.randn(T * k, N, generator=GEN).to(BF)
    for ranges in ([(0, 4), (6, 10)], [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9), (10, 11)]):
        inside = torch.zeros(T * k, dtype=torch.bool)
        for lo, hi in ranges:
            inside |= (ids.reshape(-1) >= lo) & (ids.reshape(-1) < hi)
        y_in = torch.where(inside[:, None], y, torch.nan if len(ranges) <= 4 else 0.0).to(BF)
        y0 = torch.where(inside[:, None], y, 0.0).to(BF)
        ref = torch.einsum("tk,tkn->tn", wts.to(BF).double(), y0.double().view(T, k, N))
        got = moe_gemm.pair_sum(y_in, wts, ids, ranges)
        within_one_rounding(got, ref, f"pair_sum {len(ranges)} ranges")
        bmm = torch.bmm(wts.to(BF).view(T, 1, k), y0.view(T, k, N)).view(T, N)
        assert (got.double() - bmm.double()).abs().max() <= ref.abs().max() * 2.0 ** -7
        out0 = torch.randn(T, N, generator=GEN).to(BF)
        out = moe_gemm.pair_sum(y_in, wts, ids, ranges, out0.clone())
        assert torch.equal(out, out0 + got)
    H, I, E = 64, 32, 10
    banks = [ExpertBank(first, (torch.randn(n, 2 * I, H, generator=GEN) / 8).to(BF),
                        (torch.randn(n, H, I, generator=GEN) / 4).to(BF)) for first, n in ((0, 4), (6, 3))]
    x = torch.randn(5, H, generator=GEN).to(BF)
    ids = torch.stack([torch.randperm(E + 2, generator=GEN)[:3] for _ in range(5)])     # 4, 5, 9..11 in no bank
    wts = torch.rand(5, 3, generator=GEN)
    got = moe_gemm.routed_experts_fused(x, ids, wts, banks)
    ref = routed_experts(x, ids, wts, banks)
    assert rel(got, ref) < 1e-2 and not got.isnan().any(), rel(got, ref)


def mla_merge_in_latent_chunks() -> None:
    """One sequence (the interpreter's 8 "SMs" split the merge into 4 latent chunks of 32), three, and
    four with 40 heads (two head groups of 32, one chunk: one split per merge step), several context
    splits each, vs fp64."""
    C, R, bs = 128, 16, 8
    assert mla_decode.combine_chunks(1, C, 8) == 4 and mla_decode.combine_chunks(64, C, 132) == 4
    assert mla_decode.combine_chunks(256, 512, 132) == 1 and mla_decode.combine_chunks(1, 512, 132) == 16
    cache = torch.randn(60, bs, C + R, generator=GEN)
    for ctxs, h in (([300], 16), ([5, 290, 100], 16), ([300, 7, 250, 64], 40)):
        tables = torch.stack([torch.randperm(60, generator=GEN)[:40] for _ in ctxs])
        q = torch.randn(len(ctxs), h, C + R, generator=GEN)
        assert mla_decode.num_splits(len(ctxs), 1, max(ctxs), 8, 4, 32, 2) > 1
        out = mla_decode.mla_decode_attention(q, cache, tables, torch.tensor(ctxs), C, 0.1, max(ctxs))
        for b, c in enumerate(ctxs):
            keys = cache[tables[b]].reshape(-1, C + R)[:c].double()
            ref = torch.softmax(q[b].double() @ keys.T * 0.1, -1) @ keys[:, :C]
            assert rel(out[b], ref) < 1e-5, (ctxs, b, rel(out[b], ref))


if __name__ == "__main__":
    checks = [add_rmsnorm_matches_torch, router_bf16_logits_pick_the_reference_experts,
              pair_sum_matches_the_batched_product, mla_merge_in_latent_chunks]
    for c in checks:
        c()
        print("passed", c.__name__, flush=True)
    print(f"ok {len(checks)} checks")
    sys.exit(0)
