"""Server-side evidence: scrape the workers' Prometheus `/metrics` around each point, take deltas.

The DWDP workers export (labels `strategy`, `role`, `group`, `rank` on every series):
  counters  dwdp_step_seconds_total, dwdp_step_compute_seconds_total,
            dwdp_step_prefetch_wait_seconds_total (exposed DWDP prefetch stall),
            dwdp_step_sync_wait_seconds_total (DEP all-to-all, TP all-reduce, step agreement),
            dwdp_steps_total, dwdp_tokens_total (tokens computed), dwdp_remote_bytes_total (+ `peer`),
            dwdp_kv_transfer_bytes_total, dwdp_generated_tokens_total,
            dwdp_graph_steps_total, dwdp_graph_step_seconds_total (decode steps replayed from CUDA graphs),
            dwdp_step_launch_seconds_total, dwdp_step_launch_cpu_seconds_total (the host's launches: wall
            and engine-thread CPU), dwdp_device_steps_total, dwdp_step_device_seconds_total (CUDA), and
            the graph steps' parts of the three: dwdp_graph_step_{launch,launch_cpu,device}_seconds_total,
            dwdp_engine_loop_seconds_total, dwdp_engine_loop_cpu_seconds_total (the engine thread's busy time)
  histogram dwdp_kv_transfer_seconds (_sum / _count used)
  gauges    dwdp_queue_depth, dwdp_queue_to_compute_ratio

`parse_prometheus` is a tolerant reader of the text exposition format (bad lines are skipped), a
failed scrape is `None`, and every derived number is `None` ("n/a") when a family it needs is
missing, so a graph whose workers export nothing still gets a report. Counter deltas that go
negative (a restarted worker) are dropped.
"""
from __future__ import annotations

import asyncio
import math
import re
from typing import Any, Iterable

import aiohttp

Series = tuple[str, tuple[tuple[str, str], ...]]  # (sample name, sorted labels)

STEP = "dwdp_step_seconds_total"
COMPUTE = "dwdp_step_compute_seconds_total"
PREFETCH = "dwdp_step_prefetch_wait_seconds_total"
SYNC = "dwdp_step_sync_wait_seconds_total"
STEPS = "dwdp_steps_total"
TOKENS = "dwdp_tokens_total"
REMOTE_BYTES = "dwdp_remote_bytes_total"
KV_BYTES = "dwdp_kv_transfer_bytes_total"
KV_SECONDS_SUM = "dwdp_kv_transfer_seconds_sum"
KV_SECONDS_COUNT = "dwdp_kv_transfer_seconds_count"
GENERATED = "dwdp_generated_tokens_total"
GRAPH_STEPS = "dwdp_graph_steps_total"
GRAPH_STEP_SECONDS = "dwdp_graph_step_seconds_total"
LAUNCH_SECONDS = "dwdp_step_launch_seconds_total"
LAUNCH_CPU_SECONDS = "dwdp_step_launch_cpu_seconds_total"
DEVICE_STEPS = "dwdp_device_steps_total"
DEVICE_SECONDS = "dwdp_step_device_seconds_total"
GRAPH_LAUNCH_SECONDS = "dwdp_graph_step_launch_seconds_total"
GRAPH_LAUNCH_CPU_SECONDS = "dwdp_graph_step_launch_cpu_seconds_total"
GRAPH_DEVICE_SECONDS = "dwdp_graph_step_device_seconds_total"
LOOP_SECONDS = "dwdp_engine_loop_seconds_total"
LOOP_CPU_SECONDS = "dwdp_engine_loop_cpu_seconds_total"
QUEUE_DEPTH = "dwdp_queue_depth"
QUEUE_RATIO = "dwdp_queue_to_compute_ratio"
GAUGES = (QUEUE_DEPTH, QUEUE_RATIO)

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)(\s+\S+)?\s*$")
_LABEL = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"\s*,?')


def _unescape(v: str) -> str:
    return v.replace('\\"', '"').replace("\\n", "\n").replace("\\\\", "\\")


def parse_prometheus(text: str | None) -> dict[Series, float]:
    """{(name, labels): value} of every parseable sample; comments and malformed lines are skipped."""
    out: dict[Series, float] = {}
    if not text:
        return out
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        if not m:
            continue
        name, _, body, value = m.group(1), m.group(2), m.group(3), m.group(4)
        labels = []
        if body:
            pos = 0
            ok = True
            while pos < len(body):
                lm = _LABEL.match(body, pos)
                if not lm:
                    ok = not body[pos:].strip(" ,")
                    break
                labels.append((lm.group(1), _unescape(lm.group(2))))
                pos = lm.end()
            if not ok:
                continue
        try:
            v = float(value)
        except ValueError:
            continue
        out[(name, tuple(sorted(labels)))] = v
    return out


