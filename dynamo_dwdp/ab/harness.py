"""`dynamo-dwdp ab` orchestration: launch each graph, warm up, sweep, tear down, report.

For each graph in order (A = the baseline, then B, ...): launch it with the launcher
(`dynamo_dwdp.launch.launcher.serve_graph`, with the workload's expert skew as the override
`expert_skew`), wait until the frontend lists the model, send the warm-up requests, then for every
sweep point not yet finished: scrape the workers' /metrics, drive the point (native client or
aiperf), scrape again, and write the point's files. Then the graph is torn down. At the end every
finished point is assembled into results.json / results.csv / pareto.png / report.md.

Files in the output directory::

    state.json                      fingerprint of the run (workload, graph and config files, client)
    points/<key>/<point>.json       summary + server evidence of one finished (graph, point)
    points/<key>/<point>.requests.jsonl   one compact record per request (no chunk times)
    logs/<key>/                     launcher logs (and aiperf logs with --client aiperf)
    results.json results.csv pareto.png report.md

`<key>` is `<label>-<graph name>` (e.g. `A-disagg-dep`). A point file is written only when the
point finished, so `--resume` re-runs exactly the points that are missing; it refuses a directory
whose fingerprint differs (another workload, edited graph/config files, or another client).

results.json layout::

    {schema, created, client, workload_file, workload: {...}, configs: [...],
     graphs: [{label, key, name, path, num_gpus, pools: [{name, role, strategy, ranks, replicas}],
               status, points: [{label, value, concurrency, request_rate, num_requests,
                                 summary: {... results.summarize_point ...},
                                 server: {pool: {... server_metrics.pool_evidence ...}},
                                 aiperf: {...} | null}],
               frontier: [point labels], plan: {...} | null}],
     comparisons: [{baseline, candidate, baseline_name, candidate_name, ... results.matched_ratio ...}]}
"""
from __future__ import annotations

import asyncio
import contextlib
import datetime as _dt
import hashlib
import json
import logging
import shutil
import string
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from dynamo_dwdp.ab import aiperf, loadgen, report, results, server_metrics
from dynamo_dwdp.ab.workload import (LoadPoint, Tokenizer, Workload, generate_requests, load_tokenizer,
                                        load_workload, skew_overrides)
from dynamo_dwdp.config.graph import load_graph
from dynamo_dwdp.config.settings import load_settings
from dynamo_dwdp.errors import UserError
from dynamo_dwdp.launch.launcher import serve_graph
from dynamo_dwdp.planner.hardware import get_hardware
from dynamo_dwdp.planner.roofline import load_model_shape, plan_layer

log = logging.getLogger("dynamo_dwdp.ab")

SCHEMA = "dynamo-dwdp-ab/1"
CLIENTS = ("native", "aiperf")
MODEL_WAIT_S = 180.0


class GraphFailed(Exception):
    """A graph could not be measured (launch, warm-up); the others still run."""


@dataclass
class GraphEntry:
    label: str
    key: str
    path: str
    name: str
    pools: list[dict]
    num_gpus: int  # from the graph file (sum of ranks x replicas); the handle's value wins when launched


def _graph_entries(paths: list[str]) -> list[GraphEntry]:
    if not paths:
        raise UserError("ab: give at least one graph file (allowed: graphs/*.yaml)")
    if len(paths) > len(string.ascii_uppercase):
        raise UserError(f"ab: {len(paths)} graphs given (allowed: at most 26)")
    out = []
    for label, path in zip(string.ascii_uppercase, paths):
        g = load_graph(path)
        pools = [{"name": p.name, "role": p.role, "strategy": p.strategy, "ranks": p.ranks, "replicas": p.replicas}
                 for p in g.pools]
        out.append(GraphEntry(label=label, key=f"{label}-{g.name}", path=str(path), name=g.name, pools=pools,
                              num_gpus=g.processes))
    return out


