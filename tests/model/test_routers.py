"""The family's routers on an empty batch (an idle DEP rank still runs every MoE layer in lock-step)
and against a brute-force reading of their definition on a small batch."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from dynamo_dwdp.model.moe import route_greedy, route_group_limited_greedy, route_noaux_tc

E, G, TG, K = 16, 4, 2, 3


def _cfg(norm: bool = False):
    return SimpleNamespace(n_routed_experts=E, n_group=G, topk_group=TG, num_experts_per_tok=K,
                           norm_topk_prob=norm, routed_scaling_factor=2.0)


def _route(method, logits):
    zeros = torch.zeros(E)
    if method == "noaux_tc":
        return route_noaux_tc(logits, _cfg(True), zeros, zeros)
    fn = route_greedy if method == "greedy" else route_group_limited_greedy
    return fn(logits, _cfg(), zeros)


@pytest.mark.parametrize("method", ["noaux_tc", "greedy", "group_limited_greedy"])
def test_empty_batch_routes_to_nothing(method):
    ids, weights = _route(method, torch.zeros(0, E))
    assert ids.shape == (0, K) and weights.shape == (0, K)


@pytest.mark.parametrize("method", ["noaux_tc", "group_limited_greedy"])
def test_grouped_methods_pick_only_from_the_best_groups(method):
    logits = torch.randn(7, E, generator=torch.Generator().manual_seed(3))
    ids, _ = _route(method, logits)
    scores = logits.sigmoid() if method == "noaux_tc" else logits.softmax(-1)
    per_group = scores.view(7, G, E // G)
    group_score = (per_group.topk(2, -1).values.sum(-1) if method == "noaux_tc" else per_group.amax(-1))
    best = group_score.topk(TG, -1).indices
    for t in range(7):
        allowed = {int(g) * (E // G) + j for g in best[t] for j in range(E // G)}
        assert set(ids[t].tolist()) <= allowed
        top = sorted(allowed, key=lambda e: -float(scores[t, e]))[:K]
        assert sorted(ids[t].tolist()) == sorted(top)
