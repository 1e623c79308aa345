"""The bf16 routed experts' decode schedule (the M tile rule, the work list of M tiles) under Triton's
CPU interpreter, against an fp64 loop and the torch path."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import run_under_triton_interpreter


def test_routed_expert_tiles_under_the_interpreter():
    """tests/model/routed_schedule_checks.py in a fresh process: every M tile with and without the
    work list on skewed routing (fp32 to 1e-5 of fp64, bf16 within the torch path's error), the work
    list's extremes (one expert with every pair, one pair each, an unreached bank), and choose_tiles'
    bf16 rule at 1-256 tokens."""
    out = run_under_triton_interpreter(Path(__file__).with_name("routed_schedule_checks.py"))
    assert out.strip().endswith("ok routed schedule"), out


POINTERS = ("A", "ORDER", "OFFS", "W", "WS", "OUT", "PART", "WB")
ALIGNED = POINTERS + ("N", "K", "stride_am", "stride_we", "stride_wn", "stride_om")   # as launches specialize them


def _compile_for_hopper(cfg, swiglu: bool, groups: int = 64, two_banks: bool = False):
    """moe_gemm's grouped kernel compiled (no GPU needed: Triton's bundled ptxas) for sm_90 as
    routed_experts_fused launches it for bf16 experts at the v2-lite shapes with TileConfig `cfg`
    (`two_banks`: with the folded shared experts' second weight tensor)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from dynamo_dwdp.model.kernels import moe_gemm, next_pow2

    kernel = moe_gemm._kernels()[1]
    const = dict(SWIGLU=swiglu, GATHER=swiglu, SCATTER=not swiglu, DENSE=False, FP8=False, BLOCK_M=cfg.block_m,
                 BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, SWAP=cfg.swap, FAST_CVT=False, CVT_ASM="", SPLIT_K=1,
                 IEEE=False, WORK_LIST=max(2, next_pow2(groups)) if cfg.work_list else 0, TWO_BANKS=two_banks)
    sig = {n: ("constexpr" if n in const else "*i32" if n in ("ORDER", "OFFS") else "*fp32" if n == "PART"
               else "*bf16" if n in POINTERS else "i32") for n in kernel.arg_names}
    attrs = {(kernel.arg_names.index(n),): [["tt.divisibility", 16]] for n in ALIGNED}
    _, stages = moe_gemm.pipeline_stages(cfg, 2, 2, swiglu)                    # as moe_gemm._launch
    return triton.compile(ASTSource(kernel, sig, const, attrs), target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=cfg.warps, num_stages=stages, enable_fp_fusion=True))


def test_routed_expert_tiles_compile_to_hopper_pipelines():
    """The bf16 routed tiles that choose_tiles gives at 1, 64, 128 and 256 tokens (K steps of 64 in 8 and
    5 stages, the work list, 128-row weight tiles on 8 warps) compile for sm_90 to warpgroup MMAs fed by
    software-pipelined async copies within the shared memory an H200 gives one program (227 KB); the
    interpreter checks the arithmetic, this the GPU build."""
    pytest.importorskip("triton")
    from dynamo_dwdp.model.kernels import moe_gemm

    cfgs = [moe_gemm.choose_tiles("swiglu", T * 6 / 64, min(T * 6, 64), 1408, False, 132) for T in (1, 64, 128, 256)]
    assert len(set(cfgs)) == 4, cfgs
    for cfg in cfgs:
        for swiglu in (True, False):
            compiled = _compile_for_hopper(cfg, swiglu)
            ptx = compiled.asm["ptx"]
            assert "wgmma.mma_async" in ptx, (cfg, swiglu)
            assert "cp.async.cg.shared.global" in ptx, (cfg, swiglu)
            assert compiled.metadata.shared <= 227 * 1024, (cfg, swiglu, compiled.metadata.shared)
    for swiglu in (True, False):                # the shared-experts fold (small batches: the 1-token tile)
        compiled = _compile_for_hopper(cfgs[0], swiglu, groups=66, two_banks=True)
        assert "wgmma.mma_async" in compiled.asm["ptx"], swiglu
