"""Serving through Dynamo on one GPU, measured end to end, in one command.

    PYTHONPATH=. PYTHONUNBUFFERED=1 python3 scripts/gpu_serve.py --out $OUT [--pack DIR] [--layers 8]
    PYTHONPATH=. python3 scripts/gpu_serve.py --device cpu --out out/serve-cpu     # the same flow, tiny model

Steps (each printed with its wall time; a step that fails is reported and the next one still runs):
1. `--pack DIR`: install the carried Dynamo pack (`pack-dynamo-for-gpu.sh` output: wheels, the runtime
   without its extension, the xz-compressed extension) into a folder outside the checkout and put it on
   PYTHONPATH for this process and every process it starts.
2. Make the model: v2-lite-shape (DeepSeek-V2-Lite shapes, random bf16 weights) with `--layers` layers,
   written on the GPU (cpu: the `tiny` preset).
3. Serve the first graph (`--graphs`, default graphs/agg.yaml then graphs/disagg_single.yaml) with
   configs/h200-v2lite.yaml plus an overlay (this model, logs, `kv_transfer.backend`, default `local`;
   optionally `--max-num-seqs` / `--max-model-len`): launch, a greedy probe (fixed prompts, temperature
   0: an agg and a disagg graph must agree when the KV arrived intact), `dynamo-dwdp ab`'s client over
   the workload (ISL 1K-8K lognormal, fixed OSL, `--concurrency` sweep), tear down.
4. `bench engine` (single rank, decode, CUDA graphs) at the batch of the largest concurrency and the
   mean context of that point, and a prefill point (`--prefill-chunk` tokens per step), the same model:
   the serving-vs-engine comparison, raw (decode TPS) and against the TPS the engine alone would give
   for the point's prompts and decode tokens (`expected_output_tps`). Then the like-for-like reference:
   the largest point's workload (same ISL/OSL law, concurrency and request count) through the engine
   alone, no Dynamo (`scripts/gpu_engine_mix.py`; `engine_mix`), and serving / that ratio.
5. The other graphs as in 3, each only if `--graph-min-s` is left before `--deadline`.
   Then the probe's prompts once more in one process (`scripts/first_token_paths.py`): greedy through the
   prefill path and through the decode path for the last prompt token (what a disaggregated decode worker
   computes), and which of the two each graph served.
6. After every step, write under --out: serve.md (TTFT, ITL, TPS/user, TPS/GPU, KV hand-offs per graph
   and point; the comparison; the probe), serve.json, pareto.png, report.md, results.json (all graphs
   in one `ab` report), logs.tar.xz. A run cut short still brings back what it measured.

TPS/GPU divides by the physical GPUs the graph ran on (`--gpus`, default 1: prefill and decode of a
disaggregated graph share the one GPU), not by its rank processes as `ab` does for multi-GPU graphs.
NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1, NVSHMEM_DISABLE_NVLS=1 are set for every process.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
T0 = time.monotonic()


def say(msg: str) -> None:
    print(f"[gpu_serve {time.monotonic() - T0:6.1f}s] {msg}", flush=True)


def install_pack(pack: str, site: str) -> None:
    """The pack script's install recipe (its header), into `site`; idempotent per machine."""
    if os.path.isfile(os.path.join(site, "dynamo", "_core.abi3.so")):
        say(f"pack already installed in {site}")
    else:
        wheels = sorted(glob.glob(os.path.join(pack, "*.whl")))
        if not wheels:
            raise SystemExit(f"error: --pack {pack}: no wheels there (allowed: a pack-dynamo-for-gpu.sh output folder)")
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        "--target", site, *wheels], check=True)
        subprocess.run([sys.executable, "-m", "zipfile", "-e", os.path.join(pack, "runtime_noso.zip"), site],
                       check=True)
        with open(os.path.join(site, "dynamo", "_core.abi3.so"), "wb") as f:
            subprocess.run(["xz", "-dc", os.path.join(pack, "core.xz")], stdout=f, check=True)
        say(f"pack installed in {site}")
    sys.path.insert(0, site)
    os.environ["PYTHONPATH"] = os.pathsep.join([site, ROOT] + [p for p in os.environ.get("PYTHONPATH", "").split(
        os.pathsep) if p])


