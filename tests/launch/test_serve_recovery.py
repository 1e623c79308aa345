"""A serving graph heals, black-box through `serve_graph` and the OpenAI API, on the customer's
reference graph (graphs/disagg_dwdp_decode.yaml: prefill single, decode DWDP x2, embedded infra).

- a decode rank stopped (SIGSTOP) for 12 s, longer than the 5 s liveness timeout, then resumed:
  its peer declares it down, fails what needs it fast and with a message naming the rank, then takes
  it back (membership epoch 2: down, up); requests succeed again within 60 s, no restart;
- a decode rank SIGKILLed: its supervisor restarts the whole group under a new rendezvous
  generation; new requests succeed within 60 s; every new rank reports its time to recovery (log
  line and `dwdp_group_recovery_seconds`) below 60 s;
- the frontend and the prefill worker SIGKILLed: the launcher restarts them;
- six streaming clients dropped mid-stream: every KV block is freed (the gauges return to their idle
  value) and the server still answers;
- shutdown of the idle graph takes under 10 s and leaves nothing running.

Each test starts from, and leaves, a whole graph (`_whole` waits for it): none depends on another.
"""
from __future__ import annotations

import os
import re
import signal
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, rank_pid
from tests.launch.test_serve_e2e import (CONFIG, TEST_WORKER_ENV, Served, assert_nothing_left, metric_samples,
                            metric_total, post, served_pids, stream, wait_for, worker_map)

GRAPH = str(REPO / "graphs" / "disagg_dwdp_decode.yaml")
RECOVERY_BOUND_S = 60.0          # the bound for a request to succeed again after a failure
PAUSE_S = 12.0
STOP_BOUND_S = 10.0              # the bound for an idle graph (about 1 s measured on the 2-core CI box)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def served(tiny_served_model, tmp_path_factory):
    from dynamo_dwdp.launch.launcher import serve_graph

    model_dir = tiny_served_model
    run_dir = tmp_path_factory.mktemp("run-heal")
    pids: set[int] = set()
    stop_s = None
    with serve_graph(GRAPH, [CONFIG], overrides={"model.path": model_dir}, log_dir=str(run_dir), http_port=0,
                     worker_env=TEST_WORKER_ENV) as h:
        s = Served(h)
        pids = s.pids
        yield s
        pids |= served_pids(h)
        assert _whole(s, 90), "graph not whole before shutdown"
        t0 = time.monotonic()
        h.shutdown()                   # what leaving the `with` does; idempotent, so measured here
        stop_s = time.monotonic() - t0
    assert_nothing_left(pids, str(run_dir))
    assert_nothing_left(set(), model_dir)
    assert stop_s is not None and stop_s < STOP_BOUND_S, f"idle graph took {stop_s:.1f}s to stop"


def _one(s: Served, prompt: str = "are you there", max_tokens: int = 4, timeout: float = 30) -> tuple[int, dict]:
    return post(s.h.url + "/v1/completions", {"model": s.h.model_name, "prompt": prompt, "max_tokens": max_tokens,
                                             "temperature": 0, "ignore_eos": True,
                                             "nvext": {"extra_fields": ["worker_id"]}}, timeout=timeout)


def _decode_urls(s: Served) -> list[str]:
    c = s.h.component("decode-g0")
    return [f"http://{s.h.infra.host}:{p}/metrics" for p in c.system_ports]


def _whole(s: Served, timeout: float) -> bool:
    """Every process alive, every decode rank healthy, and both decode ranks answer (round-robin)."""
    def check():
        if s.h.dead_components():
            return False
        if not all(metric_total(u, "dwdp_group_healthy") == 1 for u in _decode_urls(s)):
            return False
        served_by = set()
        for i in range(4):
            status, body = _one(s, f"whole {i}")
            if status != 200 or body["usage"]["completion_tokens"] != 4:
                return False
            served_by.add(body["nvext"]["worker_id"]["decode_worker_id"])
        s.workers = worker_map(s.h)
        return len(served_by) == 2
    return bool(wait_for(check, timeout, 0.5))


def _health_ready(url: str) -> bool:
    import json
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200 and json.loads(r.read()).get("status") == "ready"
    except OSError:
        return False


