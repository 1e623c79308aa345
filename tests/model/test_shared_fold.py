"""The shared experts folded into the routed call at small batches (model/moe.py `MoEBlock.folded_shared`)."""
from __future__ import annotations

from pathlib import Path

from tests.conftest import run_under_triton_interpreter


def test_shared_fold_under_the_interpreter():
    """tests/model/shared_fold_checks.py in a fresh process: router columns, fold kernels vs fp64, block folded
    vs separate."""
    out = run_under_triton_interpreter(Path(__file__).with_name("shared_fold_checks.py"))
    assert out.strip().endswith("ok 3 checks"), out
