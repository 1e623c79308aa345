"""TP and DEP with their collectives on the peer-memory protocol (`collectives: peer`; on CPU its
shared-memory twin) give the same greedy tokens as the single-process engine (fp32), and the
protocol really carried the step (its call counter moved; prefill-sized all-reduces fall back to
the library collective)."""
from __future__ import annotations

import pytest

from conftest import capture_rank, group_engine_config, prompts_for, single_reference
from dynamo_dwdp.parallel.local_group import run_local_group

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("private_shm_dir")]

PARAMS = dict(max_tokens=5, temperature=0, ignore_eos=True)
V = 384


def rank_prompts(rank):
    return prompts_for(V, [5 + rank, 19, 9 + 2 * rank], seed=40 + rank)


def peer_rank(rank_engine, payload):
    value = capture_rank(rank_engine, payload)
    runner = rank_engine.runner
    peer = getattr(runner.executor, "peer", None) or getattr(getattr(runner.executor, "tp", None), "peer", None)
    calls = peer.calls if peer is not None else -1
    return {"calls": calls, **(value or {})}


@pytest.mark.parametrize("strategy,n", [("tp", 2), ("tp", 3), ("dep", 2), ("dep", 3)])
def test_peer_collectives_match_single(strategy_ckpt, strategy, n):
    model_dir, _ = strategy_ckpt
    payloads = [(rank_prompts(r if strategy != "tp" else 0), PARAMS) for r in range(n)]
    res = run_local_group(str(model_dir), group_engine_config(), strategy, n, peer_rank, payloads, timeout=240,
                          spec_overrides={"collectives": "peer"})
    for r in res:
        assert r.error is None, f"rank {r.rank}: {r.error}"
        assert r.value["calls"] > 0, f"rank {r.rank}: the peer protocol was never used"
    serving = [0] if strategy == "tp" else list(range(n))
    for r in serving:
        ref_tokens, _ = single_reference(model_dir, rank_prompts(r), PARAMS)
        assert res[r].value["tokens"] == ref_tokens, (strategy, n, r)