def _gauge(url: str, name: str) -> float | None:
    samples = metric_samples(url, name)
    return samples[0][1] if samples else None


def test_paused_decode_rank_rejoins_and_the_group_serves_again(served):
    assert _whole(served, 90)
    h = served.h
    sup = h.component("decode-g0").proc.pid
    victim, survivor_url = rank_pid(sup, 1), _decode_urls(served)[0]
    epoch0 = _gauge(survivor_url, "dwdp_group_membership_epoch") or 0
    recoveries0 = metric_total(survivor_url, "dwdp_group_recoveries_total")
    os.kill(victim, signal.SIGSTOP)
    t_stop = time.monotonic()
    results: list[tuple[int, dict]] = []
    threads: list[threading.Thread] = []
    try:
        # the survivor declares rank 1 down after the liveness timeout; requests sent then, in parallel
        # (round-robin gives each rank some): those on the survivor fail fast naming the rank, those
        # on the paused rank wait for it and complete; none hangs
        assert wait_for(lambda: _gauge(survivor_url, "dwdp_group_peers_down") == 1, PAUSE_S - 2, 0.2), \
            "rank 1 not declared down"
        for i in range(4):
            t = threading.Thread(target=lambda i=i: results.append(_one(served, f"during the pause {i}", timeout=60)),
                                 daemon=True)
            t.start()
            threads.append(t)
            time.sleep(0.3)
        # unhealthy while not whole: our gauge, and Dynamo's /health once its canary has failed
        health = survivor_url.replace("/metrics", "/health")
        assert wait_for(lambda: not _health_ready(health), max(0.5, PAUSE_S - 1 - (time.monotonic() - t_stop)),
                        0.2), "the survivor's /health stayed ready while its group was broken"
        time.sleep(max(0.0, PAUSE_S - (time.monotonic() - t_stop)))
        assert _gauge(survivor_url, "dwdp_group_healthy") == 0
    finally:
        os.kill(victim, signal.SIGCONT)
    t_cont = time.monotonic()
    for t in threads:
        t.join(60)
    assert len(results) == 4, "a request hung"
    failed = [status for status, _ in results if status != 200]
    assert failed, f"no request reached the survivor while its peer was down: {results}"
    # the survivor's fail fast (503); those stuck on the paused rank end with the frontend's 504: a
    # retryable status either way, never a 500 or a hang
    assert all(status in (503, 504) for status in failed), results
    assert 503 in failed, results
    # back: same processes, new membership epoch (down + up), survivor's engine serves again
    assert _whole(served, RECOVERY_BOUND_S), "requests do not succeed within 60 s of the resume"
    assert time.monotonic() - t_cont < RECOVERY_BOUND_S
    assert rank_pid(sup, 1) == victim                    # not restarted: it rejoined
    assert _gauge(survivor_url, "dwdp_group_membership_epoch") == epoch0 + 2
    assert _gauge(survivor_url, "dwdp_group_peers_down") == 0
    assert metric_total(survivor_url, "dwdp_group_recoveries_total") == recoveries0 + 1
    assert wait_for(lambda: _health_ready(survivor_url.replace("/metrics", "/health")), 30, 0.5)
    log = Path(h.component("decode-g0").log_path).read_text(errors="replace")
    # the survivor's error names the group and the rank (the frontend shows clients only the 503)
    assert re.search(r"engine step failed: dwdp group \S+: experts [\d-]+ have no live owner "
                     r"\(rank 1: stopped heartbeating for 5\.0s\)", log), log[-3000:]
    assert re.search(r"rank 1 is back \(heartbeat resumed\) after \d+\.\ds down", log), log[-3000:]
    assert "engine serving again" in log


