"""Failure behaviour through the frontend, on a disagg graph whose DWDP decode pool has TWO groups
(tests/fixtures/graphs/disagg_dwdp_decode_2groups.yaml: prefill single x1, decode dwdp 2 ranks x 2).

1. Bad requests (unknown model, bad max_tokens, prompt over the context, bad or unsupported
   sampling / output options, streaming or not) come back 4xx with a message; the engine's own
   checks (`InvalidArgument`) map to 400, never 500; nothing stays allocated; the graph keeps serving.
2. A decode rank SIGKILLed mid-stream: its requests end with an error (no hang: every client call has
   a timeout), requests on the other group complete in full, new requests are served by the surviving
   group while the killed one restarts (its supervisor stops the survivor at once and re-forms the
   whole group), then by both groups again; no KV block leaks on the survivors (the prefill's held
   blocks go at the latest after DWDP_KV_HOLD_TIMEOUT, set short here).
"""
from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, rank_pid
from tests.launch.test_serve_e2e import (CONFIG, TEST_WORKER_ENV, Served, assert_nothing_left, metric_samples,
                            metric_total, post, served_pids, stream, stream_finish, stream_worker_ids, wait_for)

GRAPH = str(REPO / "tests" / "fixtures" / "graphs" / "disagg_dwdp_decode_2groups.yaml")
HOLD_TIMEOUT = 3.0
GROUP_GRACE = 8.0                     # dynamo_dwdp.group --grace default: survivors' time before the group stops
RECOVERY_S = 60.0                     # a killed group serves again within this (issue bound)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def served(tiny_served_model, tmp_path_factory):
    from dynamo_dwdp.launch.launcher import serve_graph

    model_dir = tiny_served_model
    run_dir = tmp_path_factory.mktemp("run-2groups")
    env = dict(TEST_WORKER_ENV, DWDP_KV_HOLD_TIMEOUT=str(HOLD_TIMEOUT))
    pids: set[int] = set()
    with serve_graph(GRAPH, [CONFIG], overrides={"model.path": model_dir}, log_dir=str(run_dir), http_port=0,
                     worker_env=env) as h:
        s = Served(h)
        pids = s.pids
        yield s
        pids |= served_pids(h)
    assert_nothing_left(pids, str(run_dir))
    assert_nothing_left(set(), model_dir)


def test_hold_timeout_comes_from_the_environment(monkeypatch):
    from dynamo_dwdp.worker.args import parse_worker_args

    monkeypatch.setenv("DWDP_KV_HOLD_TIMEOUT", "2.5")
    assert parse_worker_args(["--model-path", "m"]).kv_hold_timeout == 2.5
    assert parse_worker_args(["--model-path", "m", "--kv-hold-timeout", "7"]).kv_hold_timeout == 7.0
    monkeypatch.delenv("DWDP_KV_HOLD_TIMEOUT")
    assert parse_worker_args(["--model-path", "m"]).kv_hold_timeout == 60.0


# ------------------------------------------------------------------ 1. bad requests
LONG = "x " * 1500                    # about 1500 tokens: over max_model_len 1024
CHAT = [{"role": "user", "content": "hello"}]