def counter_deltas(before: dict[Series, float], after: dict[Series, float]) -> dict[Series, float]:
    """after - before for every series in `after` (a series new in `after` counts from 0).

    Gauges (dwdp_queue_*) keep their `after` value. Negative deltas (counter reset) are dropped.
    """
    out = {}
    for key, v in after.items():
        if key[0] in GAUGES:
            out[key] = v
            continue
        d = v - before.get(key, 0.0)
        if d >= 0 and not math.isnan(d):
            out[key] = d
    return out


def scrape_total(url: str, name: str, timeout_s: float = 1.0) -> float:
    """Blocking: the sum of every sample named `name` on one /metrics page (0 when unreachable).
    For status lines and the demo; the A/B harness uses the async `scrape`."""
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as r:
            text = r.read().decode(errors="replace")
    except OSError:
        return 0.0
    return sum(v for (n, _labels), v in parse_prometheus(text).items() if n == name)


async def scrape(urls: Iterable[str], timeout_s: float = 5.0) -> dict[str, str | None]:
    """GET every URL concurrently; the body text, or None for a failed scrape."""
    urls = list(urls)
    result: dict[str, str | None] = {u: None for u in urls}
    if not urls:
        return result
    async with aiohttp.ClientSession(trust_env=False, timeout=aiohttp.ClientTimeout(total=timeout_s)) as s:
        async def one(u: str) -> None:
            try:
                async with s.get(u, allow_redirects=False) as resp:
                    if resp.status == 200:
                        result[u] = await resp.text()
            except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
                result[u] = None

        await asyncio.gather(*(one(u) for u in urls))
    return result


def _sum(deltas: dict[Series, float], name: str) -> float | None:
    vals = [v for (n, _), v in deltas.items() if n == name]
    return sum(vals) if vals else None


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b <= 0:
        return None
    return a / b


def _diff(a: float | None, b: float | None) -> float | None:
    """a - b, a missing b counting as 0."""
    return None if a is None else a - (b or 0.0)


def _scaled(x: float | None, k: float) -> float | None:
    return None if x is None else x * k


def _labels_of(deltas: dict[Series, float], key: str) -> list[str]:
    return sorted({dict(labels).get(key) for (n, labels) in deltas if n.startswith("dwdp_")} - {None})


def _by_kind(deltas: dict[Series, float], name: str, total: str, graph: str, steps: str) -> dict[str, float | None]:
    """Mean ms per step of a seconds counter over graph steps (`graph_<name>`) and the other steps
    (`other_<name>`), from its total, its graph part and the step counts."""
    t, g = _sum(deltas, total), _sum(deltas, graph)
    n, ng = _sum(deltas, steps), _sum(deltas, GRAPH_STEPS)
    return {f"graph_{name}": _scaled(_ratio(g, ng), 1e3),
            f"other_{name}": _scaled(_ratio(_diff(t, g), _diff(n, ng)), 1e3)}


