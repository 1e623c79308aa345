"""Run by tests/model/test_shared_fold.py in a fresh process with TRITON_INTERPRET=1: the shared experts
folded into the routed call (`MoEBlock.folded_shared`): the router's always-on columns, the routed kernels
reading the shared experts' own weights as a second bank in the same launch, and the MoE block folded vs
separate, against an fp64 reference and the unfolded path, with the GPU's arithmetic
(tests/model/interpreter_numerics.py). Prints "ok <n> checks" when all pass."""
from __future__ import annotations

import os
import sys
from types import SimpleNamespace

import torch
import torch.nn.functional as F

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"

from tests.model import interpreter_numerics  # noqa: E402

interpreter_numerics.install()

from tests.model.check_inputs import fresh_generator, rel  # noqa: E402
from dynamo_dwdp.model import moe  # noqa: E402
from dynamo_dwdp.model.experts import ExpertBank  # noqa: E402
from dynamo_dwdp.model.kernels import moe_gemm, router  # noqa: E402
from dynamo_dwdp.model.kernels.moe_gemm import SharedExperts, routed_experts_fused  # noqa: E402
from dynamo_dwdp.model.moe import MoEBlock, Router  # noqa: E402
from dynamo_dwdp.model.moe_executor import LocalExecutor  # noqa: E402
from dynamo_dwdp.model.tensor_parallel import TensorParallel  # noqa: E402

GEN = fresh_generator()   # fresh inputs every run, the seed printed
BF = torch.bfloat16


def router_always_on_columns() -> None:
    """noaux_tc_route(always_on=S): the first k columns bitwise those of the plain call, then ids E.. E+S-1 with
    weight 1.0; the two-kernel and the one-launch forms, bf16 and fp32 x; the torch router the same."""
    E, G, TG, K, H = 64, 1, 1, 6, 256
    w = torch.randn(E, H, generator=GEN) * 0.05
    bias = torch.randn(E, generator=GEN) * 0.1
    skew = torch.zeros(E)
    for fused_rows in (0, router.FUSED_SELECT_ROWS_TESTED):
        router.FUSED_SELECT_MAX_ROWS = fused_rows
        for T in (1, 5, 70):
            for x in (torch.randn(T, H, generator=GEN).to(BF), torch.randn(T, H, generator=GEN)):
                ids, wts = router.noaux_tc_route(x, w, bias, skew, K, G, TG, True, 2.5)
                ids2, wts2 = router.noaux_tc_route(x, w, bias, skew, K, G, TG, True, 2.5, always_on=2)
                assert ids2.shape == (T, K + 2) and wts2.shape == (T, K + 2)
                assert torch.equal(ids2[:, :K], ids) and torch.equal(wts2[:, :K], wts), (fused_rows, T)
                assert torch.equal(ids2[:, K:], torch.tensor([[E, E + 1]]).expand(T, 2))
                assert torch.equal(wts2[:, K:], torch.ones(T, 2))
    router.FUSED_SELECT_MAX_ROWS = 0
    cfg = SimpleNamespace(topk_method="greedy", uses_correction_bias=False, n_routed_experts=E, hidden_size=H,
                          n_group=1, topk_group=1, num_experts_per_tok=K, norm_topk_prob=False,
                          routed_scaling_factor=1.0)
    r = Router(cfg)
    r.weight.data = w
    x = torch.randn(3, H, generator=GEN)
    ids, wts = r(x)
    ids2, wts2 = r(x, always_on=2)
    assert torch.equal(ids2[:, :K], ids) and torch.equal(ids2[:, K:], torch.tensor([[E, E + 1]]).expand(3, 2))
    assert torch.equal(wts2[:, :K], wts) and torch.equal(wts2[:, K:], torch.ones(3, 2))


def _fp64_moe(x, ids, wts, w13, w2, gate_up, down, S) -> torch.Tensor:
    """sum_k w * expert(x) over the routed picks plus the dense SwiGLU MLP (the shared experts), in fp64."""
    x = x.double()
    out = torch.zeros_like(x)
    I = w2.shape[2]
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            if e >= w13.shape[0]:
                continue
            h = w13[e].double() @ x[t]
            out[t] += float(wts[t, j]) * (w2[e].double() @ (F.silu(h[:I]) * h[I:]))
    h = x @ gate_up.double().T
    IS = S * I
    return out + (F.silu(h[:, :IS]) * h[:, IS:]) @ down.double().T


