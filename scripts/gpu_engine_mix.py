"""The serving workload through the engine alone: the A/B point's requests (ISL lognormal 1K-8K, fixed
OSL, a closed loop at one concurrency) driven straight into `EngineCore` with the serving settings, no
Dynamo, no asyncio, no second thread. What a worker's steps would cost if nothing else ran beside them;
the reference a serving point is compared with (same prompt mix, same scheduler, same step kinds).

    PYTHONPATH=.:scripts python3 scripts/gpu_engine_mix.py --model DIR --out OUT [--concurrency 64]
    PYTHONPATH=.:scripts python3 scripts/gpu_engine_mix.py --model DIR --out OUT --config configs/tiny-cpu.yaml \
        --isl-mean 48 --isl-max 96 --isl-min 16 --osl 8 --requests 12 --concurrency 4      # CPU, tiny model

Per step: its kind (decode replayed from a CUDA graph, or eager: prefill), tokens, wall time of
`EngineCore.step`, the launch's wall and CPU time and the device time (ExecutorStats' totals, split by
kind by the engine). With --probe, on CUDA, one eager step also runs under the CUDA sync-debug mode
(every host sync it makes, counted) and one under torch.profiler (top kernels, top host ops by self CPU
time); both slow their steps, which are in the timed window. Writes OUT/mix.json and OUT/mix.md.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import time
import warnings

import numpy as np
import torch

from dynamo_dwdp.ab.workload import LengthDist
from dynamo_dwdp.config.schema import build
from dynamo_dwdp.config.settings import load_settings
from dynamo_dwdp.engine.sampling import SamplingParams
from dynamo_dwdp.errors import UserError
from dynamo_dwdp.group.context import GroupSpec
from dynamo_dwdp.rank.build import build_rank_engine

FIELDS = ("launch_seconds", "launch_cpu_seconds", "device_seconds", "device_steps", "graph_steps", "steps", "tokens")
GRAPH_PARTS = ("graph_launch_seconds", "graph_launch_cpu_seconds", "graph_device_seconds")


def kinds(t: dict) -> dict:
    """Per step kind (graph / eager), from the run's ExecutorStats totals: steps, and the mean launch
    wall, launch CPU and device ms of a step. The engine books each step's device time to its own kind
    when it reads the step back (with async scheduling that is the next call of `step`)."""
    out = {}
    n_graph, n_eager = t["graph_steps"], t["steps"] - t["graph_steps"]
    for kind, n, part in (("graph", n_graph, lambda k: t[f"graph_{k}"]),
                          ("eager", n_eager, lambda k: t[k] - t[f"graph_{k}"])):
        if n:
            out[kind] = {"steps": n, **{f"{k}_ms_mean": 1e3 * part(k) / n
                                        for k in ("launch_seconds", "launch_cpu_seconds", "device_seconds")}}
    return out


def snapshot(stats) -> dict:
    return {k: getattr(stats, k) for k in FIELDS}


def run(a) -> dict:
    settings = load_settings(a.config)
    isl = build(LengthDist, {"mean": a.isl_mean, "cv": a.isl_cv, "min": a.isl_min, "max": a.isl_max},
                where="gpu_engine_mix --isl-*", path="isl")           # the A/B workload's law, checked as there
    eng = settings.engine
    overrides = {"max_num_seqs": a.concurrency}
    if a.max_model_len:
        overrides["max_model_len"] = a.max_model_len
    eng = dataclasses.replace(eng, **overrides)
    t0 = time.perf_counter()
    re = build_rank_engine(a.model, eng, GroupSpec(strategy="single", name="mix"))
    print(f"engine built in {time.perf_counter() - t0:.1f}s", flush=True)
    engine, stats = re.engine, re.stats
    vocab = re.runner.model_config.vocab_size
    rng = np.random.default_rng(a.seed)
    isls = isl.sample(rng, a.requests)
    prompts = [rng.integers(0, vocab, n).tolist() for n in isls]
    params = SamplingParams(max_tokens=a.osl, ignore_eos=True)
    pending = collections.deque(range(a.requests))
    running = set()

    def admit() -> None:
        while pending and len(running) < a.concurrency:
            i = pending.popleft()
            engine.add_request(f"mix-{i}", prompts[i], params)
            running.add(f"mix-{i}")

    steps: list[dict] = []
    generated = 0
    admit()
    start = time.perf_counter()
    sync_step = prof_step = None
    while running:
        before = snapshot(stats)
        kind_probe = None
        maybe_eager = a.probe and engine.scheduler.waiting and len(steps) >= 4    # this step may be a prefill
        if torch.cuda.is_available() and maybe_eager and sync_step is None:
            kind_probe = "sync"
        elif torch.cuda.is_available() and maybe_eager and prof_step is None:
            kind_probe = "profile"
        t = time.perf_counter()
        if kind_probe == "sync":
            torch.cuda.set_sync_debug_mode("warn")
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                outs = engine.step()
            torch.cuda.set_sync_debug_mode(0)
            sites = collections.Counter()
            for w in caught:
                sites[str(w.message).splitlines()[0][:160]] += 1
            sync_step = {"index": len(steps), "syncs": len(caught), "messages": sites.most_common(10)}
        elif kind_probe == "profile":
            from torch.profiler import ProfilerActivity, profile
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                outs = engine.step()
                torch.cuda.synchronize()
            ka = prof.key_averages()
            cuda = sorted(ka, key=lambda e: e.self_device_time_total, reverse=True)[:20]
            cpu = sorted(ka, key=lambda e: e.self_cpu_time_total, reverse=True)[:25]
            prof_step = {"index": len(steps),
                         "kernels": [(e.key[:90], e.count, round(e.self_device_time_total / 1e3, 3)) for e in cuda],
                         "host_ops": [(e.key[:90], e.count, round(e.self_cpu_time_total / 1e3, 3)) for e in cpu]}
        else:
            outs = engine.step()
        wall = time.perf_counter() - t
        after = snapshot(stats)
        d = {k: after[k] - before[k] for k in FIELDS}
        d.update(wall=wall, probe=kind_probe, kind="graph" if d["graph_steps"] else ("eager" if d["steps"] else "none"))
        if d["kind"] != "eager":            # a probe keeps only an eager step's record: try the next one
            if kind_probe == "sync":
                sync_step = None
            elif kind_probe == "profile":
                prof_step = None
        steps.append(d)
        for o in outs:
            generated += len(o.new_token_ids)
            if o.finished:
                running.discard(o.request_id)
        admit()
    total = time.perf_counter() - start
    end = {k: getattr(stats, k) for k in FIELDS + GRAPH_PARTS}
    by_kind = kinds(end)
    return {"requests": a.requests, "concurrency": a.concurrency, "probe": a.probe, "osl": a.osl, "isl_mean": sum(isls) / len(isls),
            "isl_max": max(isls), "seconds": total, "generated": generated, "output_tps": generated / total,
            "by_kind": by_kind, "sync_step": sync_step, "profile_step": prof_step, "config": a.config,
            "engine": {k: getattr(eng, k) for k in ("max_num_seqs", "max_num_batched_tokens", "max_model_len",
                                                    "async_scheduling", "cuda_graphs", "separate_prefill_steps")}}


def markdown(r: dict, command: str) -> str:
    out = [f"# The serving workload through the engine alone ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})",
           "", f"command: `{command}`", "",
           f"{r['requests']} requests, concurrency {r['concurrency']}, ISL mean {r['isl_mean']:.0f} (max "
           f"{r['isl_max']}), OSL {r['osl']}; engine {json.dumps(r['engine'])}", "",
           f"**{r['output_tps']:,.1f} output tokens/s** ({r['generated']} tokens in {r['seconds']:.2f} s)", "",
           "| kind | steps | launch wall ms | launch CPU ms | device ms |", "|---|---|---|---|---|"]
    for kind, v in r["by_kind"].items():
        out.append(f"| {kind} | {v['steps']} | {v['launch_seconds_ms_mean']:.2f} | "
                   f"{v['launch_cpu_seconds_ms_mean']:.2f} | {v['device_seconds_ms_mean']:.2f} |")
    out.append("\n(device ms: the step's span on the GPU, from its start on the stream to its sampled tokens, "
               "host-starved gaps included; the probed steps below are in these means)")
    if r.get("sync_step"):
        s = r["sync_step"]
        out += ["", f"host syncs in one eager step (step {s['index']}, CUDA sync-debug mode): {s['syncs']}"]
        out += [f"- {n} x {m}" for m, n in s["messages"]]
    if r.get("profile_step"):
        p = r["profile_step"]
        out += ["", f"profile of one eager step (step {p['index']}): top kernels (name, calls, ms)"]
        out += [f"- {k} x{c}: {ms}" for k, c, ms in p["kernels"]]
        out += ["", "top host ops by self CPU (name, calls, ms)"]
        out += [f"- {k} x{c}: {ms}" for k, c, ms in p["host_ops"]]
    return "\n".join(out) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="model directory (a v2-lite-shape model on the GPU)")
    p.add_argument("--out", required=True)
    p.add_argument("--config", action="append", default=None, help="settings files (default: configs/h200-v2lite.yaml)")
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--requests", type=int, default=128, help="requests in all (the serving point: 2 x concurrency)")
    p.add_argument("--isl-mean", type=int, default=3072)
    p.add_argument("--isl-cv", type=float, default=0.6)
    p.add_argument("--isl-min", type=int, default=1024)
    p.add_argument("--isl-max", type=int, default=8192)
    p.add_argument("--osl", type=int, default=256)
    p.add_argument("--max-model-len", type=int, default=None,
                   help="engine.max_model_len (default: the settings'; gpu_serve passes its own, 9216 on the GPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--probe", action="store_true",
                   help="CUDA: one eager step under the sync-debug mode and one under torch.profiler (in the timing)")
    a = p.parse_args(argv)
    a.config = a.config or ["configs/h200-v2lite.yaml"]
    os.makedirs(a.out, exist_ok=True)
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "4"))))
    try:
        r = run(a)
    except UserError as exc:                         # bad flags, settings or model: one line, no traceback
        raise SystemExit(f"error: {exc}") from None
    command = "python3 scripts/gpu_engine_mix.py " + " ".join(argv if argv is not None else __import__("sys").argv[1:])
    with open(os.path.join(a.out, "mix.json"), "w") as f:
        json.dump(r, f, indent=2)
    text = markdown(r, command)
    with open(os.path.join(a.out, "mix.md"), "w") as f:
        f.write(text)
    print(text, flush=True)


if __name__ == "__main__":
    main()
