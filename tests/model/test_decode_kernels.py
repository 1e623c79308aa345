"""The decode-step kernels (fused add + RMSNorm, bf16 router logits, pair sum, chunked MLA merge)
under Triton's CPU interpreter, and the decoder layer's deferred residual add against the plain order."""
from __future__ import annotations

from pathlib import Path

from tests.conftest import run_under_triton_interpreter


def test_decode_kernels_under_the_interpreter():
    """tests/model/decode_kernel_checks.py in a fresh process, each kernel against the torch path and fp64."""
    out = run_under_triton_interpreter(Path(__file__).with_name("decode_kernel_checks.py"))
    assert out.strip().endswith("ok 4 checks"), out
