"""DWDP's CUDA-graph protocol, exercised on CPU (shared-memory transport, 2 ranks).

A captured step must be self-contained: its begin_step pulls the first two MoE layers whatever the
host believes the slots hold, no pull wraps into the next step, and every pull it issued has been
waited for when the step ends. This test runs one step in capture mode (no CUDA needed: the mode
is host-side) between eager steps on the same inputs and checks: identical logits, nothing in
flight afterwards, exactly one full remote set pulled per MoE layer (hand arithmetic), and the
bytes counted once per replay (`after_replay`).
"""
from __future__ import annotations

import pytest
import torch

from tests.conftest import group_engine_config, prompts_for
from dynamo_dwdp.rank.local_group import run_local_group

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("private_shm_dir")]


def capture_mode_rank(rank_engine, payload):
    from tests.dwdp.decode_step import prefilled_decode

    runner = rank_engine.runner
    ex = runner.executor
    decode = prefilled_decode(runner, payload)

    eager = decode()
    ex.prepare_capture()
    in_flight_before = [s.pending is not None for s in ex.slots]
    captured = decode()
    in_flight_after = [s.pending is not None for s in ex.slots]
    pulled = sum(n for _, n in ex._captured_pulls)
    ex.end_capture()
    before = sum(ex.stats.bytes_pulled.values())
    ex.before_replay()
    ex.after_replay()
    counted = sum(ex.stats.bytes_pulled.values()) - before
    again = decode()
    cfg = runner.model_config
    per_expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size * runner.kv_pool.element_size()
    remote = cfg.n_routed_experts - len(ex.local)
    return {"same": torch.equal(eager, captured) and torch.equal(eager, again), "in_flight_before": in_flight_before,
            "in_flight_after": in_flight_after, "pulled": pulled, "counted": counted,
            "expected": len(cfg.moe_layers) * remote * per_expert, "moe_layers": len(cfg.moe_layers)}


def test_captured_dwdp_step_is_self_contained(strategy_ckpt):
    model_dir, hf = strategy_ckpt
    prompts = prompts_for(hf.config.vocab_size, [5, 9], seed=70)
    res = run_local_group(str(model_dir), group_engine_config(), "dwdp", 2, capture_mode_rank, [prompts] * 2,
                          timeout=120)
    for r in res:
        assert r.error is None, r.error
        v = r.value
        assert v["moe_layers"] >= 3                  # so that the eager schedule would wrap (the case under test)
        assert v["same"]
        assert not any(v["in_flight_before"]) and not any(v["in_flight_after"])
        assert v["pulled"] == v["expected"] == v["counted"]


@pytest.mark.parametrize("n", range(1, 10))
def test_wrap_points_release_every_awaited_slot_after_its_last_use(n):
    """The wrapped prefetch (GPU) is only safe if, per step, each slot is awaited before its first
    use and released after its last, once each, at a later layer; with 3 MoE layers slot 1 serves
    one layer and would never be released (the next step would wait forever): no wrap there."""
    from dynamo_dwdp.dwdp.graph_prefetch import wrap_points

    pts = wrap_points(n)
    if n < 4:
        assert pts is None
        return
    waits, releases = pts
    for s in (0, 1):
        uses = [m for m in range(n) if m % 2 == s]
        assert [m for m, x in waits.items() if x == s] == [uses[0]]
        assert [m for m, x in releases.items() if x == s] == [uses[-1]]
        assert uses[-1] > uses[0]
