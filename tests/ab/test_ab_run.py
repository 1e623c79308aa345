"""`dynamo-dwdp ab` end to end on CPU with a fake launcher (the real launcher is not under test here).

The fake `serve_graph` starts the fake frontend of tests/ab/test_ab_fakes.py per graph, with per-graph
delays, and reports the graph's real GPU count (sum of ranks x replicas). References: the fake's
request counters and bodies, the per-request rows the harness writes (recomputed here by hand),
numpy interpolation of the frontiers read back from results.csv, and the fake's metric ratios.
"""
from __future__ import annotations

import contextlib
import csv
import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from dynamo_dwdp.ab import harness
from dynamo_dwdp.ab.workload import HFTokenizer
from dynamo_dwdp.cli import main as cli_main
from dynamo_dwdp.config.graph import load_graph
from dynamo_dwdp.errors import UserError
from dynamo_dwdp.synthetic.tokenizer import write_tokenizer_files
from tests.ab.test_ab_fakes import FakeFrontend

GRAPH = """\
name: {name}
pools:
  - {{name: prefill, role: prefill, strategy: single, ranks: 1, replicas: 1}}
  - {{name: decode, role: decode, strategy: {strategy}, ranks: {ranks}, replicas: 1}}
"""

WORKLOAD = """\
name: run-test
endpoint: completions
prompt_format: tokens
isl: {{mean: 16, cv: 0.0}}
osl: {{mean: 6, cv: 0.0}}
load: {{concurrency: [1, 2]}}
requests_per_point: 4
warmup_requests: 1
slo: {{ttft_ms: 5000, tpot_ms: 1000}}
seed: {seed}
expert_skew: {skew}
request_timeout_s: 20
point_timeout_s: 60
"""


class FakeLauncher:
    """Stands in for dynamo_dwdp.launch.launcher.serve_graph."""

    def __init__(self, speeds: dict[str, tuple[float, float]], fail: tuple[str, ...] = (),
                 families: dict[str, str] | None = None, fail_status: dict[str, int] | None = None,
                 slowdown: dict[str, float] | None = None):
        self.speeds, self.fail, self.families = speeds, fail, families or {}
        self.slowdown = slowdown or {}
        self.fail_status = fail_status or {}
        self.refuse_after: dict[str, int] = {}
        self.calls: list[dict] = []
        self.requests: dict[str, int] = {}
        self.bodies: dict[str, list] = {}

    def __call__(self, graph_path, config_paths, overrides=None, log_dir=None, http_port=0, infra=None):
        return self._serve(graph_path, config_paths, overrides, log_dir)

    @contextlib.contextmanager
    def _serve(self, graph_path, config_paths, overrides, log_dir):
        g = load_graph(graph_path)
        self.calls.append({"graph": g.name, "overrides": overrides, "log_dir": log_dir, "configs": config_paths})
        if g.name in self.fail:
            raise RuntimeError("boom")
        first, chunk = self.speeds[g.name]
        with FakeFrontend(first_delay_s=first, chunk_delay_s=chunk, metrics_families=self.families.get(g.name, "all"),
                          fail_status=self.fail_status.get(g.name),
                          slowdown_per_inflight=self.slowdown.get(g.name, 0.0),
                          refuse_after=self.refuse_after.get(g.name)) as fe:
            # like the real launcher: one component per group, `<pool>-g<index>`, one URL per rank
            urls = {f"{p.name}-g{k}": [f"{fe.url}/metrics/{p.name}/{k * p.ranks + r}?strategy={p.strategy}&role={p.role}"
                                       for r in range(p.ranks)] for p in g.pools for k in range(p.replicas)}
            try:
                yield SimpleNamespace(url=fe.url, model_name="tiny", num_gpus=g.processes, worker_metrics_urls=urls,
                                      graph=g)
            finally:
                self.requests[g.name] = self.requests.get(g.name, 0) + fe.state.requests
                self.bodies.setdefault(g.name, []).extend(fe.state.bodies)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    write_tokenizer_files(d, 1024, 2048)
    return HFTokenizer(d / "tokenizer.json")


