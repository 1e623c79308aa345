"""Aggregation, goodput, Pareto frontier and the matched B/A ratio on small synthetic inputs.

References: numpy percentiles (method "linear", independent of our pure-Python implementation) and
explicit hand arithmetic written out in each test.
"""
from __future__ import annotations

import math
import random

import numpy as np
import pytest

from dynamo_dwdp.ab.loadgen import RequestRecord
from dynamo_dwdp.ab.results import (error_kind, frontier_of, interpolate, is_good, matched_ratio,
                                       pareto_frontier, percentile, same_point_ratios, summarize_point)


def rec(i, *, start, ttft, gaps, out=None, prompt=10, ok=True, error=None, osl=None):
    """A finished request: chunks at ttft, ttft+g1, ...; ends at the last chunk."""
    times = [ttft]
    for g in gaps:
        times.append(times[-1] + g)
    out = len(times) if out is None else out
    return RequestRecord(index=i, target_isl=prompt, target_osl=osl if osl is not None else out, ok=ok, sent=True,
                         start_s=start, end_s=start + times[-1], ttft_s=ttft if ok else None,
                         prompt_tokens=prompt, output_tokens=out if ok else None, error=error,
                         chunk_times_s=times if ok else [])


@pytest.mark.parametrize("q", [0, 1, 10, 25, 50, 75, 90, 99, 100])
def test_percentile_matches_numpy(q):
    rnd = random.Random(q)
    for n in (1, 2, 3, 7, 100, 1001):
        xs = [rnd.lognormvariate(0, 1) for _ in range(n)]
        assert percentile(xs, q) == pytest.approx(float(np.percentile(xs, q, method="linear")), rel=1e-12)
    assert percentile([], 50) is None


def test_percentile_by_hand():
    # 4 values: position = 3 * q/100; p50 -> 1.5 -> halfway between 20 and 30
    assert percentile([40, 10, 30, 20], 50) == 25.0
    assert percentile([40, 10, 30, 20], 99) == pytest.approx(30 + 0.97 * 10)


def test_summary_of_a_hand_made_point():
    # Three ok requests and one failed, 2 GPUs.
    #  r0: start 0.0, ttft 0.10, gaps [0.02, 0.02, 0.02]  -> 4 tokens, e2e 0.16, tpot (0.16-0.10)/3 = 0.02
    #  r1: start 0.0, ttft 0.30, gaps [0.05, 0.05]        -> 3 tokens, e2e 0.40, tpot 0.05
    #  r2: start 0.2, ttft 0.20, gaps [0.01, 0.03]        -> 3 tokens, e2e 0.24, tpot 0.02; ends at 0.44
    #  r3: failed (http 400) at start 0.1
    recs = [rec(0, start=0.0, ttft=0.10, gaps=[0.02] * 3), rec(1, start=0.0, ttft=0.30, gaps=[0.05] * 2),
            rec(2, start=0.2, ttft=0.20, gaps=[0.01, 0.03]),
            RequestRecord(index=3, target_isl=10, target_osl=4, ok=False, sent=True, start_s=0.1, end_s=0.11,
                          status=400, error="http 400: nope")]
    duration = 0.44  # first start 0.0 -> last end 0.44
    s = summarize_point(recs, duration_s=duration, num_gpus=2, ttft_slo_ms=250, tpot_slo_ms=30)
    assert (s["requests"], s["sent"], s["ok"], s["failed"]) == (4, 4, 3, 1)
    assert s["errors"] == {"http 400": 1} and s["first_error"] == "http 400: nope"
    assert s["ttft_ms_p50"] == pytest.approx(200.0)  # median of 100, 300, 200
    assert s["ttft_ms_p99"] == pytest.approx(200 + 0.98 * 100)  # pos 1.98 between 200 and 300
    gaps_ms = [20, 20, 20, 50, 50, 10, 30]
    assert s["itl_ms_p50"] == pytest.approx(float(np.percentile(gaps_ms, 50)))
    assert s["itl_ms_p99"] == pytest.approx(float(np.percentile(gaps_ms, 99)))
    assert s["tpot_ms_p50"] == pytest.approx(20.0)
    # TPS/user: 1 / mean TPOT = 1 / ((20 + 50 + 20) / 3 ms) = 33.3 tokens/s; aiperf's mean of 1/TPOT:
    # (50 + 20 + 50) / 3 = 40 tokens/s
    assert s["tps_user"] == pytest.approx(1000 / 30)
    assert s["tps_user_mean"] == pytest.approx(40.0)
    assert s["tpot_ms_mean"] == pytest.approx(30.0)
    # 10 output tokens over 0.44 s on 2 GPUs
    assert s["output_tps"] == pytest.approx(10 / 0.44)
    assert s["tps_gpu"] == pytest.approx(10 / 0.44 / 2)
    # goodput: r0 (ttft 100 <= 250, tpot 20 <= 30) good; r1 ttft 300 > 250 bad; r2 (200, 20) good; r3 failed
    assert s["good"] == 2 and s["good_fraction"] == pytest.approx(2 / 4)
    assert s["goodput_rps"] == pytest.approx(2 / 0.44)
    assert s["goodput_tps_gpu"] == pytest.approx((4 + 3) / 0.44 / 2)
    assert s["osl_mismatch"] == 0 and s["isl_mean"] == 10


