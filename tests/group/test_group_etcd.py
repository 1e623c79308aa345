"""DWDP group membership over real etcd + NATS (the graph's `--infra etcd` mode).

Starts the same etcd and nats-server processes the launcher starts, then joins a 2-rank group twice
in this process (DWDP groups have no process group, so two members can live in two threads):
- both ranks rendezvous through etcd and see each other;
- a NATS `rank_down` event marks the peer down at once (no waiting for a lease to expire);
- a rank that leaves without an event is noticed through its expired etcd lease, in bounded time.
"""
from __future__ import annotations

import shutil
import threading
import time

import pytest

from dynamo_dwdp.launch.infra import Infra
from dynamo_dwdp.group.context import GroupContext, GroupSpec

pytestmark = pytest.mark.skipif(shutil.which("etcd") is None, reason="etcd-server not installed")


@pytest.fixture(scope="module")
def infra(tmp_path_factory):
    inf = Infra("etcd", str(tmp_path_factory.mktemp("etcd"))).start()
    procs = [p for _, p in inf.procs]
    assert len(procs) == 2 and all(p.poll() is None for p in procs)     # etcd and nats-server are up
    yield inf
    inf.stop()
    assert all(p.poll() is not None for p in procs), "etcd / nats-server still running after stop()"


def _join_pair(infra, name, liveness=2.0):
    url = infra.rendezvous()
    out: dict[int, GroupContext] = {}

    def join(rank):
        out[rank] = GroupContext.join(GroupSpec("dwdp", 2, rank, name, url, setup_timeout=30,
                                                liveness_timeout=liveness), nats_url=infra.nats_url)

    threads = [threading.Thread(target=join, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert set(out) == {0, 1}
    return out[0], out[1]


def test_nats_rank_down_event_marks_peer_down_immediately(infra):
    g0, g1 = _join_pair(infra, "ev-test", liveness=30.0)   # lease expiry alone would take 30 s
    try:
        assert g0.dead() == frozenset() and g1.dead() == frozenset()
        t0 = time.monotonic()
        g0.events.publish("rank_down", reason="test")           # what the supervisor sends on a crash
        while 0 not in g1.dead() and time.monotonic() - t0 < 5:
            time.sleep(0.02)
        assert 0 in g1.dead(), "the NATS event did not mark rank 0 down"
        assert time.monotonic() - t0 < 5
        assert "NATS" in g1.down_reason(0)
        assert any(e.get("event") == "rank_up" for e in g1.events.received)
    finally:
        g1.membership.stop()
        g0.membership.stop()
        g1.events.stop()
        g0.events.stop()


def test_lease_expiry_marks_silent_peer_down(infra):
    g0, g1 = _join_pair(infra, "lease-test", liveness=2.0)
    try:
        time.sleep(1.0)
        assert g1.dead() == frozenset()
        g0.membership._stop.set()                               # rank 0 goes silent: no keep-alive
        t0 = time.monotonic()
        while 0 not in g1.dead() and time.monotonic() - t0 < 15:
            time.sleep(0.1)
        assert 0 in g1.dead(), "an expired lease was not noticed"
        assert "lease" in g1.down_reason(0)
    finally:
        g1.membership.stop()
        g1.events.stop()
        g0.events.stop()
