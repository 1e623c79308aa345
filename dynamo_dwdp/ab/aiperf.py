"""Optional driver for NVIDIA aiperf (`pip install aiperf`, the `aiperf` extra): never required.

`dynamo-dwdp ab --client aiperf` runs one `aiperf profile` per sweep point against the graph's
frontend and parses its exports back into our per-request records, so the summaries, goodput,
Pareto frontier and report are computed by the same code as for the native client.

What is sent: our own generated requests, written as an aiperf `single_turn` dataset
(`{"text": ..., "output_length": osl}` per line; token-id prompts are decoded to text, so ISL is
approximate and read back from aiperf's `input_sequence_length`), with `--extra-inputs
ignore_eos:true` (Dynamo 1.6.1 accepts top-level `ignore_eos`; with it the engine runs to
max_tokens = output_length).

Exports read (aiperf 0.13.x names; `find_export` searches the artifact dir recursively):
  - `profile_export.jsonl`: one record per request: `metadata` (`request_start_ns`,
    `request_end_ns`, `benchmark_phase`; older releases: `timestamp_ns`, `credit_phase`),
    `metrics` {tag: {value, unit}} (`time_to_first_token` or older `ttft`, `request_latency`,
    `usage_prompt_tokens` / `usage_completion_tokens` (the server's counts, preferred) else
    `input_sequence_length` / `output_sequence_length`, `inter_chunk_latency` [list], ...), `error`
    ({code, type, message} or null). Warm-up records are skipped.
  We pass `--use-server-token-count`: without it aiperf re-tokenises the streamed text, which for a
  random model's byte-level output differs from what the engine generated (seen: 12 vs 8 tokens).
  - `profile_export_aiperf.json`: per-metric stats blocks {unit, avg, min, max, p1..p99, std, count},
    either at the top level (schema 1.x) or under `records` (older releases).
  - `profile_export_aiperf.csv`: a per-record stats section (`Metric,avg,...`) and, after a blank
    line, a `Metric,Value` section; a header `Time to First Token (ms)` is the tag
    `time_to_first_token` with unit `ms`.
"""
from __future__ import annotations

import csv
import io
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any, Sequence

from dynamo_dwdp.ab.loadgen import PointRun, RequestRecord
from dynamo_dwdp.ab.workload import LoadPoint, Request, Tokenizer, Workload
from dynamo_dwdp.errors import UserError

JSONL_NAME = "profile_export.jsonl"
JSON_NAME = "profile_export_aiperf.json"
CSV_NAME = "profile_export_aiperf.csv"
INSTALL_HINT = "install it with `pip install aiperf` (or `pip install dynamo-dwdp[aiperf]`), or use --client native"

TAG_ALIASES = {"ttft": "time_to_first_token", "ttst": "time_to_second_token"}
_TO_SECONDS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "sec": 1.0}


def aiperf_path() -> str | None:
    return shutil.which("aiperf")


def build_command(workload: Workload, point: LoadPoint, *, url: str, model: str, input_file: str | Path,
                  artifact_dir: str | Path, tokenizer_dir: str | Path | None = None,
                  warmup_requests: int = 0, executable: str = "aiperf") -> list[str]:
    """The `aiperf profile` command line of one sweep point (our requests, our seed, exact OSL)."""
    cmd = [executable, "profile",
           "--model", model,
           "--url", url,
           "--endpoint-type", "completions" if workload.endpoint == "completions" else "chat",
           "--streaming",
           "--input-file", str(input_file),
           "--custom-dataset-type", "single_turn",
           "--request-count", str(point.num_requests),
           "--random-seed", str(workload.seed),
           "--artifact-dir", str(artifact_dir),
           "--use-server-token-count",  # lengths from the usage chunk, not from re-tokenised text
           "--ui", "none"]
    if warmup_requests > 0:  # aiperf 0.13 rejects --warmup-request-count 0
        cmd += ["--warmup-request-count", str(int(warmup_requests))]
    if point.request_rate is not None:
        cmd += ["--request-rate", f"{point.request_rate:g}", "--arrival-pattern", workload.load.arrival]
        if point.concurrency:
            cmd += ["--concurrency", str(point.concurrency)]
    else:
        cmd += ["--concurrency", str(point.concurrency)]
    if workload.ignore_eos:
        cmd += ["--extra-inputs", "ignore_eos:true"]
    goodput = []
    if workload.slo.ttft_ms is not None:
        goodput.append(f"time_to_first_token:{workload.slo.ttft_ms:g}")
    if workload.slo.tpot_ms is not None:
        goodput.append(f"inter_token_latency:{workload.slo.tpot_ms:g}")
    if goodput:
        cmd += ["--goodput", " ".join(goodput)]
    if tokenizer_dir is not None:
        cmd += ["--tokenizer", str(tokenizer_dir)]
    return cmd


