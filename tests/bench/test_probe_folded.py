"""bench engine's expert probe on layers whose shared experts are folded into the routed call: it marks the
routed experts of the step (the columns before the always-on shared ids E, E+1, ..), and the executor still
gets every column."""
from __future__ import annotations

from types import SimpleNamespace

import torch

from dynamo_dwdp.bench.engine_bench import _Probe


class FoldingExecutor:
    """The executor surface the probe wraps (forward, forward_folded, begin_step, stats), recording its calls."""
    folds_shared = True

    def __init__(self):
        self.stats = SimpleNamespace()
        self.calls = []

    def forward(self, layer, x, ids, w):
        self.calls.append(("forward", layer, ids.clone()))
        return x

    def forward_folded(self, layer, x, ids, w, shared):
        self.calls.append(("folded", layer, ids.clone()))
        return x

    def begin_step(self):
        pass


def test_probe_marks_the_routed_columns_of_a_folded_layer():
    E, k, shared = 16, 3, 2
    cfg = SimpleNamespace(moe_layers=[1, 2], n_routed_experts=E, num_experts_per_tok=k)
    ex = FoldingExecutor()
    probe = _Probe(SimpleNamespace(executor=ex, model_config=cfg, device="cpu"))
    routed = torch.tensor([[0, 5, 9], [5, 7, 15]])
    ids = torch.cat([routed, torch.tensor([[E, E + 1]]).expand(2, shared)], dim=1)
    x = torch.zeros(2, 4)
    ex.forward_folded(2, x, ids, torch.ones(2, k + shared), object())
    ex.forward(1, x, torch.tensor([[3, 4, 6]]), torch.ones(1, k))
    want = torch.zeros(2, E, dtype=torch.bool)
    want[1, [0, 5, 7, 9, 15]] = True                  # layer 2 is MoE layer 1
    want[0, [3, 4, 6]] = True
    assert torch.equal(probe.live, want)
    assert [c[0] for c in ex.calls] == ["folded", "forward"]
    assert torch.equal(ex.calls[0][2], ids)             # the executor got the shared columns too
    ex.begin_step()
    assert not probe.live.any()
