"""The four output files from a hand-made results dict (incl. missing values, NaN and a failed graph).

References: the hand-made dict itself (CSV read back with the csv module, JSON with json), the PNG
signature, and the numbers written into the dict by hand.
"""
from __future__ import annotations

import csv
import json
import math

import pytest

from dynamo_dwdp.ab import report


def summary(tps_user, tps_gpu, **kw):
    s = {"requests": 8, "sent": 8, "ok": 8, "failed": 0, "errors": {}, "first_error": None, "duration_s": 2.0,
         "num_gpus": 3, "ttft_ms_p50": 120.0, "ttft_ms_p99": 300.0, "itl_ms_p50": 12.5, "itl_ms_p99": 20.0,
         "tpot_ms_p50": 12.0, "tps_user": tps_user, "output_tps": tps_gpu * 3 if tps_gpu is not None else None,
         "tps_gpu": tps_gpu, "good": 8, "good_fraction": 1.0, "goodput_rps": 4.0, "goodput_tps_gpu": tps_gpu,
         "isl_mean": 96.0, "osl_mean": 24.0, "osl_mismatch": 0}
    s.update(kw)
    return s


def results_dict():
    ev = {"decode": {"strategy": "dwdp", "compute_frac": 0.5, "prefetch_wait_frac": 0.25, "sync_wait_frac": None,
                     "other_frac": None, "mean_step_ms": 4.0, "tokens_per_step": 2.0,
                     "remote_bytes_per_generated_token": 1.5e6, "kv_transfer_ms_mean": None,
                     "rank_step_spread": 1.1, "scraped": 2, "scrape_failed": 0}}
    return {
        "schema": "dynamo-dwdp-ab/1", "client": "native", "workload_file": "configs/workloads/x.yaml",
        "workload": {"name": "x", "description": "d", "endpoint": "completions", "prompt_format": "tokens",
                     "isl": {"mean": 96, "cv": 0.2, "dist": "lognormal", "min": 16, "max": 384},
                     "osl": {"mean": 24, "cv": 0.0, "dist": "lognormal", "min": 1, "max": None},
                     "load": {"concurrency": [1, 4], "request_rate": None, "scale": "total", "arrival": "poisson"},
                     "requests_per_point": 8, "requests_per_concurrency": 0, "warmup_requests": 2,
                     "shared_prefix_ratio": 0.25, "expert_skew": {"hot_experts": [0, 1], "bias": 2.0},
                     "slo": {"ttft_ms": 1000.0, "tpot_ms": None}, "seed": 0, "ignore_eos": True},
        "graphs": [
            {"label": "A", "key": "A-dep", "name": "dep", "path": "graphs/a.yaml", "num_gpus": 3, "status": "ok",
             "pools": [{"name": "decode", "role": "decode", "strategy": "dep", "ranks": 2, "replicas": 1}],
             "points": [{"label": "c1", "concurrency": 1, "request_rate": None, "summary": summary(50.0, 10.0),
                         "server": {}},
                        {"label": "c4", "concurrency": 4, "request_rate": None,
                         "summary": summary(30.0, float("nan"), failed=2, ok=6,
                                            errors={"http 400": 2}, first_error="http 400: no"),
                         "server": {}}],
             "frontier": ["c1"], "plan": None},
            {"label": "B", "key": "B-dwdp", "name": "dwdp", "path": "graphs/b.yaml", "num_gpus": 3, "status": "ok",
             "pools": [{"name": "decode", "role": "decode", "strategy": "dwdp", "ranks": 2, "replicas": 1}],
             "points": [{"label": "c1", "concurrency": 1, "request_rate": None, "summary": summary(60.0, 12.0),
                         "server": ev, "aiperf": {"request_count": 8.0, "tps_user_mean": 59.0}},
                        {"label": "c4", "concurrency": 4, "request_rate": None, "summary": summary(20.0, 30.0),
                         "server": ev}],
             "frontier": ["c4", "c1"],
             "plan": {"gpu": "h200", "caveat": "CPU caveat.", "pools": [
                 {"pool": "decode", "phase": "decode", "ranks": 2, "note": None, "points": [
                     {"point": "c1", "tokens_per_iter": 2.0, "tokens_source": "measured", "t_compute_ms": 0.0123,
                      "t_prefetch_ms": 0.5, "t_exposed_ms": 0.4877, "predicted_exposed_frac": 0.9754,
                      "measured_prefetch_wait_frac": 0.25}]}]}},
            {"label": "C", "key": "C-tp", "name": "tp", "path": "graphs/c.yaml", "num_gpus": 3,
             "status": "failed: launch: RuntimeError: boom", "pools": [], "points": [], "frontier": [], "plan": None},
        ],
        "comparisons": [
            {"baseline": "A", "candidate": "B", "baseline_name": "dep", "candidate_name": "dwdp",
             "range_a": [50.0, 50.0], "range_b": [20.0, 60.0], "matched_range": [50.0, 50.0], "mean": 1.25,
             "min": 1.25, "max": 1.25,
             "samples": [{"tps_user": 50.0, "tps_gpu_a": 10.0, "tps_gpu_b": 12.5, "ratio": 1.25, "grid": True}],
             "same_point": [{"point": "c1", "tps_gpu_a": 10.0, "tps_gpu_b": 12.0, "tps_gpu_ratio": 1.2,
                             "tps_user_a": 50.0, "tps_user_b": 60.0, "tps_user_ratio": 1.2}]},
            {"baseline": "A", "candidate": "C", "baseline_name": "dep", "candidate_name": "tp",
             "range_a": [50.0, 50.0], "range_b": None, "matched_range": None, "mean": None, "min": None,
             "max": None, "samples": [], "note": "a graph has no successful point"},
        ],
    }