def _digest(path: str) -> str:
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]
    except OSError:
        return "missing"


def fingerprint(workload: Workload, graph_paths: list[str], config_paths: list[str], client: str) -> dict:
    """What makes two runs comparable: the workload values, the graph/config file contents, the client."""
    return {"workload": workload.to_dict(), "graphs": [[p, _digest(p)] for p in graph_paths],
            "configs": [[p, _digest(p)] for p in config_paths], "client": client}


def _diff_text(old: dict, new: dict) -> str:
    keys = [k for k in new if old.get(k) != new.get(k)]
    return ", ".join(keys) or "unknown"


def prepare_out_dir(out: Path, fp: dict, *, resume: bool, overwrite: bool) -> None:
    """Create/validate the output directory (see the module docstring for --resume/--overwrite)."""
    state = out / "state.json"
    if state.exists():
        try:
            old = json.loads(state.read_text(encoding="utf-8")).get("fingerprint", {})
        except ValueError:
            old = {}
        if overwrite:
            shutil.rmtree(out / "points", ignore_errors=True)
        elif resume:
            if old != fp:
                raise UserError(f"--out {out}: it holds a run with a different {_diff_text(old, fp)} "
                                "(allowed: resume the same workload/graphs/configs/client, or use --overwrite "
                                "or another --out)")
        else:
            raise UserError(f"--out {out}: already holds results (allowed: --resume to finish them, --overwrite "
                            "to start again, or an empty directory)")
    out.mkdir(parents=True, exist_ok=True)
    report._atomic_write(state, json.dumps({"schema": SCHEMA, "fingerprint": fp}, indent=2) + "\n")


def point_path(out: Path, key: str, label: str) -> Path:
    return out / "points" / key / f"{label}.json"


def is_done(out: Path, key: str, label: str) -> bool:
    p = point_path(out, key, label)
    if not p.is_file():
        return False
    try:
        return bool(json.loads(p.read_text(encoding="utf-8")).get("complete"))
    except ValueError:
        return False


def write_point(out: Path, key: str, point: LoadPoint, run: loadgen.PointRun, summary: dict,
                server: dict, aiperf_reported: dict | None) -> Path:
    """Write the request rows first, then the point summary (its presence marks the point done)."""
    p = point_path(out, key, point.label)
    p.parent.mkdir(parents=True, exist_ok=True)
    rows = "".join(json.dumps(report.clean(r.compact())) + "\n" for r in run.records)
    report._atomic_write(p.with_name(f"{point.label}.requests.jsonl"), rows)
    doc = {"graph": key, "point": asdict(point), "wall_start": run.wall_start, "timed_out": run.timed_out,
           "summary": summary, "server": server, "aiperf": aiperf_reported, "complete": True}
    report._atomic_write(p, json.dumps(report.clean(doc), indent=2) + "\n")
    return p


# ------------------------------------------------------------------------------------ planning