def pool_evidence(deltas: dict[Series, float], scraped: int = 0, failed: int = 0) -> dict[str, Any]:
    """Derived numbers of one pool from its summed rank deltas (None where a family is missing).

    step split: compute / exposed prefetch wait / sync wait as fractions of step time (per-rank
    sums, so the fractions are time-weighted over ranks); remote bytes per generated token; KV
    transfer time per transfer (mean, ms); tokens per step; mean queue depth.
    """
    step = _sum(deltas, STEP)
    per_rank_step = {}
    for (n, labels), v in deltas.items():
        if n == STEP:
            per_rank_step[dict(labels).get("rank", "?") + "/" + dict(labels).get("group", "?")] = v
    spread = None
    if len(per_rank_step) >= 2 and min(per_rank_step.values()) > 0:
        spread = max(per_rank_step.values()) / (sum(per_rank_step.values()) / len(per_rank_step))
    qd = [v for (n, _), v in deltas.items() if n == QUEUE_DEPTH]
    qr = [v for (n, _), v in deltas.items() if n == QUEUE_RATIO]
    compute, prefetch, sync = _sum(deltas, COMPUTE), _sum(deltas, PREFETCH), _sum(deltas, SYNC)
    other = split_sum = None
    if step and compute is not None:  # a family a strategy does not export (DEP: prefetch) counts as 0
        split_sum = (compute + (prefetch or 0.0) + (sync or 0.0)) / step
        other = 1.0 - split_sum if split_sum <= 1.0 + 1e-9 else None
    kv_sum, kv_count = _sum(deltas, KV_SECONDS_SUM), _sum(deltas, KV_SECONDS_COUNT)
    return {
        "scraped": scraped,
        "scrape_failed": failed,
        "strategy": ",".join(_labels_of(deltas, "strategy")) or None,
        "role": ",".join(_labels_of(deltas, "role")) or None,
        "step_seconds": step,
        "compute_frac": _ratio(compute, step),
        "prefetch_wait_frac": _ratio(prefetch, step),
        "sync_wait_frac": _ratio(sync, step),
        "other_frac": None if other is None else max(0.0, other),
        "split_sum_frac": split_sum,
        "steps": _sum(deltas, STEPS),
        "tokens": _sum(deltas, TOKENS),
        "tokens_per_step": _ratio(_sum(deltas, TOKENS), _sum(deltas, STEPS)),
        "mean_step_ms": _scaled(_ratio(step, _sum(deltas, STEPS)), 1e3),
        "graph_steps": _sum(deltas, GRAPH_STEPS),
        "graph_step_ms_mean": _scaled(_ratio(_sum(deltas, GRAPH_STEP_SECONDS), _sum(deltas, GRAPH_STEPS)), 1e3),
        "other_step_ms_mean": _scaled(_ratio(_diff(step, _sum(deltas, GRAPH_STEP_SECONDS)),
                                             _diff(_sum(deltas, STEPS), _sum(deltas, GRAPH_STEPS))), 1e3),
        "loop_ms_mean": _scaled(_ratio(_sum(deltas, LOOP_SECONDS), _sum(deltas, STEPS)), 1e3),
        "loop_cpu_ms_mean": _scaled(_ratio(_sum(deltas, LOOP_CPU_SECONDS), _sum(deltas, STEPS)), 1e3),
        **_by_kind(deltas, "launch_ms_mean", LAUNCH_SECONDS, GRAPH_LAUNCH_SECONDS, STEPS),
        **_by_kind(deltas, "launch_cpu_ms_mean", LAUNCH_CPU_SECONDS, GRAPH_LAUNCH_CPU_SECONDS, STEPS),
        **_by_kind(deltas, "device_ms_mean", DEVICE_SECONDS, GRAPH_DEVICE_SECONDS, DEVICE_STEPS),
        "remote_bytes": _sum(deltas, REMOTE_BYTES),
        "generated_tokens": _sum(deltas, GENERATED),
        "remote_bytes_per_generated_token": _ratio(_sum(deltas, REMOTE_BYTES), _sum(deltas, GENERATED)),
        "kv_transfer_bytes": _sum(deltas, KV_BYTES),
        "kv_transfers": kv_count,
        "kv_transfer_ms_mean": _scaled(_ratio(kv_sum, kv_count), 1e3),
        "rank_step_spread": spread,
        "queue_depth_mean": sum(qd) / len(qd) if qd else None,
        "queue_to_compute_ratio_mean": sum(qr) / len(qr) if qr else None,
    }


def group_by_pool(urls: dict[str, list[str]], pool_names: Iterable[str]) -> dict[str, list[str]]:
    """Launcher components (`decode-g0`, `decode-g1`, ...) merged into their pools (`decode`).

    A component belongs to pool P when it is named P or P-g<index>; any other name is kept as is.
    """
    names = sorted(pool_names, key=len, reverse=True)
    out: dict[str, list[str]] = {}
    for comp, us in urls.items():
        pool = next((p for p in names if comp == p or re.fullmatch(re.escape(p) + r"-g\d+", comp)), comp)
        out.setdefault(pool, []).extend(us)
    return out


def evidence(before: dict[str, str | None], after: dict[str, str | None],
             components: dict[str, list[str]]) -> dict[str, dict[str, Any]]:
    """Per component (pool): `pool_evidence` over the rank URLs scraped both before and after."""
    out = {}
    for comp, urls in components.items():
        deltas: dict[Series, float] = {}
        good = 0
        for u in urls:
            b, a = before.get(u), after.get(u)
            if b is None or a is None:
                continue
            good += 1
            for key, v in counter_deltas(parse_prometheus(b), parse_prometheus(a)).items():
                # the same series from two ranks has different `rank` labels; add the url to be safe
                deltas[(key[0], key[1] + (("__url", u),))] = v
        out[comp] = pool_evidence(deltas, scraped=good, failed=len(urls) - good)
    return out
