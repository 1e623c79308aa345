"""The optional aiperf driver: command line, input file, and parsing aiperf's exports.

Fixtures: tests/fixtures/aiperf/ (README.md there): one export captured from a real aiperf 0.13.0
run against this project's frontend, whose aggregates aiperf computed itself, and synthetic exports
(0.13.x and older layouts) whose aggregates make_fixtures.py computed with numpy. The reference for
our parser + aggregation is therefore aggregates computed independently of our code.
"""
from __future__ import annotations

import json
import stat
import sys
from pathlib import Path

import pytest

from dynamo_dwdp.ab import aiperf
from dynamo_dwdp.ab.results import summarize_point
from dynamo_dwdp.ab.workload import Request, workload_from_dict
from dynamo_dwdp.errors import UserError

FIX = Path(__file__).resolve().parents[1] / "fixtures" / "aiperf"
SWEEP = FIX / "sweep" / "concurrency_4"
LEGACY = FIX / "legacy"
REAL = FIX / "real-0.13.0" / "concurrency_4"  # captured from a real aiperf 0.13.0 run (see README.md there)


def workload(**kw):
    data = {"name": "t", "isl": {"mean": 32}, "osl": {"mean": 8}, "load": {"concurrency": [4]},
            "slo": {"ttft_ms": 500, "tpot_ms": 40}, "seed": 7}
    data.update(kw)
    return workload_from_dict(data)


def summary_of(dirpath: Path) -> dict:
    records, _ = aiperf.parse_records(dirpath / aiperf.JSONL_NAME)
    sent = [r for r in records if r.start_s is not None and r.end_s is not None]
    duration = max(r.end_s for r in sent) - min(r.start_s for r in sent)
    return summarize_point(records, duration_s=duration, num_gpus=2)


def test_records_of_the_013_export():
    records, wall = aiperf.parse_records(SWEEP / aiperf.JSONL_NAME)
    lines = [json.loads(x) for x in (SWEEP / aiperf.JSONL_NAME).read_text().splitlines()]
    profiling = [x for x in lines if x["metadata"]["benchmark_phase"] == "profiling"]
    assert len(records) == len(profiling) == 14  # the warm-up record is dropped
    assert wall == pytest.approx(min(x["metadata"]["request_start_ns"] for x in profiling) * 1e-9)
    ok = [r for r in records if r.ok]
    bad = sorted((r for r in records if not r.ok), key=lambda r: r.status)
    assert len(ok) == 12
    assert [r.status for r in bad] == [400, 499]
    assert bad[0].error.startswith("http 400: HTTPStatusError: Failed to deserialize")
    assert bad[1].error.startswith("http 499: RequestCancellationError")
    first = min(profiling, key=lambda x: x["metadata"]["request_start_ns"])
    r0 = records[0]
    assert r0.ttft_s == pytest.approx(first["metrics"]["time_to_first_token"]["value"] / 1e3)
    assert r0.e2e_s == pytest.approx(first["metrics"]["request_latency"]["value"] / 1e3)
    assert r0.output_tokens == 8 and r0.prompt_tokens == 32
    # chunk times rebuilt from TTFT + inter-chunk gaps: 8 chunks, gaps equal aiperf's list
    gaps = first["metrics"]["inter_chunk_latency"]["value"]
    assert len(r0.chunk_times_s) == 8
    assert [g * 1e3 for g in r0.itl_gaps_s] == pytest.approx(gaps)