def fold_kernels_match_fp64() -> None:
    """routed_experts_fused(shared=) (the shared experts' gate_up / down read in place as experts E, E+1 of the
    same launches) vs fp64 and vs the unfolded routed call + the dense MLP in torch, bf16, 1-8 tokens, with the
    per-expert loop and the work list, one bank and three (DWDP's); a second bank of another intermediate size
    is refused."""
    E, K, S, H, I = 16, 4, 2, 64, 32
    w13 = (torch.randn(E, 2 * I, H, generator=GEN) * 0.1).to(BF)
    w2 = (torch.randn(E, H, I, generator=GEN) * 0.1).to(BF)
    gate_up = (torch.randn(2 * S * I, H, generator=GEN) * 0.1).to(BF)
    down = (torch.randn(H, S * I, generator=GEN) * 0.1).to(BF)
    bank = ExpertBank(0, w13, w2)
    shared = SharedExperts(gate_up, down, S)
    for override in ({}, {"swiglu": moe_gemm.TileConfig(16, 16, block_k=32, swap=True, work_list=True),
                          "down": moe_gemm.TileConfig(16, 16, block_k=32, swap=True, work_list=True)}):
        moe_gemm.TILE_OVERRIDE.clear()
        moe_gemm.TILE_OVERRIDE.update(override)
        for T in (1, 3, 8):
            x = torch.randn(T, H, generator=GEN).to(BF)
            ids = torch.stack([torch.randperm(E, generator=GEN)[:K] for _ in range(T)])
            wts = torch.rand(T, K, generator=GEN)
            ids2 = torch.cat([ids, torch.tensor([[E, E + 1]]).expand(T, 2)], 1)
            wts2 = torch.cat([wts, torch.ones(T, 2)], 1)
            folded = routed_experts_fused(x, ids2, wts2, [bank], shared=shared)
            # DWDP's layout: a local shard between two banks of pulled peers' experts, the shared experts
            # joining the last one (the other banks launch unchanged)
            split = [ExpertBank(lo, w13[lo:hi], w2[lo:hi]) for lo, hi in ((5, 11), (0, 5), (11, E))]
            folded3 = routed_experts_fused(x, ids2, wts2, split, shared=shared)
            ref = _fp64_moe(x, ids, wts, w13, w2, gate_up, down, S)
            routed = routed_experts_fused(x, ids, wts, [bank])
            sep = routed.float() + F.linear(F.silu(F.linear(x, gate_up[:S * I])) * F.linear(x, gate_up[S * I:]),
                                            down).float()
            e_fold, e_sep, e_fold3 = rel(folded, ref), rel(sep, ref), rel(folded3, ref)
            assert e_fold < 1e-2 and e_fold < 2 * e_sep + 1e-3, (T, override, e_fold, e_sep)
            assert e_fold3 < 1e-2 and e_fold3 < 2 * e_sep + 1e-3, (T, override, e_fold3, e_sep)
    moe_gemm.TILE_OVERRIDE.clear()
    try:
        routed_experts_fused(x, ids2, wts2, [bank], shared=SharedExperts(gate_up[:, :], down[:, :S * 16], S))
    except ValueError as exc:
        assert "intermediate" in str(exc)
    else:
        raise AssertionError("a shared MLP of another intermediate size was not refused")


def moe_block_folded_equals_separate() -> None:
    """MoEBlock on the fused decode path (forced on the CPU): folded up to its fold_max_tokens, the
    separate DenseMLP above it, and both within bf16 rounding of each other and of fp64; the pair form gives
    (sum, None) when folded."""
    E, K, S, H, I = 16, 4, 2, 64, 32
    cfg = SimpleNamespace(topk_method="noaux_tc", uses_correction_bias=True, n_routed_experts=E, hidden_size=H,
                          n_group=1, topk_group=1, num_experts_per_tok=K, norm_topk_prob=True,
                          routed_scaling_factor=2.5, n_shared_experts=S, moe_intermediate_size=I)
    ex = LocalExecutor(cfg, torch.device("cpu"), BF)
    for e in range(E):
        ex.load_expert(0, e, *(torch.randn(*s, generator=GEN).mul(0.1).to(BF) for s in ((I, H), (I, H), (H, I))))
    block = MoEBlock(cfg, 0, TensorParallel(), ex)
    block.gate.weight.data = torch.randn(E, H, generator=GEN) * 0.05
    block.gate.e_score_correction_bias.copy_(torch.randn(E, generator=GEN) * 0.1)
    for lin in (block.shared_experts.gate_proj, block.shared_experts.up_proj, block.shared_experts.down_proj):
        lin.weight.data = (torch.randn(*lin.weight.shape, generator=GEN) * 0.1).to(BF)
    assert block.shared_experts.fuse_gate_up()
    saved = moe.fused_decode_path
    moe.fused_decode_path = lambda x: True
    block.fold_max_tokens = 4
    try:
        for T in (1, 4, 5):
            x = torch.randn(T, H, generator=GEN).to(BF)
            assert (block.folded_shared(x) is not None) == (T <= 4)
            got = block(x)
            pair = block(x, separate=True)
            block.fold_max_tokens = 0
            sep = block(x)
            block.fold_max_tokens = 4
            ids, wts = block.gate(x)
            bank = ex.banks[0]
            ref = _fp64_moe(x, ids, wts, bank.w13, bank.w2, block.shared_experts.gate_up,
                            block.shared_experts.down_proj.weight, S)
            assert rel(got, ref) < 1e-2 and rel(sep, ref) < 1e-2, (T, rel(got, ref), rel(sep, ref))
            if T <= 4:
                assert pair[1] is None and torch.equal(pair[0], got)
    finally:
        moe.fused_decode_path = saved


if __name__ == "__main__":
    checks = [router_always_on_columns, fold_kernels_match_fp64, moe_block_folded_equals_separate]
    for c in checks:
        c()
        print("passed", c.__name__, flush=True)
    print(f"ok {len(checks)} checks")
    sys.exit(0)
