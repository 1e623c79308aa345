"""The prefill routed-expert path per variant, checked and timed on one GPU in one command.

  PYTHONPATH=.:scripts PYTHONUNBUFFERED=1 python3 scripts/gpu_routed_prefill.py --out OUT [--budget-s 200]

Shapes: v2-lite (64 routed experts, top-6, H 2048, I 1408), bf16, one bank holding every expert (one rank),
ids the top-6 of uniform random scores (the bench model's random router gives near-uniform load).
Variants of one MoE layer's routed experts (`routed_experts_grouped` at prefill sizes):
- `torch`: torch.sort, gather, searchsorted, compares, scatter (DWDP_PREFILL_SORT=torch);
- `counting`: the three-kernel counting sort with the gather in its last pass (kernels/moe_sort.py);
- `tri13:<tile>`: the counting sort without the gather, then moe_gemm.grouped_kernel for [gate; up]
  (rows gathered through `order`, SwiGLU in the epilogue), cutlass for the down projection;
- `tri:<tile>/<tile>`: grouped_kernel for both projections.
Steps (each skipped when --budget-s would not allow it):
1. checks at --check-tokens: `counting` bit for bit equal to `torch`; every variant vs a float64 reference
   (error no worse than 1.5x torch's + 1e-3);
2. CUDA-event timings per layer at --tokens, --rounds rounds with the variants in turn (median of --reps calls);
3. the v2-lite-shape model (27 layers), `scripts/gpu_perf.py --only bench_prefill` at --bench-tokens with
   DWDP_PREFILL_SORT=torch and =counting, in turn;
4. one engine: the --bench-tokens[0] prefill's logits with each sort (bit for bit), then a kernel profile of
   that step with the default (scripts/gpu_prefill_parts.profile_step).
Writes OUT/routed_prefill.json and OUT/routed_prefill.md (printed last), OUT/bench_<sort>/ (gpu_perf's files).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

from gpu_common import say

T_START = time.perf_counter()
H, INTER, E, K = 2048, 1408, 64, 6


def left(a) -> float:
    return a.budget_s - (time.perf_counter() - T_START)


def tiles():
    from dynamo_dwdp.model.kernels.moe_gemm import TileConfig

    up = {"128x128x64w8s3": TileConfig(128, 128, block_k=64, warps=8, stages=3, work_list=True),
          "128x128x64w8s4": TileConfig(128, 128, block_k=64, warps=8, stages=4, work_list=True),
          "128x64x64w4s4": TileConfig(128, 64, block_k=64, warps=4, stages=4, work_list=True)}
    down = {"128x256x64w8s3": TileConfig(128, 256, block_k=64, warps=8, stages=3, work_list=True),
            "128x128x64w8s4": TileConfig(128, 128, block_k=64, warps=8, stages=4, work_list=True)}
    return up, down


def make_layer(T: int, gen: torch.Generator):
    from dynamo_dwdp.model.experts import ExpertBank

    dev = "cuda"
    bank = ExpertBank(0, (torch.randn(E, 2 * INTER, H, generator=gen, device=dev) * 0.02).to(torch.bfloat16),
                      (torch.randn(E, H, INTER, generator=gen, device=dev) * 0.02).to(torch.bfloat16))
    x = torch.randn(T, H, generator=gen, device=dev).to(torch.bfloat16)
    ids = torch.rand(T, E, generator=gen, device=dev).topk(K, dim=1).indices
    w = torch.rand(T, K, generator=gen, device=dev)
    return bank, x, ids, w


def variant_fn(name: str, bank, x, ids, w):
    """A no-argument call computing the layer's routed output with variant `name`."""
    from dynamo_dwdp.model import experts
    from dynamo_dwdp.model.kernels import moe_gemm, moe_prefill, moe_sort

    if name in ("torch", "counting"):
        def call():
            experts.PREFILL_SORT = name
            return experts.routed_experts_grouped(x, ids, w, [bank])
        return call
    up_tiles, down_tiles = tiles()
    kind, spec = name.split(":")
    t13, _, t2 = spec.partition("/")
    T = x.shape[0]
    rows = T * K

    def call():
        starts, order, pos, _ = moe_sort.sort_pairs(ids.reshape(-1), E, None, K, [(0, E)])
        h = torch.empty(rows, INTER, dtype=x.dtype, device=x.device)
        moe_gemm.TILE_OVERRIDE["swiglu"] = up_tiles[t13]
        moe_gemm._launch("swiglu", x, order, starts, bank.w13, None, h, 0, E, 0, INTER, H, K, True, True, False,
                         rows / E, E)
        if kind == "tri13":
            y = torch._grouped_mm(h, bank.w2.transpose(1, 2), offs=starts[1:E + 1])
        else:
            y = torch.empty(rows, H, dtype=x.dtype, device=x.device)
            moe_gemm.TILE_OVERRIDE["down"] = down_tiles[t2]
            moe_gemm._launch("down", h, order, starts, bank.w2, None, y, 0, E, 0, H, INTER, K, False, False, False,
                             rows / E, E)
        moe_gemm.TILE_OVERRIDE.clear()
        return moe_prefill.combine(y, pos.view(T, K), w)
    return call


