"""The native load generator against a fake streaming frontend (tests/ab/test_ab_fakes.py).

References: the delays the fake server injects (TTFT >= first delay, ITL >= chunk delay), the usage
numbers it reports, its request/in-flight counters, and the wall clock (nothing may hang).
"""
from __future__ import annotations

import asyncio
import statistics
import time

import pytest

from dynamo_dwdp.ab.loadgen import arrival_offsets, build_body, check_base_url, run_load
from dynamo_dwdp.ab.workload import Request
from dynamo_dwdp.errors import UserError
from tests.ab.test_ab_fakes import FakeFrontend

# Lower bounds are exact (nothing arrives before the server sent it). Upper bounds are generous on
# purpose: a loaded 2-core CI box can delay any wake-up by hundreds of milliseconds; the relations
# between the measures (ttft < e2e, tpot from e2e and ttft) are checked exactly instead.
SLACK = 1.0


def reqs(n: int, *, osl: int = 6, prompt=None) -> list[Request]:
    return [Request(index=i, prompt=list(range(10 + i)) if prompt is None else prompt, isl=10 + i, osl=osl,
                    prefix_len=0) for i in range(n)]


def run(url, requests, **kw):
    kw.setdefault("concurrency", 1)
    kw.setdefault("request_timeout_s", 10)
    kw.setdefault("point_timeout_s", 30)
    return asyncio.run(run_load(url, "tiny", requests, **kw))


def test_ttft_and_itl_match_the_injected_delays():
    first, gap = 0.15, 0.04
    with FakeFrontend(first_delay_s=first, chunk_delay_s=gap) as fe:
        res = run(fe.url, reqs(3, osl=6))
    assert all(r.ok for r in res.records), [r.error for r in res.records]
    for r in res.records:
        # strict lower bounds: nothing can arrive before the server sent it
        assert first <= r.ttft_s <= first + SLACK
        assert r.e2e_s >= first + 5 * gap
        gaps = r.itl_gaps_s
        assert len(gaps) == 5  # 6 tokens, one per chunk
        # a single gap can be short when the chunk before it was delivered late, so check the median
        assert gap - 0.01 <= statistics.median(gaps) <= gap + SLACK / 2
        # TPOT = (e2e - ttft) / (osl - 1) is the mean gap (+ the last chunk -> [DONE] tail)
        assert gap - 0.01 <= r.tpot_s <= gap + SLACK / 2
        assert r.ttft_s < r.e2e_s and r.tpot_s == pytest.approx((r.e2e_s - r.ttft_s) / 5, rel=1e-6)


def test_token_counts_come_from_the_usage_chunk():
    with FakeFrontend(first_delay_s=0.001, chunk_delay_s=0.001) as fe:
        res = run(fe.url, reqs(4, osl=7), concurrency=2)
        bodies = list(fe.state.bodies)
    for r in res.records:
        assert r.ok
        assert r.output_tokens == 7 and r.target_osl == 7
        assert r.prompt_tokens == r.target_isl == 10 + r.index  # token-id prompt length, as the server counted
        assert r.finish_reason == "length"
    # exact OSL controls are top-level fields (Dynamo 1.6.1 rejects nvext.ignore_eos)
    for b in bodies:
        assert b["ignore_eos"] is True and b["min_tokens"] == b["max_tokens"] == 7
        assert "nvext" not in b
        assert b["stream"] is True and b["stream_options"] == {"include_usage": True}
        assert isinstance(b["prompt"], list)


def test_ignore_eos_off_reports_the_shorter_output():
    with FakeFrontend(first_delay_s=0.001, chunk_delay_s=0.001, eos_after=3) as fe:
        res = run(fe.url, reqs(2, osl=8), ignore_eos=False)
    assert [r.output_tokens for r in res.records] == [3, 3]
    assert all(r.ok for r in res.records)


def test_chat_endpoint_ignores_the_role_preamble_for_ttft():
    first = 0.1
    with FakeFrontend(first_delay_s=first, chunk_delay_s=0.01) as fe:
        res = run(fe.url, reqs(2, osl=4, prompt="hello there"), endpoint="chat")
        body = fe.state.bodies[0]
    assert body["messages"] == [{"role": "user", "content": "hello there"}]
    for r in res.records:
        assert r.ok and r.output_tokens == 4
        assert r.ttft_s >= first  # the role-only chunk arrives at once and must not count