def workload_doc(a) -> dict:
    conc = [int(c) for c in a.concurrency.split(",") if c]
    if a.device == "cpu":
        isl = {"mean": 32, "cv": 0.0}
        osl = {"mean": 8, "cv": 0.0}
    else:
        isl = {"mean": a.isl_mean, "cv": 0.6, "dist": "lognormal", "min": 1024, "max": 8192}
        osl = {"mean": a.osl, "cv": 0.0}
    return {"name": "gpu-serve" if a.device != "cpu" else "cpu-serve",
            "description": "one-GPU serving: ISL 1K-8K (lognormal), fixed OSL, concurrency sweep",
            "endpoint": "completions", "prompt_format": "tokens", "isl": isl, "osl": osl,
            "load": {"concurrency": conc}, "requests_per_point": a.requests_per_point,
            "requests_per_concurrency": a.requests_per_concurrency, "warmup_requests": a.warmup,
            "slo": {"ttft_ms": 5000, "tpot_ms": 50}, "seed": 0, "ignore_eos": True,
            "request_timeout_s": a.point_timeout, "point_timeout_s": a.point_timeout, "plan_gpu": None}


def overlay_doc(a, model_dir: str, log_dir: str) -> dict:
    doc = {"model": {"path": model_dir, "served_name": "v2-lite-shape" if a.device != "cpu" else "tiny", "make": None},
           "kv_transfer": {"backend": a.kv},
           "infra": {"log_dir": log_dir, "health_timeout_s": a.health_timeout}}
    engine = {k: v for k, v in (("max_num_seqs", a.max_num_seqs), ("max_model_len", a.max_model_len)) if v}
    if engine:
        doc["engine"] = engine
    if a.kv == "nixl" and a.device == "cpu":
        doc["kv_transfer"].update({"ucx_tls": "tcp,sm,self", "ucx_net_devices": "lo"})
    return doc


def make_model(a, model_dir: str) -> None:
    from dynamo_dwdp.synthetic.checkpoint import write_checkpoint   # torch: after the pack is on the path

    if a.device == "cpu":
        write_checkpoint(model_dir, "tiny", seed=0, quiet=True, force=True)
    else:
        write_checkpoint(model_dir, "v2-lite-shape", seed=0, dtype="bf16", num_layers=a.layers, quiet=True,
                         device="cuda", force=True)


PROBE_PROMPTS = ["Mixture of experts models send every token to a few experts",
                 "Disaggregated serving moves the prompt's KV cache from the prefill worker to the decode worker, "
                 "which then generates every output token itself; on one host the copy stays on the device."]
PROBE_TOKENS = 24


def greedy_probe(url: str, model: str) -> list[str]:
    """Greedy completions of PROBE_PROMPTS (fixed length): agg and disagg must agree when the KV arrived intact."""
    import urllib.request

    out = []
    for prompt in PROBE_PROMPTS:
        body = {"model": model, "prompt": prompt, "max_tokens": PROBE_TOKENS, "temperature": 0.0,
                "ignore_eos": True, "min_tokens": PROBE_TOKENS}
        req = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            out.append(json.loads(r.read())["choices"][0]["text"])
    return out


def run_graphs(a, graphs: list[str], configs: list[str], workload: str, ab_dir: str, probes: dict) -> dict:
    """`dynamo-dwdp ab` over the graphs (its launcher and client), with a greedy probe after each launch."""
    import contextlib

    from dynamo_dwdp.ab.harness import run_ab
    from dynamo_dwdp.launch.launcher import serve_graph

    @contextlib.contextmanager
    def serve_and_probe(path, config_paths, **kw):
        t = time.monotonic()
        with serve_graph(path, config_paths, **kw) as handle:
            say(f"{path}: serving after {time.monotonic() - t:.1f}s (launch, load, capture)")
            try:
                probes[handle.graph.name] = greedy_probe(handle.url, handle.model_name)
            except Exception as exc:       # the sweep still runs; the table says the probe failed
                probes[handle.graph.name] = f"failed: {exc}"
            yield handle

    return run_ab(graphs, workload_path=workload, out_dir=ab_dir, config_paths=configs, progress=False,
                  overwrite=True, serve=serve_and_probe)