@pytest.fixture
def files(tmp_path):
    a = tmp_path / "base.yaml"
    a.write_text(GRAPH.format(name="base", strategy="dep", ranks=2))  # 3 GPUs
    b = tmp_path / "fast.yaml"
    b.write_text(GRAPH.format(name="fast", strategy="dwdp", ranks=4))  # 5 GPUs
    w = tmp_path / "w.yaml"
    w.write_text(WORKLOAD.format(seed=0, skew="null"))
    return SimpleNamespace(a=str(a), b=str(b), w=str(w), out=tmp_path / "out", tmp=tmp_path)


def launcher():
    """Both fakes slow down with load, so their TPS/user ranges overlap: per-request decode speed is
    ~1/(chunk x (1 + 0.5 x (in flight - 1))): base ~100 tok/s at c1 and ~67 at c2, fast ~125 and ~83;
    throughput still grows by 1/3 from c1 to c2, so both points stay on each frontier."""
    return FakeLauncher({"base": (0.02, 0.010), "fast": (0.015, 0.008)}, families={"base": "partial"},
                        slowdown={"base": 0.5, "fast": 0.5})


def run(files, fake, tokenizer, **kw):
    kw.setdefault("progress", False)
    return harness.run_ab([files.a, files.b], workload_path=files.w, out_dir=str(files.out), serve=fake,
                     tokenizer=tokenizer, **kw)


def rows_of(out: Path, key: str, label: str) -> list[dict]:
    return [json.loads(x) for x in (out / "points" / key / f"{label}.requests.jsonl").read_text().splitlines()]


