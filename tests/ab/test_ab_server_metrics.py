"""Worker /metrics: tolerant Prometheus parsing, counter deltas and the per-pool evidence.

References: hand-written exposition text and hand arithmetic of the step-time split, bytes per
token and KV-transfer means; the fake frontend's /metrics for the scrape path.
"""
from __future__ import annotations

import asyncio
import socket

import pytest

from dynamo_dwdp.ab import server_metrics as sm
from tests.ab.test_ab_fakes import FakeFrontend

TEXT = r'''# HELP dwdp_step_seconds_total Step time.
# TYPE dwdp_step_seconds_total counter
dwdp_step_seconds_total{strategy="dwdp",role="decode",group="g0",rank="0"} 10.0
dwdp_step_seconds_total{strategy="dwdp",role="decode",group="g0",rank="1"} 6 1712345678000
dwdp_weird{path="a\"b,c",x="1"} 3
no_labels_metric 4.5e3
dwdp_kv_transfer_seconds_bucket{le="+Inf",rank="0"} 12
broken{unterminated="x 5
also broken line
dwdp_nan{rank="0"} NaN
empty_labels{} 7
'''


def test_parser_reads_good_lines_and_skips_bad_ones():
    m = sm.parse_prometheus(TEXT)
    key = ("dwdp_step_seconds_total", (("group", "g0"), ("rank", "1"), ("role", "decode"), ("strategy", "dwdp")))
    assert m[key] == 6.0  # a trailing timestamp is ignored
    assert m[("dwdp_weird", (("path", 'a"b,c'), ("x", "1")))] == 3.0  # escaped quote, comma inside the value
    assert m[("no_labels_metric", ())] == 4500.0
    assert m[("dwdp_kv_transfer_seconds_bucket", (("le", "+Inf"), ("rank", "0")))] == 12.0
    assert m[("empty_labels", ())] == 7.0
    assert not any(k[0] in ("broken", "also") for k in m)
    assert len(m) == 7
    assert sm.parse_prometheus(None) == {} and sm.parse_prometheus("") == {}


def test_counter_deltas_gauges_and_resets():
    lab = (("rank", "0"),)
    before = {("dwdp_steps_total", lab): 10.0, ("dwdp_tokens_total", lab): 50.0, ("dwdp_queue_depth", lab): 3.0}
    after = {("dwdp_steps_total", lab): 15.0, ("dwdp_tokens_total", lab): 20.0, ("dwdp_queue_depth", lab): 1.0,
             ("dwdp_generated_tokens_total", lab): 4.0}
    d = sm.counter_deltas(before, after)
    assert d[("dwdp_steps_total", lab)] == 5.0
    assert ("dwdp_tokens_total", lab) not in d  # went backwards: a restarted worker, dropped
    assert d[("dwdp_queue_depth", lab)] == 1.0  # gauge: the value after
    assert d[("dwdp_generated_tokens_total", lab)] == 4.0  # new series counts from 0


def _series(rank, **values):
    lab = (("group", "g0"), ("rank", str(rank)), ("role", "decode"), ("strategy", "dwdp"))
    return {(name, lab): v for name, v in values.items()}


def test_pool_evidence_by_hand():
    d = {}
    d.update(_series(0, dwdp_step_seconds_total=10.0, dwdp_step_compute_seconds_total=6.0,
                     dwdp_step_prefetch_wait_seconds_total=3.0, dwdp_step_sync_wait_seconds_total=1.0,
                     dwdp_steps_total=100.0, dwdp_tokens_total=400.0, dwdp_generated_tokens_total=100.0,
                     dwdp_remote_bytes_total=1e6, dwdp_kv_transfer_seconds_sum=0.15,
                     dwdp_kv_transfer_seconds_count=5.0, dwdp_queue_depth=2.0))
    d.update(_series(1, dwdp_step_seconds_total=6.0, dwdp_step_compute_seconds_total=3.0,
                     dwdp_step_prefetch_wait_seconds_total=2.0, dwdp_step_sync_wait_seconds_total=0.5,
                     dwdp_steps_total=60.0, dwdp_tokens_total=240.0, dwdp_generated_tokens_total=200.0,
                     dwdp_remote_bytes_total=2e6, dwdp_kv_transfer_seconds_sum=0.05,
                     dwdp_kv_transfer_seconds_count=5.0, dwdp_queue_depth=4.0))
    ev = sm.pool_evidence(d)
    # step 16 s in all: compute 9, prefetch 5, sync 1.5, the rest 0.5
    assert ev["compute_frac"] == pytest.approx(9 / 16)
    assert ev["prefetch_wait_frac"] == pytest.approx(5 / 16)
    assert ev["sync_wait_frac"] == pytest.approx(1.5 / 16)
    assert ev["other_frac"] == pytest.approx(0.5 / 16)
    assert ev["split_sum_frac"] == pytest.approx(15.5 / 16)
    assert ev["remote_bytes_per_generated_token"] == pytest.approx(3e6 / 300)
    assert ev["kv_transfer_ms_mean"] == pytest.approx(0.2 / 10 * 1e3)
    assert ev["tokens_per_step"] == pytest.approx(640 / 160)
    assert ev["mean_step_ms"] == pytest.approx(16 / 160 * 1e3)
    assert ev["rank_step_spread"] == pytest.approx(10 / 8)
    assert ev["queue_depth_mean"] == 3.0
    assert ev["strategy"] == "dwdp" and ev["role"] == "decode"


