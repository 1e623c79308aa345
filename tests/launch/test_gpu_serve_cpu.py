"""`scripts/gpu_serve.py --device cpu`: the GPU serving command's whole flow on the tiny model.

Both graphs serve every request of the sweep; the disaggregated graph moved KV over the local path
(shared memory on CPU) and its greedy completions equal the aggregated graph's (the independent
reference: the same model computing prompt and output in one process); bench engine ran at the
largest concurrency; the files the GPU run brings back are all there.
"""
from __future__ import annotations

import json
import os
import subprocess

import pytest

from tests.conftest import PY, REPO

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def test_gpu_serve_flow_on_cpu(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    p = subprocess.run([PY, "scripts/gpu_serve.py", "--device", "cpu", "--out", str(out), "--work", str(work),
                        "--concurrency", "1,2", "--requests-per-point", "2", "--requests-per-concurrency", "0",
                        "--warmup", "1", "--point-timeout", "120"],
                       cwd=str(REPO), env=env, capture_output=True, text=True, timeout=540)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert {"serve.md", "serve.json", "pareto.png", "report.md", "results.json", "logs.tar.xz"} <= set(os.listdir(out))
    doc = json.loads((out / "serve.json").read_text())
    points = doc["summary"]["points"]
    assert {(pt["graph"], pt["concurrency"]) for pt in points} == {(g, c) for g in ("agg", "disagg-single")
                                                                  for c in (1, 2)}
    assert all(pt["ok"] == pt["sent"] == 2 for pt in points)
    assert all(pt["kv"] and pt["kv"]["kv_transfers"] >= 2 for pt in points if pt["graph"] == "disagg-single")
    assert all(pt["kv"] is None for pt in points if pt["graph"] == "agg")
    probes = doc["summary"]["probes"]
    assert isinstance(probes["agg"], list) and probes["agg"] == probes["disagg-single"]
    # the same prompts through one in-process engine (fp32: both forwards exact) give the served text
    paths = doc["summary"]["first_token_paths"]
    assert paths["match_whole"] == {"agg": "both", "disagg-single": "both"}
    assert paths["match"] == {"agg": ["both"] * 2, "disagg-single": ["both"] * 2}
    assert doc["bench"]["tokens_per_s_per_gpu"] > 0 and doc["summary"]["bench"]["batch"] == 2
    assert doc["bench_prefill"]["setup"]["phase"] == "prefill" and doc["summary"]["bench_prefill"]["tokens_per_s"] > 0
    assert set(doc["summary"]["vs_expected"]) == {"agg", "disagg-single"}
    assert all(v["ratio"] > 0 for v in doc["summary"]["vs_expected"].values())
    mix = doc["engine_mix"]                     # the engine alone on the largest point's workload
    assert (mix["concurrency"], mix["requests"], mix["osl"]) == (2, 2, 8) and mix["generated"] == 2 * 8
    assert set(doc["summary"]["vs_engine_mix"]) == {"agg", "disagg-single"}
    results = json.loads((out / "results.json").read_text())
    assert [g["name"] for g in results["graphs"]] == ["agg", "disagg-single"]


def test_expected_output_tps_adds_prompt_and_decode_time():
    """4 requests of 1000-token prompts at 10,000 prompt tokens/s (0.4 s) and 100 output tokens each in
    steps of 2 sequences at 10 ms (200 steps, 2 s): 400 tokens in 2.4 s."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_serve", REPO / "scripts" / "gpu_serve.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    point = {"concurrency": 2, "summary": {"ok": 4, "isl_mean": 1000}}
    decode = {"step_ms": {"mean": 10.0}}
    prefill = {"tokens": {"counted": 50_000}, "wall_s": 5.0}
    assert mod.expected_output_tps(point, decode, prefill, 100) == pytest.approx(400 / 2.4)
    assert mod.expected_output_tps(point, None, prefill, 100) is None


def test_gpu_serve_serves_a_given_model_without_writing_one(tmp_path):
    """--model: the given folder is served as it is (not rewritten, nothing written in --work's model/);
    a folder without config.json is a one-line error."""
    model, out, work = tmp_path / "model", tmp_path / "out", tmp_path / "work"
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    subprocess.run([PY, "-m", "dynamo_dwdp.cli", "make-model", str(model), "--preset", "tiny", "-q"], cwd=str(REPO),
                   env=env, check=True, timeout=300)
    stamp = os.stat(model / "config.json").st_mtime_ns
    p = subprocess.run([PY, "scripts/gpu_serve.py", "--device", "cpu", "--out", str(out), "--work", str(work),
                        "--model", str(model), "--graphs", "graphs/agg.yaml", "--concurrency", "1",
                        "--requests-per-point", "1", "--requests-per-concurrency", "0", "--warmup", "0",
                        "--point-timeout", "120", "--skip-bench"],
                       cwd=str(REPO), env=env, capture_output=True, text=True, timeout=540)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert os.stat(model / "config.json").st_mtime_ns == stamp and not (work / "model").exists()
    points = json.loads((out / "serve.json").read_text())["summary"]["points"]
    assert [(pt["graph"], pt["ok"], pt["sent"]) for pt in points] == [("agg", 1, 1)]
    p = subprocess.run([PY, "scripts/gpu_serve.py", "--device", "cpu", "--out", str(out), "--model", str(tmp_path)],
                       cwd=str(REPO), env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and f"error: --model {tmp_path}: no config.json there" in p.stderr
