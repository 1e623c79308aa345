"""Aggregation of request records into point summaries, Pareto frontiers and the matched B/A ratio.

Pure Python (no numpy) so the tests can check it against numpy and hand arithmetic.

Definitions (one point = one load level of one graph):
  - duration: first request sent -> last request finished (the measured window).
  - TTFT: per request, send -> first content chunk (includes every queue); p50/p99 over ok requests.
  - ITL: the gaps between consecutive content chunks, pooled over ok requests; p50/p99.
  - TPOT: per request, (e2e - TTFT) / (output tokens - 1) (aiperf's `inter_token_latency`).
  - TPS/user (the Pareto x axis): 1 / (mean TPOT over ok requests), tokens/s. It is robust to a
    request whose tokens arrive in one burst (TPOT ~ 0), which would dominate a mean of 1/TPOT.
    `tps_user_mean` is that mean of 1/TPOT over requests with TPOT > 0 (aiperf's
    `output_token_throughput_per_user` avg), kept for cross-checks with aiperf.
  - output TPS: output tokens of ok requests / duration;  TPS/GPU = output TPS / GPUs of the graph.
  - goodput (DistServe): a request is good when it succeeded, TTFT <= slo.ttft_ms and TPOT <=
    slo.tpot_ms (an unset bound always holds; a request with < 2 output tokens has no TPOT and
    meets the TPOT bound). goodput = good requests / duration; good_fraction = good / sent.
Percentiles use linear interpolation between closest ranks (numpy's default `linear` method).

Pareto frontier (x = TPS/user, y = TPS/GPU, both "more is better"): the points no other point
dominates (>= on both axes, > on one), sorted by x. Between frontier points y is interpolated
linearly in x; outside [x_min, x_max] of a frontier it is undefined (no extrapolation).

Matched ratio B/A: over the TPS/user range both frontiers cover, [max(xmin_A, xmin_B),
min(xmax_A, xmax_B)], y_B(x) / y_A(x) on `grid` evenly spaced x (the mean over that grid is the
headline number; min/max and the values at every frontier knot inside the range are given too).
No overlap -> no ratio, and the report says so with both ranges.
"""
from __future__ import annotations

import math
from collections import Counter
from typing import Any, Iterable, Sequence

from dynamo_dwdp.ab.loadgen import RequestRecord

NA = None  # a value that does not exist (JSON null, "n/a" in reports)


def percentile(values: Sequence[float], q: float) -> float | None:
    """q-th percentile (0..100) with linear interpolation (numpy `method="linear"`); None if empty."""
    xs = sorted(float(v) for v in values)
    if not xs:
        return None
    if not 0 <= q <= 100:
        raise ValueError(f"percentile q={q} outside 0..100")
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    frac = pos - lo
    return xs[lo] + (xs[hi] - xs[lo]) * frac


def mean(values: Iterable[float]) -> float | None:
    xs = [float(v) for v in values]
    return sum(xs) / len(xs) if xs else None


def _ms(x: float | None) -> float | None:
    return None if x is None else x * 1e3


def is_good(rec: RequestRecord, ttft_ms: float | None, tpot_ms: float | None) -> bool:
    """DistServe goodput test of one request (see the module docstring)."""
    if not rec.ok:
        return False
    if ttft_ms is not None and (rec.ttft_s is None or rec.ttft_s * 1e3 > ttft_ms * (1 + 1e-9)):
        return False
    tpot = rec.tpot_s
    if tpot_ms is not None and tpot is not None and tpot * 1e3 > tpot_ms * (1 + 1e-9):
        return False
    return True


def error_kind(message: str | None) -> str:
    """A short class of an error message, for counting (`http 400`, `timeout`, `connection`, ...)."""
    if not message:
        return "unknown"
    if message.startswith("http "):
        return message.split(":", 1)[0]
    for kind in ("timeout", "connection", "not sent", "cancelled", "stream error", "no usage chunk",
                 "no content chunk", "empty response", "bad stream chunk", "stream"):
        if message.startswith(kind):
            return kind
    return message.split(":", 1)[0][:40]


