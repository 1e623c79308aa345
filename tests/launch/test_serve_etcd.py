"""`--infra etcd`: the reference graph (graphs/disagg_dwdp_decode.yaml: prefill single, decode DWDP x2)
on a real etcd + NATS that the launcher starts and stops.

The end-to-end checks of tests/launch/test_serve_e2e.py run here unchanged (they are imported, so they use
this module's `served`): outputs equal `dynamo-dwdp generate`, prefill and decode on different workers
of the right pools, KV bytes over NIXL, worker-side 400s, loopback-only listeners. On top: the workers
really registered in etcd (its own v3 API lists their instances) and really talk to NATS (its monitor
counts the connections), and after the graph stops etcd and nats-server are gone, ports closed.
"""
from __future__ import annotations

import base64
import json
import shutil
import socket
import urllib.request

import pytest

from tests.conftest import REPO
from tests.launch.test_serve_e2e import (CONFIG, TEST_WORKER_ENV, References, Served, assert_nothing_left, make_model,
                            served_pids)
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
def model_dir(tmp_path_factory) -> str:
    return make_model(tmp_path_factory.mktemp("etcd-model") / "tiny")


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