def merge_reports(ab_dirs: list[tuple[str, str]], graphs: list[str], configs: list[str], workload: str, out: str,
                  statuses: dict) -> dict | None:
    """One report (results.json, pareto.png, report.md) over the graphs measured in separate `ab` runs:
    each run's points are filed under the graph's label in the combined run (A, B, ...)."""
    from dynamo_dwdp.ab.harness import _graph_entries, report_only

    done = {g: d for g, d in ab_dirs}
    entries = _graph_entries(graphs)
    os.makedirs(os.path.join(out, "points"), exist_ok=True)
    for e in entries:
        src = done.get(e.path)
        if src is None:
            continue
        for key in os.listdir(os.path.join(src, "points")) if os.path.isdir(os.path.join(src, "points")) else []:
            shutil.copytree(os.path.join(src, "points", key), os.path.join(out, "points", e.key), dirs_exist_ok=True)
    try:
        res = report_only(graphs, workload_path=workload, out_dir=out, config_paths=configs)
    except Exception:
        traceback.print_exc()
        return None
    for g, e in zip(res["graphs"], entries):
        g["status"] = statuses.get(e.path, "not run")
    return res


def served_async_scheduling(configs: list[str]) -> bool:
    """engine.async_scheduling of the served settings files (the last file that sets it wins)."""
    import yaml

    on = False
    for path in configs:
        with open(path) as f:
            on = ((yaml.safe_load(f) or {}).get("engine") or {}).get("async_scheduling", on)
    return bool(on)


def bench_engine(a, model_dir: str, batch: int, context: int, out_jsonl: str, phase: str = "decode",
                 tokens: int = 0, async_scheduling: bool = False) -> dict | None:
    """One `bench engine` point on the served model: decode (`batch` sequences over `context` cached
    tokens, CUDA graphs; `async_scheduling` as the served engine steps) or prefill (`tokens` per step in
    `batch` prompts)."""
    argv = [sys.executable, "-m", "dynamo_dwdp.cli", "bench", "engine", "--model", model_dir, "--strategy", "single",
            "--ranks", "1", "--phase", phase, "--batch", str(batch), "--device", a.device,
            "--block-size", str(a.block_size), "--steps", "20" if phase == "decode" else "5", "--warmup", "5" if
            phase == "decode" else "2", "--out", out_jsonl, "--json", "--timeout", str(a.point_timeout)]
    argv += ["--context", str(context)] if phase == "decode" else ["--tokens-per-iter", str(tokens)]
    if a.device != "cpu":
        argv += ["--dtype", "bfloat16"] + (["--cuda-graphs"] if phase == "decode" else [])
    if phase == "decode" and async_scheduling:
        argv += ["--async-scheduling"]
    say("$ " + " ".join(argv))
    p = subprocess.run(argv, capture_output=True, text=True, timeout=a.point_timeout + 60)
    if p.returncode != 0:
        say(f"bench engine failed ({p.returncode}): {p.stderr[-2000:]}")
        return None
    return json.loads(p.stdout.strip().splitlines()[-1])


def engine_mix(a, model_dir: str, configs: list[str], wl: dict, concurrency: int, requests: int,
               out: str) -> dict | None:
    """The largest point's workload through the engine alone (`scripts/gpu_engine_mix.py`: the same
    settings, ISL/OSL law, concurrency and request count, no Dynamo): the like-for-like reference of
    a serving point. Returns its mix.json (None if it failed)."""
    isl = wl["isl"]
    argv = [sys.executable, os.path.join(ROOT, "scripts", "gpu_engine_mix.py"), "--model", model_dir, "--out", out,
            "--concurrency", str(concurrency), "--requests", str(requests), "--isl-mean", str(isl["mean"]),
            "--isl-cv", str(isl.get("cv", 0.0)), "--isl-min", str(isl.get("min", 1)),
            "--isl-max", str(isl.get("max", isl["mean"])), "--osl", str(wl["osl"]["mean"])]
    if a.max_model_len:
        argv += ["--max-model-len", str(a.max_model_len)]
    for c in configs:
        argv += ["--config", c]
    say("$ " + " ".join(argv))
    p = subprocess.run(argv, capture_output=True, text=True, timeout=a.point_timeout + 120)
    if p.returncode != 0:
        say(f"engine mix failed ({p.returncode}): {p.stderr[-2000:]}")
        return None
    with open(os.path.join(out, "mix.json")) as f:
        return json.load(f)


