"""The rank supervisor (`python -m dynamo_dwdp.group`) and group membership, with stand-in ranks.

Supervisor: a rank that dies restarts the whole group under a new rendezvous generation, with the
failure time passed on (for the time-to-recovery metric); the back-off doubles and is bounded;
`--max-restarts` gives up; a first generation that never became ready is a start-up error (no
restart); SIGTERM is forwarded and nothing is left running. Membership: a peer whose heartbeat stops
is declared down, and up again when it resumes (epoch 1 then 2), listeners told each time.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from tests.conftest import REPO
from tests.launch.test_serve_e2e import alive, process_tree, wait_for

pytestmark = pytest.mark.timeout(120)

# A stand-in rank: appends "<generation> <rank> <failed_at or -> <pid>" to $OUT, then behaves as $MODE says.
RANK = textwrap.dedent("""
    import os, sys, time
    gen, rank = os.environ["DWDP_GROUP_GENERATION"], os.environ["DWDP_GROUP_RANK"]
    with open(os.environ["OUT"], "a") as f:
        f.write(f"{gen} {rank} {os.environ.get('DWDP_GROUP_FAILED_AT', '-')} {os.getpid()}\\n")
    assert sys.argv[-2:] == ["--group-rank", rank]
    mode = os.environ["MODE"]
    if mode == "fail-first" and rank == "1" and not os.environ.get("DWDP_GROUP_FAILED_AT"):
        time.sleep(0.5); sys.exit(3)
    if mode == "always-fail" and rank == "1":
        time.sleep(0.3); sys.exit(4)
    if mode == "fail-at-once":
        sys.exit(2)
    time.sleep(60)
""")


def _supervisor(tmp_path, mode: str, *flags: str, env: dict | None = None) -> tuple[subprocess.Popen, str]:
    out = str(tmp_path / "ranks.txt")
    full_env = dict(os.environ, OUT=out, MODE=mode, PYTHONPATH=str(REPO), **(env or {}))
    full_env.pop("DYN_SYSTEM_PORT", None)
    full_env.pop("NATS_SERVER", None)
    full_env.update(env or {})
    proc = subprocess.Popen([sys.executable, "-m", "dynamo_dwdp.group", "--ranks", "2", *flags, "--",
                             sys.executable, "-c", RANK], cwd=REPO, env=full_env, stderr=subprocess.PIPE, text=True)
    return proc, out


def _lines(out: str) -> list[list[str]]:
    try:
        with open(out) as f:
            return [line.split() for line in f if line.strip()]
    except FileNotFoundError:
        return []


def test_a_dead_rank_restarts_the_whole_group_under_a_new_generation(tmp_path):
    proc, out = _supervisor(tmp_path, "fail-first", "--backoff", "0.2", "--grace", "2")
    try:
        assert wait_for(lambda: len(_lines(out)) >= 4, 30, 0.1), _lines(out)
        time.sleep(0.5)
        rows = _lines(out)
        gens = sorted({r[0] for r in rows}, key=lambda g: int(g.split("-")[1]))
        assert len(gens) == 2, rows                                   # exactly one restart
        first = [r for r in rows if r[0] == gens[0]]
        second = [r for r in rows if r[0] == gens[1]]
        assert sorted(r[1] for r in first) == sorted(r[1] for r in second) == ["0", "1"]
        assert all(r[2] == "-" for r in first)                        # no failure before the first
        failed_at = {float(r[2]) for r in second}
        assert len(failed_at) == 1 and abs(time.time() - failed_at.pop()) < 30
        old_pids = {int(r[3]) for r in first}
        assert not any(alive(p) for p in old_pids)                   # the survivor was stopped too
        ranks = process_tree([proc.pid]) - {proc.pid}
        assert {int(r[3]) for r in second} == ranks
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=30)
        err = proc.stderr.read()
    assert rc == 0, err
    assert "rank 1 of group g0 exited with code 3" in err
    assert re.search(r"restarting all 2 ranks in 0\.2s \(restart 1", err), err
    assert not any(alive(p) for p in ranks)


def test_back_off_doubles_up_to_its_bound_and_max_restarts_gives_up(tmp_path):
    proc, out = _supervisor(tmp_path, "always-fail", "--backoff", "0.2", "--max-backoff", "0.4",
                            "--max-restarts", "3", "--grace", "1")
    rc = proc.wait(timeout=60)
    err = proc.stderr.read()
    assert rc == 1, err
    delays = re.findall(r"restarting all 2 ranks in (\d+\.\d)s", err)
    assert delays == ["0.2", "0.4", "0.4"], err
    assert "3 restarts used up; giving up" in err
    assert len({r[0] for r in _lines(out)}) == 4


def test_a_group_that_never_became_ready_is_not_restarted(tmp_path):
    from dynamo_dwdp.group.rendezvous import free_port

    proc, out = _supervisor(tmp_path, "fail-at-once", "--backoff", "0.2",
                            env={"DYN_SYSTEM_PORT": str(free_port())})   # nothing answers /health there
    rc = proc.wait(timeout=30)
    err = proc.stderr.read()
    assert rc == 1, err
    assert "failed while starting" in err and "not restarting" in err
    assert len({r[0] for r in _lines(out)}) == 1


def test_membership_declares_a_silent_peer_down_and_takes_it_back(tmp_path):
    from dynamo_dwdp.group.membership import Membership
    from dynamo_dwdp.group.rendezvous import open_group_store

    url = f"file://{tmp_path / 'store'}"
    watcher = open_group_store(url, "g", 0, 2, timeout=10, generation="gen1")
    peer = open_group_store(url, "g", 1, 2, timeout=10, generation="gen1")
    events = []
    m = Membership(watcher, timeout=1.0, interval=0.05)
    m.on_change(lambda epoch, rank, up, seconds: events.append((epoch, rank, up, seconds)))
    m.start()
    try:
        count = 0

        def beat(seconds: float) -> None:
            nonlocal count
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                count += 1
                peer.set("alive/1", str(count))
                time.sleep(0.05)

        beat(1.5)
        assert m.dead == frozenset() and m.epoch == 0
        time.sleep(2.0)                                        # the peer is silent (paused) > timeout
        assert m.dead == {1} and m.epoch == 1 and "stopped heartbeating" in m.reason(1)
        beat(1.0)                                              # and comes back
        assert m.dead == frozenset() and m.epoch == 2
    finally:
        m.stop()
    assert [e[:3] for e in events] == [(1, 1, False), (2, 1, True)]
    assert events[1][3] >= 1.0                                 # seconds it was down
    # keys live under the generation: another generation of the same group sees none of them
    other = open_group_store(url, "g", 0, 2, timeout=10, generation="gen2")
    assert peer.check("alive/1") and not other.check("alive/1")