def test_graph_and_eager_steps_are_split():
    """Steps replayed from CUDA graphs and the others (eager prefill or mixed steps): count and mean each."""
    d = _series(0, dwdp_step_seconds_total=10.0, dwdp_steps_total=100.0, dwdp_graph_steps_total=80.0,
                dwdp_graph_step_seconds_total=2.0)
    ev = sm.pool_evidence(d)
    assert ev["graph_steps"] == 80.0
    assert ev["graph_step_ms_mean"] == pytest.approx(2.0 / 80 * 1e3)
    assert ev["other_step_ms_mean"] == pytest.approx(8.0 / 20 * 1e3)
    host = sm.pool_evidence(_series(0, dwdp_steps_total=100.0, dwdp_graph_steps_total=80.0,
                                    dwdp_step_launch_seconds_total=0.5, dwdp_graph_step_launch_seconds_total=0.1,
                                    dwdp_step_launch_cpu_seconds_total=0.2, dwdp_graph_step_launch_cpu_seconds_total=0.08,
                                    dwdp_device_steps_total=100.0, dwdp_step_device_seconds_total=4.24,
                                    dwdp_graph_step_device_seconds_total=0.24, dwdp_engine_loop_seconds_total=0.9,
                                    dwdp_engine_loop_cpu_seconds_total=0.3))
    assert host["loop_ms_mean"] == pytest.approx(9.0) and host["loop_cpu_ms_mean"] == pytest.approx(3.0)
    assert host["graph_launch_ms_mean"] == pytest.approx(100 / 80) and host["other_launch_ms_mean"] == pytest.approx(20)
    assert host["graph_launch_cpu_ms_mean"] == pytest.approx(1.0) and host["other_launch_cpu_ms_mean"] == pytest.approx(6)
    assert host["graph_device_ms_mean"] == pytest.approx(3.0) and host["other_device_ms_mean"] == pytest.approx(200)
    eager = sm.pool_evidence(_series(0, dwdp_step_seconds_total=10.0, dwdp_steps_total=100.0))
    assert eager["other_launch_ms_mean"] is None and eager["graph_device_ms_mean"] is None
    # the A/B report's table by step kind shows these means; a pool without the families gets no table
    from dynamo_dwdp.ab.report import _server_section
    host.update(graph_step_ms_mean=3.5, other_step_ms_mean=150.0)
    md = "\n".join(_server_section([{"label": "G", "points": [{"label": "c64", "server": {"decode": host}}]}]))
    assert "| G c64 | decode | graph | 80 | 3.50 | 1.25 | 1.00 | 3.00 |" in md
    assert "| G c64 | decode | other | 20 | 150.00 | 20.00 | 6.00 | 200.00 |" in md
    bare = "\n".join(_server_section([{"label": "G", "points": [{"label": "c64", "server": {"decode": eager}}]}]))
    assert "by kind" not in bare
    assert eager["graph_steps"] is None and eager["graph_step_ms_mean"] is None
    assert eager["other_step_ms_mean"] == pytest.approx(100.0)


def test_a_strategy_without_prefetch_still_gets_other_and_overlap_is_detected():
    dep = sm.pool_evidence(_series(0, dwdp_step_seconds_total=10.0, dwdp_step_compute_seconds_total=3.0,
                                   dwdp_step_sync_wait_seconds_total=5.0))
    assert dep["prefetch_wait_frac"] is None and dep["other_frac"] == pytest.approx(0.2)
    bad = sm.pool_evidence(_series(0, dwdp_step_seconds_total=10.0, dwdp_step_compute_seconds_total=3.0,
                                   dwdp_step_sync_wait_seconds_total=9.0))
    assert bad["split_sum_frac"] == pytest.approx(1.2) and bad["other_frac"] is None