def plan_for_graph(entry: GraphEntry, model_dir: Path | None, workload: Workload,
                   points: list[dict]) -> dict | None:
    """Predicted t_compute / t_prefetch per MoE layer for the graph's DWDP pools, next to the measured split.

    Tokens per rank per iteration come from the measured `tokens_per_step` of the pool when the
    workers export it, else an estimate (decode: concurrency / ranks of the pool; prefill: mean ISL).
    """
    dwdp_pools = [p for p in entry.pools if p["strategy"] == "dwdp"]
    if not dwdp_pools or workload.plan_gpu is None:
        return None
    if model_dir is None:
        return {"note": "no model directory (give the settings with -f; prediction skipped)", "pools": []}
    if not (model_dir / "config.json").is_file():
        return {"note": f"no config.json in {model_dir} (prediction skipped)", "pools": []}

    try:
        model = load_model_shape(model_dir)
        hw = get_hardware(workload.plan_gpu)
    except UserError as e:
        return {"note": f"planner: {e}", "pools": []}
    out_pools = []
    for pool in dwdp_pools:
        phase = "prefill" if pool["role"] == "prefill" else "decode"
        rows, note = [], None
        for pt in points:
            s = pt.get("summary") or {}
            ev = (pt.get("server") or {}).get(pool["name"]) or {}
            measured_tps = ev.get("tokens_per_step")
            isl = s.get("isl_mean") or s.get("isl_target_mean") or workload.isl.mean
            osl = s.get("osl_mean") or s.get("osl_target_mean") or workload.osl.mean
            if measured_tps:
                tokens, source = float(measured_tps), "measured"
            elif phase == "decode":
                conc = pt.get("concurrency") or 1
                tokens, source = max(1.0, conc / (pool["ranks"] * pool["replicas"])), "estimate"
            else:
                tokens, source = float(isl), "estimate"
            try:
                if phase == "decode":
                    lp = plan_layer(model, hw, pool["ranks"], tokens, phase="decode", context=isl + osl / 2)
                else:
                    lp = plan_layer(model, hw, pool["ranks"], tokens, phase="prefill")
            except UserError as e:
                note = f"planner: {e}"
                break
            exposed = lp.dwdp.extra["t_exposed_ms"]
            rows.append({"point": pt["label"], "tokens_per_iter": tokens, "tokens_source": source,
                         "t_compute_ms": lp.t_compute_ms, "t_prefetch_ms": lp.t_prefetch_ms,
                         "t_exposed_ms": exposed,
                         "predicted_exposed_frac": exposed / lp.t_dwdp_ms if lp.t_dwdp_ms > 0 else None,
                         "measured_prefetch_wait_frac": ev.get("prefetch_wait_frac")})
        out_pools.append({"pool": pool["name"], "phase": phase, "ranks": pool["ranks"], "points": rows,
                          "note": note})
    caveat = ("Predicted with the datasheet rates of that GPU, measured on this run's devices. On a CPU run "
              "the measured split reflects host compute and shared-memory copies, so compare the trend (does "
              "the exposed prefetch shrink as tokens per step grow?), not the values.")
    return {"gpu": workload.plan_gpu, "model_dir": str(model_dir), "caveat": caveat, "pools": out_pools}


# ------------------------------------------------------------------------------------ assembly


def assemble(out: Path, entries: list[GraphEntry], workload: Workload, *, client: str, config_paths: list[str],
             statuses: dict[str, str], num_gpus: dict[str, int], model_dir: Path | None) -> dict:
    """Read every finished point file and build the results dict (module docstring)."""
    graphs = []
    for e in entries:
        gpus = num_gpus.get(e.key, e.num_gpus)
        pts = []
        for lp in workload.points(gpus):
            p = point_path(out, e.key, lp.label)
            if not is_done(out, e.key, lp.label):
                continue
            doc = json.loads(p.read_text(encoding="utf-8"))
            pts.append({"label": lp.label, "value": lp.value, "concurrency": doc["point"].get("concurrency"),
                        "request_rate": doc["point"].get("request_rate"),
                        "num_requests": doc["point"].get("num_requests"), "summary": doc.get("summary") or {},
                        "server": doc.get("server") or {}, "aiperf": doc.get("aiperf")})
        idx, _ = results.frontier_of([p["summary"] for p in pts])
        num = next((p["summary"].get("num_gpus") for p in pts if p["summary"].get("num_gpus")), gpus)
        g = {"label": e.label, "key": e.key, "name": e.name, "path": e.path, "num_gpus": num, "pools": e.pools,
             "status": statuses.get(e.key, "ok" if pts else "not run"), "points": pts,
             "frontier": [pts[i]["label"] for i in idx]}
        g["plan"] = plan_for_graph(e, model_dir, workload, pts)
        graphs.append(g)
    comparisons = []
    base = graphs[0] if graphs else None
    for g in graphs[1:]:
        _, fa = results.frontier_of([p["summary"] for p in base["points"]])
        _, fb = results.frontier_of([p["summary"] for p in g["points"]])
        c = results.matched_ratio(fa, fb)
        c.update({"baseline": base["label"], "candidate": g["label"], "baseline_name": base["name"],
                  "candidate_name": g["name"], "same_point": results.same_point_ratios(base["points"], g["points"])})
        comparisons.append(c)
    return {"schema": SCHEMA, "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "client": client, "workload_file": workload.source, "workload": workload.to_dict(),
            "configs": list(config_paths), "graphs": graphs, "comparisons": comparisons}