def test_our_aggregation_reproduces_aiperfs_json():
    agg = aiperf.parse_aggregate_json(SWEEP / aiperf.JSON_NAME)
    s = summary_of(SWEEP)
    assert s["ok"] == agg["request_count"]["avg"] == 12
    assert s["failed"] == agg["error_request_count"]["avg"] == 2
    assert s["ttft_ms_p50"] == pytest.approx(agg["time_to_first_token"]["p50"], rel=1e-9)
    assert s["ttft_ms_p99"] == pytest.approx(agg["time_to_first_token"]["p99"], rel=1e-9)
    assert s["tpot_ms_mean"] == pytest.approx(agg["inter_token_latency"]["avg"], rel=1e-6)
    assert s["tps_user_mean"] == pytest.approx(agg["output_token_throughput_per_user"]["avg"], rel=1e-6)
    assert s["tps_user"] == pytest.approx(1000 / agg["inter_token_latency"]["avg"], rel=1e-6)
    assert s["itl_ms_p50"] == pytest.approx(agg["inter_chunk_latency"]["p50"], rel=1e-9)
    assert s["itl_ms_p99"] == pytest.approx(agg["inter_chunk_latency"]["p99"], rel=1e-9)
    assert s["duration_s"] == pytest.approx(agg["benchmark_duration"]["avg"], rel=1e-6)
    assert s["output_tps"] == pytest.approx(agg["output_token_throughput"]["avg"], rel=1e-6)
    assert s["tps_gpu"] == pytest.approx(agg["output_token_throughput"]["avg"] / 2, rel=1e-6)


def test_a_real_aiperf_export_reproduces_aiperfs_own_aggregates():
    records, _ = aiperf.parse_records(REAL / aiperf.JSONL_NAME)
    agg = aiperf.parse_aggregate_json(REAL / aiperf.JSON_NAME)
    s = summary_of(REAL)
    assert len(records) == 13  # the 2 warm-up records are dropped
    assert s["ok"] == agg["request_count"]["avg"] == 12 and s["failed"] == agg["error_request_count"]["avg"] == 1
    bad = next(r for r in records if not r.ok)
    assert bad.error.startswith("InvalidInferenceResultError") and bad.status is None  # no `code` in 0.13
    assert s["ttft_ms_p50"] == pytest.approx(agg["time_to_first_token"]["p50"], rel=1e-9)
    assert s["ttft_ms_p99"] == pytest.approx(agg["time_to_first_token"]["p99"], rel=1e-9)
    assert s["tpot_ms_mean"] == pytest.approx(agg["inter_token_latency"]["avg"], rel=1e-9)
    assert s["tps_user_mean"] == pytest.approx(agg["output_token_throughput_per_user"]["avg"], rel=1e-9)
    assert s["itl_ms_p99"] == pytest.approx(agg["inter_chunk_latency"]["p99"], rel=1e-9)
    assert s["output_tokens"] == agg["total_output_tokens"]["avg"] == 137
    assert s["duration_s"] == pytest.approx(agg["benchmark_duration"]["avg"], rel=1e-5)
    assert s["isl_mean"] == pytest.approx(agg["usage_prompt_tokens"]["avg"])  # the server's counts
    assert s["osl_mean"] == pytest.approx(agg["usage_completion_tokens"]["avg"])
    csv_ = aiperf.parse_aggregate_csv(REAL / aiperf.CSV_NAME)
    assert csv_["request_count"]["value"] == 12 and csv_["goodput"]["value"] == pytest.approx(agg["goodput"]["avg"],
                                                                                             abs=0.006)
    assert csv_["time_to_first_token"]["p50"] == pytest.approx(agg["time_to_first_token"]["p50"], abs=0.006)
    assert not any(k.startswith("endpoint") for k in csv_)  # the GPU-telemetry section is not a metric table


def test_csv_and_json_aggregates_agree():
    j = aiperf.parse_aggregate_json(SWEEP / aiperf.JSON_NAME)
    c = aiperf.parse_aggregate_csv(SWEEP / aiperf.CSV_NAME)
    for tag in ("time_to_first_token", "inter_token_latency", "request_latency", "output_token_throughput_per_user"):
        assert c[tag]["unit"] in ("ms", "tokens/sec/user")
        for stat_ in ("avg", "p50", "p99", "min", "max"):
            assert c[tag][stat_] == pytest.approx(j[tag][stat_], abs=0.006), (tag, stat_)
    assert c["request_count"]["value"] == 12
    assert c["benchmark_duration"] == {"unit": "sec", "value": pytest.approx(j["benchmark_duration"]["avg"], abs=0.006)}
    assert c["output_token_throughput"]["value"] == pytest.approx(j["output_token_throughput"]["avg"], abs=0.006)