def test_goodput_rules():
    r = rec(0, start=0, ttft=0.125, gaps=[0.0625])  # 2 tokens, ttft 125 ms, tpot 62.5 ms (exact in binary)
    assert is_good(r, None, None)
    assert is_good(r, 125, 62.5)  # bounds are inclusive
    assert not is_good(r, 124.9, None) and not is_good(r, None, 62.4)
    one = rec(1, start=0, ttft=0.1, gaps=[])  # 1 token: no TPOT, meets any TPOT bound
    assert one.tpot_s is None and is_good(one, None, 0.001)
    failed = RequestRecord(index=2, target_isl=1, target_osl=1, sent=True, error="timeout after 1 s")
    assert not is_good(failed, None, None)


def test_osl_mismatch_is_counted():
    s = summarize_point([rec(0, start=0, ttft=0.1, gaps=[0.1], osl=5)], duration_s=1, num_gpus=1)
    assert s["osl_mismatch"] == 1 and s["osl_mean"] == 2


def test_empty_point_has_no_nan():
    failed = [RequestRecord(index=i, target_isl=1, target_osl=1, sent=True, error="connection: refused")
              for i in range(3)]
    s = summarize_point(failed, duration_s=0.0, num_gpus=3)
    assert s["ok"] == 0 and s["failed"] == 3 and s["errors"] == {"connection": 3}
    for k, v in s.items():
        assert not (isinstance(v, float) and math.isnan(v)), k
    assert s["tps_gpu"] is None and s["ttft_ms_p50"] is None


def test_error_kinds():
    assert error_kind("http 503: overloaded") == "http 503"
    assert error_kind("timeout after 3 s") == "timeout"
    assert error_kind("not sent: point timeout after 9 s") == "not sent"
    assert error_kind("connection: ServerDisconnectedError") == "connection"


def test_pareto_frontier_by_hand():
    pts = [(10, 100), (20, 80), (15, 70), (30, 40), (25, 40), (5, 90), (30, 40)]
    # (15,70) is dominated by (20,80); (25,40) by (30,40); (5,90) by (10,100); the 2nd (30,40) duplicates
    assert pareto_frontier(pts) == [0, 1, 3]
    assert pareto_frontier([(1, None), (2, 3)]) == [1]
    assert pareto_frontier([]) == []


def test_interpolation_by_hand():
    f = [(10.0, 100.0), (20.0, 80.0), (30.0, 40.0)]
    assert interpolate(f, 10) == 100 and interpolate(f, 15) == 90 and interpolate(f, 25) == 60
    assert interpolate(f, 30) == 40
    assert interpolate(f, 9.9) is None and interpolate(f, 30.1) is None  # never extrapolated


