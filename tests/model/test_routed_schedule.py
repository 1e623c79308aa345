"""The bf16 routed experts' decode schedule (the M tile rule, the work list of M tiles) under Triton's
CPU interpreter, against an fp64 loop and the torch path."""
from __future__ import annotations

from pathlib import Path

from tests.conftest import run_under_triton_interpreter


def test_routed_expert_tiles_under_the_interpreter():
    """tests/model/routed_schedule_checks.py in a fresh process: every M tile with and without the
    work list on skewed routing (fp32 to 1e-5 of fp64, bf16 within the torch path's error), the work
    list's extremes (one expert with every pair, one pair each, an unreached bank), and choose_tiles'
    bf16 rule at 1-256 tokens."""
    out = run_under_triton_interpreter(Path(__file__).with_name("routed_schedule_checks.py"))
    assert out.strip().endswith("ok routed schedule"), out
