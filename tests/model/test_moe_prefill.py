"""The prefill-size MoE kernels (dynamo_dwdp/model/kernels/moe_prefill.py) and the paths that use them,
under Triton's CPU interpreter."""
from __future__ import annotations

from pathlib import Path

from tests.conftest import run_under_triton_interpreter


def test_prefill_kernels_under_the_interpreter():
    """tests/model/moe_prefill_checks.py in a fresh process: swiglu and combine vs float64 (pairs of
    no bank over NaN-poisoned rows, accumulation into out, fp32 and bf16), the grouped expert path
    with both kernels vs the per-expert fp32 loop for one bank, several banks and partial covers
    (sync-free and host-synced), the dense MLP's prefill form, the MLA prep's in-place rope, and the
    attention layer's prefill with it vs its reference backend."""
    out = run_under_triton_interpreter(Path(__file__).with_name("moe_prefill_checks.py"))
    assert out.strip().endswith("ok 6 checks"), out
