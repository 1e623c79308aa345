"""`--infra etcd`: the reference graph (graphs/disagg_dwdp_decode.yaml: prefill single, decode DWDP x2)
on a real etcd + NATS that the launcher starts and stops.

The end-to-end checks of tests/launch/test_serve_e2e.py run here unchanged (they are imported, so they use
this module's `served`): outputs equal `dynamo-dwdp generate`, prefill and decode on different workers
of the right pools, KV bytes over NIXL, worker-side 400s, loopback-only listeners. On top: the workers
really registered in etcd (its own v3 API lists their instances) and really talk to NATS (its monitor
counts the connections), and after the graph stops etcd and nats-server are gone, ports closed.
Last, NATS killed and etcd stopped mid-serve: serving goes on or fails fast, and recovers by itself.
"""
from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import threading
import time
import urllib.request

import pytest

from tests.conftest import REPO
from tests.launch.test_serve_e2e import (CONFIG, TEST_WORKER_ENV, References, Served, assert_nothing_left,
                            metric_total, post, served_pids, wait_for)
from tests.launch.test_serve_e2e import (  # noqa: F401  (collected here, with this module's fixtures)
    test_chat_matches_generate_on_templated_ids, test_chat_streaming_equals_non_streaming,
    test_completions_match_generate, test_completions_streaming_matches_generate,
    test_every_listener_of_the_graph_is_on_loopback, test_kv_bytes_moved_by_nixl_to_the_serving_decode_worker,
    test_worker_side_rejections_are_400_and_the_graph_keeps_serving,
    test_workers_of_the_right_pools_served_each_request)

GRAPH = str(REPO / "graphs" / "disagg_dwdp_decode.yaml")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300),
              pytest.mark.skipif(not shutil.which("etcd"),
                                 reason="needs the etcd binary (apt-get install etcd-server)")]


def _port_open(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex((host, port)) == 0


def _flag(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


@pytest.fixture(scope="module")
def model_dir(tiny_served_model) -> str:
    return tiny_served_model


@pytest.fixture(scope="module")
def refs(model_dir):
    r = References(model_dir)
    yield r
    r.close()


@pytest.fixture(scope="module")
def served(model_dir, refs, tmp_path_factory):
    from dynamo_dwdp.launch.launcher import serve_graph

    run_dir = tmp_path_factory.mktemp("run-etcd")
    pids: set[int] = set()
    with serve_graph(GRAPH, [CONFIG], overrides={"model.path": model_dir}, log_dir=str(run_dir), http_port=0,
                     infra="etcd", worker_env=TEST_WORKER_ENV) as h:
        infra = {name: proc for name, proc in h.infra.procs}
        endpoints = {"etcd": h.infra.etcd_url.rsplit(":", 1), "nats": h.infra.nats_url.rsplit(":", 1)}
        s = Served(h)
        pids = s.pids
        yield s
        pids |= served_pids(h)
    for name, proc in infra.items():                           # stopped by the launcher, reaped
        assert proc.poll() is not None, f"{name} (pid {proc.pid}) still running after the graph stopped"
    for name, (scheme_host, port) in endpoints.items():
        assert not _port_open(scheme_host.split("//")[-1], int(port)), f"{name} port {port} still open"
    assert_nothing_left(pids, str(run_dir))
    assert_nothing_left(set(), model_dir)


def test_real_etcd_and_nats_run_the_graph(served):
    h = served.h
    procs = dict(h.infra.procs)
    assert set(procs) == {"etcd", "nats"} and all(p.poll() is None for p in procs.values())
    assert procs["etcd"].args[0] == shutil.which("etcd")
    assert "nats-server" in procs["nats"].args[0]

    # every Dynamo worker (prefill rank + 2 DWDP decode ranks) registered its instance in etcd
    key = base64.b64encode(b"v1/instances/").decode()
    end = base64.b64encode(b"v1/instances0").decode()
    query = json.dumps({"key": key, "range_end": end}).encode()
    req = urllib.request.Request(h.infra.etcd_url + "/v3/kv/range", data=query)
    with urllib.request.urlopen(req, timeout=10) as r:
        kvs = json.loads(r.read()).get("kvs") or []
    keys = [base64.b64decode(kv["key"]).decode().split("/") for kv in kvs]   # v1/instances/ns/comp/endpoint/id
    ids = {int(k[5], 16) for k in keys if len(k) == 6 and k[2] == h.settings.infra.namespace and k[4] == "generate"}
    assert ids == set(served.workers), (keys, served.workers)

    # and the processes hold NATS connections (events plane, DWDP group events)
    monitor = int(_flag(list(procs["nats"].args), "-m"))
    with urllib.request.urlopen(f"http://127.0.0.1:{monitor}/connz", timeout=10) as r:
        assert json.loads(r.read())["num_connections"] >= 3


def test_nats_and_etcd_lost_mid_serve_then_back(served):
    """Last test here (it disturbs the infra). NATS killed: the launcher starts it again on the same
    port; serving never stops (requests succeed at once) and the clients reconnect. etcd stopped for
    8 s (longer than the 5 s membership leases): requests sent meanwhile succeed or fail fast (never
    hang); once etcd is back, membership and discovery recover by themselves: requests succeed again
    within 60 s, every decode rank healthy with no peer down, and no graph restart by hand."""
    h = served.h

    def ok() -> bool:
        status, body = post(h.url + "/v1/completions", {"model": h.model_name, "prompt": "still serving?",
                                                         "max_tokens": 3, "temperature": 0}, timeout=30)
        return status == 200 and body["usage"]["completion_tokens"] == 3

    def nats_connections() -> int:
        monitor = int(_flag(list(dict(h.infra.procs)["nats"].args), "-m"))
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{monitor}/connz", timeout=2) as r:
                return json.loads(r.read())["num_connections"]
        except OSError:
            return 0

    connected = nats_connections()
    assert connected >= 3
    nats = dict(h.infra.procs)["nats"]
    os.kill(nats.pid, signal.SIGKILL)
    assert ok() and ok(), "serving stopped when NATS went away"
    assert wait_for(lambda: dict(h.infra.procs)["nats"].pid != nats.pid, 10, 0.2), "NATS not restarted"
    assert wait_for(lambda: nats_connections() >= connected, 30, 0.5), (nats_connections(), connected)
    assert ok()

    etcd = dict(h.infra.procs)["etcd"]
    os.kill(etcd.pid, signal.SIGSTOP)
    outcomes: list[bool] = []
    try:
        t_end = time.monotonic() + 8
        while time.monotonic() < t_end:
            t = threading.Thread(target=lambda: outcomes.append(ok()), daemon=True)
            t.start()
            t.join(max(0.5, t_end - time.monotonic()) + 30)
            assert not t.is_alive(), "a request hung while etcd was away"
            time.sleep(1)
    finally:
        os.kill(etcd.pid, signal.SIGCONT)
    assert outcomes
    decode = [f"http://127.0.0.1:{p}/metrics" for c in h.components if c.role == "decode" for p in c.system_ports]
    assert wait_for(lambda: all(ok() for _ in range(3)), 60, 1.0), "no recovery within 60 s of etcd's return"
    assert wait_for(lambda: all(metric_total(u, "dwdp_group_healthy") == 1 and
                                metric_total(u, "dwdp_group_peers_down") == 0 for u in decode), 30, 0.5), \
        {u: (metric_total(u, "dwdp_group_healthy"), metric_total(u, "dwdp_group_peers_down")) for u in decode}
