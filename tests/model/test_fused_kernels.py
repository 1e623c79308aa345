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
    experts, FP8 linear, the decode kernel's separate q_pe, and every tile configuration the GPU sweep
    chooses among, each against the torch reference on fresh random inputs."""
    out = run_under_triton_interpreter(Path(__file__).with_name("fused_kernel_checks.py"))
    assert out.strip().endswith("ok 10 checks"), out


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


def _run_fp8_to_bf16_ptx(asm: str, word: int) -> tuple[int, int]:
    """Executes moe_gemm.FP8_TO_BF16_ASM's instructions on one packed 32-bit word (input $2) by their
    PTX definitions (prmt default mode, shr, and, or, mov, fma.rn.bf16x2); returns ($0, $1)."""
    regs = {"$2": word}

    def val(tok):
        tok = tok.strip()
        return int(tok, 16) if tok.startswith("0x") else int(tok) if tok.isdigit() else regs[tok]

    def bf16(bits):
        return torch.tensor([bits], dtype=torch.int32).to(torch.int16).view(torch.bfloat16).double().item()

    def to_bits(x):
        return int(torch.tensor([x], dtype=torch.float64).to(torch.bfloat16).view(torch.int16).item()) & 0xFFFF

    for line in asm.strip().strip("{}").splitlines():
        line = line.strip().rstrip(";")
        if not line or line.startswith(".reg"):
            continue
        op, args = line.split(None, 1)
        d, *src = [a.strip() for a in args.split(",")]
        if op == "mov.b32":
            r = val(src[0])
        elif op == "prmt.b32":
            pool = (val(src[1]) << 32) | val(src[0])          # bytes 0-3: a, 4-7: b
            sel = val(src[2])
            r = 0
            for i in range(4):
                nib = (sel >> (4 * i)) & 0xF
                assert nib < 8, "sign-replicate mode is not used"
                r |= ((pool >> (8 * nib)) & 0xFF) << (8 * i)
        elif op == "shr.b32":
            r = val(src[0]) >> val(src[1])
        elif op == "and.b32":
            r = val(src[0]) & val(src[1])
        elif op == "or.b32":
            r = val(src[0]) | val(src[1])
        elif op == "fma.rn.bf16x2":
            a, b, c = (val(x) for x in src)
            r = 0
            for half in (0, 16):
                x, y, z = (bf16((v >> half) & 0xFFFF) for v in (a, b, c))
                r |= to_bits(x * y + z) << half
        else:
            raise AssertionError(f"instruction {op} has no model here")
        regs[d] = r & 0xFFFFFFFF
    return regs["$0"], regs["$1"]


def test_fast_fp8_to_bf16_conversion_is_exact():
    """The inline PTX that converts FP8 weights on the GPU (run there, not under the interpreter),
    executed instruction by instruction: every e4m3 byte in every position of the packed word gives
    the bf16 of torch's e4m3 -> bf16 conversion, bit for bit (subnormals, zeros and signs included;
    the two NaN encodings, which quantized weights never hold, are left out)."""
    from dynamo_dwdp.model.kernels.moe_gemm import FP8_TO_BF16_ASM

    codes = [c for c in range(256) if c & 0x7F != 0x7F]
    want = torch.tensor(codes, dtype=torch.uint8).view(torch.float8_e4m3fn).to(torch.bfloat16).view(torch.int16)
    want = {c: int(w) & 0xFFFF for c, w in zip(codes, want.tolist())}
    gen = torch.Generator().manual_seed(3)
    for i, c in enumerate(codes):
        others = [codes[int(j)] for j in torch.randint(0, len(codes), (3,), generator=gen)]
        pos = i % 4
        byts = others[:pos] + [c] + others[pos:]
        word = sum(b << (8 * k) for k, b in enumerate(byts))
        lo, hi = _run_fp8_to_bf16_ptx(FP8_TO_BF16_ASM, word)
        got = [lo & 0xFFFF, lo >> 16, hi & 0xFFFF, hi >> 16]
        assert got == [want[b] for b in byts], (hex(word), [hex(g) for g in got])


def test_router_weight_split_into_three_bf16_parts_is_exact():
    """router.stacked_split3 (the prefill logits' stacked weight): hi + mid + lo is the fp32 weight bit for bit,
    over the router weights' range (random scales, tiny and large entries), and the cache follows an
    in-place change of the weight."""
    from dynamo_dwdp.model.kernels.router import stacked_split3

    g = torch.Generator().manual_seed(3)
    w = torch.randn(64, 512, generator=g) * torch.logspace(-6, 1, 512)
    parts = stacked_split3(w)
    assert parts.dtype == torch.bfloat16 and parts.shape == (192, 512)
    hi, mid, lo = parts.float().view(3, 64, 512)
    assert torch.equal((hi + mid) + lo, w)
    assert not torch.equal(hi, w)                     # teeth: one bf16 part alone is not the weight
    assert stacked_split3(w) is parts                         # cached
    w.mul_(2)
    assert torch.equal(stacked_split3(w).float().view(3, 64, 512).sum(0), w)
