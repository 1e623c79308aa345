"""TP and DEP with their collectives on the peer-memory protocol (`collectives: peer`; on CPU its
shared-memory twin) give the same greedy tokens as the single-process engine (fp32), and the
protocol really carried the step (its call counter moved; prefill-sized all-reduces fall back to
the library collective)."""
from __future__ import annotations

import pytest

from tests.conftest import capture_rank, group_engine_config, prompts_for, single_reference
from dynamo_dwdp.rank.local_group import run_local_group

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


@pytest.mark.parametrize("strategy,n,seqs", [("tp", 2, 32), ("tp", 3, 32), ("dep", 2, 32), ("dep", 3, 32),
                                             ("dep", 2, 4)])
def test_peer_collectives_match_single(strategy_ckpt, strategy, n, seqs):
    """seqs=4: prefill steps (16 tokens) exceed the largest bucket and take the library path on every
    rank, decode steps (3 sequences) the peer path: both in one run."""
    model_dir, _ = strategy_ckpt
    payloads = [(rank_prompts(r if strategy != "tp" else 0), PARAMS) for r in range(n)]
    res = run_local_group(str(model_dir), group_engine_config(max_num_seqs=seqs), strategy, n, peer_rank, payloads,
                          timeout=240, spec_overrides={"collectives": "peer"})
    for r in res:
        assert r.error is None, f"rank {r.rank}: {r.error}"
        assert r.value["calls"] > 0, f"rank {r.rank}: the peer protocol was never used"
    serving = [0] if strategy == "tp" else list(range(n))
    for r in serving:
        ref_tokens, _ = single_reference(model_dir, rank_prompts(r), PARAMS)
        assert res[r].value["tokens"] == ref_tokens, (strategy, n, r)


def dep_graph_hooks_rank(rank_engine, payload):
    """Host side of DEP's graph protocol: after the step agreement every rank picks the same batch
    bucket whatever its own batch, and a warm-up forward exchanges nothing (its peer is not warming
    up: an exchange would wait for it and time out)."""
    import torch

    from dynamo_dwdp.engine.cuda_graphs import batch_bucket

    ex = rank_engine.runner.executor
    local = payload
    ex.agree_step(local)
    bucket = batch_bucket(ex.graph_batch(local), ex.max_batch)
    H = rank_engine.runner.model_config.hidden_size
    x = torch.randn(local, H)
    ids = torch.zeros(local, rank_engine.runner.model_config.num_experts_per_tok, dtype=torch.long)
    if rank_engine.group.rank == 0:
        ex.begin_warmup()
        warm = ex.forward(ex.cfg.moe_layers[0], x, ids, torch.ones_like(ids, dtype=torch.float32))
        ex.end_warmup()
        zeros = bool((warm == 0).all())
    else:
        zeros = True
    return {"bucket": bucket, "agreed": ex.step_tokens, "warm_zeros": zeros}


def test_dep_ranks_agree_on_the_graph_bucket(strategy_ckpt):
    model_dir, _ = strategy_ckpt
    res = run_local_group(str(model_dir), group_engine_config(max_num_seqs=8), "dep", 3, dep_graph_hooks_rank,
                          [3, 1, 5], timeout=240, spec_overrides={"collectives": "peer"})
    for r in res:
        assert r.error is None, r.error
    assert [r.value["agreed"] for r in res] == [5, 5, 5]
    assert [r.value["bucket"] for r in res] == [8, 8, 8]          # batch_bucket(5) with max 8
    assert res[0].value["warm_zeros"]