def test_matched_ratio_by_hand():
    a = [(10.0, 100.0), (20.0, 80.0), (30.0, 40.0)]
    b = [(15.0, 120.0), (25.0, 90.0)]
    m = matched_ratio(a, b, grid=3)
    # overlap [15, 25]; grid x = 15, 20, 25
    # A: 90, 80, 60   B: 120, 105, 90   -> ratios 4/3, 1.3125, 1.5
    assert m["matched_range"] == [15.0, 25.0]
    assert m["range_a"] == [10.0, 30.0] and m["range_b"] == [15.0, 25.0]
    assert [s["ratio"] for s in m["samples"]] == pytest.approx([120 / 90, 105 / 80, 90 / 60])
    assert m["mean"] == pytest.approx((120 / 90 + 105 / 80 + 90 / 60) / 3)
    assert m["min"] == pytest.approx(105 / 80) and m["max"] == pytest.approx(1.5)


def test_matched_ratio_includes_frontier_knots_but_averages_the_grid():
    a = [(0.0, 10.0), (10.0, 10.0)]
    b = [(0.0, 10.0), (4.0, 30.0), (10.0, 10.0)]
    m = matched_ratio(a, b, grid=2)  # grid: x = 0 and 10 (ratio 1 and 1); knot at x = 4: ratio 3
    assert m["mean"] == pytest.approx(1.0)
    assert m["max"] == pytest.approx(3.0)
    assert [s["tps_user"] for s in m["samples"]] == [0.0, 4.0, 10.0]


def test_matched_ratio_without_overlap_says_so():
    m = matched_ratio([(1.0, 5.0), (2.0, 4.0)], [(3.0, 9.0)])
    assert m["mean"] is None and m["matched_range"] is None and "overlap" in m["note"]
    assert m["range_a"] == [1.0, 2.0] and m["range_b"] == [3.0, 3.0]
    assert matched_ratio([], [(1.0, 1.0)])["mean"] is None


def test_single_point_overlap():
    m = matched_ratio([(1.0, 4.0), (3.0, 2.0)], [(3.0, 3.0), (5.0, 1.0)])
    assert m["matched_range"] == [3.0, 3.0] and m["mean"] == pytest.approx(1.5)


def test_frontier_of_summaries():
    sums = [{"tps_user": 10, "tps_gpu": 5}, {"tps_user": 5, "tps_gpu": 9}, {"tps_user": 4, "tps_gpu": 8},
            {"tps_user": None, "tps_gpu": None}]
    idx, pts = frontier_of(sums)
    assert idx == [1, 0] and pts == [(5.0, 9.0), (10.0, 5.0)]


def test_a_burst_request_does_not_dominate_tps_user():
    # two requests decode at 10 ms/token; one arrives in a burst (TPOT 0.01 ms)
    recs = [rec(0, start=0, ttft=0.1, gaps=[0.01] * 4), rec(1, start=0, ttft=0.1, gaps=[0.01] * 4),
            rec(2, start=0, ttft=0.14, gaps=[0.00001] * 4)]
    s = summarize_point(recs, duration_s=0.15, num_gpus=1)
    assert s["tps_user"] == pytest.approx(1000 / ((10 + 10 + 0.01) / 3))  # ~150 tokens/s
    assert s["tps_user_mean"] > 30000  # the mean of reciprocals is dominated by the burst


def test_same_point_ratios_by_hand():
    a = [{"label": "c1", "summary": {"tps_gpu": 10.0, "tps_user": 50.0}},
         {"label": "c2", "summary": {"tps_gpu": 16.0, "tps_user": None}},
         {"label": "c4", "summary": {"tps_gpu": 20.0, "tps_user": 20.0}}]
    b = [{"label": "c2", "summary": {"tps_gpu": 20.0, "tps_user": 30.0}},
         {"label": "c1", "summary": {"tps_gpu": 12.0, "tps_user": 40.0}}]
    rows = same_point_ratios(a, b)
    assert [r["point"] for r in rows] == ["c1", "c2"]  # c4 only in A
    assert rows[0]["tps_gpu_ratio"] == pytest.approx(1.2) and rows[0]["tps_user_ratio"] == pytest.approx(0.8)
    assert rows[1]["tps_gpu_ratio"] == pytest.approx(1.25) and rows[1]["tps_user_ratio"] is None
