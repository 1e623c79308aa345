"""Prefill on one GPU: the forms of model/prefill_forms.py (the expanded keys from a plain GEMM, shared
experts on a side stream, the routed pairs sorted by one kernel) against the forms before, in one command.

  PYTHONPATH=.:scripts PYTHONUNBUFFERED=1 python3 scripts/gpu_prefill_parts.py --out OUT [--layers 27]

Steps, in this order (5 runs right after 2, with forms on, and last with them off), each skipped
when --budget-s would not allow it:
1. the v2-lite-shape model (bf16, --layers deep) written into a temporary folder, deleted at the end;
2. one engine (`ModelRunner`, eager) sized for the longest prompt: the prefill logits of a --check-tokens
   prompt with the forms on against the forms off (relative error under --tol, the same argmax);
   one MoE block at 8192 tokens on and off (the side stream runs the same kernels: bitwise equal);
3. the step's host wall time (execute + sync, median of 5) at each --tokens for each DWDP_PREFILL_FORMS
   value of VARIANTS (none, each form alone, all), at the first length twice each in turn, with the
   allocator's counters;
4. a kernel profile of one prefill at the first --tokens, on and off: kernel time by name, the GPU's busy
   time (union over streams), and the idle gaps between kernels summed by their neighbours;
5. `bench engine` prefill at --tokens through scripts/gpu_perf.py's bench_prefill (its own ceilings, so
   '% GEMM peak' is the bench's figure), forms on, then off.
Writes OUT/prefill_parts.json and OUT/prefill_parts.md (tables; printed last), OUT/bench_off and
OUT/bench_on (gpu_perf's files).
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

from gpu_common import prefill_runner, rel, say, wall_ms, write_v2lite
from gpu_profile import kernel_events, summarize

ENV = "DWDP_PREFILL_FORMS"
T_START = time.perf_counter()


def left(a) -> float:
    return a.budget_s - (time.perf_counter() - T_START)


VARIANTS = ("0", "kv_gemm", "shared_beside", "routed_first", "pair_sort", "1")   # DWDP_PREFILL_FORMS values timed


def forms(on) -> None:
    """on: True (all forms), False (none) or a $DWDP_PREFILL_FORMS value."""
    os.environ[ENV] = on if isinstance(on, str) else ("1" if on else "0")


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


def check_moe_block(r, rows: list) -> None:
    """One MoE block at 8192 tokens with each two-stream form and with the branches one after the other."""
    from dynamo_dwdp.model.moe import MoEBlock   # local import: the model after torch's CUDA set-up

    block = next(layer.mlp for layer in r.model.model.layers if isinstance(layer.mlp, MoEBlock))
    x = torch.randn(8192, r.model.cfg.hidden_size, device="cuda", dtype=torch.bfloat16,
                    generator=torch.Generator(device="cuda").manual_seed(5))
    outs = {}
    with torch.inference_mode():
        for v in ("0", "shared_beside", "routed_first"):
            forms(v)
            outs[v] = block(x, separate=True)
        torch.cuda.synchronize()
    for v in ("shared_beside", "routed_first"):
        same = all(torch.equal(a, b) for a, b in zip(outs[v], outs["0"]))
        rows.append((f"MoE block, 8192 tokens: {v} vs one stream",
                     "bitwise equal" if same else f"differ: routed {rel(outs[v][0], outs['0'][0]):.2e}, shared "
                     f"{rel(outs[v][1], outs['0'][1]):.2e}", "ok" if same else "FAIL"))


def bench(a, on: bool, model: str) -> dict:
    out = os.path.join(a.out, "bench_on" if on else "bench_off")
    env = {**os.environ, ENV: "1" if on else "0"}
    cmd = [sys.executable, "-u", os.path.join("scripts", "gpu_perf.py"), "--out", out, "--only", "bench_prefill",
           "--prefill", a.tokens, "--model", model, "--hw", "h200-measured", "--skip-checks", "--skip-matrix"]
    say(("forms on: " if on else "forms off: ") + " ".join(cmd[2:]))
    p = subprocess.run(cmd, env=env, timeout=max(20.0, left(a)), capture_output=True, text=True)
    with open(out + ".log", "w") as f:
        f.write(p.stdout + p.stderr)
    doc = json.load(open(os.path.join(out, "gpu_perf.json"))) if os.path.isfile(os.path.join(out, "gpu_perf.json")) else {}
    return {"rc": p.returncode, "bench": doc.get("bench", []), "ceilings": doc.get("ceilings")}


def run_bench(a, res: dict, on: bool, model: str, flush) -> None:
    name = "bench_on" if on else "bench_off"
    if left(a) < 30:
        res.setdefault("skipped", []).append(name)
        return
    try:
        res[name] = bench(a, on, model)
    except subprocess.TimeoutExpired:
        res.setdefault("skipped", []).append(f"{name} (timed out)")
    flush()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--layers", type=int, default=27)
    p.add_argument("--tokens", default="8192,16000", help="prefill lengths timed and benched (first: profiled)")
    p.add_argument("--check-tokens", type=int, default=2048)
    p.add_argument("--tol", type=float, default=2e-2, help="relative error of the logits, forms on vs off")
    p.add_argument("--budget-s", type=float, default=175.0, help="seconds for the whole run (steps are skipped)")
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as tmp:      # the model goes with it
        return run(a, tmp)


def run(a, tmp: str) -> int:
    tokens = [int(t) for t in a.tokens.split(",") if t]
    res: dict = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "argv": sys.argv,
                 "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "checks": [], "wall": {}, "profile": {}}
    rows: list = res["checks"]

    def flush():
        with open(os.path.join(a.out, "prefill_parts.json"), "w") as f:
            json.dump(res, f, indent=1, default=str)
        with open(os.path.join(a.out, "prefill_parts.md"), "w") as f:
            f.write(report(res, tokens))

    model = write_v2lite(tmp, a.layers)
    r, full = prefill_runner(model, max(tokens + [a.check_tokens]))
    prompt = full[0][0]
    say("engine loaded")
    with torch.inference_mode():
        forms(False)
        ref = r.execute(*step_args(a.check_tokens, prompt)).float()
        forms(True)
        new = r.execute(*step_args(a.check_tokens, prompt)).float()
    e = rel(new, ref)
    same_top = bool((new.argmax(-1) == ref.argmax(-1)).all())
    rows.append((f"prefill logits, {a.check_tokens} tokens, {a.layers} layers: forms on vs off",
                 f"rel err {e:.2e} (tol {a.tol:g}), argmax {'same' if same_top else 'DIFFERS'}",
                 "ok" if e < a.tol and same_top and torch.isfinite(new).all() else "FAIL"))
    check_moe_block(r, rows)
    for row in rows:
        say(f"check: {row}")
    flush()
    run_bench(a, res, True, model, flush)                # the forms' figure first: the one the issue is about
    for i, t in enumerate(tokens):
        for v in (VARIANTS + VARIANTS if i == 0 else VARIANTS):
            if left(a) < 45:
                res.setdefault("skipped", []).append(f"wall {t} {v}")
                continue
            forms(v)
            stats0 = torch.cuda.memory_stats()
            ms = wall_ms(r, step_args(t, prompt), reps=5, warmup=1)
            stats1 = torch.cuda.memory_stats()
            res["wall"].setdefault(str(t), {}).setdefault(v, []).append(round(ms, 3))
            res.setdefault("allocator", {})[f"{t} {v}"] = {k: stats1.get(k, 0) - stats0.get(k, 0) for k in (
                "num_alloc_retries", "num_device_alloc", "num_device_free", "num_sync_all_streams")}
            say(f"wall {t} tokens forms {v}: {ms:.2f} ms; allocator {res['allocator'][f'{t} {v}']}")
        flush()
    for on in (True, False):
        if left(a) < 38:
            res.setdefault("skipped", []).append(f"profile {'on' if on else 'off'}")
            continue
        forms(on)
        p = profile_step(r, step_args(tokens[0], prompt))
        res["profile"]["on" if on else "off"] = p
        say(f"profile {tokens[0]} forms {'on' if on else 'off'}: kernels {p['kernel_sum_ms']:.2f} ms, busy "
            f"{p['busy_ms']:.2f} ms, idle between kernels {p['idle_between_kernels_us'] / 1e3:.2f} ms")
        flush()
    del r
    torch.cuda.empty_cache()
    run_bench(a, res, False, model, flush)
    flush()
    md = report(res, tokens)
    with open(os.path.join(a.out, "prefill_parts.md"), "w") as f:
        f.write(md)
    print(md, flush=True)
    return 0 if all(c[2] == "ok" for c in rows) else 1


def report(res: dict, tokens: list[int]) -> str:
    lines = [f"# Prefill forms, {res['device']}, torch {res['torch']}, {res['date']}", "",
             "| check | result | status |", "|---|---|---|"]
    lines += [f"| {c[0]} | {c[1]} | {c[2]} |" for c in res["checks"]]
    lines += ["", "step wall ms (execute + sync, median of 5), each DWDP_PREFILL_FORMS value twice in turn", "",
              "| tokens | " + " | ".join(f"forms {v}" for v in VARIANTS) + " |", "|---|" + "---|" * len(VARIANTS)]
    for t, w in res["wall"].items():
        lines.append(f"| {t} | " + " | ".join(", ".join(map(str, w.get(v, []))) for v in VARIANTS) + " |")
    if res.get("allocator"):
        lines += ["", "allocator counters over each timing (retries, device allocs/frees): " + "; ".join(
            f"{k}: {v['num_alloc_retries']}/{v['num_device_alloc']}/{v['num_device_free']}"
            for k, v in res["allocator"].items())]
    for name in ("bench_off", "bench_on"):
        b = res.get(name)
        if not b:
            continue
        c = b.get("ceilings") or {}
        lines += ["", f"{name} (rc {b['rc']}; bf16 GEMM ceiling {c.get('bf16_gemm_flops', 0) / 1e12:.0f} TFLOP/s):"]
        for row in b["bench"]:
            if row["phase"] == "prefill":
                lines.append(f"- prefill {row['tokens']}: {row['step_ms']:.2f} ms (p50 {row['p50_ms']:.2f}), "
                             f"{100 * row['flop_frac']:.1f}% of GEMM peak, {row['tok_s']:,.0f} tok/s")
    for name, p in res["profile"].items():
        lines += ["", f"## profile {tokens[0]} tokens, forms {name}", "",
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