# ------------------------------------------------------------------------------------- running


def _default_serve() -> Callable:
    return serve_graph


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="req", file=sys.stderr, disable=not enabled, dynamic_ncols=True,
                mininterval=0.5)


def _model_dir(config_paths: list[str]) -> Path | None:
    if not config_paths:
        return None
    return Path(load_settings(list(config_paths)).model.path)


def _n_experts(model_dir: Path | None) -> int | None:
    if model_dir is None or not (model_dir / "config.json").is_file():
        return None
    try:
        cfg = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
        return int(cfg["n_routed_experts"])
    except (ValueError, KeyError, TypeError):
        return None


async def _measure(handle, workload: Workload, point: LoadPoint, requests, bar, urls: dict[str, list[str]],
                   run_client: Callable) -> tuple[loadgen.PointRun, dict, dict | None]:
    all_urls = [u for us in urls.values() for u in us]
    before = await server_metrics.scrape(all_urls)
    run, reported = await run_client(point, requests, bar)
    after = await server_metrics.scrape(all_urls)
    return run, server_metrics.evidence(before, after, urls), reported


def run_ab(graph_paths: list[str], *, workload_path: str, out_dir: str, config_paths: list[str] | None = None,
           client: str = "native", resume: bool = False, overwrite: bool = False, progress: bool = True,
           serve: Callable | None = None, http_port: int = 0, infra: str | None = None,
           tokenizer: Tokenizer | None = None, aiperf_executable: str = "aiperf") -> dict:
    """Run (or resume) the A/B and write the four result files; returns the results dict.

    `serve` defaults to the launcher's `serve_graph`; tests pass a fake with the same signature.
    `tokenizer` defaults to the model directory's tokenizer.json (read after the launch, which may
    create the model).
    """
    config_paths = list(config_paths or [])
    if client not in CLIENTS:
        raise UserError(f"--client {client!r} not allowed (allowed: {', '.join(CLIENTS)})")
    workload = load_workload(workload_path)
    entries = _graph_entries(list(graph_paths))
    model_dir = _model_dir(config_paths)
    if client == "aiperf":
        if shutil.which(aiperf_executable) is None and not Path(aiperf_executable).is_file():
            raise UserError(f"--client aiperf: `{aiperf_executable}` not found; {aiperf.INSTALL_HINT}")
    out = Path(out_dir)
    prepare_out_dir(out, fingerprint(workload, [e.path for e in entries], config_paths, client),
                    resume=resume, overwrite=overwrite)
    statuses: dict[str, str] = {}
    num_gpus: dict[str, int] = {}
    pending = {e.key: [p for p in workload.points(e.num_gpus) if not is_done(out, e.key, p.label)] for e in entries}
    total = sum(sum(p.num_requests for p in pts) + (workload.warmup_requests if pts else 0)
                for pts in pending.values())
    serve_fn = serve
    try:
        _run_all(entries, pending, workload, out, serve_fn, config_paths, total, progress, statuses, num_gpus,
                 client=client, http_port=http_port, infra=infra, tokenizer=tokenizer, model_dir=model_dir,
                 aiperf_executable=aiperf_executable)
    finally:  # also on Ctrl-C: report what finished
        res = assemble(out, entries, workload, client=client, config_paths=config_paths, statuses=statuses,
                       num_gpus=num_gpus, model_dir=model_dir)
        report.write_all(res, out)
    return res


