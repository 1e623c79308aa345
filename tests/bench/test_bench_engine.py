"""`dynamo-dwdp bench engine|table|matrix` on CPU.

- Every strategy (single, dwdp, dep, tp) on 2 local ranks of the tiny preset (5 layers = 4 MoE layers,
  so every MoE layer is re-pulled by DWDP every step) runs a prefill and an imbalanced decode point;
  the JSON is checked for sane values: positive times, split == step time, DEP/TP sync > 0, DWDP
  sync == 0 with exactly (E - L) experts x 4 layers of remote bytes per step (hand arithmetic), the
  tokens counted by the engine == the tokens scheduled (and == N*T*steps when balanced).
- The FLOP model is checked against torch's FlopCounterMode on this engine's forward, the causal
  pair count against an explicit enumeration, and the HBM weight bytes against the model's parameters.
- `bench table` renders a hand-written fixture; the matrix plan, resume and a real --quick run.
- Bad inputs give one `error: ...` line and exit code 2.
"""
from __future__ import annotations

import json

import pytest

from tests.conftest import cli
from dynamo_dwdp.planner import flops as work
from dynamo_dwdp.bench.engine_bench import BenchSetup, Point, run_points
from dynamo_dwdp.model.config import load_model_config

pytestmark = pytest.mark.slow

RANKS = 2
PREFILL_T, PREFILL_B = 48, 2
DECODE_B, DECODE_C = 3, 12
STEPS, WARMUP = 3, 1


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from dynamo_dwdp.synthetic.checkpoint import write_checkpoint

    out = tmp_path_factory.mktemp("bench") / "tiny5"
    write_checkpoint(out, "tiny", num_layers=5, quiet=True, with_tokenizer=False)
    return str(out)


POINTS = [Point("prefill", PREFILL_T, PREFILL_B, 0, 0.0, STEPS, WARMUP),
          Point("decode", DECODE_B, DECODE_B, DECODE_C, 0.3, STEPS, WARMUP)]


@pytest.fixture(scope="module")
def runs(tiny):
    cache = {}

    def get(strategy):
        if strategy not in cache:
            cache[strategy] = run_points(BenchSetup(tiny, strategy, RANKS, timeout=240), POINTS)
        return cache[strategy]

    return get


def _sane(res):
    sm, split = res["step_ms"], res["split_ms"]
    assert sm["mean"] > 0 and sm["p50"] > 0 and sm["min"] > 0 and all(x > 0 for x in sm["per_rank_mean"])
    assert sm["min"] <= sm["p50"] <= sm["max"]
    assert sm["max"] >= max(sm["per_rank_mean"]) - 1e-9          # max over ranks per step >= any rank's mean
    assert sum(split.values()) == pytest.approx(sm["rank_mean"], rel=0.02)
    assert all(v >= 0 for v in split.values())
    assert sum(res["split_pct"].values()) == pytest.approx(100.0, rel=1e-6)
    assert res["tokens"]["counted"] == res["tokens"]["scheduled"] > 0
    assert res["wall_s"] > 0 and res["tokens_per_s_per_gpu"] > 0
    assert res["flops"]["achieved_per_gpu"] > 0 and res["hbm"]["achieved_per_gpu"] > 0
    assert res["flops"]["frac_of_peak"] is None and res["hbm"]["frac_of_peak"] is None   # CPU: absolute only
    for pr in res["per_rank"]:
        assert 0 < pr["experts_touched_per_moe_layer"] <= res["model"]["experts"]
    assert json.loads(json.dumps(res)) == res                     # JSON-clean


