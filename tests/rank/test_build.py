"""Rank assembly refuses what it cannot build before it joins a group or touches a device."""
from __future__ import annotations

import pytest

from dynamo_dwdp.config.engine import EngineSettings
from dynamo_dwdp.errors import UserError
from dynamo_dwdp.group.context import GroupSpec
from dynamo_dwdp.rank.build import build_rank_engine


@pytest.mark.parametrize("fmt", ["fp8-block", "fp8-block-a8"])
@pytest.mark.parametrize("strategy", ["dwdp", "dep", "tp"])
def test_fp8_resident_weights_are_refused_for_split_experts(strategy, fmt, tmp_path):
    spec = GroupSpec(strategy=strategy, size=2, rank=0, name="g", rendezvous="tcp://127.0.0.1:1")
    with pytest.raises(UserError, match=f"weight_format={fmt} runs with strategy single or dp.*not {strategy}"):
        build_rank_engine(str(tmp_path), EngineSettings(device="cuda", weight_format=fmt), spec)