def variants() -> list[str]:
    up, down = tiles()
    return (["torch", "counting"] + [f"tri13:{u}" for u in up]
            + [f"tri:{u}/{d}" for u in list(up)[:2] for d in down])


def reference(bank, x, ids, w) -> torch.Tensor:
    """float64 routed output (per expert)."""
    out = torch.zeros(x.shape, dtype=torch.float64, device=x.device)
    xd = x.double()
    for e in range(E):
        t, j = (ids == e).nonzero(as_tuple=True)
        if t.numel() == 0:
            continue
        g, u = (xd[t] @ bank.w13[e].double().T).chunk(2, dim=-1)
        y = (torch.nn.functional.silu(g) * u) @ bank.w2[e].double().T
        out.index_add_(0, t, y * w[t, j, None].double())
    return out


def rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def checks(a, res) -> set[str]:
    """Step 1; returns the variants that passed."""
    gen = torch.Generator(device="cuda").manual_seed(1)
    bank, x, ids, w = make_layer(a.check_tokens, gen)
    ref = reference(bank, x, ids, w)
    outs, ok = {}, set()
    for name in variants():
        try:
            outs[name] = variant_fn(name, bank, x, ids, w)()
        except Exception as exc:                                  # a tile that does not compile: a row saying so
            res["checks"].append({"variant": name, "error": f"{type(exc).__name__}: {str(exc)[:200]}"})
            continue
    e_torch = rel(outs["torch"], ref)
    for name, y in outs.items():
        e = rel(y, ref)
        row = {"variant": name, "rel_vs_float64": e, "finite": bool(torch.isfinite(y).all())}
        if name == "counting":
            row["bitwise_equal_torch"] = bool(torch.equal(y, outs["torch"]))
            good = row["bitwise_equal_torch"]
        else:
            good = row["finite"] and e <= 1.5 * e_torch + 1e-3
        row["ok"] = good
        res["checks"].append(row)
        say(f"check {name}: rel {e:.3e} {'ok' if good else 'FAILED'}")
        if good:
            ok.add(name)
    # the 8K layer bit for bit, counting vs torch
    bank, x, ids, w = make_layer(8192, gen)
    eq = torch.equal(variant_fn("torch", bank, x, ids, w)(), variant_fn("counting", bank, x, ids, w)())
    res["checks"].append({"variant": "counting vs torch, 8192 tokens", "ok": eq, "bitwise_equal_torch": eq})
    say(f"8192 tokens counting == torch bitwise: {eq}")
    if not eq:
        ok.discard("counting")
    return ok