def write_inputs(requests: Sequence[Request], path: str | Path, tokenizer: Tokenizer | None = None) -> Path:
    """Our requests as an aiperf `single_turn` JSONL dataset (token prompts decoded to text)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with p.open("w", encoding="utf-8") as f:
        for r in requests:
            if isinstance(r.prompt, str):
                text = r.prompt
            elif tokenizer is not None:
                text = tokenizer.decode(list(r.prompt))
            else:
                raise UserError("aiperf needs text prompts: a tokenizer is required to decode token prompts")
            f.write(json.dumps({"text": text, "output_length": int(r.osl)}) + "\n")
    return p


def find_export(artifact_dir: str | Path, name: str) -> Path | None:
    """The newest file called `name` below `artifact_dir` (aiperf nests runs in sub-directories)."""
    root = Path(artifact_dir)
    if (root / name).is_file():
        return root / name
    hits = [p for p in root.rglob(name) if p.is_file()]
    return max(hits, key=lambda p: p.stat().st_mtime) if hits else None


# ---------------------------------------------------------------------------------------- parsing


def _metric(metrics: dict, *tags: str) -> tuple[Any, str | None]:
    for t in tags:
        m = metrics.get(t)
        if isinstance(m, dict) and "value" in m:
            return m["value"], m.get("unit")
    return None, None


def _seconds(value: Any, unit: str | None, default_unit: str = "ms") -> float | None:
    if value is None:
        return None
    try:
        return float(value) * _TO_SECONDS.get((unit or default_unit).strip().lower(), 1e-3)
    except (TypeError, ValueError):
        return None


def _error_text(err: dict) -> tuple[str, int | None]:
    code = err.get("code")
    etype = err.get("type") or "error"
    msg = " ".join(str(err.get("message") or "").split())
    if isinstance(code, int) and 400 <= code < 600:
        return f"http {code}: {etype}: {msg}", code
    return f"{etype}: {msg}" if msg else etype, code if isinstance(code, int) else None


def parse_records(path: str | Path) -> tuple[list[RequestRecord], float | None]:
    """Profiling-phase records of a `profile_export.jsonl`, ordered by start time.

    Returns (records, wall start in epoch seconds). Records carry aiperf's own TTFT, latency,
    lengths and chunk gaps; `start_s`/`end_s` are relative to the earliest start in the file.
    """
    rows = []
    with Path(path).open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except ValueError:
                raise UserError(f"{path}: line {n}: not JSON (allowed: aiperf profile_export.jsonl records)") from None
    parsed = []
    for row in rows:
        meta = row.get("metadata") or {}
        phase = meta.get("benchmark_phase") or meta.get("credit_phase") or "profiling"
        if str(phase).lower() == "warmup":
            continue
        metrics = row.get("metrics") or {}
        start_ns = meta.get("request_start_ns") or meta.get("timestamp_ns")
        if start_ns is None:
            v, _ = _metric(metrics, "min_request_timestamp")
            start_ns = v
        end_ns = meta.get("request_end_ns")
        if end_ns is None:
            v, _ = _metric(metrics, "max_response_timestamp")
            end_ns = v
        parsed.append((start_ns, end_ns, metrics, row.get("error")))
    starts = [float(s) for s, *_ in parsed if s is not None]
    t0 = min(starts) if starts else 0.0
    parsed.sort(key=lambda r: (r[0] is None, r[0] or 0))
    records = []
    for i, (start_ns, end_ns, metrics, err) in enumerate(parsed):
        isl, _ = _metric(metrics, "usage_prompt_tokens", "input_sequence_length", "error_isl")
        osl, _ = _metric(metrics, "usage_completion_tokens", "output_sequence_length", "output_token_count")
        rec = RequestRecord(index=i, target_isl=int(isl or 0), target_osl=int(osl or 0), sent=True)
        rec.start_s = (float(start_ns) - t0) * 1e-9 if start_ns is not None else None
        lat = _seconds(*_metric(metrics, "request_latency"))
        if rec.start_s is not None:
            if lat is not None:
                rec.end_s = rec.start_s + lat
            elif end_ns is not None:
                rec.end_s = (float(end_ns) - t0) * 1e-9
        if err:
            rec.error, rec.status = _error_text(err)
            records.append(rec)
            continue
        rec.status = 200
        rec.ttft_s = _seconds(*_metric(metrics, "time_to_first_token", "ttft"))
        rec.prompt_tokens = int(isl) if isl is not None else None
        rec.output_tokens = int(osl) if osl is not None else None
        gaps, gunit = _metric(metrics, "inter_chunk_latency")
        if rec.ttft_s is not None:
            t = rec.ttft_s
            rec.chunk_times_s = [t]
            for g in gaps if isinstance(gaps, list) else ():
                t += _seconds(g, gunit) or 0.0
                rec.chunk_times_s.append(t)
        rec.ok = rec.ttft_s is not None and rec.end_s is not None and rec.output_tokens is not None
        if not rec.ok:
            rec.error = "aiperf record without ttft/latency/output length"
        records.append(rec)
    return records, (t0 * 1e-9 if starts else None)


def _slug(header: str) -> tuple[str, str | None]:
    m = re.match(r"^\s*(.*?)\s*(?:\(([^)]*)\))?\s*$", header)
    name, unit = (m.group(1), m.group(2)) if m else (header, None)
    tag = re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")
    return TAG_ALIASES.get(tag, tag), unit


def parse_aggregate_json(path: str | Path) -> dict[str, dict]:
    """{metric tag: stats block} of a `profile_export_aiperf.json` (either layout; `ttft` -> `time_to_first_token`)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except ValueError:
        raise UserError(f"{path}: not JSON (allowed: aiperf profile_export_aiperf.json)") from None
    blocks = data.get("records") if isinstance(data.get("records"), dict) else data
    out = {}
    for key, block in blocks.items():
        if isinstance(block, dict) and "unit" in block and ("avg" in block or "p50" in block):
            tag = TAG_ALIASES.get(block.get("tag", key), block.get("tag", key))
            out[tag] = {k: v for k, v in block.items() if k != "tag"}
    return out


