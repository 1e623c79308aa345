"""Roofline planner (`dynamo-dwdp plan`): checked against independent references.

References: the DWDP paper's roofline table (Table 1 of the DWDP tech blog in NVIDIA/TensorRT-LLM, arXiv 2604.01621),
DeepSeek-R1's published sizing, textbook order statistics and hand arithmetic from config values.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from dynamo_dwdp.planner.hardware import HARDWARE, get_hardware
from dynamo_dwdp.planner.roofline import (
    resolve_placement,
    build_report,
    bytes_per_expert,
    expected_max_std_normal,
    find_crossover,
    load_model_shape,
    parse_model_shape,
    plan_layer,
    touched_experts,
)
from dynamo_dwdp.dwdp.placement import Placement
from dynamo_dwdp.errors import CheckpointError, UserError

REPO = Path(__file__).resolve().parents[2]
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
R1 = FIXTURES / "deepseek-r1"
V2_LITE = FIXTURES / "deepseek-v2-lite"
PY = str(REPO / ".venv" / "bin" / "python") if (REPO / ".venv" / "bin" / "python").exists() else sys.executable

# Blog Table 1: DeepSeek-R1 context phase on GB200, DWDP4 vs DEP4, batch 1, perfectly balanced.
PUBLISHED_COMPUTE_OVER_PREFETCH = {8192: 0.62, 16384: 1.52, 32768: 4.77}
PUBLISHED_DEP_OVER_DWDP = {8192: 0.73, 16384: 1.27, 32768: 1.17}


@pytest.fixture(scope="module")
def r1():
    return load_model_shape(R1)


@pytest.fixture(scope="module")
def v2_lite():
    return load_model_shape(V2_LITE)


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "dynamo_dwdp.cli", "plan", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=60)


# --------------------------------------------------------------------------------------- config parsing
def test_r1_shape_from_official_config(r1):
    assert r1.n_moe_layers == 58  # 61 layers, first 3 dense
    assert r1.n_routed_experts == 256 and r1.num_experts_per_tok == 8 and r1.n_shared_experts == 1
    assert r1.checkpoint_dtype == "fp8"  # quantization_config.quant_method
    # notes §3: MLA projections ~187M parameters per layer
    assert r1.attention_params == pytest.approx(187e6, rel=0.01)


def test_transformers5_layout_parses_like_official(r1):
    cfg = json.loads((R1 / "config.json").read_text())
    for key in ("rope_scaling", "rope_theta", "quantization_config", "torch_dtype", "moe_layer_freq"):
        cfg.pop(key)
    cfg["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0}
    cfg["dtype"] = "bfloat16"
    m = parse_model_shape(cfg, "t5/config.json")
    assert m.checkpoint_dtype == "bf16"
    assert (m.n_moe_layers, m.attention_params, m.expert_params) == (
        r1.n_moe_layers, r1.attention_params, r1.expert_params)


def test_v2_lite_null_q_lora(v2_lite):
    assert v2_lite.q_lora_rank is None and v2_lite.n_moe_layers == 26
    # q_proj 2048x(16*192) + kv_a 2048x576 + kv_b 512x(16*256) + o (16*128)x2048, by hand
    assert v2_lite.attention_params == 2048 * 3072 + 2048 * 576 + 512 * 4096 + 2048 * 2048


def test_missing_field_is_named(tmp_path):
    cfg = json.loads((R1 / "config.json").read_text())
    del cfg["n_routed_experts"]
    with pytest.raises(CheckpointError, match="n_routed_experts"):
        parse_model_shape(cfg, "x/config.json")


# --------------------------------------------------------------------------------------- bytes per expert
@pytest.mark.parametrize("dtype,notes_mb", [("bf16", 88.1), ("fp8", 44.05), ("nvfp4", 24.77)])
def test_bytes_per_expert_match_notes(r1, dtype, notes_mb):
    assert bytes_per_expert(r1, dtype) / 1e6 == pytest.approx(notes_mb, rel=0.02)


def test_dwdp4_nvfp4_memory_matches_notes(r1):
    p = plan_layer(r1, get_hardware("gb200"), 4, 8192, 1, "nvfp4")
    mem = p.dwdp.memory
    # notes §3: local experts ~92 GB, double buffer ~9.5 GB, non-expert weights 15-20 GB; fits GB200
    assert mem.local_experts / 1e9 == pytest.approx(92, rel=0.02)
    assert mem.prefetch_slots / 1e9 == pytest.approx(9.5, rel=0.02)
    assert 15 <= mem.non_expert / 1e9 <= 20
    assert mem.fits
    # full replication of 368 GB of experts would not fit
    assert 256 * bytes_per_expert(r1, "nvfp4") * 58 > get_hardware("gb200").memory_bytes


# --------------------------------------------------------------------------------------- published roofline
def test_reproduces_published_compute_over_prefetch(r1):
    hw = get_hardware("gb200")
    ratios = {}
    for tokens, published in PUBLISHED_COMPUTE_OVER_PREFETCH.items():
        p = plan_layer(r1, hw, 4, tokens, 1, "nvfp4", imbalance_cv=0.0)
        ratios[tokens] = p.compute_over_prefetch
        assert p.compute_over_prefetch == pytest.approx(published, rel=0.25), (tokens, ratios)
    assert ratios[8192] < ratios[16384] < ratios[32768]
    cross = find_crossover(r1, hw, 4, weight_dtype="nvfp4", imbalance_cv=0.0)
    assert 8192 < cross < 16384


def test_prefetch_is_all_remote_experts_at_link_rate(r1):
    hw = get_hardware("gb200")
    p = plan_layer(r1, hw, 4, 8192, 1, "nvfp4")
    # notes §3: 192 remote NVFP4 experts = 4.76 GB per layer per rank
    assert p.dwdp.extra["prefetch_gb"] == pytest.approx(4.76, rel=0.01)
    expected_ms = 192 * bytes_per_expert(r1, "nvfp4") / (hw.link_gbps * 1e9 * hw.link_efficiency) * 1e3
    assert p.t_prefetch_ms == pytest.approx(expected_ms, rel=1e-9)
    assert p.t_dwdp_ms == pytest.approx(max(p.t_compute_ms, p.t_prefetch_ms))


def test_dep_over_dwdp_shape_matches_published(r1):
    hw = get_hardware("gb200")
    got = {t: plan_layer(r1, hw, 4, t, 1, "nvfp4", imbalance_cv=0.0).dep_over_dwdp
           for t in PUBLISHED_DEP_OVER_DWDP}
    for t, published in PUBLISHED_DEP_OVER_DWDP.items():
        assert got[t] == pytest.approx(published, rel=0.25), got
    # the paper's point: the gain peaks near the crossover and shrinks at very long ISL
    assert got[8192] < 1 < got[32768] < got[16384]


def test_batch_shrinks_attention_not_moe(r1):
    hw = get_hardware("gb200")
    one = plan_layer(r1, hw, 4, 16384, 1, "nvfp4")
    four = plan_layer(r1, hw, 4, 16384, 4, "nvfp4")
    # causal core: 4 sequences of S/4 tokens -> pairs ~ 1/4 (compute-bound at these sizes)
    assert four.dwdp.breakdown_ms["attn_core"] == pytest.approx(one.dwdp.breakdown_ms["attn_core"] / 4, rel=0.01)
    assert four.dwdp.breakdown_ms["moe_routed"] == pytest.approx(one.dwdp.breakdown_ms["moe_routed"])
    assert find_crossover(r1, hw, 4, batch=4, weight_dtype="nvfp4") > find_crossover(r1, hw, 4, weight_dtype="nvfp4")


def test_verdicts_prefill_long_dwdp_decode_not(r1):
    report = build_report(r1, get_hardware("gb200"), 4, 32768, weight_dtype="nvfp4", decode_batch=64)
    assert report["prefill"]["verdict"]["winner"] == "dwdp"
    assert "covers" in report["prefill"]["verdict"]["why"]
    assert report["decode"]["verdict"]["winner"] != "dwdp"  # notes §5: decode cannot hide the prefetch


# --------------------------------------------------------------------------------------- sync + routing
@pytest.mark.parametrize("n,k_n", [(2, 1 / math.sqrt(math.pi)), (4, 1.0294), (8, 1.4236), (16, 1.7660)])
def test_expected_max_of_normals(n, k_n):
    assert expected_max_std_normal(n) == pytest.approx(k_n, abs=1e-3)  # k_2 = 1/sqrt(pi) exactly


def test_dep_sync_formula(r1):
    p = plan_layer(r1, get_hardware("gb200"), 4, 8192, 1, "nvfp4", imbalance_cv=0.2)
    assert p.dep.extra["t_sync_ms"] == pytest.approx(0.2 * 1.0294 * p.dep.t_compute_ms, rel=1e-3)
    balanced = plan_layer(r1, get_hardware("gb200"), 4, 8192, 1, "nvfp4", imbalance_cv=0.0)
    assert balanced.dep.extra["t_sync_ms"] == 0.0


def test_touched_experts_uniform():
    # notes §5: at batch 64 about 222 of 256 experts are touched with top-8
    assert touched_experts(256, 256, 8, 64) == pytest.approx(222, abs=2)
    assert touched_experts(256, 256, 8, 1) == pytest.approx(8)


# --------------------------------------------------------------------------------------- placement
def test_placement_default_and_uneven():
    assert resolve_placement(256, 4) == Placement(256, 4, 64, 64)
    pl = resolve_placement(64, 3)  # E not divisible by N: adjacent ranks overlap
    covered = set()
    for r in range(3):
        covered |= set(pl.local_range(r))
    assert covered == set(range(64)) and pl.experts_per_rank + 2 * pl.prefetch_per_peer == 64
    assert resolve_placement(64, 3, experts_per_rank=24) == Placement(64, 3, 24, 20)
    with pytest.raises(UserError, match="experts-per-rank"):
        resolve_placement(64, 3, experts_per_rank=25)
    with pytest.raises(UserError):
        resolve_placement(64, 3, experts_per_rank=10, prefetch_per_peer=27)  # L < P leaves gaps


# --------------------------------------------------------------------------------------- V2-Lite on H200
def test_v2_lite_h200_measured_crossover(v2_lite):
    hw = get_hardware("h200-measured")
    cross = find_crossover(v2_lite, hw, 2, weight_dtype="bf16")
    assert cross is not None
    at = plan_layer(v2_lite, hw, 2, cross, 1, "bf16")
    assert at.t_compute_ms == pytest.approx(at.t_prefetch_ms, rel=1e-3)
    # hand arithmetic: 32 remote bf16 experts of 3*2048*1408*2 bytes at the measured 386 GB/s
    assert at.t_prefetch_ms == pytest.approx(32 * 3 * 2048 * 1408 * 2 / 386e9 * 1e3, rel=1e-6)
    below = plan_layer(v2_lite, hw, 2, cross / 2, 1, "bf16")
    above = plan_layer(v2_lite, hw, 2, cross * 2, 1, "bf16")
    assert below.compute_over_prefetch < 1 < above.compute_over_prefetch
    report = build_report(v2_lite, hw, 2, 8192, weight_dtype="bf16", phases=("prefill",))
    assert report["prefill"]["crossover"]["tokens_per_iter"] == pytest.approx(cross, rel=1e-3)


def test_hardware_entries_are_complete():
    assert {"h100", "h200", "gb200", "h200-measured"} <= set(HARDWARE)
    for hw in HARDWARE.values():
        assert hw.sources and 0 < hw.math_efficiency <= 1 and 0 < hw.link_efficiency <= 1
    assert HARDWARE["h200-measured"].link_bytes_per_s == pytest.approx(386e9)
    assert HARDWARE["h200-measured"].hbm_bytes_per_s == pytest.approx(4.19e12)


# --------------------------------------------------------------------------------------- CLI
def test_cli_json_is_one_object_on_stdout(r1):
    res = cli(str(R1), "--gpu", "gb200", "--ranks", "4", "--tokens-per-iter", "16384",
              "--weight-dtype", "nvfp4", "--batch", "1", "--json")
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)  # the whole stdout is one JSON document
    layer = report["prefill"]["dwdp"]["per_moe_layer"]
    api = plan_layer(r1, get_hardware("gb200"), 4, 16384, 1, "nvfp4")
    assert layer["t_compute_ms"] == pytest.approx(api.t_compute_ms, rel=1e-3)
    assert layer["t_prefetch_ms"] == pytest.approx(api.t_prefetch_ms, rel=1e-3)
    assert report["prefill"]["verdict"]["winner"] in ("dwdp", "dep", "tp")
    assert report["decode"]["verdict"]["why"]


def test_cli_table_and_phase():
    res = cli(str(V2_LITE), "--gpu", "h200-measured", "--ranks", "2", "--tokens-per-iter", "8192",
              "--phase", "prefill")
    assert res.returncode == 0, res.stderr
    assert "T_compute / T_prefetch" in res.stdout and "prefill verdict:" in res.stdout
    assert "decode verdict" not in res.stdout


def test_cli_missing_config_json(tmp_path):
    res = cli(str(tmp_path), "--gpu", "h200", "--ranks", "2", "--tokens-per-iter", "8192", "--json")
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr.startswith("error: ") and "config.json" in res.stderr


def test_cli_missing_field(tmp_path):
    cfg = json.loads((R1 / "config.json").read_text())
    del cfg["moe_intermediate_size"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    res = cli(str(tmp_path), "--gpu", "h200", "--ranks", "2", "--tokens-per-iter", "8192")
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr.startswith("error: ") and "moe_intermediate_size" in res.stderr


def test_cli_rejects_nvfp4_on_hopper():
    res = cli(str(R1), "--gpu", "h100", "--ranks", "8", "--tokens-per-iter", "8192", "--weight-dtype", "nvfp4")
    assert res.returncode == 2 and "nvfp4" in res.stderr


def test_planner_does_not_import_torch():
    code = ("import sys, dynamo_dwdp.planner.roofline, dynamo_dwdp.commands.plan; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    res = subprocess.run([PY, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
