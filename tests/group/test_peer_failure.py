"""A peer process killed mid-run (SIGKILL) turns into a clear PeerError on the survivors within a
bounded time; nothing hangs. With an overlapping DWDP placement whose dead rank's experts are all
stored by others, the survivors fail over and keep producing the single-process tokens."""
from __future__ import annotations

import multiprocessing as mp
import os
import re
import signal
import time

import pytest

from tests.conftest import group_engine_config, prompts_for, single_reference
from dynamo_dwdp.config.dwdp import DwdpSettings
from dynamo_dwdp.rank.local_group import run_local_group

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("private_shm_dir")]

PARAMS = dict(max_tokens=4, temperature=0, ignore_eos=True)
V = 384
LIVENESS = 2.0


def busy_until_error_rank(rank_engine, payload):
    """Target: step with its own requests until something raises (the expected PeerError), or give up
    after `limit` seconds (then the test fails: the error never came)."""
    from dynamo_dwdp.engine.sampling import SamplingParams

    prompts, ready, limit = payload
    eng = rank_engine.engine
    t_end = time.monotonic() + limit
    steps, k = 0, 0
    while time.monotonic() < t_end:
        if not eng.has_unfinished():
            eng.add_request(f"q{k}", prompts[k % len(prompts)], SamplingParams(**PARAMS))
            k += 1
        _, outs = rank_engine.step()
        for o in outs:
            if o.error:
                raise RuntimeError(f"request failed without an exception: {o.error}")
        steps += 1
        if steps == 5:
            ready.set()
    return f"no error within {limit}s ({steps} steps)"


def _kill_run(model_dir, strategy, n, victim, dwdp=None):
    ctx = mp.get_context("spawn")
    ready = [ctx.Event() for _ in range(n)]
    killed = {}

    def kill_when_busy(procs):
        for ev in ready:
            if not ev.wait(120):
                return
        time.sleep(0.2)
        killed["t"] = time.monotonic()
        os.kill(procs[victim].pid, signal.SIGKILL)

    payloads = [(prompts_for(V, [6, 11], seed=80 + r), ready[r], 60.0) for r in range(n)]
    res = run_local_group(str(model_dir), group_engine_config(), strategy, n, busy_until_error_rank, payloads,
                          dwdp=dwdp, timeout=90, spec_overrides={"liveness_timeout": LIVENESS},
                          on_started=kill_when_busy)
    assert "t" in killed, [r.error for r in res]
    return res, time.monotonic() - killed["t"]


def _group_name(text: str) -> str | None:
    m = re.search(r"group (local-\d+-\d+)", text)
    return m.group(1) if m else None


@pytest.mark.parametrize("victim", [1, 0], ids=["kill-rank1", "kill-rank0-store-host"])
def test_dwdp_survivor_reports_dead_peer(strategy_ckpt, victim):
    model_dir, _ = strategy_ckpt
    res, elapsed = _kill_run(model_dir, "dwdp", 2, victim)
    survivor = res[1 - victim]
    assert f"rank {victim} exited with code {-signal.SIGKILL}" in res[victim].error
    assert survivor.user_error, survivor.error                 # a PeerError, not a crash
    assert _group_name(survivor.error) and f"rank {victim}" in survivor.error, survivor.error
    assert "no live owner" in survivor.error
    assert len(survivor.error.splitlines()) == 1
    assert elapsed < 15, elapsed


@pytest.mark.parametrize("victim", [1, 0], ids=["kill-rank1", "kill-rank0-store-host"])
def test_dep_survivor_reports_dead_peer(strategy_ckpt, victim):
    model_dir, _ = strategy_ckpt
    res, elapsed = _kill_run(model_dir, "dep", 2, victim)
    survivor = res[1 - victim]
    assert survivor.user_error, survivor.error
    assert _group_name(survivor.error) and "dep group" in survivor.error, survivor.error
    assert f"dead: rank {victim}" in survivor.error, survivor.error
    assert len(survivor.error.splitlines()) == 1
    assert elapsed < 15, elapsed


