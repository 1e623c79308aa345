"""The MLA decode split kernel, compiled for Hopper (sm_90) without a GPU, keeps a cache-tile load in
flight while it computes: at the configurations `decode_config` picks, Triton's pipeliner must give
the 32 x 512 latent tile at least two shared-memory buffers and wait for all but the newest copies.

Why a compiler check: the kernel computes the same numbers with or without the overlap (the
interpreter tests cannot see it), and the H200 measured the difference (docs/performance.md, "MLA
decode kernel pipelined": the cache load waiting behind the dots read the cache at 44-59% of the copy
rate at batch 64-256). The block-table indirection is what cost the second buffer before."""
from __future__ import annotations

import re

import pytest

triton = pytest.importorskip("triton")


def _compile_split_kernel(block_n: int, warps: int, stages: int):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from dynamo_dwdp.model import mla_decode

    fn = mla_decode._kernels()[0]
    ptrs = {"Q": "*bf16", "QPE": "*bf16", "KV": "*bf16", "TABLES": "*i64", "CTX": "*i64", "ACC": "*fp32",
            "ML": "*fp32", "OUT": "*bf16"}
    consts = dict(C=512, R=64, BS=16, BLOCK_N=block_n, BLOCK_H=16, ONE_SPLIT=False, IEEE=False)
    sig = {n: ptrs.get(n, "constexpr" if n in consts else "fp32" if n == "scale" else "i32") for n in fn.arg_names}
    # what the launcher specialises at DeepSeek shapes: 16-byte aligned pointers and 16-divisible strides
    # (576-wide cache rows, 512-wide query rows); the table's row stride (blocks per sequence) need not be
    aligned = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
               if n in ptrs or (n.startswith("stride") and n != "stride_tb")}
    src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=aligned)
    try:
        return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps, num_stages=stages))
    except Exception as exc:                      # no CUDA backend / ptxas in this Triton build
        pytest.skip(f"cannot compile for sm_90 here: {str(exc)[:200]}")


@pytest.mark.parametrize("batch", [1, 64, 256])
def test_cache_tile_is_double_buffered(batch):
    from dynamo_dwdp.model.mla_decode import decode_config

    cfg = decode_config(batch, 1)
    kernel = _compile_split_kernel(cfg.block_n, cfg.warps or 4, cfg.stages)
    ttgir = kernel.asm["ttgir"]
    buffers = [int(n) for n in re.findall(rf"local_alloc : \(\) -> !ttg\.memdesc<(\d+)x{cfg.block_n}x512xbf16", ttgir)]
    assert buffers and max(buffers) >= 2, f"latent tile buffers {buffers}: no load in flight during the dots"
    waits = [int(n) for n in re.findall(r"async_wait[^\n]*\{num = (\d+) : i32\}", ttgir)]
    assert any(n > 0 for n in waits), f"every async_wait drains all copies (num = {waits})"