@pytest.mark.parametrize("strategy", ["single", "dwdp", "dep", "tp"])
def test_bench_each_strategy_has_sane_values(strategy, runs, tiny):
    prefill, decode = runs(strategy)
    cfg = load_model_config(tiny)
    n_moe = len(cfg.moe_layers)
    assert n_moe == 4
    for res in (prefill, decode):
        _sane(res)
        assert res["setup"]["strategy"] == strategy and res["setup"]["ranks"] == RANKS
        syncs = [p["sync_wait_ms"] for p in res["per_rank"]]
        remote = res["remote_bytes_per_step"]["per_rank_mean"]
        if strategy in ("dep", "tp"):
            assert all(s > 0 for s in syncs)
            assert remote == 0
        else:
            assert all(s == 0 for s in syncs)
        if strategy == "dwdp":
            # E=16 on 2 ranks: L = P = 8, so 8 remote experts x 3 matrices of 64x32 fp32, every MoE layer
            per_layer = 8 * 3 * 64 * 32 * 4
            assert remote == n_moe * per_layer
            assert all(p["remote_bytes_per_step"] == n_moe * per_layer for p in res["per_rank"])
        elif strategy == "single":
            assert remote == 0 and res["split_ms"]["prefetch_wait"] == 0
        if strategy == "dep":          # owners read only their own 8 experts
            assert all(p["experts_touched_per_moe_layer"] <= 8 for p in res["per_rank"])
    # balanced prefill: every step every rank (TP: the leader, for both) computes T tokens
    assert prefill["tokens"]["scheduled"] == RANKS * PREFILL_T * STEPS
    # imbalanced decode: the ranks' batches differ from B somewhere (cv 0.3), the engine counted them all
    per_rank_tokens = [p["tokens"] for p in decode["per_rank"]]
    if strategy == "tp":
        assert decode["per_rank"][1]["role"] == "follower"
        assert per_rank_tokens[0] == per_rank_tokens[1] == decode["tokens"]["counted"]
    else:
        assert sum(per_rank_tokens) == decode["tokens"]["counted"]
    assert decode["tokens"]["scheduled"] != RANKS * DECODE_B * STEPS
    # model FLOPs per step for the balanced prefill: hand count of the same shapes (2 sequences of 24)
    assert prefill["flops"]["per_step"] == pytest.approx(
        RANKS * work.forward_flops(cfg, [(24, 24), (24, 24)])["total"])
    pred = prefill["prediction"]
    assert pred["comparable"] is False and "CPU: not comparable" in pred["note"]
    if strategy == "single":
        # one GPU holding every expert: the same compute roofline as a DWDP rank's (own tokens, all E)
        from dynamo_dwdp.planner.hardware import get_hardware
        from dynamo_dwdp.planner.roofline import load_model_shape, plan_layer

        group = plan_layer(load_model_shape(tiny), get_hardware("h200-measured"), 2, PREFILL_T, PREFILL_B, "bf16",
                           phase="prefill", imbalance_cv=0.0)
        assert pred["per_moe_layer"]["t_compute_ms"] == pytest.approx(group.dwdp.t_compute_ms, rel=1e-9)
        assert pred["per_moe_layer"]["t_prefetch_ms"] == 0
    else:
        assert pred["per_moe_layer"]["t_compute_ms"] > 0 and pred["per_moe_layer"]["t_prefetch_ms"] > 0


def test_imbalance_is_deterministic_and_shared_by_dep_and_dwdp(runs):
    """Same seed -> same per-(rank, step) shares in every strategy (TP runs their sum in one batch)."""
    dep, dwdp, tp = runs("dep")[1], runs("dwdp")[1], runs("tp")[1]
    assert [p["tokens"] for p in dep["per_rank"]] == [p["tokens"] for p in dwdp["per_rank"]]
    assert tp["tokens"]["scheduled"] == dep["tokens"]["scheduled"]


def test_cli_engine_json_and_out(tiny, tmp_path):
    out = tmp_path / "r.jsonl"
    proc = cli("bench", "engine", "--model", tiny, "--strategy", "single", "--ranks", "1", "--phase", "decode",
               "--batch", "2", "--context", "5", "--steps", "2", "--warmup", "1", "--json", "--out", str(out),
               timeout=240)
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout)                        # exactly one JSON object on stdout
    lines = out.read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0]) == res
    assert res["schema"] == "dynamo-dwdp/bench-engine/1"
    assert res["tokens"]["counted"] == 2 * 2 and len(res["per_rank"]) == 1
    _sane(res)