def expected_output_tps(point: dict, decode: dict | None, prefill: dict | None, osl: int) -> float | None:
    """Output tokens/s the engine alone would give for a serving point's work, from `bench engine`:
    every request's prompt at the measured prefill rate (tokens per second of a prefill step), plus its
    `osl` decode tokens in steps of `concurrency` sequences at the measured decode step time.
    T = n * isl_mean / prefill_rate + n * osl / concurrency * decode_step;  expected = n * osl / T.
    The serving figure divided by this is what the serving stack (Dynamo, the host path, scheduling,
    the tail of a point where fewer than `concurrency` sequences run) costs on top of the model."""
    s = point["summary"]
    n, isl, conc = s.get("ok"), s.get("isl_mean"), point.get("concurrency")
    try:
        step_s = decode["step_ms"]["mean"] / 1e3
        pre_rate = prefill["tokens"]["counted"] / prefill["wall_s"]
    except (TypeError, KeyError, ZeroDivisionError):
        return None
    if not (n and isl and conc and pre_rate):
        return None
    t = n * isl / pre_rate + n * osl / conc * step_s
    return n * osl / t


STEP_FIELDS = ("steps", "graph_steps", "tokens_per_step", "loop_ms_mean", "loop_cpu_ms_mean", "graph_step_ms_mean", "graph_launch_ms_mean",
               "graph_launch_cpu_ms_mean", "graph_device_ms_mean", "other_step_ms_mean", "other_launch_ms_mean",
               "other_launch_cpu_ms_mean", "other_device_ms_mean")


def step_evidence(point: dict) -> dict:
    """The workers' step accounting over a point, per pool (from the A/B server evidence): how many
    steps replayed graphs, and where a step's wall time went (host launch wall vs the engine thread's
    CPU in it, device time)."""
    return {pool: {k: ev.get(k) for k in STEP_FIELDS} for pool, ev in (point.get("server") or {}).items()}


def step_table(points: list[dict]) -> list[str]:
    rows = [p for p in points if p.get("steps")]
    if not rows:
        return []
    out = ["", "workers' steps per point (A/B server evidence; ms are means per step):", "",
           "| graph | concurrency | pool | " + " | ".join(STEP_FIELDS) + " |", "|" + "---|" * (3 + len(STEP_FIELDS))]
    for p in rows:
        for pool, ev in p["steps"].items():
            out.append(f"| {p['graph']} | {p['concurrency']} | {pool} | "
                       + " | ".join(fmt(ev.get(k), 0 if k.endswith("steps") else 2) for k in STEP_FIELDS) + " |")
    return out


def fmt(v, nd=1) -> str:
    return "—" if v is None else f"{v:,.{nd}f}"