def test_http_400_and_dropped_connection_are_counted_as_errors():
    good = reqs(2, osl=5)
    bad = [Request(index=2, prompt="BAD prompt", isl=2, osl=5, prefix_len=0)]
    drop = [Request(index=3, prompt="DROP me please", isl=3, osl=5, prefix_len=0)]
    nousage = [Request(index=4, prompt="NOUSAGE here", isl=2, osl=5, prefix_len=0)]
    empty = [Request(index=5, prompt="EMPTY answer", isl=2, osl=5, prefix_len=0)]
    with FakeFrontend(first_delay_s=0.01, chunk_delay_s=0.01) as fe:
        res = run(fe.url, good + bad + drop + nousage + empty, concurrency=2)
        served = fe.state.requests
    by = {r.index: r for r in res.records}
    assert served == 6
    assert not by[5].ok and by[5].error.startswith("empty response: 0 output tokens")
    assert by[0].ok and by[1].ok
    assert not by[2].ok and by[2].status == 400 and by[2].error.startswith("http 400: bad request for the test")
    assert not by[3].ok and by[3].error.startswith("connection")
    assert len(by[3].chunk_times_s) == 2  # two chunks arrived before the cut
    assert not by[4].ok and by[4].error.startswith("no usage chunk")


def test_a_hanging_request_times_out_and_nothing_hangs():
    hang = [Request(index=0, prompt="HANG forever", isl=2, osl=4, prefix_len=0)]
    with FakeFrontend(first_delay_s=0.01, chunk_delay_s=0.01) as fe:
        t0 = time.monotonic()
        res = run(fe.url, hang + reqs(2, osl=3)[1:], concurrency=2, request_timeout_s=0.5)
        took = time.monotonic() - t0
    assert took < 5
    assert not res.records[0].ok and res.records[0].error == "timeout after 0.5 s"
    assert res.records[1].ok


def test_point_timeout_bounds_the_whole_point():
    hang = [Request(index=i, prompt="HANG", isl=1, osl=4, prefix_len=0) for i in range(4)]
    with FakeFrontend() as fe:
        t0 = time.monotonic()
        res = run(fe.url, hang, concurrency=2, request_timeout_s=60, point_timeout_s=0.4)
        took = time.monotonic() - t0
    assert took < 5 and res.timed_out
    errors = sorted(r.error.split(":")[0] for r in res.records)
    assert errors == ["cancelled", "cancelled", "not sent", "not sent"]
    assert sum(r.sent for r in res.records) == 2


def test_concurrency_is_a_bound_and_is_reached():
    with FakeFrontend(first_delay_s=0.03, chunk_delay_s=0.01) as fe:
        res = run(fe.url, reqs(12, osl=4), concurrency=3)
        assert fe.state.max_inflight == 3
        assert fe.state.requests == 12
    assert all(r.ok for r in res.records)
    assert res.duration_s >= 4 * 0.06  # 12 requests, 3 at a time, >= 0.06 s each


def test_request_rate_mode_sends_on_schedule():
    rate = 20.0
    with FakeFrontend(first_delay_s=0.005, chunk_delay_s=0.005) as fe:
        res = run(fe.url, reqs(6, osl=2), concurrency=None, request_rate=rate, arrival="constant")
    starts = sorted(r.start_s for r in res.records)
    assert all(r.ok for r in res.records)
    for i, s in enumerate(starts):
        assert i / rate - 0.01 <= s - starts[0] <= i / rate + SLACK


def test_poisson_arrivals_are_seeded_and_have_the_right_mean():
    a = arrival_offsets(2001, 10.0, "poisson", seed=3, stream="c1")
    b = arrival_offsets(2001, 10.0, "poisson", seed=3, stream="c1")
    c = arrival_offsets(2001, 10.0, "poisson", seed=4, stream="c1")
    assert a == b and a != c and a[0] == 0.0
    gaps = [y - x for x, y in zip(a, a[1:])]
    assert abs(statistics.mean(gaps) - 0.1) < 0.01  # 2000 exponential gaps: se of the mean ~ 0.0022
    assert arrival_offsets(3, 4.0, "constant", 0, "x") == [0.0, 0.25, 0.5]


def test_only_http_base_urls_are_accepted():
    assert check_base_url("http://127.0.0.1:8000/") == "http://127.0.0.1:8000"
    for bad in ("ftp://x", "127.0.0.1:8000", "http://", "http://h:1/?q=1", "file:///etc/passwd"):
        with pytest.raises(UserError):
            check_base_url(bad)


def test_connection_refused_is_an_error_not_a_crash():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    res = run(f"http://127.0.0.1:{port}", reqs(2), concurrency=2)
    assert [r.ok for r in res.records] == [False, False]
    assert all(r.error.startswith("connection") for r in res.records)


def test_body_of_a_text_completion():
    b = build_body(Request(index=0, prompt="a b c", isl=3, osl=5, prefix_len=0), "m", "completions", True)
    assert b == {"model": "m", "max_tokens": 5, "stream": True, "stream_options": {"include_usage": True},
                 "prompt": "a b c", "ignore_eos": True, "min_tokens": 5}