@pytest.mark.parametrize("phase", ["decode", "prefill"])
def test_cli_engine_async_scheduling_times_the_whole_pipeline(tiny, phase):
    """--async-scheduling: every timed step is counted once, and the step times add up to the timed
    window's wall time (pipeline fill and drain included)."""
    shape = ["--batch", "2", "--context", "5"] if phase == "decode" else ["--tokens-per-iter", "12", "--batch", "2"]
    proc = cli("bench", "engine", "--model", tiny, "--strategy", "single", "--ranks", "1", "--phase", phase, *shape,
               "--steps", "4", "--warmup", "1", "--async-scheduling", "--json", timeout=240)
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout)
    assert res["setup"]["async_scheduling"] is True
    assert res["tokens"]["counted"] == res["tokens"]["scheduled"] == 4 * (2 if phase == "decode" else 12)
    assert res["step_ms"]["mean"] * 4 / 1e3 == pytest.approx(res["wall_s"], rel=0.05)
    _sane(res)


# --------------------------------------------------------------------------------------- schedule
def test_schedule_shares_blocks_and_dep_lockstep():
    from dynamo_dwdp.bench.engine_bench import block_tables, build_schedule, imbalance_z

    p = Point("prefill", 100, 3, 0, 0.5, 4, 2, seed=7)
    sched = build_schedule(p, "dwdp", 3, 16)
    for r in range(3):
        assert len(sched.steps[r]) == 6 and sched.fill[r] == []
        for s, seqs in enumerate(sched.steps[r]):
            lens = [w.new for w in seqs]
            assert len(lens) == 3 and max(lens) - min(lens) <= 1
            assert sum(lens) == max(3, round(100 * (1 + 0.5 * imbalance_z(7, r, s))))
            tables = block_tables(sched, seqs, 16)
            used = [b for t in tables for b in t]
            assert len(used) == len(set(used)) and max(used) < sched.kv_blocks      # disjoint, inside the pool
            assert all(len(t) * 16 >= w.new for t, w in zip(tables, seqs))
    tp = build_schedule(p, "tp", 3, 16)
    assert tp.steps[1] == tp.steps[2] == [] and len(tp.steps[0]) == 6
    assert [sum(w.new for w in seqs) for seqs in tp.steps[0]] == [
        sum(sum(w.new for w in sched.steps[r][s]) for r in range(3)) for s in range(6)]
    # decode: fill chunks of <= FILL_TOKENS tokens; DEP pads every rank to the same number of forwards
    d = Point("decode", 5, 5, 3000, 0.8, 3, 1, seed=1)
    dep, dwdp = build_schedule(d, "dep", 2, 16), build_schedule(d, "dwdp", 2, 16)
    assert len(dep.fill[0]) == len(dep.fill[1])
    most = [max(len(seqs) for seqs in dwdp.steps[r]) for r in range(2)]
    assert [sum(len(f) for f in dwdp.fill[r]) for r in range(2)] == most      # every decode slot filled once
    assert most[0] != most[1] and len(dwdp.fill[0]) != len(dwdp.fill[1])     # so DEP padding was needed
    assert all(len(f) * 3000 <= 8192 for r in range(2) for f in dwdp.fill[r])
    assert all(w.start == 3000 and w.new == 1 for seqs in dep.steps[0] for w in seqs)
    assert dep.kv_blocks == max(most) * -(-3001 // 16)


def test_kv_pool_guard_on_cuda(tiny):
    from dynamo_dwdp.bench.engine_bench import check_fits, kv_pool_bytes
    from dynamo_dwdp.errors import UserError

    cfg = load_model_config(tiny)
    ok = Point("decode", 8, 8, 1000, 0.0, 1, 0)
    setup = BenchSetup(tiny, "dwdp", 2, device="cuda", hw="h100")
    # 8 seqs x ceil(1001/16)=63 blocks (+1 spare) x 5 layers x 16 x (32+16) x 4 bytes
    assert kv_pool_bytes(setup, ok, cfg) == (8 * 63 + 1) * 5 * 16 * 48 * 4
    check_fits(setup, ok, cfg)
    huge = Point("decode", 4096, 4096, 60000, 0.0, 1, 0)
    with pytest.raises(UserError, match="KV pool needs"):
        check_fits(setup, huge, cfg)
    check_fits(BenchSetup(tiny, "dwdp", 2, device="cpu"), huge, cfg)          # CPU: not guarded


# ------------------------------------------------------------------------------------------- FLOPs
@pytest.fixture(scope="module")
def runner(tiny):
    from dynamo_dwdp.config.engine import EngineSettings
    from dynamo_dwdp.engine.model_runner import ModelRunner
    from dynamo_dwdp.model.moe_executor import LocalExecutor

    return ModelRunner(tiny, EngineSettings(block_size=4, num_kv_blocks=64), LocalExecutor)


def _flop_counted(runner, seqs):
    """FlopCounterMode total of one forward; seqs = [(new tokens, start position)]."""
    from torch.utils.flop_counter import FlopCounterMode

    chunks = [[5 + i] * q for i, (q, _) in enumerate(seqs)]
    tables, nxt = [], 0
    for q, s in seqs:
        nb = -(-(q + s) // 4)
        tables.append(list(range(nxt, nxt + nb)))
        nxt += nb
    with FlopCounterMode(display=False) as fc:
        runner.execute(chunks, [s for _, s in seqs], tables, [True] * len(seqs))
    return fc.get_total_flops()


@pytest.mark.parametrize("seqs", [
    [(7, 0), (3, 0)],                 # fresh prefill, uneven lengths
    [(4, 6), (1, 9), (2, 0)],         # chunked prefill + decode mixed
    [(1, 11), (1, 11), (1, 11)],      # uniform decode
])
def test_flops_match_torch_flop_counter(runner, seqs):
    cfg = runner.model_config
    shapes = [(q, s + q) for q, s in seqs]
    # the reference kernel pads every sequence to [max_q, max_context]: that is what torch counts
    assert work.forward_flops(cfg, shapes, attention="dense")["total"] == _flop_counted(runner, seqs)


def test_causal_pairs_enumerated_and_equal_dense_for_uniform_decode(runner):
    shapes = [(7, 7), (3, 10), (1, 5)]
    enumerated = sum(1 for q, c in shapes for i in range(q) for key in range(c) if key <= c - q + i)
    assert work.attention_pairs(shapes, "causal") == enumerated == 28 + 27 + 5
    cfg = runner.model_config
    uniform = [(1, 12)] * 3
    assert work.forward_flops(cfg, uniform)["total"] == work.forward_flops(cfg, uniform, attention="dense")["total"]


def test_hbm_weight_bytes_match_model_parameters(runner):
    """Weight components of the byte model (all experts touched, fp32) == the engine's own tensors."""
    cfg, model = runner.model_config, runner.model
    numel = {"attn": 0, "dense": 0, "shared": 0, "router": 0}
    for name, p in model.named_parameters():
        if ".self_attn." in name and "layernorm" not in name:
            numel["attn"] += p.numel()
        elif ".shared_experts." in name:
            numel["shared"] += p.numel()
        elif name.endswith(".mlp.gate.weight"):
            numel["router"] += p.numel()
        elif ".mlp." in name:
            numel["dense"] += p.numel()
    routed = sum(b.w13.numel() + b.w2.numel() for b in runner.executor.banks.values())
    b = work.forward_hbm_bytes(cfg, [(5, 5)], 4)
    assert b["attn_weights"] == numel["attn"] * 4
    assert b["dense_mlp_weights"] == numel["dense"] * 4
    assert b["shared_expert_weights"] == numel["shared"] * 4
    assert b["router_weights"] == numel["router"] * 4
    assert b["routed_expert_weights"] == routed * 4
    assert b["lm_head"] == model.lm_head.weight.numel() * 4
    assert b["kv_read"] == 5 * runner.kv_pool[0, :, 0].numel() * 4
    half = work.forward_hbm_bytes(cfg, [(5, 5)], 4, touched_experts=[8] * 4)
    assert half["routed_expert_weights"] == routed * 4 / 2
    # FP8-resident weights (model/fp8_weights.py): the quantized matrices at one byte, kv_b / lm_head / router kept
    kv_b = sum(p.numel() for name, p in model.named_parameters() if "kv_b_proj" in name)
    f8 = work.forward_hbm_bytes(cfg, [(5, 5)], 4, weight_bytes=1)
    assert f8["attn_weights"] == (numel["attn"] - kv_b) + kv_b * 4
    assert f8["dense_mlp_weights"] == numel["dense"] and f8["shared_expert_weights"] == numel["shared"]
    assert f8["routed_expert_weights"] == routed
    assert (f8["router_weights"], f8["lm_head"], f8["kv_read"]) == (b["router_weights"], b["lm_head"], b["kv_read"])


# ------------------------------------------------------------------------------------------- table
def _fixture_row(strategy, phase, load, cv, step_mean, step_p50, split, remote, tps, tflops, hbm, opts=()):
    return {
        "schema": "dynamo-dwdp/bench-engine/1", "key": f"{strategy}-{phase}-{load}-{cv}-{opts}",
        "model": {"name": "fixture"}, "device_name": "NVIDIA H200",
        "setup": {"strategy": strategy, "ranks": 2, "phase": phase, "tokens_per_iter": load,
                  "batch": 1 if phase == "prefill" else load, "context": 0 if phase == "prefill" else 4096,
                  "imbalance_cv": cv, "expert_skew": None, "dtype": "bfloat16",
                  "dwdp_routed_only": "routed-only" in opts, "dwdp_contention_opt": "contention-opt" in opts},
        "step_ms": {"mean": step_mean, "p50": step_p50},
        "split_pct": dict(zip(("compute", "prefetch_wait", "sync_wait"), split)),
        "remote_bytes_per_step": {"per_rank_mean": remote}, "tokens_per_s_per_gpu": tps,
        "flops": {"achieved_per_gpu": tflops * 1e12, "frac_of_peak": tflops * 1e12 / 989.4e12},
        "hbm": {"achieved_per_gpu": hbm * 1e9, "frac_of_peak": hbm * 1e9 / 4.19e12},
        "prediction": {"comparable": True, "per_moe_layer": {"t_compute_ms": 1.5, "t_prefetch_ms": 2.25,
                                                             "t_total_ms": 2.25},
                       "measured_per_moe_layer": {"step_ms": 2.5}},
    }


def test_table_renders_fixture(tmp_path):
    rows = [
        _fixture_row("dep", "decode", 64, 0.2, 20.0, 19.5, (60, 0, 40), 0.0, 3200.0, 10.0, 838.0),
        _fixture_row("dwdp", "prefill", 8192, 0.0, 12.3456, 12.0, (90, 10, 0), 1.5e9, 660000.0, 494.7, 1000.0),
        _fixture_row("tp", "prefill", 8192, 0.0, 14.0, 14.0, (80, 0, 20), 0.0, 585000.0, 400.0, 900.0),
        _fixture_row("dwdp", "decode", 64, 0.2, 30.0, 29.0, (50, 50, 0), 2.0e8, 2100.0, 5.0, 1200.0, ("routed-only",)),
    ]
    rows[0]["prediction"]["comparable"] = False          # the dep row: a CPU run
    path = tmp_path / "fixture.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = cli("bench", "table", str(path), "--md")
    assert proc.returncode == 0, proc.stderr
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("|")]
    assert len(lines) == 2 + len(rows)                       # header, rule, one row per result
    assert lines[0].startswith("| strategy | N | load |")
    cells = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines[2:]]
    assert [c[0] for c in cells] == ["dwdp", "tp", "dwdp", "dep"]      # prefill first; dwdp < dep < tp
    dwdp_p = cells[0]
    assert dwdp_p[5] == "12.346 / 12.000"
    assert dwdp_p[6] == "90 / 10 / 0"
    assert dwdp_p[7] == "1,500"                              # MB per step per rank
    assert dwdp_p[8] == "660,000"
    assert dwdp_p[9] == "495 (50.0%)"                        # 494.7 TFLOP/s of 989.4
    assert dwdp_p[10] == "1,000 (23.9%)"                     # 1000 GB/s of 4190
    assert dwdp_p[11] == "1.5 / 2.25 / 2.25 (2.5)"
    assert cells[2][4] == "routed-only" and cells[3][4] == "-"
    assert cells[3][11].endswith(" *") and not cells[0][11].endswith("*") and "* CPU: not comparable" in proc.stdout
    assert "NVIDIA H200 bfloat16" in proc.stdout
    plain = cli("bench", "table", str(path))
    assert plain.returncode == 0 and "12.346 / 12.000" in plain.stdout
    assert not any(ln.startswith("|") for ln in plain.stdout.splitlines())