def parse_aggregate_csv(path: str | Path) -> dict[str, dict]:
    """{metric tag: {unit, avg, p50, ...} or {unit, value}} from both sections of the aggregate CSV."""
    text = Path(path).read_text(encoding="utf-8")
    out: dict[str, dict] = {}
    for section in re.split(r"\n\s*\n", text.strip()):
        rows = list(csv.reader(io.StringIO(section)))
        if not rows or not rows[0] or rows[0][0].strip().lower() != "metric":
            continue
        header = [h.strip().lower() for h in rows[0]]
        for row in rows[1:]:
            if not row or not row[0].strip():
                continue
            tag, unit = _slug(row[0])
            entry: dict[str, Any] = {"unit": unit}
            for h, cell in zip(header[1:], row[1:]):
                try:
                    entry[h] = float(cell.replace(",", "")) if cell.strip() not in ("", "N/A") else None
                except ValueError:
                    entry[h] = None
            out[tag] = entry
    return out


def reported_summary(agg: dict[str, dict]) -> dict[str, float | None]:
    """The few aiperf-reported numbers we show next to our own (from either aggregate parser)."""
    def get(tag: str, stat: str = "avg") -> float | None:
        block = agg.get(tag) or {}
        v = block.get(stat, block.get("value"))
        return float(v) if isinstance(v, (int, float)) else None

    return {
        "request_count": get("request_count"),
        "error_request_count": get("error_request_count"),
        "ttft_ms_p50": get("time_to_first_token", "p50"),
        "ttft_ms_p99": get("time_to_first_token", "p99"),
        "tpot_ms_mean": get("inter_token_latency"),
        "tps_user_mean": get("output_token_throughput_per_user"),
        "output_tps": get("output_token_throughput"),
        "benchmark_duration_s": get("benchmark_duration"),
        "goodput_rps": get("goodput"),
    }


def run_point(cmd: list[str], artifact_dir: str | Path, timeout_s: float, log_path: str | Path) -> PointRun:
    """Run one `aiperf profile` and parse its records (UserError if aiperf is missing or fails)."""
    if shutil.which(cmd[0]) is None and not Path(cmd[0]).is_file():
        raise UserError(f"--client aiperf: `{cmd[0]}` not found; {INSTALL_HINT}")
    log = Path(log_path)
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w", encoding="utf-8") as out:
        try:
            proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, timeout=timeout_s, check=False)
        except subprocess.TimeoutExpired:
            raise UserError(f"aiperf did not finish within {timeout_s:g} s (log: {log})") from None
    jsonl = find_export(artifact_dir, JSONL_NAME)
    if proc.returncode != 0 or jsonl is None:
        raise UserError(f"aiperf exited with {proc.returncode} and {'no ' if jsonl is None else ''}"
                        f"{JSONL_NAME} (log: {log})")
    records, wall = parse_records(jsonl)
    sent = [r for r in records if r.start_s is not None and r.end_s is not None]
    duration = (max(r.end_s for r in sent) - min(r.start_s for r in sent)) if sent else 0.0
    return PointRun(records=records, wall_start=wall or 0.0, duration_s=duration)