# (endpoint, body without "model" (None = the served model), expected status, words the message must hold)
BAD_REQUESTS = [
    ("completions", {"model": "no-such-model", "prompt": "hi", "max_tokens": 3}, 404, ["not found"]),
    ("chat/completions", {"model": "no-such-model", "messages": CHAT, "max_tokens": 3}, 404, ["not found"]),
    ("completions", {"prompt": "hi", "max_tokens": -1}, 400, ["-1"]),
    ("completions", {"prompt": "hi", "max_tokens": 0}, 400, ["max tokens"]),
    ("completions", {"prompt": "hi", "max_tokens": 5000}, 400, ["max_tokens=5000", "context length 1024"]),
    ("chat/completions", {"messages": CHAT, "max_tokens": 2000}, 400, ["max_tokens=2000", "context length 1024"]),
    ("completions", {"prompt": LONG, "max_tokens": 4}, 400, ["prompt has", "context length is 1024"]),
    ("chat/completions", {"messages": [{"role": "user", "content": LONG}], "max_tokens": 4}, 400,
     ["context length is 1024"]),
    ("completions", {"prompt": "hi", "max_tokens": 3, "temperature": -1}, 400, ["temperature"]),
    ("chat/completions", {"messages": CHAT, "max_tokens": 3, "top_p": 2}, 400, ["top_p"]),
    ("completions", {"prompt": "hi", "max_tokens": 3, "repetition_penalty": 1.3}, 400,
     ["repetition_penalty", "not supported"]),
    ("chat/completions", {"messages": CHAT, "max_tokens": 3, "frequency_penalty": 0.5}, 400,
     ["frequency_penalty", "not supported"]),
    ("completions", {"prompt": "hi", "max_tokens": 3, "n": 2}, 400, ["n=2", "not supported"]),
    ("completions", {"prompt": "hi", "max_tokens": 3, "min_tokens": 5}, 400, ["min_tokens"]),
    ("completions", {"prompt": "hi", "max_tokens": 3, "logprobs": 2}, 400, ["logprobs", "not supported"]),
    ("chat/completions", {"messages": CHAT, "max_tokens": 3, "logprobs": True}, 400, ["logprobs", "not supported"]),
]


def _body(s: Served, body: dict) -> dict:
    return {"model": s.h.model_name, **body}


def test_bad_requests_are_4xx_with_a_message(served):
    failures = []
    for endpoint, body, want, words in BAD_REQUESTS:
        status, resp = post(f"{served.h.url}/v1/{endpoint}", _body(served, body), timeout=30)
        message = str(resp.get("message") or resp.get("error") or "")
        if status != want or not all(w.lower() in message.lower() for w in words):
            failures.append((endpoint, {k: v for k, v in body.items() if k != "prompt"}, status, message[:200]))
    assert not failures, failures


def test_bad_streaming_requests_fail_with_400(served):
    url = served.h.url + "/v1/completions"
    # refused by the first worker (prefill): a plain HTTP 400
    res = stream(url, _body(served, {"prompt": "hi", "max_tokens": 3, "repetition_penalty": 1.3}), timeout=30)
    assert res["status"] == 400 and "repetition_penalty" in str(res["errors"]), res
    # refused by the decode worker, after the prefill ran: the SSE stream carries the 400 error
    t0 = time.monotonic()
    res = stream(url, _body(served, {"prompt": "hi", "max_tokens": 3000}), timeout=30)
    assert res["exception"] is None, res
    assert res["status"] == 400 or (res["errors"] and res["errors"][0].get("code") == 400), res
    assert "max_tokens=3000" in str(res["errors"]) and not [c for c in res["chunks"] if c.get("choices")], res
    # and the prefill's blocks for it are freed at once, not after the hold timeout
    urls = [w[3] for w in served.workers.values()]
    assert wait_for(lambda: all(metric_total(u, "dwdp_kv_blocks_used") == 0 for u in urls), 1.5)
    assert time.monotonic() - t0 < HOLD_TIMEOUT


# refused by the engine (not the frontend): each must be counted as `rejected` by the worker that saw it
ENGINE_REFUSED = [b for e, b, status, _ in BAD_REQUESTS
                  if e == "completions" and status == 400 and
                  (b.get("max_tokens") == 5000 or {"repetition_penalty", "n", "logprobs"} & set(b))]


def _rejected(urls: list[str]) -> float:
    return sum(v for u in urls for labels, v in metric_samples(u, "dwdp_requests_total")
               if labels.get("outcome") == "rejected")