# ------------------------------------------------------------------------------------------ matrix
def test_matrix_plan_and_resume(tmp_path, monkeypatch, tiny):
    from dynamo_dwdp.bench import matrix
    from dynamo_dwdp.bench.engine_bench import point_key, setup_dict

    spec = matrix.MatrixSpec(model_dir=tiny, ranks=4, device="cpu", dtype="float32", prefill_tokens=(16, 32),
                             decode_batches=(2,), context=4, imbalance=(0.0, 0.2), steps=1, warmup=0,
                             out=str(tmp_path / "m.jsonl"))
    plan = matrix.matrix_plan(spec, tiny)
    labels = [(s.strategy, s.contention_opt, s.routed_only, len(p)) for s, p in plan]
    # 3 points x 2 CVs per full setup; routed-only: the 2 decode points only
    assert labels == [("dwdp", False, False, 6), ("dwdp", True, False, 6), ("dwdp", False, True, 2),
                      ("dep", False, False, 6), ("tp", False, False, 6)]
    assert all(s.ranks == 4 for s, _ in plan)
    two = matrix.matrix_plan(matrix.MatrixSpec(model_dir=tiny, ranks=2), tiny)   # standard GPU matrix on 2
    assert [(s.strategy, s.contention_opt, s.routed_only, len(p)) for s, p in two] == [
        ("dwdp", False, False, 16), ("dwdp", False, True, 8), ("dep", False, False, 16), ("tp", False, False, 16)]
    assert two[0][0].device == "cuda" and two[0][1][0].steps == 10
    launched = []

    def fake_run_points(setup, points, model=None):
        launched.append(len(points))
        out = []
        for p in points:
            st = setup_dict(setup, p)
            r = _fixture_row(st["strategy"], p.phase, p.tokens_per_iter, p.imbalance_cv, 1.0, 1.0, (100, 0, 0),
                             0.0, 1.0, 1.0, 1.0)
            r["setup"], r["key"] = st, point_key(model, st)
            out.append(r)
        return out

    monkeypatch.setattr(matrix, "run_points", fake_run_points)
    jsonl, md, ran = matrix.run_matrix(spec, progress=lambda s: None)
    assert ran == 26 and launched == [6, 6, 2, 6, 6]
    assert len(open(jsonl).read().splitlines()) == 26
    assert open(md).read().count("\n| ") == 26 + 1           # header + one row per point
    launched.clear()
    assert matrix.run_matrix(spec, progress=lambda s: None)[2] == 0 and launched == []
    keep = open(jsonl).read().splitlines()[:20]              # lose the last 6 (the tp launch)
    open(jsonl, "w").write("\n".join(keep) + "\n")
    assert matrix.run_matrix(spec, progress=lambda s: None)[2] == 6 and launched == [6]


