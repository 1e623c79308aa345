"""`dynamo-dwdp plan --recommend` and `--calibrate`: the published evidence, the placement rule
E = L + (N-1)P against a brute-force enumeration, and calibration checked by hand arithmetic."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dynamo_dwdp.planner.calibrate import calibrate, load_calibration, read_records
from dynamo_dwdp.planner.hardware import get_hardware
from dynamo_dwdp.planner.roofline import load_model_shape, plan_layer
from dynamo_dwdp.planner.recommend import Workload, recommend
from dynamo_dwdp.errors import UserError

REPO = Path(__file__).resolve().parents[2]
R1 = Path(__file__).resolve().parents[1] / "fixtures" / "deepseek-r1"
PY = str(REPO / ".venv" / "bin" / "python") if (REPO / ".venv" / "bin" / "python").exists() else sys.executable


@pytest.fixture(scope="module")
def r1():
    return load_model_shape(R1)


@pytest.mark.parametrize("work", [Workload(8192, 1024, concurrency=64), Workload(8192, 1024, concurrency=256),
                                  Workload(8192, 1024, tps_per_user=50.0)])
def test_r1_nvfp4_gb200_dwdp_pays_on_prefill_not_decode(r1, work):
    """Published: DeepSeek-R1 NVFP4 on 4 GB200, 8K prompts, DWDP on the context servers only (the
    generation servers stayed DEP); dwdp-method notes section 0."""
    ans = recommend(r1, get_hardware("gb200"), 4, work, weight_dtype="nvfp4")
    pre, dec = ans["pools"]["prefill"], ans["pools"]["decode"]
    assert pre["strategy"] == "dwdp"
    assert dec["strategy"] != "dwdp"
    assert pre["experts_per_rank"] + 3 * pre["prefetch_per_peer"] == 256
    assert (pre["experts_per_rank"], pre["prefetch_per_peer"]) == (64, 64)   # the paper's DWDP4 placement
    assert "Prefill: DWDP" in ans["reason"] and "Decode:" in ans["reason"]
    if work.tps_per_user:
        assert dec["predicted_tps_per_user"] >= work.tps_per_user


def test_dwdp_placement_is_the_fastest_that_fits_then_the_smallest(r1):
    """Brute force over every P with plan_layer itself: the pick must be the least-memory placement
    among those within 1% of the fastest fitting one."""
    hw = get_hardware("gb200")
    ans = recommend(r1, hw, 4, Workload(8192, 1024, concurrency=64), weight_dtype="nvfp4")
    got = ans["pools"]["decode"]["alternatives"]["dwdp"]
    b, ctx = 16, 8192 + 512
    rows = []
    for p in range(1, 65):
        L = 256 - 3 * p
        lp = plan_layer(r1, hw, 4, b, 1, "nvfp4", phase="decode", context=ctx, experts_per_rank=L, prefetch_per_peer=p)
        rows.append((lp.dwdp.t_total_ms, lp.dwdp.memory.total, lp.dwdp.memory.fits, L, p))
    fit = [r for r in rows if r[2]]
    best = min(r[0] for r in fit)
    expect = min((r for r in fit if r[0] <= best * 1.01), key=lambda r: r[1])
    assert (got["experts_per_rank"], got["prefetch_per_peer"]) == (expect[3], expect[4])
    assert got["experts_per_rank"] > 64            # decode: local redundancy buys back exposed prefetch


def test_calibration_replaces_rates_and_adds_floors(r1, tmp_path):
    f = tmp_path / "bench.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in [
        {"measure": "hbm_copy", "bytes_per_s": 4.0e12}, {"measure": "hbm_copy", "bytes_per_s": 4.2e12},
        {"measure": "gemm", "dtype": "bf16", "flops_per_s": 7.5e14},
        {"measure": "peer_pull", "bytes_per_s": 3.0e11},
        {"measure": "collective", "op": "all_reduce", "bytes": 14336, "seconds": 3e-5},
        {"measure": "collective", "op": "all_reduce", "bytes": 14336, "seconds": 2e-5},
        {"measure": "collective", "op": "all_reduce", "bytes": 1835008, "seconds": 1e-5},
        {"measure": "collective", "op": "dispatch_combine", "bytes": 114688, "seconds": 1e-4, "shared_gpu": True},
        {"measure": "layer_fixed", "seconds": 1e-5}, {"measure": "layer_fixed", "seconds": 3e-5},
        {"measure": "layer_fixed", "seconds": 5e-5}]) + "\n")
    base = get_hardware("h200")
    hw, cal = load_calibration(base, str(f))
    assert hw.hbm_bytes_per_s == pytest.approx(4.2e12)
    assert hw.flops_per_s("bf16") == pytest.approx(7.5e14)
    assert hw.flops_per_s("fp8") == pytest.approx(base.flops_per_s("fp8"))      # unmeasured: unchanged
    assert hw.link_bytes_per_s == pytest.approx(3.0e11)
    assert cal.all_reduce_floor_s == pytest.approx(2e-5)     # fastest at the smallest size
    assert cal.dispatch_combine_floor_s == pytest.approx(1e-4) and cal.shared_gpu
    assert cal.layer_fixed_s == pytest.approx(3e-5)          # median
    work = Workload(4096, 512, concurrency=32)
    plain = recommend(r1, hw, 2, work, weight_dtype="fp8")
    with_floor = recommend(r1, hw, 2, work, weight_dtype="fp8", calibration=cal)

    def step(ans, s):
        pool = ans["pools"]["decode"]
        return pool["step_ms"] if pool["strategy"] == s else pool["alternatives"][s]["step_ms"]
    fixed = r1.num_hidden_layers * 3e-5 * 1e3
    assert step(with_floor, "tp") - step(plain, "tp") == pytest.approx(r1.n_moe_layers * 2 * 2e-5 * 1e3 + fixed, rel=1e-4)
    assert step(with_floor, "dep") - step(plain, "dep") == pytest.approx(r1.n_moe_layers * 1e-4 * 1e3 + fixed, rel=1e-4)
    assert "shared one GPU" in with_floor["reason"] or "sharing one GPU" in with_floor["reason"]


@pytest.mark.parametrize("line,msg", [("{not json", "not valid JSON"), ('{"measure": "speed"}', "'measure'"),
                                      ('{"measure": "hbm_copy", "bytes_per_s": -1}', "'bytes_per_s'"),
                                      ('{"measure": "gemm", "dtype": "fp4", "flops_per_s": 1}', "'dtype'"),
                                      ('{"measure": "collective", "op": "bcast", "bytes": 1, "seconds": 1}', "'op'")])
def test_bad_calibration_line_is_named(tmp_path, line, msg):
    f = tmp_path / "b.jsonl"
    f.write_text('{"measure": "layer_fixed", "seconds": 1e-5}\n' + line + "\n")
    with pytest.raises(UserError, match=rf"b.jsonl:2: .*{msg}"):
        calibrate(get_hardware("h200"), read_records(str(f)))


def test_cli_recommend_json_interface(tmp_path):
    out = subprocess.run([PY, "-m", "dynamo_dwdp.cli", "plan", str(R1), "--gpu", "gb200", "--ranks", "4",
                          "--weight-dtype", "nvfp4", "--recommend", "--isl", "8192", "--osl", "1024",
                          "--concurrency", "128", "--json"], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr
    ans = json.loads(out.stdout)
    for pool in ("prefill", "decode"):
        assert {"strategy", "experts_per_rank", "prefetch_per_peer"} <= set(ans["pools"][pool])
    assert isinstance(ans["reason"], str) and ans["reason"]
    bad = subprocess.run([PY, "-m", "dynamo_dwdp.cli", "plan", str(R1), "--gpu", "gb200", "--ranks", "4",
                          "--recommend", "--isl", "8192", "--osl", "1024"], capture_output=True, text=True,
                         timeout=120, cwd=REPO)
    assert bad.returncode == 2 and "--concurrency" in bad.stderr and "Traceback" not in bad.stderr


def test_nothing_fits_is_said_not_hidden(r1):
    """DeepSeek-R1 in fp8 on two H200s: about 600 GiB of experts against 2 x 141 GB."""
    ans = recommend(r1, get_hardware("h200"), 2, Workload(8192, 1024, concurrency=64), weight_dtype="fp8")
    for pool in ("prefill", "decode"):
        p = ans["pools"][pool]
        assert not p["fits"] and not any(a["fits"] for a in p["alternatives"].values())
    assert ans["reason"].count("nothing fits in memory") == 2
