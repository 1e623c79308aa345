"""Where a step's GPU time goes: the full v2-lite-shape model, decode replayed from CUDA graphs and prefill.

  PYTHONPATH=.:scripts PYTHONUNBUFFERED=1 python3 scripts/gpu_profile.py --out $OUT

For each decode batch: the step's wall time (median of replays through `ModelRunner.execute`), then
the torch profiler (CUPTI sees the kernels inside graph replays) over a few replays: kernel time per
kernel name, the sum of kernel time, and the GPU's busy time (union of kernel intervals) against the
step's span, i.e. how much of the step is launch gaps between kernels rather than kernels. The same
for FP8-resident weights (`--fp8-batches`; `--fp8a8-batches`: W8A8 experts, off by default) and for
prefill lengths (eager, one forward).
Writes $OUT/profile.md (tables) and $OUT/profile.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import torch

from gpu_perf import ceilings, say, write_v2lite


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


def decode_runner(model: str, batch: int, context: int, weight_format: str):
    from dynamo_dwdp.config.engine import EngineSettings
    from dynamo_dwdp.engine.model_runner import ModelRunner
    from dynamo_dwdp.model.moe_executor import LocalExecutor

    bs = 16
    per = (context + 1 + bs - 1) // bs
    cfg = EngineSettings(block_size=bs, num_kv_blocks=batch * per + 1, device="cuda", dtype="bfloat16",
                         max_num_seqs=batch, max_num_batched_tokens=8192, cuda_graphs=True,
                         capture_graphs_at_start=False, weight_format=weight_format)
    r = ModelRunner(model, cfg, LocalExecutor)
    g = torch.Generator().manual_seed(2)
    tables = [list(range(i * per, (i + 1) * per)) for i in range(batch)]
    for i in range(0, batch, 8):
        chunk = list(range(i, min(batch, i + 8)))
        r.execute([torch.randint(5, 1000, (context,), generator=g).tolist() for _ in chunk], [0] * len(chunk),
                  [tables[j] for j in chunk], [True] * len(chunk))
    step = ([[int(t)] for t in torch.randint(5, 1000, (batch,), generator=g)], [context] * batch, tables,
            [True] * batch)
    return r, step


def profile_decode(model: str, batch: int, context: int, weight_format: str, reps: int = 30) -> dict:
    from torch.profiler import ProfilerActivity, profile

    r, step = decode_runner(model, batch, context, weight_format)
    for _ in range(5):
        r.execute(*step)
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        r.execute(*step)
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t) * 1e3)
    # GPU-only time of a replay: the graph itself, back to back (no host work between).
    entry = r.graphs.graphs.get(r.graphs.key(batch, context + 1)) if r.graphs is not None else None
    gpu_ms = None
    if entry is not None:
        graph = entry[0]
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(reps):
            graph.replay()
        e.record()
        torch.cuda.synchronize()
        gpu_ms = s.elapsed_time(e) / reps
    steps = 3
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            r.execute(*step)
        torch.cuda.synchronize()
    out = summarize(prof, steps, statistics.median(times))
    out["graph_replay_ms"] = gpu_ms
    del r
    torch.cuda.empty_cache()
    return out


def profile_prefill(model: str, tokens: int) -> dict:
    from torch.profiler import ProfilerActivity, profile

    from dynamo_dwdp.config.engine import EngineSettings
    from dynamo_dwdp.engine.model_runner import ModelRunner
    from dynamo_dwdp.model.moe_executor import LocalExecutor

    bs = 16
    blocks = (tokens + bs - 1) // bs
    r = ModelRunner(model, EngineSettings(block_size=bs, num_kv_blocks=blocks + 1, device="cuda", dtype="bfloat16",
                                          max_num_batched_tokens=tokens), LocalExecutor)
    prompt = torch.randint(5, 1000, (tokens,), generator=torch.Generator().manual_seed(3)).tolist()
    step = ([prompt], [0], [list(range(blocks))], [True])
    for _ in range(2):
        r.execute(*step)
    torch.cuda.synchronize()
    times = []
    for _ in range(3):
        t = time.perf_counter()
        r.execute(*step)
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t) * 1e3)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        r.execute(*step)
        torch.cuda.synchronize()
    out = summarize(prof, 1, statistics.median(times))
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


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=".")
    p.add_argument("--layers", type=int, default=27)
    p.add_argument("--context", type=int, default=1000)
    p.add_argument("--batches", default="1,64,256")
    p.add_argument("--fp8-batches", default="1,64,256")
    p.add_argument("--fp8a8-batches", default="", help="batches for weight_format fp8-block-a8 (W8A8 experts)")
    p.add_argument("--prefill", default="8192,16000")
    p.add_argument("--model", default="", help="an existing model directory (default: write the v2-lite shape)")
    a = p.parse_args()
    os.makedirs(a.out, exist_ok=True)
    ceil = ceilings()
    say(f"ceilings: {ceil['hbm_copy_bytes_per_s'] / 1e12:.2f} TB/s, {ceil['bf16_gemm_flops'] / 1e12:.0f} TFLOP/s")
    model = a.model or write_v2lite(tempfile.mkdtemp(), a.layers)
    results: dict = {"ceilings": ceil, "decode": {}, "fp8": {}, "fp8a8": {}, "prefill": {}}
    md = [f"# Profile, {torch.cuda.get_device_name(0)}, torch {torch.__version__}, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n"]

    def flush():
        with open(os.path.join(a.out, "profile.json"), "w") as f:
            json.dump(results, f, indent=1)
        with open(os.path.join(a.out, "profile.md"), "w") as f:
            f.write("\n".join(md))

    for kind, batches, fmt in (("decode", a.batches, "native"), ("fp8", a.fp8_batches, "fp8-block"),
                               ("fp8a8", a.fp8a8_batches, "fp8-block-a8")):
        for b in [int(x) for x in batches.split(",") if x]:
            try:
                res = profile_decode(model, b, a.context, fmt)
            except Exception as exc:                     # one failed point is a line, the rest still run
                say(f"{kind} b{b}: FAILED {type(exc).__name__}: {exc}")
                continue
            results[kind][b] = res
            md.append(table(f"{kind} ({fmt}) batch {b}, context {a.context}", res))
            say(f"{kind} b{b}: wall {res['wall_ms']:.2f} ms replay {res['graph_replay_ms']} busy "
                f"{res['busy_ms']:.2f} kernels {res['kernels_per_step']:.0f}")
            flush()
    for t in [int(x) for x in a.prefill.split(",") if x]:
        try:
            res = profile_prefill(model, t)
        except Exception as exc:
            say(f"prefill {t}: FAILED {type(exc).__name__}: {exc}")
            continue
        results["prefill"][t] = res
        md.append(table(f"prefill {t} tokens", res))
        say(f"prefill {t}: wall {res['wall_ms']:.2f} ms busy {res['busy_ms']:.2f}")
        flush()
    flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