def test_matrix_quick_runs_and_resumes(tmp_path):
    out = tmp_path / "quick.jsonl"
    args = ("bench", "matrix", "--quick", "--ranks", "2", "--strategies", "dep", "--out", str(out))
    proc = cli(*args, timeout=240)
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == 8                                     # 2 prefill + 2 decode, x 2 CVs
    assert {(r["setup"]["phase"], r["setup"]["imbalance_cv"]) for r in rows} == {
        ("prefill", 0.0), ("prefill", 0.2), ("decode", 0.0), ("decode", 0.2)}
    for r in rows:
        _sane(r)
        assert r["split_ms"]["sync_wait"] > 0
    assert (tmp_path / "quick.md").read_text().count("\n| dep |") == 8
    again = cli(*args, timeout=120)
    assert again.returncode == 0 and "0 point(s) run" in again.stdout
    assert len(out.read_text().splitlines()) == 8


# ---------------------------------------------------------------------------------------- bad input
def _error_line(proc, *needles):
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])


@pytest.mark.parametrize("extra, needles", [
    (["--strategy", "pipeline", "--phase", "prefill", "--tokens-per-iter", "8"], ["pipeline", "single, dwdp, dep, tp"]),
    (["--strategy", "dwdp", "--ranks", "1", "--phase", "prefill", "--tokens-per-iter", "8"], ["--ranks >= 2"]),
    (["--strategy", "dep", "--ranks", "1", "--phase", "decode", "--batch", "2"], ["--ranks >= 2"]),
    (["--strategy", "dwdp", "--phase", "train", "--tokens-per-iter", "8"], ["--phase", "train"]),
    (["--strategy", "dwdp", "--phase", "prefill"], ["--tokens-per-iter"]),
    (["--strategy", "dwdp", "--phase", "prefill", "--tokens-per-iter", "4", "--batch", "8"], ["--batch 8"]),
    (["--strategy", "dwdp", "--phase", "decode"], ["--batch"]),
    (["--strategy", "dwdp", "--phase", "decode", "--batch", "2", "--expert-skew", "99:1"], ["99", "16"]),
    (["--strategy", "dwdp", "--phase", "decode", "--batch", "2", "--expert-skew", "hot"], ["K:BIAS"]),
    (["--strategy", "dep", "--phase", "decode", "--batch", "2", "--dwdp-routed-only"], ["--strategy dwdp"]),
    (["--strategy", "dwdp", "--phase", "decode", "--batch", "2", "--imbalance-cv", "-1"], ["--imbalance-cv"]),
    (["--strategy", "dwdp", "--phase", "decode", "--batch", "2", "--dtype", "int8"], ["--dtype", "int8"]),
    (["--strategy", "dwdp", "--phase", "decode", "--batch", "2", "--hw", "tpu"], ["tpu"]),
    (["--strategy", "single", "--phase", "decode", "--batch", "2", "--weights", "fp8-block"], ["--weights", "cuda"]),
    (["--strategy", "single", "--phase", "decode", "--batch", "2", "--weights", "fp8-block-a8"], ["--weights", "cuda"]),
    (["--strategy", "single", "--phase", "decode", "--batch", "2", "--weights", "int4"], ["int4", "fp8-block"]),
    (["--strategy", "dep", "--phase", "decode", "--batch", "2", "--async-scheduling"], ["--async-scheduling", "dep"]),
])
def test_bad_engine_inputs(tiny, extra, needles):
    _error_line(cli("bench", "engine", "--model", tiny, *extra), *needles)


