"""Decode at batch 1 on one GPU: the router's one-launch selection and the shared experts folded into the
routed call, checked against their references and timed in one run.

1. checks on the GPU: the one-launch router (last logits program selects) bitwise equal to the two-kernel form,
   200 repeats, v2-lite and V3 router shapes; the fold (`routed_experts_fused(shared=)`) vs fp64 and vs the
   routed call + the dense MLP, v2-lite shapes;
2. kernel timing (CUDA graph of 4 distinct layers' weights, median of replays): the MoE part of one layer at
   1-32 tokens, folded vs routed call + DenseMLP (dense_swiglu + cuBLAS down);
3. `bench engine` decode (single, CUDA graphs, async scheduling, context 1000) at the given batches, once per
   variant (env switches: DWDP_ROUTER_FUSED_SELECT_ROWS, DWDP_FOLD_SHARED_MAX_TOKENS), each in a fresh process.

    PYTHONPATH=. python3 scripts/gpu_b1.py --model WORK/m --out OUT
Writes OUT/b1.json and OUT/b1.md."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

OFF = {"DWDP_ROUTER_FUSED_SELECT_ROWS": "0", "DWDP_FOLD_SHARED_MAX_TOKENS": "0"}
VARIANTS = {"base": OFF,
            "select+fold": {"DWDP_ROUTER_FUSED_SELECT_ROWS": "64", "DWDP_FOLD_SHARED_MAX_TOKENS": "8"},
            "select": {"DWDP_ROUTER_FUSED_SELECT_ROWS": "64", "DWDP_FOLD_SHARED_MAX_TOKENS": "0"}}

BENCH = r"""
import json, sys
from dynamo_dwdp.bench.engine_bench import BenchSetup, Point, run_points
model, batches, context = sys.argv[1], [int(b) for b in sys.argv[2].split(",")], int(sys.argv[3])
steps = {1: 300}
setup = BenchSetup(model_dir=model, strategy="single", ranks=1, device="cuda", dtype="bfloat16", block_size=64,
                   cuda_graphs=True, async_scheduling=True, hw="h200-measured")
pts = [Point("decode", b, b, context, 0.0, steps.get(b, 60), 10) for b in batches]
res = run_points(setup, pts)
print("RESULT " + json.dumps([{"batch": p.batch, "step_ms": r["step_ms"], "forward_ms": r.get("forward_ms")}
                              for p, r in zip(pts, res)]))
