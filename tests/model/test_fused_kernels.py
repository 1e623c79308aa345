"""The fused GPU kernels (dynamo_dwdp/model/kernels/) under Triton's CPU interpreter, the start-up
graph capture's key set, and the FP8-resident weight setting's contracts."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dynamo_dwdp.config.engine import EngineSettings
from dynamo_dwdp.errors import UserError
from tests.conftest import run_under_triton_interpreter


def test_fused_kernels_under_the_interpreter():
    """tests/model/fused_kernel_checks.py in a fresh process: no fp32 dot at TF32, the kernels at TP2's
    sharded shapes in bf16, router, norm/rope/cache-write, the counting sort, bf16-path and FP8
    experts, FP8 linear, the decode kernel's separate q_pe, each against the torch reference on fresh
    random inputs."""
    out = run_under_triton_interpreter(Path(__file__).with_name("fused_kernel_checks.py"))
    assert out.strip().endswith("ok 9 checks"), out


def test_tp2_bf16_on_the_gpu_decode_path_under_the_interpreter():
    """tests/model/tp_bf16_checks.py in a fresh process: TP2 vs single in bf16 with every fused kernel
    at TP's sharded shapes and the peer collectives, forced tokens; logits apart by more than 5e-2 only
    in steps where a token's expert selection differs, median step under 3e-2."""
    out = run_under_triton_interpreter(Path(__file__).with_name("tp_bf16_checks.py"), timeout=900)
    assert out.strip().endswith("ok tp2 bf16"), out


def test_start_up_capture_covers_every_key():
    """capture_all's key set holds the key of every decode step the engine can run (batch 1..max,
    context 1..max blocks), and nothing past the limits."""
    from dynamo_dwdp.engine.cuda_graphs import DecodeGraphs

    g = DecodeGraphs.__new__(DecodeGraphs)
    g.max_batch, g.max_blocks, g.bs, g.executor = 48, 70, 16, None
    keys = set(g.all_keys())
    need = {g.key(b, ctx) for b in range(1, 49) for ctx in range(1, 70 * 16 + 1)}
    assert need == keys
    assert max(b for b, _ in keys) == 48 and max(k for _, k in keys) == 70


def test_fp8_weight_format_validation():
    with pytest.raises(UserError, match="weight_format"):
        EngineSettings(weight_format="int4").validate()
    with pytest.raises(UserError, match="needs device=cuda"):
        EngineSettings(weight_format="fp8-block", device="cpu").validate()
    EngineSettings(weight_format="fp8-block", device="cuda").validate()


def test_requantizing_a_dequantized_official_block_is_exact():
    """An official checkpoint's blocks (amax at 448 x scale) dequantized to the model's bf16 and
    quantized again at load give back the same e4m3 values; the scales move by bf16 rounding only."""
    from dynamo_dwdp.model.fp8 import dequantize_block_fp8, quantize_block_fp8

    gen = torch.Generator().manual_seed(5)
    w = torch.randn(300, 260, generator=gen) * torch.rand(300, 1, generator=gen)
    q, s = quantize_block_fp8(w)                                   # "official" e4m3 + scales
    for dtype in (torch.float32, torch.bfloat16):
        q2, s2 = quantize_block_fp8(dequantize_block_fp8(q, s, dtype=dtype))
        assert torch.equal(q2.view(torch.uint8), q.view(torch.uint8)), dtype
        assert ((s2 - s).abs() / s).max() <= (0 if dtype == torch.float32 else 2 ** -8), dtype
