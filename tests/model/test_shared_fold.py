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
    naming the variable (`env_count`; the model build reads them)."""
    from dynamo_dwdp.errors import UserError
    from dynamo_dwdp.model.kernels import env_count

    for raw, want in (("", 16), ("0", 0), ("8", 8), (" 32 ", 32)):
        monkeypatch.setenv("DWDP_FOLD_SHARED_MAX_TOKENS", raw)
        assert env_count("DWDP_FOLD_SHARED_MAX_TOKENS", 16) == want
    for raw in ("abc", "-1", "1.5"):
        monkeypatch.setenv("DWDP_FOLD_SHARED_MAX_TOKENS", raw)
        with pytest.raises(UserError, match=r"DWDP_FOLD_SHARED_MAX_TOKENS='"):
            env_count("DWDP_FOLD_SHARED_MAX_TOKENS", 16)


def test_prefill_sort_switch_is_checked_when_the_model_is_built(monkeypatch):
    """DWDP_PREFILL_SORT takes counting (the default) or torch; a MoE block refuses anything else with a
    one-line error naming the variable, at build time, not on the first long prompt."""
    from types import SimpleNamespace

    from dynamo_dwdp.errors import UserError
    from dynamo_dwdp.model import experts
    from dynamo_dwdp.model.moe import MoEBlock
    from dynamo_dwdp.model.tensor_parallel import TensorParallel

    monkeypatch.setattr(experts, "PREFILL_SORT", None)
    for raw, want in (("", "counting"), ("torch", "torch"), (" counting ", "counting")):
        monkeypatch.setenv("DWDP_PREFILL_SORT", raw)
        assert experts.prefill_sort() == want
    cfg = SimpleNamespace(topk_method="greedy", uses_correction_bias=False, n_routed_experts=4, hidden_size=8,
                          n_group=1, topk_group=1, num_experts_per_tok=2, norm_topk_prob=False,
                          routed_scaling_factor=1.0, n_shared_experts=0, moe_intermediate_size=4)
    monkeypatch.setenv("DWDP_PREFILL_SORT", "torch")
    MoEBlock(cfg, 0, TensorParallel(), None)
    monkeypatch.setenv("DWDP_PREFILL_SORT", "radix")
    with pytest.raises(UserError, match=r"DWDP_PREFILL_SORT='radix': expected one of counting, torch"):
        MoEBlock(cfg, 0, TensorParallel(), None)