def test_serving_continues_after_bad_requests_and_nothing_leaks(served):
    urls = [w[3] for w in served.workers.values()]
    before = _rejected(urls)
    for body in ENGINE_REFUSED:                          # this test's own refusals, whatever ran before
        status, resp = post(f"{served.h.url}/v1/completions", _body(served, body), timeout=30)
        assert status == 400, (body, resp)
    # the engine, not the frontend, refused them (and counted each once)
    assert len(ENGINE_REFUSED) == 4
    assert _rejected(urls) - before == len(ENGINE_REFUSED), (before, _rejected(urls))
    for endpoint, body in (("completions", {"prompt": "hello there", "max_tokens": 5, "temperature": 0}),
                           ("chat/completions", {"messages": CHAT, "max_tokens": 5, "temperature": 0})):
        status, resp = post(f"{served.h.url}/v1/{endpoint}", _body(served, body))
        assert status == 200 and resp["usage"]["completion_tokens"] == 5, resp
    # no KV block stays allocated for any of the refused requests
    assert wait_for(lambda: all(metric_total(u, "dwdp_kv_blocks_used") == 0 for u in urls), HOLD_TIMEOUT + 2), \
        {u: metric_total(u, "dwdp_kv_blocks_used") for u in urls}


# ------------------------------------------------------------------ 2. a decode rank killed mid-stream
N_STREAMS = 8
KILL_MAX_TOKENS = 800


def test_decode_rank_killed_mid_stream(served):
    h = served.h
    by_worker = served.workers                                  # worker id -> (component, role, rank, url)
    progress: dict[int, list] = {i: [0, None] for i in range(N_STREAMS)}
    results: dict[int, dict] = {}

    def on_chunk(i, chunk):
        progress[i][0] += 1
        progress[i][1] = stream_worker_ids({"chunks": [chunk]}).get("decode_worker_id") or progress[i][1]

    def client(i):
        body = {"model": h.model_name, "prompt": f"Stream number {i} asks about experts", "temperature": 0,
                "max_tokens": KILL_MAX_TOKENS, "ignore_eos": True, "stream_options": {"include_usage": True},
                "nvext": {"extra_fields": ["worker_id"]}}
        results[i] = stream(h.url + "/v1/completions", body, timeout=60, on_chunk=lambda c: on_chunk(i, c))

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(N_STREAMS)]
    for t in threads:
        t.start()
    assert wait_for(lambda: all(n >= 3 and w is not None for n, w in progress.values()), 60, 0.05), progress
    where = {i: by_worker[w][:3] for i, (_, w) in progress.items()}
    victim = ("decode-g0", "decode", 0)
    on_victim = [i for i, w in where.items() if w == victim]
    on_g1 = [i for i, w in where.items() if w[0] == "decode-g1"]
    assert on_victim and on_g1, f"round-robin did not spread the streams: {where}"

    pid = rank_pid(h.component("decode-g0").proc.pid, 0)
    on_victim = [i for i in on_victim if i not in results]    # still streaming when the rank dies
    os.kill(pid, signal.SIGKILL)
    t_kill = time.monotonic()
    assert on_victim, "the victim's streams had all finished before the kill"
    while any(t.is_alive() for t in threads) and time.monotonic() - t_kill < 120:
        time.sleep(0.1)
    assert not [t for t in threads if t.is_alive()], "a client call hung"

    for i in on_victim:                                        # ended with an error, not a full answer
        r = results[i]
        assert r["errors"] or r["exception"] or r["status"] != 200, r
        assert stream_finish(r) != "length", r
    for i in on_g1:                                            # the other group finished every token
        r = results[i]
        assert r["status"] == 200 and r["done"] and not r["errors"] and r["exception"] is None, (i, r["errors"])
        usage = [c["usage"] for c in r["chunks"] if c.get("usage")]
        assert stream_finish(r) == "length" and usage[-1]["completion_tokens"] == KILL_MAX_TOKENS
    for i, r in results.items():                               # rank 1 of the killed group: ended either way
        assert r["done"] or r["errors"] or r["exception"], (i, r)

    # the killed group's supervisor stops its surviving rank at once (it leaves discovery, so no new
    # request reaches the broken group) and restarts the whole group; the launcher sees no dead process
    log_path = Path(h.component("decode-g0").log_path)
    assert wait_for(lambda: "restarting all 2 ranks" in log_path.read_text(errors="replace"), GROUP_GRACE + 10, 0.2)
    assert not h.dead_components(), h.dead_components()

    # new requests are served by the surviving group. Until Dynamo's discovery drops the SIGKILLed
    # rank (its registration expires after ~10 s) a request routed there fails fast: 503, no hang.
    failed: list[tuple[int, dict]] = []

    def one() -> str | None:
        status, body = post(h.url + "/v1/completions", {"model": h.model_name, "prompt": "after the failure",
                                                         "max_tokens": 4, "temperature": 0,
                                                         "nvext": {"extra_fields": ["worker_id"]}}, timeout=30)
        if status != 200:
            failed.append((status, body))
            return None
        assert body["usage"]["completion_tokens"] == 4
        wid = body["nvext"]["worker_id"]["decode_worker_id"]
        return by_worker[wid][0] if wid in by_worker else "restarted"

    assert wait_for(lambda: "decode-g1" in [one() for _ in range(4)], 40, 0.2), failed
    assert all(status == 503 for status, _ in failed), failed
    # and, once the group has re-formed, by its new ranks too (new worker ids), within the bound
    assert wait_for(lambda: "restarted" in [one() for _ in range(4)], RECOVERY_S, 0.5), failed
    assert time.monotonic() - t_kill < RECOVERY_S + 10

    # no KV block stays allocated on a survivor; the prefill's holds go by the hold timeout at the latest
    urls = [w[3] for w in by_worker.values() if w[0] != "decode-g0"]
    assert wait_for(lambda: all(metric_total(u, "dwdp_kv_blocks_used") == 0 and
                                metric_total(u, "dwdp_kv_blocks_held_requests") == 0 for u in urls),
                    HOLD_TIMEOUT + 10), {u: metric_total(u, "dwdp_kv_blocks_used") for u in urls}
    # a hold expires only for a request that failed after its prefill (routed to the dead rank)
    expired = Path(h.component("prefill-g0").log_path).read_text(errors="replace").count("not read by a decode worker")
    assert expired <= len(failed), (expired, failed)