def _run_all(entries, pending, workload, out, serve_fn, config_paths, total, progress, statuses, num_gpus, *,
             client, http_port, infra, tokenizer, model_dir, aiperf_executable) -> None:
    with _progress(total, progress) as bar:
        for e in entries:
            if not pending[e.key]:
                continue
            if serve_fn is None:
                serve_fn = _default_serve()
            try:
                gpus = _run_graph(e, workload, out, serve_fn, config_paths, bar, client=client, http_port=http_port,
                                  infra=infra, tokenizer=tokenizer, model_dir=model_dir,
                                  aiperf_executable=aiperf_executable)
                num_gpus[e.key] = gpus
            except GraphFailed as err:
                statuses[e.key] = f"failed: {err}"
                log.error("%s: %s", e.key, err)
                bar.write(f"{e.key}: failed: {err}")
            except UserError as err:
                statuses[e.key] = f"failed: {err}"
                bar.write(f"{e.key}: failed: {err}")


def report_only(graph_paths: list[str], *, workload_path: str, out_dir: str,
                config_paths: list[str] | None = None, client: str = "native") -> dict:
    """Rebuild the four result files from the point files already in `out_dir` (nothing is run)."""
    workload = load_workload(workload_path)
    entries = _graph_entries(list(graph_paths))
    out = Path(out_dir)
    if not (out / "points").is_dir():
        raise UserError(f"--out {out}: no points/ directory to report on (allowed: a directory written by ab)")
    res = assemble(out, entries, workload, client=client, config_paths=list(config_paths or []), statuses={},
                   num_gpus={}, model_dir=_model_dir(list(config_paths or [])))
    report.write_all(res, out)
    return res


def _run_graph(e: GraphEntry, workload: Workload, out: Path, serve_fn: Callable, config_paths: list[str], bar, *,
               client: str, http_port: int, infra: str | None, tokenizer: Tokenizer | None,
               model_dir: Path | None, aiperf_executable: str) -> int:
    """Launch one graph, warm up, run its pending points; returns the GPU count the launcher reported."""
    log_dir = out / "logs" / e.key
    log_dir.mkdir(parents=True, exist_ok=True)
    bar.set_description(f"{e.key} launch")
    try:
        ctx = serve_fn(e.path, list(config_paths), overrides=skew_overrides(workload, _n_experts(model_dir)),
                       log_dir=str(log_dir), http_port=http_port, infra=infra)
        handle = ctx.__enter__()
    except UserError:
        raise
    except Exception as err:  # noqa: BLE001 - any launcher failure ends this graph only
        raise GraphFailed(f"launch: {err.__class__.__name__}: {err}") from err
    exc_info: tuple = (None, None, None)
    try:
        gpus = int(getattr(handle, "num_gpus", 0) or e.num_gpus)
        if gpus != e.num_gpus:
            log.warning("%s: launcher reports %d GPUs, graph file says %d; using %d", e.key, gpus, e.num_gpus, gpus)
        urls = server_metrics.group_by_pool(dict(getattr(handle, "worker_metrics_urls", {}) or {}),
                                            [p["name"] for p in e.pools])
        asyncio.run(loadgen.wait_for_model(handle.url, handle.model_name, MODEL_WAIT_S))
        tok = tokenizer
        if tok is None and model_dir is not None:
            tok = load_tokenizer(model_dir)
        if tok is None and workload.prompt_format == "tokens":
            raise UserError(f"{workload.source}: prompt_format tokens needs {model_dir}/tokenizer.json "
                            "(allowed without it: prompt_format text)")
        runner = _native_runner(handle, workload) if client == "native" else \
            _aiperf_runner(handle, workload, out, e.key, tok, model_dir, aiperf_executable)
        points = [p for p in workload.points(gpus) if not is_done(out, e.key, p.label)]
        if workload.warmup_requests:
            bar.set_description(f"{e.key} warm-up")
            warm = generate_requests(workload, workload.warmup_requests, "warmup", tok)
            conc = max((p.concurrency or 1) for p in points) if points else 1
            run = asyncio.run(loadgen.run_load(
                handle.url, handle.model_name, warm, endpoint=workload.endpoint,
                concurrency=min(conc, len(warm)), ignore_eos=workload.ignore_eos,
                request_timeout_s=workload.request_timeout_s, point_timeout_s=workload.point_timeout_s,
                on_done=lambda _r: bar.update(1)))
            if not any(r.ok for r in run.records):
                first = next((r.error for r in run.records if r.error), "unknown")
                raise GraphFailed(f"warm-up: all {len(warm)} requests failed (first: {first})")
        for point in points:
            bar.set_description(f"{e.key} {point.label}")
            reqs = generate_requests(workload, point.num_requests, point.label, tok)
            run, server, reported = asyncio.run(_measure(handle, workload, point, reqs, bar, urls, runner))
            if _graph_gone(run):  # not a measurement: leave the point unwritten so --resume retries it
                first = next((r.error for r in run.records if r.error), "unknown")
                raise GraphFailed(f"{point.label}: the graph stopped answering (first: {first})")
            summary = results.summarize_point(run.records, duration_s=run.duration_s, num_gpus=gpus,
                                              ttft_slo_ms=workload.slo.ttft_ms, tpot_slo_ms=workload.slo.tpot_ms)
            summary["timed_out"] = run.timed_out
            write_point(out, e.key, point, run, summary, server, reported)
        return gpus
    except BaseException:
        exc_info = sys.exc_info()
        raise
    finally:
        bar.set_description(f"{e.key} teardown")
        with contextlib.suppress(Exception):
            ctx.__exit__(*exc_info)