def summarize_point(records: Sequence[RequestRecord], *, duration_s: float, num_gpus: int,
                    ttft_slo_ms: float | None = None, tpot_slo_ms: float | None = None) -> dict[str, Any]:
    """The per-point numbers of the report (see the module docstring for every definition)."""
    if num_gpus <= 0:
        raise ValueError(f"num_gpus must be > 0, got {num_gpus}")
    sent = [r for r in records if r.sent]
    ok = [r for r in sent if r.ok]
    failed = [r for r in records if not r.ok]
    ttfts = [r.ttft_s * 1e3 for r in ok if r.ttft_s is not None]
    gaps = [g * 1e3 for r in ok for g in r.itl_gaps_s]
    tpots = [r.tpot_s * 1e3 for r in ok if r.tpot_s is not None]
    tps_users = [1.0 / r.tpot_s for r in ok if r.tpot_s is not None and r.tpot_s > 0]
    e2es = [r.e2e_s * 1e3 for r in ok if r.e2e_s is not None]
    out_tokens = sum(r.output_tokens or 0 for r in ok)
    good = [r for r in sent if is_good(r, ttft_slo_ms, tpot_slo_ms)]
    good_tokens = sum(r.output_tokens or 0 for r in good)
    dur = duration_s if duration_s and duration_s > 0 else None
    output_tps = out_tokens / dur if dur else None
    isl_actual = [r.prompt_tokens for r in ok if r.prompt_tokens is not None]
    osl_actual = [r.output_tokens for r in ok if r.output_tokens is not None]
    osl_mismatch = sum(1 for r in ok if r.output_tokens is not None and r.output_tokens != r.target_osl)
    isl_mismatch = sum(1 for r in ok if r.prompt_tokens is not None and r.prompt_tokens != r.target_isl)
    return {
        "requests": len(records),
        "sent": len(sent),
        "ok": len(ok),
        "failed": len(failed),
        "errors": dict(Counter(error_kind(r.error) for r in failed)),
        "first_error": next((r.error for r in failed if r.error), None),
        "duration_s": duration_s,
        "num_gpus": num_gpus,
        "ttft_ms_mean": mean(ttfts),
        "ttft_ms_p50": percentile(ttfts, 50),
        "ttft_ms_p90": percentile(ttfts, 90),
        "ttft_ms_p99": percentile(ttfts, 99),
        "itl_ms_p50": percentile(gaps, 50),
        "itl_ms_p99": percentile(gaps, 99),
        "tpot_ms_mean": mean(tpots),
        "tpot_ms_p50": percentile(tpots, 50),
        "tpot_ms_p99": percentile(tpots, 99),
        "e2e_ms_p50": percentile(e2es, 50),
        "e2e_ms_p99": percentile(e2es, 99),
        "tps_user": 1e3 / mean(tpots) if tpots and mean(tpots) > 0 else None,
        "tps_user_mean": mean(tps_users),
        "output_tokens": out_tokens,
        "output_tps": output_tps,
        "tps_gpu": output_tps / num_gpus if output_tps is not None else None,
        "request_throughput": len(ok) / dur if dur else None,
        "good": len(good),
        "good_fraction": len(good) / len(sent) if sent else None,
        "goodput_rps": len(good) / dur if dur else None,
        "goodput_tps_gpu": good_tokens / dur / num_gpus if dur else None,
        "slo": {"ttft_ms": ttft_slo_ms, "tpot_ms": tpot_slo_ms},
        "isl_mean": mean(isl_actual),
        "osl_mean": mean(osl_actual),
        "isl_target_mean": mean(r.target_isl for r in records),
        "osl_target_mean": mean(r.target_osl for r in records),
        "isl_mismatch": isl_mismatch,
        "osl_mismatch": osl_mismatch,
    }


# ---------------------------------------------------------------------------------------- Pareto


