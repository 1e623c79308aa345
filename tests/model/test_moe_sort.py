"""The prefill counting sort (dynamo_dwdp/model/kernels/moe_sort.py) and the grouped expert path with it,
under Triton's CPU interpreter."""
from __future__ import annotations

from pathlib import Path

from tests.conftest import run_under_triton_interpreter


def test_counting_sort_under_the_interpreter():
    """tests/model/moe_sort_checks.py in a fresh process: the sort's order, group ends, pair rows and
    gathered rows vs torch.sort(stable=True) and the index ops it replaces (E 64 and 256, top-6/8, ids
    past E, partial ranges), and routed_experts_grouped at prefill sizes with it vs with torch's sort,
    bit for bit (one bank, a subset, several banks)."""
    out = run_under_triton_interpreter(Path(__file__).with_name("moe_sort_checks.py"))
    assert out.strip().endswith("ok 2 checks"), out