def test_legacy_layout():
    records, _ = aiperf.parse_records(LEGACY / aiperf.JSONL_NAME)
    assert len(records) == 7 and sum(r.ok for r in records) == 6
    assert next(r for r in records if not r.ok).error.startswith("http 499")
    agg = aiperf.parse_aggregate_json(LEGACY / aiperf.JSON_NAME)
    assert "time_to_first_token" in agg and "ttft" not in agg  # the old tag is normalised
    s = summary_of(LEGACY)
    assert s["ttft_ms_p50"] == pytest.approx(agg["time_to_first_token"]["p50"], rel=1e-9)
    assert s["tps_user_mean"] == pytest.approx(agg["output_token_throughput_per_user"]["avg"], rel=1e-6)
    assert s["output_tps"] == pytest.approx(agg["output_token_throughput"]["avg"], rel=1e-6)
    csv_ = aiperf.parse_aggregate_csv(LEGACY / aiperf.CSV_NAME)
    assert csv_["time_to_first_token"]["p50"] == pytest.approx(agg["time_to_first_token"]["p50"], abs=0.006)
    rep = aiperf.reported_summary(agg)
    assert rep["request_count"] == 6 and rep["error_request_count"] == 1 and rep["goodput_rps"] is None


def test_reported_summary_from_csv_and_json_match():
    a = aiperf.reported_summary(aiperf.parse_aggregate_json(SWEEP / aiperf.JSON_NAME))
    b = aiperf.reported_summary(aiperf.parse_aggregate_csv(SWEEP / aiperf.CSV_NAME))
    for k in ("request_count", "ttft_ms_p50", "tps_user_mean", "tpot_ms_mean", "output_tps"):
        assert a[k] == pytest.approx(b[k], abs=0.006), k


def test_find_export_searches_nested_directories():
    assert aiperf.find_export(FIX / "sweep", aiperf.JSONL_NAME) == SWEEP / aiperf.JSONL_NAME
    assert aiperf.find_export(FIX / "nothing-here", aiperf.JSONL_NAME) is None


def test_bad_jsonl_is_a_user_error(tmp_path):
    p = tmp_path / aiperf.JSONL_NAME
    p.write_text('{"metadata": {}}\nnot json\n')
    with pytest.raises(UserError, match="line 2"):
        aiperf.parse_records(p)


def test_command_line_concurrency_point():
    wl = workload()
    pt = wl.points()[0]
    cmd = aiperf.build_command(wl, pt, url="http://127.0.0.1:9", model="tiny", input_file="in.jsonl",
                               artifact_dir="art", tokenizer_dir="models/tiny", warmup_requests=2)
    assert cmd[:2] == ["aiperf", "profile"]
    flags = dict(zip(cmd[2::1], cmd[3::1]))
    assert flags["--model"] == "tiny" and flags["--url"] == "http://127.0.0.1:9"
    assert flags["--endpoint-type"] == "completions" and "--streaming" in cmd
    assert flags["--concurrency"] == "4" and flags["--request-count"] == str(pt.num_requests)
    assert flags["--custom-dataset-type"] == "single_turn" and flags["--input-file"] == "in.jsonl"
    assert flags["--extra-inputs"] == "ignore_eos:true"  # top level in the body, as Dynamo 1.6.1 wants
    assert flags["--goodput"] == "time_to_first_token:500 inter_token_latency:40"
    assert flags["--random-seed"] == "7" and flags["--tokenizer"] == "models/tiny"
    assert "--use-server-token-count" in cmd  # lengths from the usage chunk
    assert flags["--warmup-request-count"] == "2" and "--request-rate" not in cmd
    no_warm = aiperf.build_command(wl, pt, url="http://h:1", model="m", input_file="i", artifact_dir="a")
    assert "--warmup-request-count" not in no_warm  # aiperf 0.13 rejects 0


