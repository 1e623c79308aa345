"""Where an eager prefill step's time goes on one GPU, in one command: the engine bench, the step's wall
time, and a kernel profile with the idle time between kernels summed by the kernels on either side.

  PYTHONPATH=.:scripts PYTHONUNBUFFERED=1 python3 scripts/gpu_prefill_parts.py --out OUT [--layers 27]

Steps, in this order, each skipped when --budget-s would not allow it:
1. the v2-lite-shape model (bf16, --layers deep) written into a temporary folder, deleted at the end;
2. `bench engine` prefill at --tokens through scripts/gpu_perf.py's bench_prefill (its own ceilings, so
   '% GEMM peak' is the bench's figure);
3. one engine (`ModelRunner`, eager) sized for the longest prompt: the step's host wall time (execute +
   sync, median of 5) at each --tokens, --rounds times in turn, with the caching allocator's counters
   over each timing (device allocations during a timed step would stall the host);
4. a kernel profile of one prefill at the first --tokens: kernel time by name, the GPU's busy time
   (union over streams), first kernel to last, and the idle gaps between kernels summed by neighbours.
Environment variables (DWDP_PREFILL_ATTENTION, DWDP_FUSED_KERNELS, ...) apply to every step: compare two
configurations by running the command twice. Writes OUT/prefill_parts.json and OUT/prefill_parts.md
(tables; printed last) and OUT/bench (gpu_perf's files).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

from gpu_common import prefill_runner, say, wall_ms, write_v2lite
from gpu_profile import kernel_events, summarize

T_START = time.perf_counter()


def left(a) -> float:
    return a.budget_s - (time.perf_counter() - T_START)


def step_args(tokens: int, prompt: list[int], block: int = 16):
    return ([prompt[:tokens]], [0], [list(range((tokens + block - 1) // block))], [True])


def gaps(prof) -> dict:
    """Idle time between kernels (union over streams, first kernel to last), summed by (kernel before,
    kernel after)."""
    evs = sorted(kernel_events(prof), key=lambda e: e.time_range.start)
    by_pair: dict[tuple[str, str], list[float]] = {}
    end, last = None, None
    for e in evs:
        if end is not None and e.time_range.start > end:
            by_pair.setdefault((last.name[:70], e.name[:70]), []).append(e.time_range.start - end)
        if end is None or e.time_range.end > end:
            end, last = e.time_range.end, e
    pairs = sorted(((sum(v), len(v), k) for k, v in by_pair.items()), reverse=True)
    return {"idle_between_kernels_us": sum(sum(v) for v in by_pair.values()),
            "first_to_last_kernel_us": (end - evs[0].time_range.start) if evs else 0.0,
            "top_gaps": [{"us": round(us, 1), "count": n, "before": k[0], "after": k[1]} for us, n, k in pairs[:15]]}


def profile_step(r, args) -> dict:
    """One step under the profiler (CUDA activity only, as scripts/gpu_profile.py), after one untimed."""
    from torch.profiler import ProfilerActivity, profile

    r.execute(*args)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        r.execute(*args)
        torch.cuda.synchronize()
    res = summarize(prof, 1, float("nan"))
    res.update(gaps(prof))
    return res


def bench(a, model: str) -> dict:
    out = os.path.join(a.out, "bench")
    cmd = [sys.executable, "-u", os.path.join("scripts", "gpu_perf.py"), "--out", out, "--only", "bench_prefill",
           "--prefill", a.tokens, "--model", model, "--hw", "h200-measured", "--skip-checks", "--skip-matrix"]
    say(" ".join(cmd[2:]))
    p = subprocess.run(cmd, timeout=max(20.0, left(a)), capture_output=True, text=True)
    with open(out + ".log", "w") as f:
        f.write(p.stdout + p.stderr)
    doc = json.load(open(os.path.join(out, "gpu_perf.json"))) if os.path.isfile(os.path.join(out, "gpu_perf.json")) else {}
    return {"rc": p.returncode, "bench": doc.get("bench", []), "ceilings": doc.get("ceilings")}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--layers", type=int, default=27)
    p.add_argument("--tokens", default="8192,16000", help="prefill lengths benched and timed (the first also profiled)")
    p.add_argument("--rounds", type=int, default=2, help="wall timings of each length, in turn")
    p.add_argument("--budget-s", type=float, default=150.0, help="seconds for the whole run (steps are skipped)")
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as tmp:      # the model goes with it
        return run(a, tmp)


def run(a, tmp: str) -> int:
    tokens = [int(t) for t in a.tokens.split(",") if t]
    res: dict = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "argv": sys.argv,
                 "env": {k: v for k, v in os.environ.items() if k.startswith("DWDP_")},
                 "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "wall": {}, "profile": None}

    def flush():
        with open(os.path.join(a.out, "prefill_parts.json"), "w") as f:
            json.dump(res, f, indent=1, default=str)
        with open(os.path.join(a.out, "prefill_parts.md"), "w") as f:
            f.write(report(res, tokens))

    model = write_v2lite(tmp, a.layers)
    if left(a) > 30:
        try:
            res["bench"] = bench(a, model)
        except subprocess.TimeoutExpired:
            res.setdefault("skipped", []).append("bench (timed out)")
    else:
        res.setdefault("skipped", []).append("bench")
    flush()
    r, full = prefill_runner(model, max(tokens))
    prompt = full[0][0]
    say("engine loaded")
    for _ in range(a.rounds):
        for t in tokens:
            if left(a) < 10:
                res.setdefault("skipped", []).append(f"wall {t}")
                continue
            stats0 = torch.cuda.memory_stats()
            ms = wall_ms(r, step_args(t, prompt), reps=5, warmup=1)
            stats1 = torch.cuda.memory_stats()
            res["wall"].setdefault(str(t), []).append(round(ms, 3))
            res.setdefault("allocator", []).append({"tokens": t, **{k: stats1.get(k, 0) - stats0.get(k, 0) for k in (
                "num_alloc_retries", "num_device_alloc", "num_device_free", "num_sync_all_streams")}})
            say(f"wall {t} tokens: {ms:.2f} ms; allocator {res['allocator'][-1]}")
        flush()
    if left(a) > 5:
        res["profile"] = p = profile_step(r, step_args(tokens[0], prompt))
        say(f"profile {tokens[0]}: kernels {p['kernel_sum_ms']:.2f} ms, busy {p['busy_ms']:.2f} ms, idle between "
            f"kernels {p['idle_between_kernels_us'] / 1e3:.2f} ms")
    else:
        res.setdefault("skipped", []).append("profile")
    del r
    torch.cuda.empty_cache()
    flush()
    md = report(res, tokens)
    print(md, flush=True)
    return 0 if res.get("bench", {}).get("rc", 1) == 0 and not res.get("skipped") else 1


def report(res: dict, tokens: list[int]) -> str:
    env = ", ".join(f"{k}={v}" for k, v in sorted(res["env"].items())) or "none"
    lines = [f"# Prefill step, {res['device']}, torch {res['torch']}, {res['date']}", "",
             f"DWDP_ variables: {env}", ""]
    b = res.get("bench")
    if b:
        c = b.get("ceilings") or {}
        lines += [f"bench (rc {b['rc']}; bf16 GEMM ceiling {c.get('bf16_gemm_flops', 0) / 1e12:.0f} TFLOP/s):"]
        for row in b["bench"]:
            if row["phase"] == "prefill":
                lines.append(f"- prefill {row['tokens']}: {row['step_ms']:.2f} ms (p50 {row['p50_ms']:.2f}), "
                             f"{100 * row['flop_frac']:.1f}% of GEMM peak, {row['tok_s']:,.0f} tok/s")
    lines += ["", "step wall ms (execute + sync, median of 5), each round in turn: " + "; ".join(
        f"{t} tokens {', '.join(map(str, w))}" for t, w in res["wall"].items())]
    if res.get("allocator"):
        lines += ["", "allocator counters over each timing (tokens: retries/device allocs/device frees): " + "; ".join(
            f"{x['tokens']}: {x['num_alloc_retries']}/{x['num_device_alloc']}/{x['num_device_free']}"
            for x in res["allocator"])]
    p = res.get("profile")
    if p:
        lines += ["", f"## profile {tokens[0]} tokens", "",
                  f"kernels {p['kernels_per_step']:.0f}; kernel sum {p['kernel_sum_ms']:.3f} ms; GPU busy "
                  f"{p['busy_ms']:.3f} ms; first kernel to last {p['first_to_last_kernel_us'] / 1e3:.3f} ms; idle "
                  f"between kernels {p['idle_between_kernels_us'] / 1e3:.3f} ms",
                  "", "| us | calls | kernel |", "|---|---|---|"]
        lines += [f"| {k['us_per_step']} | {k['calls_per_step']} | `{k['name']}` |" for k in p["top"]]
        lines += ["", "| idle us | gaps | kernel before | kernel after |", "|---|---|---|---|"]
        lines += [f"| {g['us']} | {g['count']} | `{g['before']}` | `{g['after']}` |" for g in p["top_gaps"]]
    if res.get("skipped"):
        lines += ["", "skipped: " + "; ".join(res["skipped"])]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