def test_full_run_writes_consistent_results(files, tokenizer, capsys):
    fake = launcher()
    res = run(files, fake, tokenizer, progress=True)
    assert "req" in capsys.readouterr().err  # the tqdm bar ran
    out = files.out
    for name in ("results.json", "results.csv", "pareto.png", "report.md"):
        assert (out / name).is_file(), name
    text = (out / "results.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # each graph: warm-up 1 + 2 points x 4 requests, launched once, in order A then B
    assert [c["graph"] for c in fake.calls] == ["base", "fast"]
    assert fake.requests == {"base": 9, "fast": 9}
    assert fake.calls[0]["overrides"] is None  # no skew in this workload
    # the same prompts, in the same order, reached both graphs
    assert [b["prompt"] for b in fake.bodies["base"]] == [b["prompt"] for b in fake.bodies["fast"]]
    assert all(len(b["prompt"]) == 16 and b["max_tokens"] == 6 and b["ignore_eos"] for b in fake.bodies["base"])

    graphs = {g["label"]: g for g in res["graphs"]}
    assert graphs["A"]["num_gpus"] == 3 and graphs["B"]["num_gpus"] == 5
    for label, g in graphs.items():
        assert g["status"] == "ok" and [p["label"] for p in g["points"]] == ["c1", "c2"]
        for pt in g["points"]:
            s = pt["summary"]
            assert (s["requests"], s["sent"], s["ok"], s["failed"]) == (4, 4, 4, 0)
            assert s["isl_mismatch"] == 0 and s["osl_mismatch"] == 0 and s["isl_mean"] == 16
            rows = rows_of(out, g["key"], pt["label"])
            assert len(rows) == 4
            # recompute from the rows: window, output TPS, TPS/GPU with the graph's real GPU count
            window = max(r["end_s"] for r in rows) - min(r["start_s"] for r in rows)
            tokens = sum(r["output_tokens"] for r in rows)
            assert s["duration_s"] == pytest.approx(window)
            assert s["output_tps"] == pytest.approx(tokens / window)
            assert s["tps_gpu"] == pytest.approx(tokens / window / g["num_gpus"])
            assert s["tps_user"] == pytest.approx(1 / np.mean([r["tpot_s"] for r in rows]))
            assert s["tps_user_mean"] == pytest.approx(np.mean([1 / r["tpot_s"] for r in rows]))
            for k, v in s.items():
                assert not (isinstance(v, float) and math.isnan(v)), k
    # server-side evidence: the fake reports compute 60% / prefetch 30% / sync 10%, 1000 B per token
    ev_b = graphs["B"]["points"][0]["server"]["decode"]
    assert ev_b["scraped"] == 4 and ev_b["compute_frac"] == pytest.approx(0.6)
    assert ev_b["prefetch_wait_frac"] == pytest.approx(0.3) and ev_b["sync_wait_frac"] == pytest.approx(0.1)
    assert ev_b["remote_bytes_per_generated_token"] == pytest.approx(1000.0)
    ev_a = graphs["A"]["points"][0]["server"]["decode"]  # "partial" families: no prefetch/remote/KV
    assert ev_a["compute_frac"] == pytest.approx(0.6) and ev_a["prefetch_wait_frac"] is None
    assert ev_a["remote_bytes_per_generated_token"] is None

    # the matched ratio equals numpy interpolation of the frontiers read back from results.csv
    with (out / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4

    def frontier(label):
        pts = sorted((float(r["tps_user"]), float(r["tps_gpu"])) for r in rows
                     if r["graph_label"] == label and r["on_frontier"] == "True")
        return [p[0] for p in pts], [p[1] for p in pts]

    (xa, ya), (xb, yb) = frontier("A"), frontier("B")
    comp = res["comparisons"][0]
    lo, hi = max(xa[0], xb[0]), min(xa[-1], xb[-1])
    assert lo < hi, (xa, xb)  # the fakes are built to overlap
    assert comp["matched_range"] == pytest.approx([lo, hi])
    assert comp["samples"] and comp["mean"] is not None
    for s in comp["samples"]:
        x = s["tps_user"]
        assert lo <= x <= hi
        assert s["ratio"] == pytest.approx(np.interp(x, xb, yb) / np.interp(x, xa, ya), rel=1e-9)
    grid = [s["ratio"] for s in comp["samples"] if s["grid"]]
    assert len(grid) == 11 and comp["mean"] == pytest.approx(np.mean(grid))
    md = (out / "report.md").read_text()
    assert f"**B (fast) / A (base): {comp['mean']:.3f}x**" in md
    assert f"matched range {lo:.1f}–{hi:.1f}" in md
    assert "## Server-side evidence" in md and "60.0%" in md and "n/a" in md
    assert "| A c1 | decode | dep |" in md and "| B c1 | decode | dwdp |" in md


def test_resume_runs_only_missing_points(files, tokenizer):
    run(files, launcher(), tokenizer)
    first = json.loads((files.out / "results.json").read_text())
    (files.out / "points" / "B-fast" / "c2.json").unlink()
    with pytest.raises(UserError, match="already holds results"):
        run(files, launcher(), tokenizer)
    fake = launcher()
    res = run(files, fake, tokenizer, resume=True)
    assert [c["graph"] for c in fake.calls] == ["fast"]  # A is complete: not even launched
    assert fake.requests == {"fast": 1 + 4}  # warm-up + the one missing point
    a_before = [p["summary"] for p in first["graphs"][0]["points"]]
    a_after = [p["summary"] for p in res["graphs"][0]["points"]]
    assert a_before == a_after
    assert [p["label"] for p in res["graphs"][1]["points"]] == ["c1", "c2"]
    # a resume with nothing missing launches nothing
    fake2 = launcher()
    run(files, fake2, tokenizer, resume=True)
    assert fake2.calls == []


def test_resume_refuses_a_different_workload(files, tokenizer):
    run(files, launcher(), tokenizer)
    Path(files.w).write_text(WORKLOAD.format(seed=1, skew="null"))
    with pytest.raises(UserError, match="different workload"):
        run(files, launcher(), tokenizer, resume=True)
    fake = launcher()
    run(files, fake, tokenizer, overwrite=True)
    assert fake.requests == {"base": 9, "fast": 9}


def test_a_failed_launch_is_reported_and_resumable(files, tokenizer):
    fake = FakeLauncher({"base": (0.01, 0.005), "fast": (0.01, 0.005)}, fail=("fast",))
    res = run(files, fake, tokenizer)
    g = {x["label"]: x for x in res["graphs"]}
    assert g["A"]["status"] == "ok" and len(g["A"]["points"]) == 2
    assert g["B"]["status"] == "failed: launch: RuntimeError: boom" and g["B"]["points"] == []
    assert res["comparisons"][0]["mean"] is None
    md = (files.out / "report.md").read_text()
    assert "failed: launch: RuntimeError: boom" in md and "not comparable" in md
    fake2 = FakeLauncher({"base": (0.01, 0.005), "fast": (0.01, 0.005)})
    res2 = run(files, fake2, tokenizer, resume=True)
    assert [c["graph"] for c in fake2.calls] == ["fast"]
    assert all(x["status"] == "ok" for x in res2["graphs"])


def test_warmup_failure_stops_only_that_graph(files, tokenizer):
    fake = FakeLauncher({"base": (0.01, 0.005), "fast": (0.01, 0.005)}, fail_status={"base": 503})
    res = run(files, fake, tokenizer)
    g = {x["label"]: x for x in res["graphs"]}
    assert g["A"]["status"].startswith("failed: warm-up: all 1 requests failed (first: http 503")
    assert fake.requests["base"] == 1  # nothing after the failed warm-up
    assert g["B"]["status"] == "ok" and len(g["B"]["points"]) == 2


def test_expert_skew_reaches_the_launcher(files, tokenizer):
    Path(files.w).write_text(WORKLOAD.format(seed=0, skew="{hot_experts: 2, bias: 1.5}"))
    fake = launcher()
    run(files, fake, tokenizer)
    assert [c["overrides"] for c in fake.calls] == [{"expert_skew": {"hot_experts": [0, 1], "bias": 1.5}}] * 2
    assert all(c["log_dir"].endswith(("A-base", "B-fast")) for c in fake.calls)


def test_report_only_rebuilds_from_points(files, tokenizer):
    run(files, launcher(), tokenizer)
    (files.out / "report.md").unlink()
    res = harness.report_only([files.a, files.b], workload_path=files.w, out_dir=str(files.out))
    assert (files.out / "report.md").is_file() and len(res["graphs"][1]["points"]) == 2


def test_plan_prediction_for_a_dwdp_pool(files):
    from dynamo_dwdp.planner.hardware import get_hardware
    from dynamo_dwdp.planner.roofline import load_model_shape, plan_layer
    from dynamo_dwdp.ab.workload import load_workload

    model_dir = Path(__file__).resolve().parents[1] / "fixtures" / "deepseek-v2-lite"
    entry = harness._graph_entries([files.b])[0]
    wl = load_workload(files.w)
    points = [{"label": "c1", "concurrency": 1, "summary": {"isl_mean": 16, "osl_mean": 6},
               "server": {"decode": {"tokens_per_step": 3.0, "prefetch_wait_frac": 0.25}}},
              {"label": "c2", "concurrency": 8, "summary": {"isl_mean": 16, "osl_mean": 6}, "server": {}}]
    plan = harness.plan_for_graph(entry, model_dir, wl, points)
    (pool,) = plan["pools"]
    assert pool["pool"] == "decode" and pool["phase"] == "decode" and plan["gpu"] == "h200"
    r1, r2 = pool["points"]
    assert (r1["tokens_source"], r1["tokens_per_iter"]) == ("measured", 3.0)
    assert (r2["tokens_source"], r2["tokens_per_iter"]) == ("estimate", 2.0)  # 8 in flight over 4 ranks
    ref = plan_layer(load_model_shape(model_dir), get_hardware("h200"), 4, 3.0, phase="decode", context=16 + 3)
    assert r1["t_compute_ms"] == pytest.approx(ref.t_compute_ms) and r1["t_prefetch_ms"] == pytest.approx(ref.t_prefetch_ms)
    assert r1["measured_prefetch_wait_frac"] == 0.25
    assert harness.plan_for_graph(entry, files.tmp / "no-model", wl, points)["note"].startswith("no config.json")
    assert harness.plan_for_graph(harness._graph_entries([files.a])[0], model_dir, wl, points) is None  # no dwdp pool


def test_cli_help_teaches():
    with pytest.raises(SystemExit) as e:
        cli_main(["ab", "--help"])
    assert e.value.code == 0


def test_cli_help_text(capsys):
    with pytest.raises(SystemExit):
        cli_main(["ab", "--help"])
    text = capsys.readouterr().out
    for needle in ("examples:", "--resume", "--workload", "--client", "pareto.png", "matched TPS/user",
                   "dynamo-dwdp ab graphs/disagg_dep.yaml graphs/disagg_dwdp_decode.yaml"):
        assert needle in text, needle


def test_cli_runs_with_the_launcher_swapped(files, tokenizer, monkeypatch, capsys):
    fake = launcher()
    monkeypatch.setattr(harness, "_default_serve", lambda: fake)
    monkeypatch.setattr(harness, "load_tokenizer", lambda _d: tokenizer)
    cfg = files.tmp / "cfg.yaml"
    cfg.write_text(f"model: {{path: {files.tmp / 'model'}}}\n")
    rc = cli_main(["ab", files.a, files.b, "-f", str(cfg), "--workload", files.w, "--out", str(files.out),
                   "--no-progress"])
    text = capsys.readouterr().out
    assert rc == 0 and "wrote" in text and ("B/A TPS/GPU at matched TPS/user" in text or "not comparable" in text)
    assert fake.calls[0]["configs"] == [str(cfg)]
    rc = cli_main(["ab", files.a, files.b, "--workload", files.w, "--out", str(files.out), "--resume", "--overwrite"])
    assert rc == 2 and "exclude each other" in capsys.readouterr().err
    rc = cli_main(["ab", files.a, "--workload", files.w, "--out", str(files.tmp / "empty"), "--report-only"])
    assert rc == 2 and "no points/ directory" in capsys.readouterr().err


def test_aiperf_client_through_the_harness(files, tokenizer, tmp_path):
    from tests.ab.test_ab_aiperf import _fake_aiperf

    exe = _fake_aiperf(tmp_path)
    res = run(files, launcher(), tokenizer, client="aiperf", aiperf_executable=str(exe))
    pt = res["graphs"][0]["points"][0]
    assert pt["summary"]["ok"] == 12 and pt["summary"]["failed"] == 2  # what the (fake) aiperf wrote
    assert pt["aiperf"]["request_count"] == 12
    inputs = files.out / "aiperf" / "A-base" / "c1" / "inputs.jsonl"
    assert len(inputs.read_text().splitlines()) == 4
    with pytest.raises(UserError, match="pip install aiperf"):
        run(files, launcher(), tokenizer, client="aiperf", aiperf_executable="/nonexistent/aiperf", overwrite=True)


def test_a_graph_that_dies_mid_sweep_leaves_the_point_for_resume(files, tokenizer):
    fake = launcher()
    fake.refuse_after = {"fast": 1}  # B's frontend dies right after the warm-up request
    res = run(files, fake, tokenizer)
    g = {x["label"]: x for x in res["graphs"]}
    assert g["A"]["status"] == "ok"
    assert g["B"]["status"].startswith("failed: c1: the graph stopped answering (first: connection")
    assert not (files.out / "points" / "B-fast" / "c1.json").exists()
    fake = launcher()
    run(files, fake, tokenizer, resume=True)
    assert [c["graph"] for c in fake.calls] == ["fast"] and fake.requests == {"fast": 1 + 2 * 4}