def table(res: dict | None, gpus: int, bench: dict | None, bench_batch: int, bench_ctx: int,
          prefill: dict | None = None, osl: int = 0, mix: dict | None = None) -> tuple[str, dict]:
    rows = ["| graph | concurrency | requests ok/sent | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms | "
            "TPS/user | output TPS | TPS/GPU | KV hand-offs, mean ms |", "|" + "---|" * 11]
    summary: dict = {"points": []}
    for g in (res or {}).get("graphs", []):
        for p in g["points"]:
            s = p["summary"]
            tps_gpu = s["output_tps"] / gpus if s.get("output_tps") is not None else None
            kv = [ev for ev in (p.get("server") or {}).values() if ev.get("kv_transfers")]
            kv_text = f"{kv[0]['kv_transfers']:.0f}, {fmt(kv[0].get('kv_transfer_ms_mean'), 2)}" if kv else "—"
            rows.append(f"| {g['name']} | {p['concurrency']} | {s['ok']}/{s['sent']} | {fmt(s['ttft_ms_p50'])} | "
                        f"{fmt(s['ttft_ms_p99'])} | {fmt(s['itl_ms_p50'], 2)} | {fmt(s['itl_ms_p99'], 2)} | "
                        f"{fmt(s['tps_user'])} | {fmt(s['output_tps'])} | {fmt(tps_gpu)} | {kv_text} |")
            summary["points"].append({"graph": g["name"], "concurrency": p["concurrency"], "tps_gpu": tps_gpu,
                                      "kv": kv[0] if kv else None, "steps": step_evidence(p),
                                      "isl_mean": s.get("isl_mean"), **{k: s.get(k) for k in (
                                          "ok", "sent", "ttft_ms_p50", "ttft_ms_p99", "itl_ms_p50", "itl_ms_p99",
                                          "tps_user", "output_tps", "first_error")}})
        if not str(g.get("status", "ok")).startswith("ok"):
            rows.append(f"| {g['name']} | — | {g['status'][:120]} | | | | | | | | |")
    lines = rows + step_table(summary["points"])
    if bench:
        step = (bench.get("step_ms") or {}).get("mean")
        tps = bench.get("tokens_per_s_per_gpu")
        summary["bench"] = {"batch": bench_batch, "tokens_per_s_per_gpu": tps, "step_ms": bench.get("step_ms")}
        lines += ["", f"bench engine, decode batch {bench_batch}, context {bench_ctx}: "
                      f"{fmt(tps)} tokens/s per GPU" + (f", step {step:.2f} ms" if step else "")]
        summary["bench"]["context"] = bench_ctx
        for g in (res or {}).get("graphs", []):
            top = max(g["points"], key=lambda p: p["concurrency"] or 0, default=None)
            if top and top["summary"].get("output_tps") and tps:
                r = top["summary"]["output_tps"] / gpus / tps
                summary.setdefault("ratio", {})[g["name"]] = r
                lines.append(f"{g['name']} at concurrency {top['concurrency']}: serving TPS/GPU / bench engine "
                             f"= {r:.3f}")
                exp = expected_output_tps(top, bench, prefill, osl)
                if exp:
                    summary.setdefault("vs_expected", {})[g["name"]] = {"expected_tps": exp,
                                                                         "ratio": top["summary"]["output_tps"] / exp}
                    lines.append(f"{g['name']} at concurrency {top['concurrency']}: expected from bench engine "
                                 f"(prompts at the prefill rate + decode steps) {exp:,.0f} tokens/s; serving / "
                                 f"expected = {top['summary']['output_tps'] / exp:.3f}")
    if mix:
        summary["engine_mix"] = {k: mix.get(k) for k in ("output_tps", "isl_mean", "requests", "concurrency", "osl")}
        lines += ["", f"engine alone on the largest point's workload (scripts/gpu_engine_mix.py: {mix['requests']} "
                      f"requests, concurrency {mix['concurrency']}, ISL mean {mix['isl_mean']:.0f}): "
                      f"{mix['output_tps']:,.1f} output tokens/s"]
        for g in (res or {}).get("graphs", []):
            top = max(g["points"], key=lambda p: p["concurrency"] or 0, default=None)
            if top and top["summary"].get("output_tps") and mix.get("output_tps"):
                r = top["summary"]["output_tps"] / mix["output_tps"]
                summary.setdefault("vs_engine_mix", {})[g["name"]] = r
                lines.append(f"{g['name']} at concurrency {top['concurrency']}: serving / engine alone on the same "
                             f"workload = {r:.3f}")
    if prefill:
        rate = prefill["tokens"]["counted"] / prefill["wall_s"] if prefill.get("wall_s") else None
        summary["bench_prefill"] = {"tokens_per_iter": prefill.get("setup", {}).get("tokens_per_iter"),
                                    "tokens_per_s": rate, "step_ms": prefill.get("step_ms")}
        lines.append(f"bench engine prefill, {summary['bench_prefill']['tokens_per_iter']} tokens per step: "
                     f"{fmt(rate, 0)} tokens/s")
    return "\n".join(lines) + "\n", summary