"""


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def graph_us(fn) -> float:
    """Microseconds per call of fn: a CUDA graph of 8 calls, median of 15 replays (gpu_common.graph_us)."""
    from gpu_common import graph_us as graph_call_us      # imports torch, as every function here does, lazily

    return graph_call_us(fn, reps=15, calls=8)


def checks_and_kernels(out: dict) -> None:
    import torch
    import torch.nn.functional as F

    from dynamo_dwdp.model.experts import ExpertBank
    from dynamo_dwdp.model.kernels import router
    from dynamo_dwdp.model.kernels.moe_gemm import SharedExperts, dense_swiglu, routed_experts_fused

    dev, BF = "cuda", torch.bfloat16
    torch.manual_seed(0)
    rows = []
    for E, G, TG, K, H in ((64, 1, 1, 6, 2048), (256, 8, 4, 8, 7168)):       # router: one launch vs two
        w = torch.randn(E, H, device=dev) * 0.02
        bias = torch.randn(E, device=dev) * 0.1
        skew = torch.zeros(E, device=dev)
        for T in (1, 8, 64):
            x = torch.randn(T, H, device=dev, dtype=BF)
            router.FUSED_SELECT_MAX_ROWS = 0
            two = router.noaux_tc_route(x, w, bias, skew, K, G, TG, True, 2.5)
            two_us = graph_us(lambda: router.noaux_tc_route(x, w, bias, skew, K, G, TG, True, 2.5))
            router.FUSED_SELECT_MAX_ROWS = 64
            bad = 0
            for _ in range(200):
                one = router.noaux_tc_route(x, w, bias, skew, K, G, TG, True, 2.5)
                bad += not (torch.equal(one[0], two[0]) and torch.equal(one[1], two[1]))
            ext = router.noaux_tc_route(x, w, bias, skew, K, G, TG, True, 2.5, always_on=2)
            ext_ok = (torch.equal(ext[0][:, :K], two[0]) and torch.equal(ext[1][:, :K], two[1])
                      and bool((ext[0][:, K:] == torch.tensor([E, E + 1], device=dev)).all())
                      and bool((ext[1][:, K:] == 1).all()))
            one_us = graph_us(lambda: router.noaux_tc_route(x, w, bias, skew, K, G, TG, True, 2.5))
            router.FUSED_SELECT_MAX_ROWS = 0
            r = {"what": f"router E={E} H={H}", "T": T, "two_kernels_us": round(two_us, 2),
                 "one_launch_us": round(one_us, 2), "mismatches_of_200": bad, "always_on_ok": ext_ok}
            rows.append(r)
            say(str(r))
    out["router"] = rows
    # the fold at v2-lite shapes: 4 layers of weights (beyond L2), routed bank 64 x I 1408, 2 shared experts
    E, K, S, H, I, L = 64, 6, 2, 2048, 1408, 4
    layers = []
    for _ in range(L):
        w13 = torch.randn(E, 2 * I, H, device=dev, dtype=BF) * 0.02
        w2 = torch.randn(E, H, I, device=dev, dtype=BF) * 0.02
        gu = torch.randn(2 * S * I, H, device=dev, dtype=BF) * 0.02
        dn = torch.randn(H, S * I, device=dev, dtype=BF) * 0.02
        layers.append((ExpertBank(0, w13, w2), SharedExperts(gu, dn, S)))
    frows = []
    for T in (1, 2, 4, 8, 16):
        x = torch.randn(T, H, device=dev, dtype=BF)
        ids = torch.stack([torch.randperm(E, device=dev)[:K] for _ in range(T)])
        wts = torch.rand(T, K, device=dev)
        ids2 = torch.cat([ids, torch.tensor([[E, E + 1]], device=dev).expand(T, 2)], 1)
        wts2 = torch.cat([wts, torch.ones(T, 2, device=dev)], 1)
        bank, sh = layers[0]
        folded = routed_experts_fused(x, ids2, wts2, [bank], shared=sh)
        sep = routed_experts_fused(x, ids, wts, [bank]).float() + F.linear(dense_swiglu(x, sh.gate_up), sh.down).float()
        xd = x.double()
        ref = torch.zeros(T, H, device=dev, dtype=torch.float64)
        for t in range(T):
            for j in range(K):
                e = int(ids[t, j])
                hh = bank.w13[e].double() @ xd[t]
                ref[t] += float(wts[t, j]) * (bank.w2[e].double() @ (F.silu(hh[:I]) * hh[I:]))
        hh = xd @ sh.gate_up.double().T
        ref += (F.silu(hh[:, :S * I]) * hh[:, S * I:]) @ sh.down.double().T
        rel = lambda a: ((a.double() - ref).norm() / ref.norm()).item()   # noqa: E731

        def run_fold():
            for b, s in layers:
                routed_experts_fused(x, ids2, wts2, [b], shared=s)

        def run_sep():
            for b, s in layers:
                routed_experts_fused(x, ids, wts, [b])
                F.linear(dense_swiglu(x, s.gate_up), s.down)

        r = {"T": T, "folded_us_per_layer": round(graph_us(run_fold) / L, 2),
             "separate_us_per_layer": round(graph_us(run_sep) / L, 2),
             "rel_err_folded": f"{rel(folded):.2e}", "rel_err_separate": f"{rel(sep):.2e}",
             "ok": rel(folded) < 2 * rel(sep) + 1e-3 and bool(torch.isfinite(folded).all())}
        frows.append(r)
        say(str(r))
    out["fold"] = frows
    del layers
    torch.cuda.empty_cache()


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--batches", default="1,64,256")
    p.add_argument("--context", type=int, default=1000)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--skip-kernels", action="store_true")
    a = p.parse_args()
    os.makedirs(a.out, exist_ok=True)
    out: dict = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "argv": sys.argv, "bench": {}}
    if not a.skip_kernels:
        import torch

        out["device"] = torch.cuda.get_device_name(0)
        out["torch"] = torch.__version__
        try:
            checks_and_kernels(out)
        except Exception:
            import traceback

            out["kernels_error"] = traceback.format_exc()[-3000:]
            traceback.print_exc()
        with open(os.path.join(a.out, "b1.json"), "w") as f:
            json.dump(out, f, indent=1)
        torch.cuda.empty_cache()
    for v in a.variants.split(","):
        env = {**os.environ, **VARIANTS[v], "PYTHONUNBUFFERED": "1"}
        say(f"bench {v}: {VARIANTS[v]}")
        t0 = time.time()
        res = subprocess.run([sys.executable, "-c", BENCH, a.model, a.batches, str(a.context)], env=env,
                             capture_output=True, text=True, timeout=400)
        line = next((ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            say(f"bench {v} FAILED rc={res.returncode}: {res.stderr[-3000:]}")
            out["bench"][v] = {"error": res.stderr[-3000:]}
            continue
        out["bench"][v] = json.loads(line[7:])
        for r in out["bench"][v]:
            sm = r["step_ms"]
            say(f"  {v} batch {r['batch']}: mean {sm['mean']:.3f} p50 {sm['p50']:.3f} p90 {sm['p90']:.3f} "
                f"min {sm['min']:.3f} max {sm['max']:.3f} ms ({time.time() - t0:.0f} s)")
        with open(os.path.join(a.out, "b1.json"), "w") as f:
            json.dump(out, f, indent=1)
    with open(os.path.join(a.out, "b1.json"), "w") as f:
        json.dump(out, f, indent=1)
    lines = [f"# Decode at batch 1: {out['date']}, {out.get('device', '?')}, torch {out.get('torch', '?')}", "",
             "| variant | batch | mean ms | p50 | p90 | min | max |", "|---|---|---|---|---|---|---|"]
    for v, rs in out["bench"].items():
        for r in rs if isinstance(rs, list) else []:
            sm = r["step_ms"]
            lines.append(f"| {v} | {r['batch']} | {sm['mean']:.3f} | {sm['p50']:.3f} | {sm['p90']:.3f} | "
                         f"{sm['min']:.3f} | {sm['max']:.3f} |")
    for key in ("router", "fold"):
        for r in out.get(key, []):
            lines.append(f"- {key}: {r}")
    with open(os.path.join(a.out, "b1.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