def test_bad_other_inputs(tmp_path):
    _error_line(cli("bench", "engine", "--model", str(tmp_path / "nope"), "--strategy", "dwdp", "--phase", "decode",
                    "--batch", "2"), "nope")
    _error_line(cli("bench", "table", str(tmp_path / "missing.jsonl")), "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"setup": {}, "step_ms": {}}\nnot json\n')
    _error_line(cli("bench", "table", str(bad)), "bad.jsonl:2")
    _error_line(cli("bench", "matrix", "--quick", "--ranks", "1"), "--ranks")
    _error_line(cli("bench", "matrix", "--quick", "--decode-batches", "8,x"), "--decode-batches")
    _error_line(cli("bench"), "engine, host, table or matrix")


@pytest.mark.parametrize("seqs", [[(7, 0), (3, 0)], [(5, 0), (2, 0), (9, 0)]])
def test_expanded_flops_match_torch_flop_counter_on_the_sdpa_path(tiny, seqs):
    """The SDPA prefill path runs the expanded MLA form; the FLOP model's `form="expanded"` (each
    sequence's q x context pairs, as SDPA computes them, plus the kv_b expansion of the context) is
    what torch counts. Fresh prefills only: torch's FlopCounterMode cannot run the bottom-right
    CausalBias of chunks after cached tokens (the HF comparison in test_model_reference covers them)."""
    from dynamo_dwdp.config.engine import EngineSettings
    from dynamo_dwdp.engine.model_runner import ModelRunner
    from dynamo_dwdp.model.moe_executor import LocalExecutor

    sdpa = ModelRunner(tiny, EngineSettings(block_size=4, num_kv_blocks=64, attention_backend="sdpa"), LocalExecutor)
    cfg = sdpa.model_config
    shapes = [(q, s + q) for q, s in seqs]
    assert work.forward_flops(cfg, shapes, attention="dense", form="expanded")["total"] == _flop_counted(sdpa, seqs)
    assert work.forward_flops(cfg, shapes, form="expanded")["total"] != work.forward_flops(cfg, shapes)["total"]