def timings(a, res, ok: set[str]) -> None:
    gen = torch.Generator(device="cuda").manual_seed(2)
    for T in [int(t) for t in a.tokens.split(",")]:
        if left(a) < 60:
            res.setdefault("skipped", []).append(f"timings {T}")
            continue
        bank, x, ids, w = make_layer(T, gen)
        fns = {n: variant_fn(n, bank, x, ids, w) for n in variants() if n in ok}
        for fn in fns.values():
            fn()
        torch.cuda.synchronize()
        times: dict[str, list[float]] = {n: [] for n in fns}
        for _ in range(a.rounds):
            for n, fn in fns.items():
                for _ in range(a.reps):
                    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    s.record()
                    fn()
                    e.record()
                    e.synchronize()
                    times[n].append(s.elapsed_time(e))
        flops = 6.0 * T * K * H * INTER
        row = {}
        for n, v in times.items():
            med = sorted(v)[len(v) // 2]
            row[n] = {"ms": round(med, 4), "tflops": round(flops / med / 1e9, 1)}
        res["layer"][str(T)] = row
        say(f"{T} tokens: " + ", ".join(f"{n} {r['ms']:.3f}" for n, r in row.items()))
        del bank, x, ids, w, fns
        torch.cuda.empty_cache()


def bench(a, model: str, sort: str, res) -> None:
    out = os.path.join(a.out, f"bench_{sort}")
    cmd = [sys.executable, "-u", os.path.join("scripts", "gpu_perf.py"), "--out", out, "--only", "bench_prefill",
           "--prefill", a.bench_tokens, "--model", model, "--hw", "h200-measured", "--skip-checks", "--skip-matrix",
           "--context", "1000"]
    say(f"DWDP_PREFILL_SORT={sort} " + " ".join(cmd[2:]))
    p = subprocess.run(cmd, timeout=max(20.0, left(a)), capture_output=True, text=True,
                       env={**os.environ, "DWDP_PREFILL_SORT": sort})
    with open(out + ".log", "w") as f:
        f.write(p.stdout + p.stderr)
    path = os.path.join(out, "gpu_perf.json")
    doc = json.load(open(path)) if os.path.isfile(path) else {}
    ceiling = (doc.get("ceilings") or {}).get("bf16_gemm_flops", 0) / 1e12
    res["bench"][sort] = {"rc": p.returncode, "ceiling_tflops": ceiling,
                          "prefill": [{k: r.get(k) for k in ("tokens", "step_ms", "p50_ms", "flop_frac", "tok_s")}
                                      for r in doc.get("bench", []) if r.get("phase") == "prefill"]}
    say(f"bench {sort}: {res['bench'][sort]}")


def engine(a, model: str, res) -> None:
    from gpu_common import prefill_runner
    from gpu_prefill_parts import profile_step

    from dynamo_dwdp.model import experts

    T = int(a.bench_tokens.split(",")[0])
    r, step = prefill_runner(model, T)
    logits = {}
    for sort in ("torch", "counting"):
        experts.PREFILL_SORT = sort
        logits[sort] = r.execute(*step).clone()
    eq = torch.equal(logits["torch"], logits["counting"])
    res["checks"].append({"variant": f"engine {T}-token prefill logits, 27 layers: counting vs torch", "ok": eq,
                          "bitwise_equal_torch": eq})
    say(f"engine logits bitwise equal: {eq}")
    for sort in ("torch", "counting"):
        if left(a) < 10:
            res.setdefault("skipped", []).append(f"profile {sort}")
            continue
        experts.PREFILL_SORT = sort
        p = profile_step(r, step)
        res["profile"][sort] = p
        say(f"profile {sort}: kernels {p['kernels_per_step']:.0f}, sum {p['kernel_sum_ms']:.2f} ms, busy "
            f"{p['busy_ms']:.2f} ms, idle {p['idle_between_kernels_us'] / 1e3:.2f} ms")
    experts.PREFILL_SORT = "counting"


def report(res) -> str:
    lines = [f"# Prefill routed experts, {res['device']}, torch {res['torch']}, {res['date']}", ""]
    lines += ["## checks", "", "| variant | rel vs float64 | bitwise = torch | ok |", "|---|---|---|---|"]
    for c in res["checks"]:
        lines.append(f"| {c['variant']} | {c.get('rel_vs_float64', '') if 'error' not in c else c['error']} | "
                     f"{c.get('bitwise_equal_torch', '')} | {c.get('ok', False)} |")
    for T, row in res["layer"].items():
        lines += ["", f"## one MoE layer's routed experts, {T} tokens (ms, median; TFLOP/s of the routed GEMMs)", "",
                  "| variant | ms | TFLOP/s |", "|---|---|---|"]
        lines += [f"| {n} | {r['ms']:.3f} | {r['tflops']} |" for n, r in row.items()]
    for sort, b in res["bench"].items():
        lines += ["", f"## bench prefill, DWDP_PREFILL_SORT={sort} (rc {b['rc']}, "
                      f"ceiling {b['ceiling_tflops']:.0f} TFLOP/s)"]
        lines += [f"- {p['tokens']}: {p['step_ms']:.2f} ms (p50 {p['p50_ms']:.2f}), "
                  f"{100 * p['flop_frac']:.1f}% of GEMM peak" for p in b["prefill"]]
    for sort, p in res["profile"].items():
        lines += ["", f"## profile, {sort}", "",
                  f"kernels {p['kernels_per_step']:.0f}; kernel sum {p['kernel_sum_ms']:.3f} ms; busy "
                  f"{p['busy_ms']:.3f} ms; first to last {p['first_to_last_kernel_us'] / 1e3:.3f} ms; idle "
                  f"{p['idle_between_kernels_us'] / 1e3:.3f} ms", "", "| us | calls | kernel |", "|---|---|---|"]
        lines += [f"| {k['us_per_step']} | {k['calls_per_step']} | `{k['name']}` |" for k in p["top"]]
    if res.get("skipped"):
        lines += ["", "skipped: " + "; ".join(res["skipped"])]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--tokens", default="2048,8192,16000")
    p.add_argument("--check-tokens", type=int, default=2048)
    p.add_argument("--bench-tokens", default="8192,16000")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--budget-s", type=float, default=200.0)
    a = p.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    res = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "argv": sys.argv,
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "checks": [], "layer": {}, "bench": {},
           "profile": {}}

    def flush():
        with open(os.path.join(a.out, "routed_prefill.json"), "w") as f:
            json.dump(res, f, indent=1, default=str)
        with open(os.path.join(a.out, "routed_prefill.md"), "w") as f:
            f.write(report(res))

    ok = checks(a, res)
    flush()
    timings(a, res, ok)
    flush()
    from gpu_common import write_v2lite
    import tempfile

    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as tmp:
        model = write_v2lite(tmp, 27)
        for sort in ("torch", "counting"):
            if left(a) > 40:
                bench(a, model, sort, res)
            else:
                res.setdefault("skipped", []).append(f"bench {sort}")
            flush()
        if left(a) > 20:
            engine(a, model, res)
        else:
            res.setdefault("skipped", []).append("engine")
    flush()
    print(report(res), flush=True)
    return 0 if all(c.get("ok") for c in res["checks"] if "error" not in c) else 1


if __name__ == "__main__":
    raise SystemExit(main())