def test_all_files_and_no_nan(tmp_path):
    paths = report.write_all(results_dict(), tmp_path)
    assert {p.name for p in paths.values()} == {"results.json", "results.csv", "pareto.png", "report.md"}
    text = (tmp_path / "results.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    data = json.loads(text)
    assert data["graphs"][0]["points"][1]["summary"]["tps_gpu"] is None  # NaN became null
    assert (tmp_path / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob("*.tmp*"))  # atomic writes leave no temporaries


def test_csv_rows(tmp_path):
    report.write_csv(results_dict(), tmp_path / "r.csv")
    with (tmp_path / "r.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == report.CSV_COLUMNS
    assert [(r["graph_label"], r["point"], r["on_frontier"]) for r in rows] == [
        ("A", "c1", "True"), ("A", "c4", "False"), ("B", "c1", "True"), ("B", "c4", "True")]
    assert rows[1]["tps_gpu"] == "" and rows[1]["failed"] == "2"
    assert float(rows[2]["tps_gpu"]) == 12.0 and float(rows[2]["tps_user"]) == 60.0 and rows[2]["num_gpus"] == "3"


def test_markdown_content():
    md = report.render_markdown(report.clean(results_dict()))
    assert "# A/B report: dep vs dwdp vs tp" in md
    assert "**B (dwdp) / A (dep): 1.250x** TPS/GPU" in md and "matched range 50.0–50.0" in md
    assert "A covers TPS/user 50.0–50.0, B covers 20.0–60.0" in md
    assert "**C / A: not comparable** (a graph has no successful point)" in md and "C has no successful point" in md
    assert "| C | tp | `graphs/c.yaml` | 3 |  | failed: launch: RuntimeError: boom |" in md
    assert "| c4 | 4 | 6/2 | 120.0 / 300.0 | 12.50 / 20.00 | 12.00 | 30.0 | n/a |" in md
    assert "- c4: 2 failed (http 400 x2); first: `http 400: no`" in md
    assert "ISL: mean 96, CV 20%, lognormal (clipped: min 16, max 384); OSL: mean 24, CV 0%" in md
    assert "hot experts [0, 1], bias 2.0" in md and "TTFT <= 1000 ms, TPOT not bounded" in md
    # server evidence, missing families as n/a, bytes/token formatted
    assert "| B c1 | decode | dwdp | 50.0% | 25.0% | n/a | n/a | 4.00 | 2.0 | 1.5e+06 | n/a | 1.10 | 2/2 |" in md
    # plan section
    assert "`dynamo-dwdp plan` model on **h200**" in md and "CPU caveat." in md
    assert "| decode | c1 | decode | 2.0 | measured | 0.012 | 0.500 | 97.5% | 25.0% |" in md
    assert "| c1 | 10.0 | 12.0 | 1.200 | 50.0 | 60.0 | 1.200 |" in md
    assert "aiperf's own numbers" in md and "No finished point (failed: launch" in md


def test_plot_with_no_points(tmp_path):
    res = results_dict()
    for g in res["graphs"]:
        g["points"] = []
    report.plot_pareto(res, tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("x, out", [(None, "n/a"), (float("nan"), "n/a"), (3, "3"), (2.345, "2.3"),
                                    (1.5e6, "1.5e+06"), (0.25, "0.2")])
def test_fmt(x, out):
    assert report.fmt(x) == out
    assert report.fmt(0.125, 1, pct=True) == "12.5%"


def test_clean():
    assert report.clean({"a": [1.0, float("inf"), {"b": float("nan")}], 3: (1, 2)}) == \
        {"a": [1.0, None, {"b": None}], "3": [1, 2]}
    assert math.isfinite(report.clean(1e308))


def test_fractions_above_one_are_flagged():
    res = results_dict()
    res["graphs"][0]["points"][0]["server"] = {"decode": {"strategy": "dep", "sync_wait_frac": 1.06, "scraped": 2,
                                                          "scrape_failed": 0},
                                               "prefill": {"strategy": "dep", "compute_frac": 0.2,
                                                           "sync_wait_frac": 0.9, "split_sum_frac": 1.1,
                                                           "scraped": 1, "scrape_failed": 0}}
    md = report.render_markdown(report.clean(res))
    assert "| A c1 | decode | dep | n/a | n/a | 106.0% (!) |" in md
    assert "| A c1 | prefill | dep | 20.0% | n/a | 90.0% | (!) |" in md
    assert ("(!) above 100% of step time (A c1 decode sync_wait_frac; A c1 prefill compute+prefetch+sync = 110.0%)"
            in md)