def pareto_frontier(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the non-dominated points (maximise x and y), sorted by increasing x.

    Points with a None/NaN coordinate are ignored. Exact duplicates keep the first index.
    """
    valid = [(i, float(x), float(y)) for i, (x, y) in enumerate(points)
             if x is not None and y is not None and not (math.isnan(x) or math.isnan(y))]
    keep = []
    for i, x, y in valid:
        dominated = False
        for j, x2, y2 in valid:
            if j == i:
                continue
            if x2 >= x and y2 >= y and (x2 > x or y2 > y):
                dominated = True
                break
            if x2 == x and y2 == y and j < i:
                dominated = True
                break
        if not dominated:
            keep.append((x, i))
    return [i for _, i in sorted(keep)]


def interpolate(frontier: Sequence[tuple[float, float]], x: float) -> float | None:
    """y at x on the piecewise-linear frontier (sorted by x); None outside its x range."""
    if not frontier:
        return None
    xs = [p[0] for p in frontier]
    if x < xs[0] - 1e-12 * max(1.0, abs(xs[0])) or x > xs[-1] + 1e-12 * max(1.0, abs(xs[-1])):
        return None
    if len(frontier) == 1 or x <= xs[0]:
        return frontier[0][1]
    for (x0, y0), (x1, y1) in zip(frontier, frontier[1:]):
        if x0 <= x <= x1:
            if x1 == x0:
                return max(y0, y1)
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return frontier[-1][1]


def matched_ratio(frontier_a: Sequence[tuple[float, float]], frontier_b: Sequence[tuple[float, float]],
                  grid: int = 11) -> dict[str, Any]:
    """B/A of y at matched x over the overlap of the two frontiers (see the module docstring)."""
    out: dict[str, Any] = {
        "range_a": [frontier_a[0][0], frontier_a[-1][0]] if frontier_a else None,
        "range_b": [frontier_b[0][0], frontier_b[-1][0]] if frontier_b else None,
        "matched_range": None, "mean": None, "min": None, "max": None, "samples": [],
    }
    if not frontier_a or not frontier_b:
        out["note"] = "a graph has no successful point"
        return out
    lo = max(frontier_a[0][0], frontier_b[0][0])
    hi = min(frontier_a[-1][0], frontier_b[-1][0])
    if lo > hi:
        out["note"] = "the TPS/user ranges of the two frontiers do not overlap"
        return out
    xs = [lo] if hi == lo else [lo + (hi - lo) * k / (grid - 1) for k in range(grid)]
    knots = sorted({x for x, _ in list(frontier_a) + list(frontier_b) if lo <= x <= hi} - set(xs))
    samples = []
    for x in sorted(set(xs) | set(knots)):
        ya, yb = interpolate(frontier_a, x), interpolate(frontier_b, x)
        if ya is None or yb is None or ya <= 0:
            continue
        samples.append({"tps_user": x, "tps_gpu_a": ya, "tps_gpu_b": yb, "ratio": yb / ya, "grid": x in xs})
    grid_ratios = [s["ratio"] for s in samples if s["grid"]]
    out["matched_range"] = [lo, hi]
    out["samples"] = samples
    if grid_ratios:
        out["mean"] = sum(grid_ratios) / len(grid_ratios)
        out["min"] = min(s["ratio"] for s in samples)
        out["max"] = max(s["ratio"] for s in samples)
    else:
        out["note"] = "baseline TPS/GPU is zero over the matched range"
    return out


def frontier_of(summaries: Sequence[dict]) -> tuple[list[int], list[tuple[float, float]]]:
    """(indices into `summaries`, [(tps_user, tps_gpu)]) of the Pareto frontier of one graph."""
    pts = [(s.get("tps_user"), s.get("tps_gpu")) for s in summaries]
    idx = pareto_frontier(pts)
    return idx, [(float(pts[i][0]), float(pts[i][1])) for i in idx]


def same_point_ratios(points_a: Sequence[dict], points_b: Sequence[dict]) -> list[dict]:
    """B/A at the same sweep point (same label), a secondary view next to the matched-TPS/user ratio:
    [{point, tps_gpu_a, tps_gpu_b, tps_gpu_ratio, tps_user_a, tps_user_b, tps_user_ratio}]."""
    by_b = {p["label"]: p.get("summary") or {} for p in points_b}
    out = []
    for p in points_a:
        if p["label"] not in by_b:
            continue
        sa, sb = p.get("summary") or {}, by_b[p["label"]]
        row: dict[str, Any] = {"point": p["label"]}
        for key in ("tps_gpu", "tps_user"):
            a, b = sa.get(key), sb.get(key)
            row[f"{key}_a"], row[f"{key}_b"] = a, b
            row[f"{key}_ratio"] = b / a if a and b is not None else None
        out.append(row)
    return out