def test_killed_decode_rank_restarts_its_group(served):
    assert _whole(served, 90)
    h = served.h
    comp = h.component("decode-g0")
    sup = comp.proc.pid
    old = {rank_pid(sup, 0), rank_pid(sup, 1)}
    os.kill(rank_pid(sup, 0), signal.SIGKILL)              # rank 0: the rendezvous store host
    t_kill = time.monotonic()
    assert _whole(served, RECOVERY_BOUND_S), "requests do not succeed within 60 s of the kill"
    assert time.monotonic() - t_kill < RECOVERY_BOUND_S
    assert comp.proc.pid == sup and comp.alive                # the supervisor healed it, not the launcher
    new = {rank_pid(sup, 0), rank_pid(sup, 1)}
    assert not new & old                                      # the whole group restarted
    for url in _decode_urls(served):
        seconds = _gauge(url, "dwdp_group_recovery_seconds")
        assert seconds is not None and 0 < seconds < RECOVERY_BOUND_S, (url, seconds)
        assert metric_total(url, "dwdp_group_recoveries_total") == 1
    log = Path(comp.log_path).read_text(errors="replace")
    assert "rank 0 of group disagg-dwdp-decode-decode-g0 exited with code -9" in log
    assert re.search(r"restarting all 2 ranks in \d+\.\ds", log)
    assert len(re.findall(r"recovered: rank \d serving again \d+\.\ds after the failure", log)) >= 2


def test_killed_frontend_and_prefill_are_restarted(served):
    assert _whole(served, 90)
    h = served.h
    for name in ("frontend", "prefill-g0"):
        c = h.component(name)
        before = c.restarts
        os.killpg(c.proc.pid, signal.SIGKILL)
        assert wait_for(lambda: c.restarts == before + 1 and c.alive, 30, 0.2), (name, c.restarts)
    assert _whole(served, RECOVERY_BOUND_S)


def test_dropped_streams_free_their_kv_blocks(served):
    assert _whole(served, 90)
    h = served.h
    urls = [w[3] for w in served.workers.values()]
    # idle: nothing allocated (a prefill hold of the requests `_whole` just made goes with its decode read)
    assert wait_for(lambda: all(metric_total(u, "dwdp_kv_blocks_used") == 0 for u in urls), 10, 0.2), \
        {u: metric_total(u, "dwdp_kv_blocks_used") for u in urls}
    idle = {u: 0.0 for u in urls}
    got: dict[int, int] = {}
    socks: list = []
    all_streaming = threading.Barrier(7, timeout=60)       # six clients + this thread

    def client(i):
        import http.client
        import json as _json

        conn = http.client.HTTPConnection(h.url.split("//")[1], timeout=60)
        socks.append(conn)
        conn.request("POST", "/v1/completions", body=_json.dumps(
            {"model": h.model_name, "prompt": f"dropped stream {i} " * 10, "max_tokens": 900, "temperature": 0,
             "ignore_eos": True, "stream": True}), headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        got[i] = 0
        for line in resp:
            if line.startswith(b"data:"):
                got[i] += 1
                if got[i] >= 3:
                    break
        all_streaming.wait()                 # hold the stream open until the gauges were read
        all_streaming.wait()
        conn.sock.close()                    # the client goes away mid-stream
        conn.close()

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(6)]
    for t in threads:
        t.start()
    all_streaming.wait()
    in_use = wait_for(lambda: sum(metric_total(u, "dwdp_kv_blocks_used") for u in urls), 10, 0.05)
    running = wait_for(lambda: sum(metric_total(u, "dwdp_running_requests") for u in urls), 10, 0.05)
    all_streaming.wait()
    for t in threads:
        t.join(60)
    assert in_use > 0 and running >= 1, (in_use, running)       # the six held KV blocks while streaming
    assert len(got) == 6 and all(n >= 3 for n in got.values()), got
    # the six requests were running (KV in use) and are gone: every gauge back to its idle value
    assert wait_for(lambda: all(metric_total(u, "dwdp_kv_blocks_used") == idle[u] and
                                metric_total(u, "dwdp_running_requests") == 0 for u in urls), 20, 0.2), \
        {u: metric_total(u, "dwdp_kv_blocks_used") for u in urls}
    generated = sum(metric_total(u, "dwdp_generated_tokens_total") for u in urls)
    assert generated < 6 * 900                                  # they did not run to the end
    status, body = _one(served, "still there?")
    assert status == 200 and body["usage"]["completion_tokens"] == 4, body
    res = stream(h.url + "/v1/completions", {"model": h.model_name, "prompt": "and streaming?", "max_tokens": 4,
                                             "temperature": 0, "ignore_eos": True})
    assert res["status"] == 200 and res["done"] and not res["errors"], res
