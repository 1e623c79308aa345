"""Outputs of `dynamo-dwdp ab`: results.json, results.csv, pareto.png and report.md.

Everything here reads the assembled results dict (layout in `dynamo_dwdp/ab/harness.py`) and
writes files; no measurement logic. Missing numbers are JSON `null`, an empty CSV cell and `n/a`
in the markdown; NaN/inf never reach a file.
"""
from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path
from typing import Any, Iterable

NA = "n/a"

CSV_COLUMNS = [
    "graph_label", "graph", "point", "concurrency", "request_rate", "num_gpus", "requests", "sent", "ok",
    "failed", "duration_s", "ttft_ms_p50", "ttft_ms_p99", "itl_ms_p50", "itl_ms_p99", "tpot_ms_p50",
    "tpot_ms_p99", "tps_user", "tps_user_mean", "output_tps", "tps_gpu", "good", "good_fraction", "goodput_rps",
    "goodput_tps_gpu", "isl_mean", "osl_mean", "osl_mismatch", "on_frontier",
]


def clean(obj: Any) -> Any:
    """A copy of `obj` where NaN/inf floats became None (JSON-safe)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean(v) for v in obj]
    return obj


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_json(results: dict, path: str | Path) -> Path:
    p = Path(path)
    _atomic_write(p, json.dumps(clean(results), indent=2, allow_nan=False) + "\n")
    return p


def csv_rows(results: dict) -> list[dict]:
    """One row per (graph, point) with the CSV_COLUMNS."""
    rows = []
    for g in results.get("graphs", []):
        frontier = set(g.get("frontier") or [])
        for pt in g.get("points", []):
            s = pt.get("summary") or {}
            row = {c: s.get(c) for c in CSV_COLUMNS}
            row.update({"graph_label": g["label"], "graph": g["name"], "point": pt["label"],
                        "concurrency": pt.get("concurrency"), "request_rate": pt.get("request_rate"),
                        "on_frontier": pt["label"] in frontier})
            rows.append(clean(row))
    return rows


def write_csv(results: dict, path: str | Path) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    with tmp.open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        w.writeheader()
        for row in csv_rows(results):
            w.writerow({k: ("" if v is None else v) for k, v in row.items()})
    os.replace(tmp, p)
    return p


# -------------------------------------------------------------------------------------- plotting


def plot_pareto(results: dict, path: str | Path) -> Path:
    """Output TPS/GPU (y) vs TPS/user (x): every point, the frontier as a line, points labelled."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7.5, 5.0), dpi=120)
    markers = "osD^vP*X"
    any_point = False
    for k, g in enumerate(results.get("graphs", [])):
        pts = [(pt["label"], (pt.get("summary") or {}).get("tps_user"), (pt.get("summary") or {}).get("tps_gpu"))
               for pt in g.get("points", [])]
        pts = [(lab, x, y) for lab, x, y in pts if _finite(x) and _finite(y)]
        if not pts:
            continue
        any_point = True
        color = f"C{k}"
        name = f"{g['label']}: {g['name']} ({g.get('num_gpus', '?')} GPUs)"
        ax.scatter([x for _, x, _ in pts], [y for _, _, y in pts], color=color, marker=markers[k % len(markers)],
                   label=name, zorder=3)
        by_label = {lab: (x, y) for lab, x, y in pts}
        front = [by_label[lab] for lab in g.get("frontier") or [] if lab in by_label]
        if len(front) >= 2:
            ax.plot([x for x, _ in front], [y for _, y in front], color=color, lw=1.5, zorder=2)
        for lab, x, y in pts:
            ax.annotate(lab, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8, color=color)
    for comp in results.get("comparisons", [])[:1]:
        rng = comp.get("matched_range")
        if rng and rng[1] > rng[0]:
            ax.axvspan(rng[0], rng[1], color="0.85", zorder=0, label="matched TPS/user range")
    ax.set_xlabel("TPS/user (output tokens/s per request)")
    ax.set_ylabel("output TPS/GPU")
    wl = results.get("workload", {})
    ax.set_title(f"Pareto: {wl.get('name', '')}")
    ax.grid(True, alpha=0.3)
    if any_point:
        ax.legend(fontsize=8, loc="best")
    else:
        ax.text(0.5, 0.5, "no successful point", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    tmp = p.with_name(p.stem + ".tmp.png")
    fig.savefig(tmp, format="png")
    plt.close(fig)
    os.replace(tmp, p)
    return p


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


# -------------------------------------------------------------------------------------- markdown


def fmt(x: Any, digits: int = 1, pct: bool = False, unit: str = "") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return NA
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int) and not pct:
        return f"{x}{unit}"
    if pct:
        return f"{100 * x:.{digits}f}%"
    ax = abs(x)
    if ax and (ax >= 1e6 or ax < 10 ** -digits):
        return f"{x:.3g}{unit}"
    return f"{x:.{digits}f}{unit}"


