"""The published group size (4 ranks) on CPU: placement, rendezvous and exactness for DWDP4 and DEP4.

A 4-GPU machine was not available; this runs the same code paths with 4 rank processes on the CPU
(shared-memory transport, gloo). Each rank serves its own prompt; every rank's greedy tokens must
equal the single-process engine's on that prompt, and DWDP rank r must have pulled exactly the
experts the placement says, from their lowest-rank owners.
"""
from __future__ import annotations

import pytest

from tests.conftest import capture_rank, group_engine_config, prompts_for, single_reference
from dynamo_dwdp.dwdp.placement import Placement
from dynamo_dwdp.config.dwdp import DwdpSettings
from dynamo_dwdp.rank.local_group import run_local_group

pytestmark = pytest.mark.slow
PARAMS = dict(max_tokens=4, temperature=0, ignore_eos=True)


@pytest.mark.parametrize("strategy", ["dwdp", "dep"])
def test_four_ranks_match_single(strategy, strategy_ckpt, private_shm_dir):
    model_dir, _ = strategy_ckpt
    prompts = prompts_for(384, [9, 14, 21, 6], seed=4)
    ref_tokens, _ = single_reference(model_dir, prompts, PARAMS)
    results = run_local_group(str(model_dir), group_engine_config(), strategy, 4, capture_rank,
                              [([p], PARAMS) for p in prompts], dwdp=DwdpSettings(), timeout=300)
    assert [r.error for r in results] == [None] * 4
    for rank, res in enumerate(results):
        assert res.value["tokens"] == [ref_tokens[rank]], f"rank {rank} differs from single"
    if strategy == "dwdp":
        placement = Placement.choose(16, 4)
        assert (placement.experts_per_rank, placement.prefetch_per_peer) == (4, 4)
        for rank, res in enumerate(results):
            pulled = res.value["bytes_pulled"]
            expected_peers = {p.peer for p in placement.pulls(rank)}
            assert set(pulled) == expected_peers == set(range(4)) - {rank}
            per_peer = {peer: sum(p.count for p in placement.pulls(rank) if p.peer == peer) for peer in expected_peers}
            # every peer served the same number of experts per layer, so the same bytes
            assert len({pulled[p] / per_peer[p] for p in expected_peers}) == 1
