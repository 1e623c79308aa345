"""Where a step's GPU time goes: the full v2-lite-shape model, decode replayed from CUDA graphs and prefill.

  PYTHONPATH=.:scripts PYTHONUNBUFFERED=1 python3 scripts/gpu_profile.py --out $OUT

For each decode batch: the step's wall time (median of replays through `ModelRunner.execute`), then
the torch profiler (CUPTI sees the kernels inside graph replays) over a few replays: kernel time per
kernel name, the sum of kernel time, and the GPU's busy time (union of kernel intervals) against the
step's span, i.e. how much of the step is launch gaps between kernels rather than kernels. The same
for FP8-resident weights (`--fp8-batches`; `--fp8a8-batches`: W8A8 experts, off by default) and for
prefill lengths (eager, one forward; their walls measured first, before any profiler session).
Writes $OUT/profile.md (tables) and $OUT/profile.json.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch

from gpu_common import BLOCK, ceilings, decode_runner, graph_replay_ms, prefill_runner, say, wall_ms, write_v2lite


def kernel_events(prof) -> list:
    return [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]


def summarize(prof, steps: int, wall_ms: float) -> dict:
    evs = kernel_events(prof)
    spans = sorted((e.time_range.start, e.time_range.end) for e in evs)
    busy, cur_s, cur_e = 0.0, None, None
    for s, e in spans:
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                busy += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    if cur_e is not None:
        busy += cur_e - cur_s
    by_name: dict[str, list[float]] = {}
    for e in evs:
        by_name.setdefault(e.name, []).append(e.time_range.end - e.time_range.start)
    top = sorted(((sum(v) / steps, len(v) // steps, k) for k, v in by_name.items()), reverse=True)
    return {"wall_ms": wall_ms, "kernels_per_step": len(evs) / steps,
            "kernel_sum_ms": sum(e.time_range.end - e.time_range.start for e in evs) / steps / 1e3,
            "busy_ms": busy / steps / 1e3,
            "top": [{"us_per_step": round(us, 1), "calls_per_step": n, "name": k[:110]} for us, n, k in top[:25]]}


def profile_decode(model: str, batch: int, context: int, weight_format: str, reps: int = 30) -> dict:
    from torch.profiler import ProfilerActivity, profile

    r, step = decode_runner(model, batch, context, weight_format)
    wall = wall_ms(r, step, reps, warmup=5)
    # GPU-only time of a replay: the graph itself, back to back (no host work between).
    gpu_ms = graph_replay_ms(r, batch, context, reps)
    steps = 3
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            r.execute(*step)
        torch.cuda.synchronize()
    out = summarize(prof, steps, wall)
    out["graph_replay_ms"] = gpu_ms
    del r
    torch.cuda.empty_cache()
    return out


def prefill_walls(model: str, lengths: list[int]) -> dict[int, float]:
    """Wall ms of one eager prefill of each length (median of 3 after 2 warm-ups), all measured before any
    profiler session of this process, with one runner sized for the longest. A short prefill is host-bound
    (launches), and its wall is the planner's host record: measured after profiler sessions, as
    `profile_prefill` does, it may include the profiler's leftover cost per launch (both are recorded)."""
    r, _ = prefill_runner(model, max(lengths))
    prompt = torch.randint(5, 1000, (max(lengths),), generator=torch.Generator().manual_seed(3)).tolist()
    walls = {}
    for n in lengths:
        walls[n] = wall_ms(r, ([prompt[:n]], [0], [list(range(-(-n // BLOCK)))], [True]), reps=3, warmup=2)
        say(f"prefill {n}: wall {walls[n]:.2f} ms before any profiler session")
    del r
    torch.cuda.empty_cache()
    return walls


def profile_prefill(model: str, tokens: int, first_wall: float | None = None) -> dict:
    """The prefill point; wall_ms = `first_wall` (from `prefill_walls`) when given, the wall measured here
    (after the process's earlier profiler sessions) as wall_ms_after_profiling."""
    from torch.profiler import ProfilerActivity, profile

    r, step = prefill_runner(model, tokens)
    wall = wall_ms(r, step, reps=3, warmup=2)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        r.execute(*step)
        torch.cuda.synchronize()
    out = summarize(prof, 1, wall if first_wall is None else first_wall)
    out["wall_ms_after_profiling"] = wall
    del r
    torch.cuda.empty_cache()
    return out


def table(title: str, res: dict) -> str:
    lines = [f"### {title}", "",
             f"wall {res['wall_ms']:.3f} ms; graph replay alone {res.get('graph_replay_ms') or float('nan'):.3f} ms; "
             f"kernels {res['kernels_per_step']:.0f}/step; kernel sum {res['kernel_sum_ms']:.3f} ms; "
             f"GPU busy {res['busy_ms']:.3f} ms", "", "| us/step | calls | kernel |", "|---|---|---|"]
    lines += [f"| {t['us_per_step']} | {t['calls_per_step']} | `{t['name']}` |" for t in res["top"]]
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=".")
    p.add_argument("--layers", type=int, default=27)
    p.add_argument("--context", type=int, default=1000)
    p.add_argument("--batches", default="1,64,256")
    p.add_argument("--fp8-batches", default="1,64,256")
    p.add_argument("--fp8a8-batches", default="", help="batches for weight_format fp8-block-a8 (W8A8 experts)")
    p.add_argument("--prefill", default="8192,16000")
    p.add_argument("--model", default="", help="an existing model directory (default: write the v2-lite shape, "
                   "--layers deep, and delete it at the end)")
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as tmp:     # the models written here go with it
        return run(a, tmp)


def run(a, tmp: str) -> int:
    """Every point in turn, results on disk after each; 1 when a point failed (the others still ran)."""
    ceil = ceilings()
    say(f"ceilings: {ceil['hbm_copy_bytes_per_s'] / 1e12:.2f} TB/s, {ceil['bf16_gemm_flops'] / 1e12:.0f} TFLOP/s")
    model = a.model or write_v2lite(tmp, a.layers)
    results: dict = {"ceilings": ceil, "decode": {}, "fp8": {}, "fp8a8": {}, "prefill": {}, "failed": []}
    md = [f"# Profile, {torch.cuda.get_device_name(0)}, torch {torch.__version__}, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n"]

    def flush():
        with open(os.path.join(a.out, "profile.json"), "w") as f:
            json.dump(results, f, indent=1)
        with open(os.path.join(a.out, "profile.md"), "w") as f:
            f.write("\n".join(md))

    lengths = [int(x) for x in a.prefill.split(",") if x]
    first_walls: dict[int, float] = {}
    if lengths:
        try:
            first_walls = prefill_walls(model, lengths)
        except Exception as exc:                     # the points below then keep their own walls
            say(f"prefill walls: FAILED {type(exc).__name__}: {exc}")
            results["failed"].append(f"prefill walls: {type(exc).__name__}: {str(exc)[:300]}")
    for kind, batches, fmt in (("decode", a.batches, "native"), ("fp8", a.fp8_batches, "fp8-block"),
                               ("fp8a8", a.fp8a8_batches, "fp8-block-a8")):
        for b in [int(x) for x in batches.split(",") if x]:
            try:
                res = profile_decode(model, b, a.context, fmt)
            except Exception as exc:                     # one failed point is a line, the rest still run
                say(f"{kind} b{b}: FAILED {type(exc).__name__}: {exc}")
                results["failed"].append(f"{kind} b{b}: {type(exc).__name__}: {str(exc)[:300]}")
                flush()
                continue
            results[kind][b] = res
            md.append(table(f"{kind} ({fmt}) batch {b}, context {a.context}", res))
            say(f"{kind} b{b}: wall {res['wall_ms']:.2f} ms replay {res['graph_replay_ms']} busy "
                f"{res['busy_ms']:.2f} kernels {res['kernels_per_step']:.0f}")
            flush()
    for t in lengths:
        try:
            res = profile_prefill(model, t, first_walls.get(t))
        except Exception as exc:
            say(f"prefill {t}: FAILED {type(exc).__name__}: {exc}")
            results["failed"].append(f"prefill {t}: {type(exc).__name__}: {str(exc)[:300]}")
            flush()
            continue
        results["prefill"][t] = res
        md.append(table(f"prefill {t} tokens", res))
        say(f"prefill {t}: wall {res['wall_ms']:.2f} ms (after profiling: {res['wall_ms_after_profiling']:.2f}) "
            f"busy {res['busy_ms']:.2f}")
        flush()
    flush()
    return 1 if results["failed"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