# ------------------------------------------------------------------ failover
def rounds_rank(rank_engine, payload):
    """Target: run the same prompts round after round (each to completion) until told to stop; return
    every round's tokens and the bytes pulled per peer after each round."""
    from dynamo_dwdp.engine.sampling import SamplingParams

    prompts, ready, stop = payload
    eng = rank_engine.engine
    rounds = []
    while not stop.is_set():
        ids = [f"r{len(rounds)}p{i}" for i in range(len(prompts))]
        for rid, p in zip(ids, prompts):
            eng.add_request(rid, p, SamplingParams(**PARAMS))
        toks = {rid: [] for rid in ids}
        while eng.has_unfinished():
            for o in eng.step():
                assert o.error is None, o.error
                toks[o.request_id].extend(o.new_token_ids)
        rounds.append(([toks[i] for i in ids], dict(rank_engine.stats.bytes_pulled),
                       sorted(rank_engine.group.dead())))
        if len(rounds) == 3:
            ready.set()
    return rounds


def test_dwdp_overlapping_placement_fails_over_when_a_peer_dies(strategy_ckpt):
    """L=8, P=4 on 3 ranks: [0,8) [4,12) [8,16). Rank 1's experts are all stored by rank 0 or 2, so
    after it is killed the survivors pull 8-11 from rank 2 instead and keep serving, token-identical."""
    model_dir, _ = strategy_ckpt
    ctx = mp.get_context("spawn")
    ready = [ctx.Event() for _ in range(3)]
    stop = ctx.Event()

    def kill_then_stop(procs):
        try:
            for ev in ready:
                if not ev.wait(120):
                    return
            os.kill(procs[1].pid, signal.SIGKILL)
            time.sleep(LIVENESS + 3.0)                 # detected after LIVENESS, then a few more rounds
        finally:
            stop.set()

    prompts = {r: prompts_for(V, [6, 13], seed=90 + r) for r in range(3)}
    payloads = [(prompts[r], ready[r], stop) for r in range(3)]
    res = run_local_group(str(model_dir), group_engine_config(), "dwdp", 3, rounds_rank, payloads,
                          dwdp=DwdpSettings(experts_per_rank=8, prefetch_per_peer=4), timeout=120,
                          spec_overrides={"liveness_timeout": LIVENESS}, on_started=kill_then_stop)
    assert res[1].error and "exited" in res[1].error
    for r in (0, 2):
        assert res[r].error is None, res[r].error
        rounds = res[r].value
        want = single_reference(model_dir, prompts[r], PARAMS)[0]
        assert all(toks == want for toks, _, _ in rounds), r
        before, after = [x for x in rounds if 1 not in x[2]], [x for x in rounds if 1 in x[2]]
        assert len(before) >= 3 and len(after) >= 2, [x[2] for x in rounds]

        def delta(a, b):                                # bytes pulled per peer during round b
            return {p: b[1].get(p, 0) - a[1].get(p, 0) for p in (0, 1, 2) if b[1].get(p, 0) - a[1].get(p, 0)}

        # rounds >= 1 have identical schedules (round 0 fills the prefix cache), so equal pull volumes
        d_before, d_after = delta(before[1], before[2]), delta(after[-2], after[-1])
        assert 1 not in d_after                         # nothing more is pulled from the dead rank
        assert sum(d_after.values()) == sum(d_before.values()) > 0
        if r == 0:                                      # 8-11 moved from rank 1 to rank 2
            assert set(d_before) == {1, 2} and d_after == {2: sum(d_before.values())}
        else:                                           # rank 2 pulled 0-7 from rank 0 all along
            assert d_before == d_after == {0: d_before[0]}


def test_leaving_does_not_wait_for_a_dead_peer():
    """Rank 0 (the store host) waits for its peers' 'left' keys before closing the store; a peer known
    to be dead never writes one, so it must not be waited for (that cost 10 s per failure)."""
    from dynamo_dwdp.group.context import GroupContext, GroupSpec

    class Store:
        def __init__(self):
            self.keys = {}

        def set(self, k, v):
            self.keys[k] = v

        def check(self, k):
            return k in self.keys

        def close(self):
            pass

    class DeadPeer:
        dead = frozenset({1})
        epoch = 1

        def on_change(self, fn):
            pass

        def reason(self, r):
            return "killed"

        def stop(self):
            pass

    spec = GroupSpec(strategy="dwdp", size=2, rank=0, name="g", rendezvous="tcp://127.0.0.1:1")
    ctx = GroupContext(spec, Store(), DeadPeer())
    t0 = time.monotonic()
    ctx.close(drain_timeout=30)
    assert time.monotonic() - t0 < 5
    assert ctx.store.keys == {"finished/0": "1"}