def probe_text(probes: dict, paths: dict | None = None) -> str:
    lines = [f"\ngreedy probe ({len(PROBE_PROMPTS)} prompts x {PROBE_TOKENS} tokens, temperature 0):"]
    names = list(probes)
    for n in names:
        lines.append(f"  {n}: {probes[n] if isinstance(probes[n], str) else 'ok'}")
    ok = {n: v for n, v in probes.items() if isinstance(v, list)}
    if len(ok) >= 2:
        base, *rest = list(ok)
        for n in rest:
            same = sum(x == y for x, y in zip(ok[base], ok[n]))
            lines.append(f"  {n} vs {base}: {same}/{len(PROBE_PROMPTS)} completions identical")
    if paths:
        lines.append("  the same prompts in one process (scripts/first_token_paths.py): prefill path vs decode path for "
                     f"the last prompt token: first tokens {paths['first_token']['prefill']} vs "
                     f"{paths['first_token']['decode_last']}; top-2 logit gap "
                     f"{', '.join(f'{g:.1e}' for g in paths['top2_gap'])}")
        lines += [f"  {n}: first token per prompt from the {', '.join(m)} path; whole completions equal to: "
                  f"{paths['match_whole'][n]}" for n, m in paths["match"].items()]
    return "\n".join(lines) + "\n"


def first_token_paths(a, model_dir: str, probes: dict) -> dict | None:
    """scripts/first_token_paths.py on the served model: the probe's greedy completions through the prefill
    path and through the decode path for the last prompt token, and which of them each graph served
    ("both" when the two paths agree)."""
    argv = [sys.executable, os.path.join(ROOT, "scripts", "first_token_paths.py"), "--model", model_dir,
            "--device", a.device, "--dtype", "float32" if a.device == "cpu" else "bfloat16",
            "--block-size", str(a.block_size), "--tokens", str(PROBE_TOKENS), *PROBE_PROMPTS]
    say("$ " + " ".join(argv[:8]) + " ...")
    p = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    if p.returncode != 0:
        say(f"first_token_paths failed ({p.returncode}): {p.stderr[-2000:]}")
        return None
    res = json.loads(p.stdout.strip().splitlines()[-1])
    res["match"], res["match_whole"] = {}, {}
    for name, texts in probes.items():
        if not isinstance(texts, list):
            continue
        per_prompt = []
        for i, text in enumerate(texts):          # whose first token the served completion starts with
            hits = [path for path in ("prefill", "decode_last") if text.startswith(res["first_text"][path][i])]
            per_prompt.append("both" if len(hits) == 2 else (hits[0] if hits else "neither"))
        res["match"][name] = per_prompt
        whole = [path for path in ("prefill", "decode_last") if res[path] == texts]
        res["match_whole"][name] = "both" if len(whole) == 2 else (whole[0] if whole else "neither")
    return res