def _graph_gone(run: loadgen.PointRun) -> bool:
    """No request succeeded and every failure is a refused/broken connection (the frontend is gone)."""
    return bool(run.records) and not any(r.ok for r in run.records) and all(
        results.error_kind(r.error) in ("connection", "not sent") for r in run.records)


def _native_runner(handle, workload: Workload) -> Callable:
    async def run(point: LoadPoint, requests, bar):
        result = await loadgen.run_load(
            handle.url, handle.model_name, requests, endpoint=workload.endpoint, concurrency=point.concurrency,
            request_rate=point.request_rate, arrival=workload.load.arrival, seed=workload.seed, stream=point.label,
            ignore_eos=workload.ignore_eos, request_timeout_s=workload.request_timeout_s,
            point_timeout_s=workload.point_timeout_s, on_done=lambda _r: bar.update(1))
        return result, None
    return run


def _aiperf_runner(handle, workload: Workload, out: Path, key: str, tok: Tokenizer | None, model_dir: Path | None,
                   executable: str) -> Callable:
    async def run(point: LoadPoint, requests, bar):
        art = out / "aiperf" / key / point.label
        shutil.rmtree(art, ignore_errors=True)
        inputs = aiperf.write_inputs(requests, art / "inputs.jsonl", tok)
        cmd = aiperf.build_command(workload, point, url=handle.url, model=handle.model_name, input_file=inputs,
                                artifact_dir=art / "export", tokenizer_dir=model_dir, executable=executable)
        timeout = workload.point_timeout_s + 120
        result = await asyncio.to_thread(aiperf.run_point, cmd, art / "export", timeout,
                                         out / "logs" / key / f"aiperf-{point.label}.log")
        bar.update(point.num_requests)
        agg_path = aiperf.find_export(art / "export", aiperf.JSON_NAME)
        reported = aiperf.reported_summary(aiperf.parse_aggregate_json(agg_path)) if agg_path else None
        return result, reported
    return run