def test_missing_families_are_none_not_a_crash():
    ev = sm.pool_evidence(_series(0, dwdp_step_seconds_total=5.0))
    assert ev["step_seconds"] == 5.0
    for k in ("compute_frac", "prefetch_wait_frac", "sync_wait_frac", "other_frac", "remote_bytes_per_generated_token",
              "kv_transfer_ms_mean", "tokens_per_step", "rank_step_spread", "queue_depth_mean"):
        assert ev[k] is None, k
    empty = sm.pool_evidence({})
    assert all(v is None for k, v in empty.items() if k not in ("scraped", "scrape_failed"))
    # zero denominators are n/a too
    ev = sm.pool_evidence(_series(0, dwdp_step_seconds_total=0.0, dwdp_step_compute_seconds_total=0.0,
                                  dwdp_remote_bytes_total=5.0, dwdp_generated_tokens_total=0.0))
    assert ev["compute_frac"] is None and ev["remote_bytes_per_generated_token"] is None


def test_evidence_merges_ranks_and_counts_failed_scrapes():
    def text(rank, step, gen):
        lab = f'strategy="dep",role="decode",group="g0",rank="{rank}"'
        return (f"dwdp_step_seconds_total{{{lab}}} {step}\ndwdp_step_sync_wait_seconds_total{{{lab}}} {step / 4}\n"
                f"dwdp_generated_tokens_total{{{lab}}} {gen}\n")

    before = {"u0": text(0, 1.0, 10), "u1": text(1, 1.0, 10), "u2": None, "p0": "garbage"}
    after = {"u0": text(0, 3.0, 30), "u1": text(1, 5.0, 50), "u2": text(2, 9.0, 9), "p0": "garbage"}
    ev = sm.evidence(before, after, {"decode": ["u0", "u1", "u2"], "prefill": ["p0"]})
    dec = ev["decode"]
    assert dec["scraped"] == 2 and dec["scrape_failed"] == 1
    assert dec["step_seconds"] == pytest.approx(2 + 4)
    assert dec["sync_wait_frac"] == pytest.approx((0.5 + 1.0) / 6)
    assert dec["generated_tokens"] == 60 and dec["strategy"] == "dep"
    assert ev["prefill"]["scraped"] == 1 and ev["prefill"]["step_seconds"] is None


def test_scrape_fake_workers_including_failures():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/metrics"
    with FakeFrontend() as fe:
        fe.state.tokens_served = 8
        got = asyncio.run(sm.scrape([f"{fe.url}/metrics/decode/0", f"{fe.url}/v1/nothing", dead]))
    assert "dwdp_generated_tokens_total" in got[f"{fe.url}/metrics/decode/0"]
    assert got[f"{fe.url}/v1/nothing"] is None and got[dead] is None
    assert asyncio.run(sm.scrape([])) == {}


def test_group_by_pool_merges_launcher_groups():
    urls = {"decode-g0": ["a", "b"], "decode-g1": ["c"], "prefill-g0": ["p"], "decode-extra": ["x"], "agg": ["g"],
            "prefill-big-g0": ["q"]}
    got = sm.group_by_pool(urls, ["decode", "prefill", "agg", "prefill-big"])
    assert got == {"decode": ["a", "b", "c"], "prefill": ["p"], "decode-extra": ["x"], "agg": ["g"],
                   "prefill-big": ["q"]}


def test_the_workers_step_time_counters_reach_the_evidence_by_name():
    """A worker's `WorkerMetrics` refreshed from ExecutorStats, scraped before and after a point, gives
    the evidence its per-kind means: the exporter's and the reader's metric names agree."""
    from prometheus_client import generate_latest

    from dynamo_dwdp.model.step_stats import ExecutorStats
    from dynamo_dwdp.worker.metrics import WorkerMetrics

    m, st = WorkerMetrics("dwdp", "decode", "g0", 0), ExecutorStats()
    m.refresh(st)
    before = generate_latest(m.registry).decode()
    st.steps, st.graph_steps, st.device_steps = 10, 8, 10
    st.launch_seconds, st.graph_launch_seconds = 0.05, 0.016
    st.launch_cpu_seconds, st.graph_launch_cpu_seconds = 0.03, 0.008
    st.device_seconds, st.graph_device_seconds = 0.5, 0.1
    st.loop_seconds, st.loop_cpu_seconds = 0.6, 0.2
    m.refresh(st)
    ev = sm.evidence({"u": before}, {"u": generate_latest(m.registry).decode()}, {"decode": ["u"]})["decode"]
    assert ev["graph_launch_ms_mean"] == pytest.approx(2.0) and ev["other_launch_ms_mean"] == pytest.approx(17.0)
    assert ev["graph_launch_cpu_ms_mean"] == pytest.approx(1.0) and ev["other_launch_cpu_ms_mean"] == pytest.approx(11.0)
    assert ev["graph_device_ms_mean"] == pytest.approx(12.5) and ev["other_device_ms_mean"] == pytest.approx(200.0)
    assert ev["loop_ms_mean"] == pytest.approx(60.0) and ev["loop_cpu_ms_mean"] == pytest.approx(20.0)