def _concurrency_list(text: str) -> str:
    try:
        values = [int(c) for c in text.split(",") if c.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} (allowed: a comma list of integers >= 1, e.g. 1,8,64)")
    return ",".join(str(v) for v in values)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="results folder ($OUT on the GPU machine)")
    p.add_argument("--work", default=None, help="model, ab points and logs (default: a temporary folder)")
    p.add_argument("--pack", default=None, help="Dynamo pack folder to install first (GPU machine)")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--layers", type=int, default=8, help="v2-lite-shape depth (27 = full; default 8)")
    p.add_argument("--model", default=None, help="serve this existing model directory instead of writing one "
                   "(cuda: a v2-lite-shape model --layers deep; the tables name it so)")
    p.add_argument("--config", action="append", default=None, help="settings files (default: the device's)")
    p.add_argument("--graphs", default="graphs/agg.yaml,graphs/disagg_single.yaml")
    p.add_argument("--kv", default="local", choices=("local", "nixl"), help="kv_transfer.backend of disagg graphs")
    p.add_argument("--concurrency", default="1,8,64", type=_concurrency_list,
                   help="comma list of concurrencies >= 1 (default 1,8,64)")
    p.add_argument("--isl-mean", type=int, default=3072)
    p.add_argument("--osl", type=int, default=256)
    p.add_argument("--requests-per-point", type=int, default=4)
    p.add_argument("--requests-per-concurrency", type=int, default=1, help="a point sends max(requests per "
                   "point, this x concurrency) requests (default 1: one wave)")
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--point-timeout", type=float, default=60.0)
    p.add_argument("--health-timeout", type=float, default=300.0)
    p.add_argument("--gpus", type=int, default=1, help="physical GPUs the graphs share (TPS/GPU divides by it)")
    p.add_argument("--max-num-seqs", type=int, default=None, help="engine.max_num_seqs (default cuda: 64, the "
                   "largest concurrency, so fewer decode buckets to capture at start-up; cpu: the config's)")
    p.add_argument("--max-model-len", type=int, default=None, help="engine.max_model_len (default cuda: 9216 "
                   "= the longest ISL 8192 + OSL, rounded up; cpu: the config's)")
    p.add_argument("--no-fused-kernels", action="store_true",
                   help="DWDP_FUSED_KERNELS=0 for every process (the torch paths: no Triton compiles of the fused "
                        "decode kernels at start-up)")
    p.add_argument("--skip-bench", action="store_true")
    p.add_argument("--prefill-chunk", type=int, default=16384,
                   help="bench engine prefill: tokens per step (the config's max_num_batched_tokens, 16384), in "
                        "prompts of --isl-mean tokens; with the decode point it gives the expected serving TPS")
    p.add_argument("--deadline", type=float, default=1e9, help="seconds after start past which no graph starts")
    p.add_argument("--graph-min-s", type=float, default=120.0, help="a graph starts only with this much time left")
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    os.environ.update(NO_MULTICAST)
    if a.no_fused_kernels:
        os.environ["DWDP_FUSED_KERNELS"] = "0"
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ["PYTHONUNBUFFERED"] = "1"
    os.chdir(ROOT)
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    os.environ["PYTHONPATH"] = os.pathsep.join([ROOT] + [x for x in os.environ.get("PYTHONPATH", "").split(os.pathsep)
                                                         if x and x != ROOT])
    os.makedirs(a.out, exist_ok=True)
    work = a.work or tempfile.mkdtemp(prefix="gpu-serve-")
    os.makedirs(work, exist_ok=True)
    if a.pack:
        install_pack(os.path.abspath(a.pack), os.path.join(tempfile.gettempdir(), "dwdp-dynamo-site"))
    if a.device == "cpu":
        a.block_size, a.osl, a.isl_mean = 16, 8, 32          # the CPU workload (workload_doc)
        a.prefill_chunk = min(a.prefill_chunk, 64)
    else:
        a.block_size = 64
        a.max_num_seqs = a.max_num_seqs or 64
        a.max_model_len = a.max_model_len or 9216
    import yaml

    if a.model:
        if not os.path.isfile(os.path.join(a.model, "config.json")):
            raise SystemExit(f"error: --model {a.model}: no config.json there (allowed: a model directory)")
        model_dir = os.path.abspath(a.model)
        say(f"model {model_dir} (given)")
    else:
        model_dir = os.path.join(work, "model")
        t = time.monotonic()
        make_model(a, model_dir)
        say(f"model {'tiny' if a.device == 'cpu' else f'v2-lite-shape {a.layers} layers'} written in "
            f"{time.monotonic() - t:.1f}s")
    configs = list(a.config or (["configs/tiny-cpu.yaml"] if a.device == "cpu" else ["configs/h200-v2lite.yaml"]))
    overlay = os.path.join(work, "overlay.yaml")
    with open(overlay, "w") as f:
        yaml.safe_dump(overlay_doc(a, model_dir, os.path.join(work, "logs")), f)
    workload = os.path.join(work, "workload.yaml")
    wl = workload_doc(a)
    with open(workload, "w") as f:
        yaml.safe_dump(wl, f)
    graphs = [g for g in a.graphs.split(",") if g]
    probes: dict = {}
    probes_extra: dict = {}
    statuses: dict = {}
    top = max(wl["load"]["concurrency"])
    ctx = a.isl_mean + a.osl // 2
    bench = prefill = mix = None
    ab_dirs = []
    # order: the first graph, then bench engine (the comparison), then the other graphs, each graph in
    # its own `ab` run so that a graph that fails or runs out of time costs only itself
    steps = graphs[:1] + (["bench"] if not a.skip_bench else []) + graphs[1:]

    def write_outputs(final: bool = False) -> dict | None:
        """Everything measured so far into --out (after every step: a run cut short still reports)."""
        res = merge_reports(ab_dirs, graphs, configs + [overlay], workload, os.path.join(work, "ab"), statuses)
        ab_dir = os.path.join(work, "ab")
        text, summary = table(res, a.gpus, bench, top, ctx, prefill, a.osl, mix)
        text += probe_text(probes, probes_extra.get("paths"))
        summary["probes"] = probes
        summary["first_token_paths"] = probes_extra.get("paths")
        head = (f"serving on one {'GPU' if a.device != 'cpu' else 'CPU'}: model "
                f"{'v2-lite-shape ' + str(a.layers) + ' layers, bf16' if a.device != 'cpu' else 'tiny'}; configs "
                f"{', '.join(configs)} + overlay {json.dumps(overlay_doc(a, 'MODEL', 'LOGS'))}"
                f"{'; DWDP_FUSED_KERNELS=0' if a.no_fused_kernels else ''}; workload {json.dumps(wl)}\n\n")
        with open(os.path.join(a.out, "serve.md"), "w") as f:
            f.write(head + text)
        with open(os.path.join(a.out, "serve.json"), "w") as f:
            json.dump({"args": vars(a), "workload": wl, "summary": summary, "bench": bench, "bench_prefill": prefill,
                       "engine_mix": mix},
                      f, indent=2, default=str)
        for name in ("pareto.png", "report.md", "results.json"):
            src = os.path.join(ab_dir, name)
            if os.path.isfile(src):
                shutil.copy(src, os.path.join(a.out, name))
        with tarfile.open(os.path.join(a.out, "logs.tar.xz"), "w:xz") as tar:
            for _graph, d in ab_dirs:
                for sub in ("logs", "points"):
                    if os.path.isdir(os.path.join(d, sub)):
                        tar.add(os.path.join(d, sub), arcname=os.path.join(os.path.basename(d), sub))
        print(head + text if final else text, flush=True)
        return res

    for step in steps:
        left = a.deadline - (time.monotonic() - T0)
        if step != "bench" and left < a.graph_min_s:
            statuses[step] = f"skipped: {left:.0f}s left of --deadline {a.deadline:.0f}s"
            say(f"{step}: {statuses[step]}")
            continue
        t = time.monotonic()
        if step == "bench":
            try:
                bench = bench_engine(a, model_dir, top, ctx, os.path.join(work, "bench.jsonl"),
                                     async_scheduling=served_async_scheduling(configs))
                chunk = min(a.prefill_chunk, top * a.isl_mean)
                prefill = bench_engine(a, model_dir, max(1, chunk // a.isl_mean), 0, os.path.join(work, "bench.jsonl"),
                                       phase="prefill", tokens=chunk)
            except Exception:
                traceback.print_exc()
            try:
                mix = engine_mix(a, model_dir, configs, wl, top,
                                 max(a.requests_per_point, a.requests_per_concurrency * top),
                                 os.path.join(work, "engine-mix"))
            except Exception:
                traceback.print_exc()
            say(f"bench engine in {time.monotonic() - t:.1f}s")
            write_outputs()
            continue
        ab_dir = os.path.join(work, f"ab-{len(ab_dirs)}")
        ab_dirs.append((step, ab_dir))
        try:
            r = run_graphs(a, [step], configs + [overlay], workload, ab_dir, probes)
            g = r["graphs"][0]
            statuses[step] = g.get("status", "ok")
            for pt in g["points"]:         # bench engine's context: the mean ISL the largest point really sent
                if pt["concurrency"] == top and pt["summary"].get("isl_mean") and step == graphs[0]:
                    ctx = int(pt["summary"]["isl_mean"] + a.osl // 2)
        except Exception as exc:
            traceback.print_exc()
            statuses[step] = f"failed: {exc}"
        say(f"{step}: served and measured in {time.monotonic() - t:.1f}s ({statuses[step]})")
        write_outputs()
    if any(isinstance(v, list) for v in probes.values()):
        try:
            paths = first_token_paths(a, model_dir, probes)
        except Exception:
            traceback.print_exc()
            paths = None
        probes_extra["paths"] = paths
    res = write_outputs(final=True)
    ok = bool(res) and all(st == "ok" for st in statuses.values()) and all(g["points"] for g in res["graphs"])
    say("done" if ok else "done, with failures (see above)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