def _table(header: list[str], rows: Iterable[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


def _pools_text(g: dict) -> str:
    return "; ".join(f"{p['name']}: {p['strategy']} {p['ranks']}x{p['replicas']} ({p['role']})"
                     for p in g.get("pools", []))


def _dist_text(d: dict) -> str:
    s = f"mean {d.get('mean')}, CV {100 * (d.get('cv') or 0):.0f}%"
    if d.get("cv"):
        s += f", {d.get('dist')}"
    clip = [f"min {d['min']}" if d.get("min", 1) != 1 else "", f"max {d['max']}" if d.get("max") else ""]
    clip = [c for c in clip if c]
    return s + (f" (clipped: {', '.join(clip)})" if clip else "")


def _bound(name: str, ms: float | None) -> str:
    return f"{name} <= {fmt(ms, 0)} ms" if ms is not None else f"{name} not bounded"


def render_markdown(results: dict) -> str:
    wl = results.get("workload", {})
    graphs = results.get("graphs", [])
    lines = [f"# A/B report: {' vs '.join(g['name'] for g in graphs)}", ""]
    load = wl.get("load", {})
    mode = "concurrency" if load.get("concurrency") is not None else "request_rate"
    values = load.get(mode)
    skew = wl.get("expert_skew")
    slo = wl.get("slo", {})
    lines += [
        f"Workload **{wl.get('name')}** ({results.get('workload_file', '')}): {wl.get('description', '')}".rstrip(": "),
        "",
        f"- requests: `/v1/{'completions' if wl.get('endpoint') == 'completions' else 'chat/completions'}`, "
        f"prompt as {'token ids (exact ISL)' if wl.get('prompt_format') == 'tokens' else 'text (ISL approximate)'}, "
        f"streaming with a usage chunk, {'ignore_eos + min_tokens = max_tokens (exact OSL)' if wl.get('ignore_eos') else 'EOS honoured'}",
        f"- ISL: {_dist_text(wl.get('isl', {}))}; OSL: {_dist_text(wl.get('osl', {}))}",
        f"- load: {mode} {values}{' per GPU' if load.get('scale') == 'per_gpu' else ''}"
        + (f", {load.get('arrival')} arrivals" if mode == "request_rate" else "")
        + f"; {wl.get('requests_per_point')} requests per point"
        + (f" (at least {wl.get('requests_per_concurrency')} x concurrency)" if wl.get("requests_per_concurrency") else "")
        + f"; warm-up: {wl.get('warmup_requests')} request(s) per graph",
        f"- shared prefix: {100 * (wl.get('shared_prefix_ratio') or 0):.0f}% of each prompt; expert skew: "
        + (f"hot experts {skew.get('hot_experts')}, bias {skew.get('bias')}" if skew else "none"),
        f"- SLOs (goodput): {_bound('TTFT', slo.get('ttft_ms'))}, {_bound('TPOT', slo.get('tpot_ms'))}; "
        f"seed {wl.get('seed')} (same requests for every graph); client: {results.get('client', 'native')}",
        "",
        "## Graphs",
        "",
    ]
    lines += _table(["", "graph", "file", "GPUs", "pools", "status"],
                    [[g["label"], g["name"], f"`{g.get('path', '')}`", fmt(g.get("num_gpus")), _pools_text(g),
                      g.get("status", "ok")] for g in graphs])
    lines += ["", "## Headline: output TPS/GPU at matched TPS/user", ""]
    comps = results.get("comparisons", [])
    if not comps:
        lines.append("Only one graph: no comparison.")
    for c in comps:
        a, b = c["baseline"], c["candidate"]
        ra, rb = c.get("range_a"), c.get("range_b")
        cover = (f"{a} covers TPS/user {fmt(ra[0])}–{fmt(ra[1])}" if ra else f"{a} has no successful point") + ", " + \
                (f"{b} covers {fmt(rb[0])}–{fmt(rb[1])}" if rb else f"{b} has no successful point")
        if c.get("mean") is None:
            lines.append(f"- **{b} / {a}: not comparable** ({c.get('note', 'no overlap')}); {cover}.")
            continue
        lo, hi = c["matched_range"]
        lines.append(f"- **{b} ({c['candidate_name']}) / {a} ({c['baseline_name']}): {c['mean']:.3f}x** TPS/GPU, "
                     f"mean over {sum(1 for s in c['samples'] if s['grid'])} evenly spaced TPS/user values in the "
                     f"matched range {fmt(lo)}–{fmt(hi)} (min {c['min']:.3f}x, max {c['max']:.3f}x); {cover}.")
        lines.append("")
        lines += _table(["TPS/user", f"{a} TPS/GPU", f"{b} TPS/GPU", f"{b}/{a}", "sample"],
                        [[fmt(s["tps_user"]), fmt(s["tps_gpu_a"]), fmt(s["tps_gpu_b"]), f"{s['ratio']:.3f}",
                          "grid" if s["grid"] else "frontier point"] for s in c["samples"]])
        lines.append("")
    for c in comps:
        rows = c.get("same_point") or []
        if rows:
            a, b = c["baseline"], c["candidate"]
            lines += ["", f"Same load point, {b} vs {a} (a secondary view: equal load is not equal interactivity):", ""]
            lines += _table(["point", f"{a} TPS/GPU", f"{b} TPS/GPU", f"{b}/{a}", f"{a} TPS/user", f"{b} TPS/user",
                             f"{b}/{a}"],
                            [[r["point"], fmt(r["tps_gpu_a"]), fmt(r["tps_gpu_b"]), fmt(r["tps_gpu_ratio"], 3),
                              fmt(r["tps_user_a"]), fmt(r["tps_user_b"]), fmt(r["tps_user_ratio"], 3)] for r in rows])
    lines += ["", "Both axes come from the client: TPS/GPU = output tokens of successful requests / measured window / "
              "GPUs of the graph; TPS/user = 1 / mean TPOT. Frontiers are interpolated linearly between Pareto "
              "points, never extrapolated. See `pareto.png`.", ""]
    lines += ["## Per point", ""]
    for g in graphs:
        lines += [f"### {g['label']}: {g['name']} ({fmt(g.get('num_gpus'))} GPUs)", ""]
        if not g.get("points"):
            lines += [f"No finished point ({g.get('status', 'not run')}).", ""]
            continue
        frontier = set(g.get("frontier") or [])
        rows = []
        for pt in g["points"]:
            s = pt.get("summary") or {}
            load_txt = str(pt.get("concurrency")) if pt.get("request_rate") is None else \
                f"{fmt(pt.get('request_rate'), 2)}/s"
            rows.append([
                pt["label"], load_txt, f"{s.get('ok', 0)}/{s.get('failed', 0)}",
                f"{fmt(s.get('ttft_ms_p50'))} / {fmt(s.get('ttft_ms_p99'))}",
                f"{fmt(s.get('itl_ms_p50'), 2)} / {fmt(s.get('itl_ms_p99'), 2)}",
                fmt(s.get("tpot_ms_p50"), 2), fmt(s.get("tps_user")), fmt(s.get("tps_gpu")),
                f"{fmt(s.get('goodput_rps'), 2)} ({fmt(s.get('good_fraction'), 0, pct=True)})",
                f"{fmt(s.get('isl_mean'))} / {fmt(s.get('osl_mean'))}",
                "yes" if pt["label"] in frontier else "",
            ])
        lines += _table(["point", "load", "ok/failed", "TTFT p50/p99 ms", "ITL p50/p99 ms", "TPOT p50 ms",
                         "TPS/user", "TPS/GPU", "goodput req/s (good)", "ISL/OSL actual", "Pareto"], rows)
        errs = [(pt["label"], pt["summary"]) for pt in g["points"] if (pt.get("summary") or {}).get("failed")]
        for label, s in errs:
            kinds = ", ".join(f"{k} x{v}" for k, v in sorted(s.get("errors", {}).items()))
            lines.append(f"- {label}: {s['failed']} failed ({kinds}); first: `{s.get('first_error')}`")
        mism = [(pt["label"], pt["summary"]) for pt in g["points"] if (pt.get("summary") or {}).get("osl_mismatch")]
        for label, s in mism:
            lines.append(f"- {label}: {s['osl_mismatch']} requests returned an OSL other than requested "
                         "(ignore_eos not honoured?)")
        rep = [(pt["label"], pt.get("aiperf")) for pt in g["points"] if pt.get("aiperf")]
        if rep:
            lines += ["", "aiperf's own numbers (cross-check):", ""]
            lines += _table(["point", "requests", "errors", "TTFT p50 ms", "TPOT mean ms", "mean 1/TPOT",
                             "output TPS"],
                            [[lab, fmt(r.get("request_count"), 0), fmt(r.get("error_request_count"), 0),
                              fmt(r.get("ttft_ms_p50")), fmt(r.get("tpot_ms_mean"), 2), fmt(r.get("tps_user_mean")),
                              fmt(r.get("output_tps"))] for lab, r in rep])
        lines.append("")
    lines += _server_section(graphs)
    lines += _plan_section(graphs)
    lines += [
        "## Method",
        "",
        "- TTFT: client send -> first generated text, so it includes queueing in the frontend, router, prefill "
        "and KV transfer (as in the DWDP paper's TTFT table).",
        "- ITL: gaps between streamed chunks (pooled); TPOT: (latency - TTFT) / (output tokens - 1) per request; "
        "TPS/user: 1 / mean TPOT (results.json also has aiperf's mean of 1/TPOT as `tps_user_mean`).",
        "- Goodput (DistServe): requests meeting both SLOs per second of the measured window.",
        "- GPUs: rank processes of the graph's pools (sum of ranks x replicas); on a CPU machine these are "
        "processes, not GPUs, and absolute numbers say nothing about GPU performance.",
        "- Each graph was launched, warmed up, swept and torn down in turn; every graph saw the same requests.",
        "",
    ]
    return "\n".join(lines)


def _server_section(graphs: list[dict]) -> list[str]:
    lines = ["## Server-side evidence", "",
             "Deltas of the workers' `dwdp_*` counters over each point, summed over the ranks of a pool. "
             "Step split = share of step time in compute, exposed DWDP prefetch wait and sync wait "
             "(all-to-all / all-reduce / step agreement); `n/a` = the workers do not export that family.", ""]
    rows = []
    over = []

    def frac(ev: dict, key: str, where: str) -> str:
        v = ev.get(key)
        if isinstance(v, (int, float)) and v > 1.0 + 1e-6:
            over.append(f"{where} {key}")
            return fmt(v, 1, pct=True) + " (!)"
        return fmt(v, 1, pct=True)

    for g in graphs:
        for pt in g.get("points", []):
            for pool, ev in sorted((pt.get("server") or {}).items()):
                where = f"{g['label']} {pt['label']} {pool}"
                total = ev.get("split_sum_frac")
                if isinstance(total, (int, float)) and total > 1.0 + 1e-6:
                    over.append(f"{where} compute+prefetch+sync = {100 * total:.1f}%")
                    other = "(!)"
                else:
                    other = fmt(ev.get("other_frac"), 1, pct=True)
                rows.append([f"{g['label']} {pt['label']}", pool, ev.get("strategy") or NA,
                             frac(ev, "compute_frac", where), frac(ev, "prefetch_wait_frac", where),
                             frac(ev, "sync_wait_frac", where), other,
                             fmt(ev.get("mean_step_ms"), 2), fmt(ev.get("tokens_per_step"), 1),
                             fmt(ev.get("remote_bytes_per_generated_token"), 0),
                             fmt(ev.get("kv_transfer_ms_mean"), 2), fmt(ev.get("rank_step_spread"), 2),
                             f"{ev.get('scraped', 0)}/{ev.get('scraped', 0) + ev.get('scrape_failed', 0)}"])
    if not rows:
        return lines + ["No worker metrics were scraped.", ""]
    lines += _table(["point", "pool", "strategy", "compute", "exposed prefetch", "sync wait", "other",
                     "step ms", "tokens/step", "remote B / gen. token", "KV transfer ms/req", "rank step max/mean",
                     "ranks scraped"], rows)
    if over:
        lines += ["", f"(!) above 100% of step time ({'; '.join(over)}): the worker's counters overlap or count "
                      "time outside `dwdp_step_seconds_total`, so the split is not a partition of the step; check "
                      "the worker's metrics."]
    return lines + [""] + _step_kinds(graphs)


STEP_KINDS = (("graph", "decode steps replayed from CUDA graphs"), ("other", "eager steps (prefill, mixed)"))


def _step_kinds(graphs: list[dict]) -> list[str]:
    """Per step kind: count and mean ms of the step, its launch (wall, and the engine thread's CPU in
    it) and its span on the device; only where the workers export these families."""
    rows = []
    for g in graphs:
        for pt in g.get("points", []):
            for pool, ev in sorted((pt.get("server") or {}).items()):
                if ev.get("graph_launch_ms_mean") is None and ev.get("other_launch_ms_mean") is None:
                    continue
                steps, graph_steps = ev.get("steps"), ev.get("graph_steps") or 0
                for kind, _ in STEP_KINDS:
                    n = graph_steps if kind == "graph" else (None if steps is None else steps - graph_steps)
                    rows.append([f"{g['label']} {pt['label']}", pool, kind, fmt(n, 0),
                                 *(fmt(ev.get(f"{kind}_{k}"), 2) for k in ("step_ms_mean", "launch_ms_mean",
                                                                           "launch_cpu_ms_mean", "device_ms_mean"))])
    if not rows:
        return []
    return ["Where a step's time goes, by kind (" + "; ".join(f"{k}: {what}" for k, what in STEP_KINDS) + "): "
            "launch wall far above its CPU = the engine thread waited (e.g. for the GIL); device = the step's "
            "span on the GPU, host-starved gaps included.", ""] + _table(
        ["point", "pool", "kind", "steps", "step ms", "launch ms", "launch CPU ms", "device ms"], rows) + [""]


def _plan_section(graphs: list[dict]) -> list[str]:
    blocks = [(g, g.get("plan")) for g in graphs if g.get("plan")]
    if not blocks:
        return []
    lines = ["## Predicted (roofline planner) vs measured", ""]
    for g, plan in blocks:
        if plan.get("note") and not plan.get("pools"):
            lines += [f"- {g['label']} {g['name']}: {plan['note']}", ""]
            continue
        lines.append(f"{g['label']} {g['name']}: `dynamo-dwdp plan` model on **{plan.get('gpu')}**, per MoE layer "
                     f"per rank. {plan.get('caveat', '')}")
        lines.append("")
        rows = []
        for pool in plan.get("pools", []):
            for r in pool.get("points", []):
                rows.append([pool["pool"], r["point"], pool["phase"], fmt(r.get("tokens_per_iter"), 1),
                             r.get("tokens_source", ""), fmt(r.get("t_compute_ms"), 3), fmt(r.get("t_prefetch_ms"), 3),
                             fmt(r.get("predicted_exposed_frac"), 1, pct=True),
                             fmt(r.get("measured_prefetch_wait_frac"), 1, pct=True)])
            if pool.get("note"):
                lines.append(f"- {pool['pool']}: {pool['note']}")
        if rows:
            lines += _table(["pool", "point", "phase", "tokens/iter/rank", "from", "t_compute ms", "t_prefetch ms",
                             "predicted exposed", "measured prefetch wait"], rows)
        lines.append("")
    return lines


def write_markdown(results: dict, path: str | Path) -> Path:
    p = Path(path)
    _atomic_write(p, render_markdown(clean(results)))
    return p


def write_all(results: dict, out_dir: str | Path) -> dict[str, Path]:
    """results.json, results.csv, pareto.png and report.md in `out_dir`."""
    d = Path(out_dir)
    return {
        "json": write_json(results, d / "results.json"),
        "csv": write_csv(results, d / "results.csv"),
        "png": plot_pareto(clean(results), d / "pareto.png"),
        "md": write_markdown(results, d / "report.md"),
    }