def test_command_line_request_rate_point():
    wl = workload(load={"request_rate": [2.5], "arrival": "constant", "max_concurrency": 8},
                  slo={}, ignore_eos=False, endpoint="chat", prompt_format="text")
    cmd = aiperf.build_command(wl, wl.points()[0], url="http://h:1", model="m", input_file="i", artifact_dir="a")
    flags = dict(zip(cmd[2::1], cmd[3::1]))
    assert flags["--request-rate"] == "2.5" and flags["--arrival-pattern"] == "constant"
    assert flags["--concurrency"] == "8" and flags["--endpoint-type"] == "chat"
    assert "--goodput" not in cmd and "--extra-inputs" not in cmd and "--tokenizer" not in cmd


class _Tok:
    def decode(self, ids):
        return " ".join(f"t{i}" for i in ids)


def test_inputs_file_is_single_turn_jsonl(tmp_path):
    reqs = [Request(index=0, prompt="hello world", isl=2, osl=5, prefix_len=0),
            Request(index=1, prompt=[3, 4], isl=2, osl=6, prefix_len=0)]
    p = aiperf.write_inputs(reqs, tmp_path / "in.jsonl", tokenizer=_Tok())
    rows = [json.loads(x) for x in p.read_text().splitlines()]
    assert rows == [{"text": "hello world", "output_length": 5}, {"text": "t3 t4", "output_length": 6}]
    with pytest.raises(UserError):
        aiperf.write_inputs(reqs, tmp_path / "x.jsonl", tokenizer=None)


def _fake_aiperf(tmp_path: Path, rc: int = 0) -> Path:
    """A stand-in `aiperf` executable that copies the 0.13 fixture into --artifact-dir (nested)."""
    exe = tmp_path / "aiperf"
    exe.write_text(f"""#!{sys.executable}
import shutil, sys
from pathlib import Path
args = sys.argv[1:]
art = Path(args[args.index("--artifact-dir") + 1]) / "tiny-openai-completions-concurrency4"
art.mkdir(parents=True, exist_ok=True)
for name in ("profile_export.jsonl", "profile_export_aiperf.json", "profile_export_aiperf.csv"):
    shutil.copy(Path({str(SWEEP)!r}) / name, art / name)
print("fake aiperf", " ".join(args))
sys.exit({rc})
""")
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    return exe


def test_run_point_parses_what_aiperf_wrote(tmp_path):
    exe = _fake_aiperf(tmp_path)
    wl = workload()
    cmd = aiperf.build_command(wl, wl.points()[0], url="http://127.0.0.1:9", model="tiny", input_file="i",
                               artifact_dir=tmp_path / "art", executable=str(exe))
    run = aiperf.run_point(cmd, tmp_path / "art", timeout_s=30, log_path=tmp_path / "log.txt")
    assert len(run.records) == 14 and sum(r.ok for r in run.records) == 12
    agg = aiperf.parse_aggregate_json(SWEEP / aiperf.JSON_NAME)
    assert run.duration_s == pytest.approx(agg["benchmark_duration"]["avg"], rel=1e-6)
    assert "fake aiperf profile" in (tmp_path / "log.txt").read_text()


def test_run_point_failures_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="pip install aiperf"):
        aiperf.run_point(["/nonexistent/aiperf", "profile"], tmp_path, 5, tmp_path / "l.txt")
    exe = _fake_aiperf(tmp_path, rc=3)
    with pytest.raises(UserError, match="exited with 3"):
        aiperf.run_point([str(exe), "profile", "--artifact-dir", str(tmp_path / "a")], tmp_path / "a", 30,
                         tmp_path / "l2.txt")