def test_prefill_frees_held_kv_by_the_hold_timeout_when_its_decode_died(served):
    """Every decode rank SIGKILLed while idle: the frontend still routes to their registrations until
    those expire, so the prefill computes the prompt and holds its KV for a decode READ that never
    comes. The request fails fast (5xx, no hang); DWDP_KV_HOLD_TIMEOUT later frees the blocks."""
    h = served.h
    prefill_url = next(w[3] for w in served.workers.values() if w[1] == "prefill")
    log_path = Path(h.component("prefill-g0").log_path)
    expired_before = log_path.read_text(errors="replace").count("not read by a decode worker")
    for c in h.components:
        if c.role == "decode" and c.alive:
            for rank in range(c.ranks):
                try:
                    os.kill(rank_pid(c.proc.pid, rank), signal.SIGKILL)
                except (AssertionError, ProcessLookupError):
                    pass                                       # already gone with its group
    t0 = time.monotonic()
    statuses = [post(h.url + "/v1/completions", {"model": h.model_name, "prompt": f"orphan {i}", "max_tokens": 4},
                     timeout=30)[0] for i in range(2)]
    assert time.monotonic() - t0 < 30 and all(500 <= s < 600 for s in statuses), statuses
    assert wait_for(lambda: metric_total(prefill_url, "dwdp_kv_blocks_used") == 0 and
                    metric_total(prefill_url, "dwdp_kv_blocks_held_requests") == 0, HOLD_TIMEOUT + 10)
    expired = log_path.read_text(errors="replace").count("not read by a decode worker") - expired_before
    assert expired >= 1, "no prefill hold expired: the decode READ never came, so the hold timeout must free it"
    # each supervisor reports both of its ranks (they died together), then restarts its group
    for g in ("decode-g0", "decode-g1"):
        text = lambda: Path(h.component(g).log_path).read_text(errors="replace")   # noqa: E731
        assert wait_for(lambda: "restarting all 2 ranks" in text().rsplit("exited with code -9", 1)[-1],
                        GROUP_GRACE + 20, 0.2), text()[-2000:]
        for rank in (0, 1):
            assert f"rank {rank} of group disagg-dwdp-decode-2groups-{g} exited with code -9" in text()
