"""The shared experts folded into the routed call at small batches (model/moe.py `MoEBlock.folded_shared`)."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import run_under_triton_interpreter


def test_shared_fold_under_the_interpreter():
    """tests/model/shared_fold_checks.py in a fresh process: router columns, fold kernels vs fp64, block folded
    vs separate."""
    out = run_under_triton_interpreter(Path(__file__).with_name("shared_fold_checks.py"))
    assert out.strip().endswith("ok 3 checks"), out


def test_switch_values_are_checked(monkeypatch):
    """The fold's and the router's switches take a whole number >= 0; anything else is a one-line error
    naming the variable (they are read when the model package is imported)."""
    from dynamo_dwdp.errors import UserError
    from dynamo_dwdp.model.kernels import env_count

    for raw, want in (("", 16), ("0", 0), ("8", 8), (" 32 ", 32)):
        monkeypatch.setenv("DWDP_FOLD_SHARED_MAX_TOKENS", raw)
        assert env_count("DWDP_FOLD_SHARED_MAX_TOKENS", 16) == want
    for raw in ("abc", "-1", "1.5"):
        monkeypatch.setenv("DWDP_FOLD_SHARED_MAX_TOKENS", raw)
        with pytest.raises(UserError, match=r"DWDP_FOLD_SHARED_MAX_TOKENS='"):
            env_count("DWDP_FOLD_SHARED_MAX_TOKENS", 16)
