"""The real A/B on the CPU tiny model: disagg_dep vs disagg_dwdp_decode through Dynamo's frontend.

Two concurrency points, four short requests each
(configs/workloads/ci-smoke.yaml). References: the workload (requests per point),
the graph files (GPUs = sum of ranks x replicas), the per-request rows the harness wrote.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from dynamo_dwdp.ab import harness
from dynamo_dwdp.ab.workload import load_workload
from dynamo_dwdp.config.graph import load_graph

REPO = Path(__file__).resolve().parents[2]
GRAPHS = [str(REPO / "graphs" / "disagg_dep.yaml"), str(REPO / "graphs" / "disagg_dwdp_decode.yaml")]
WORKLOAD = REPO / "configs" / "workloads" / "ci-smoke.yaml"


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_ab_dep_vs_dwdp_decode_on_the_tiny_model(tmp_path):
    local = tmp_path / "local.yaml"
    local.write_text(f"model: {{path: {tmp_path / 'models' / 'tiny'}}}\ninfra: {{log_dir: {tmp_path / 'logs'}}}\n")
    out = tmp_path / "ab"
    res = harness.run_ab(GRAPHS, workload_path=str(WORKLOAD), out_dir=str(out),
                    config_paths=[str(REPO / "configs" / "tiny-cpu.yaml"), str(local)], progress=False)

    for name in ("results.json", "results.csv", "pareto.png", "report.md"):
        assert (out / name).is_file(), name
    text = (out / "results.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    wl = load_workload(WORKLOAD)
    for path, g in zip(GRAPHS, res["graphs"]):
        assert g["status"] == "ok", g["status"]
        assert g["num_gpus"] == load_graph(path).processes == 3
        assert [p["label"] for p in g["points"]] == [p.label for p in wl.points(g["num_gpus"])]
        for pt in g["points"]:
            s = pt["summary"]
            rows = [json.loads(x) for x in
                    (out / "points" / g["key"] / f"{pt['label']}.requests.jsonl").read_text().splitlines()]
            assert len(rows) == s["requests"] == s["sent"] == wl.requests_per_point
            assert s["ok"] + s["failed"] == s["requests"]
            assert s["ok"] == s["requests"], s.get("first_error")
            assert s["isl_mismatch"] == 0 and s["osl_mismatch"] == 0  # token-id prompts, ignore_eos honoured
            tokens = sum(r["output_tokens"] for r in rows)
            assert tokens == wl.requests_per_point * wl.osl.mean
            assert s["tps_gpu"] == pytest.approx(tokens / s["duration_s"] / g["num_gpus"])
            for k, v in s.items():
                assert not (isinstance(v, float) and math.isnan(v)), k
    assert "## Headline" in (out / "report.md").read_text()
