"""The GPU session driver (scripts/gpu_session.py) on the CPU: its plan, its bookkeeping, its tables.

The steps here are small Python subprocesses that stand in for the GPU scripts: they write the files
those scripts write (the inputs of the session's tables), fail, hang past their timeout, ignore SIGINT,
or leave a detached process behind. What is under test is the driver: step order, time kept for later
steps, timeouts, the rows of failed, cut and skipped steps, logs, temporary folders and the model
deleted, leftovers ended, and the tables written from partial results. The real command lines are
checked against the real scripts' parsers (`--dry-run`).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest

from tests.conftest import PY, REPO

sys.path.insert(0, str(REPO / "scripts"))
import gpu_session  # noqa: E402

ORDER = ["model", "decode", "checks", "fp8", "prefill", "profile", "decode_sync", "serve", "planner"]


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{REPO / 'scripts'}", OMP_NUM_THREADS="1")


def _fake(code: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code)]


def _bench_row(phase: str, batch: int, step_ms: float, mode: str = "graphs", tokens: int | None = None) -> dict:
    """One row as gpu_perf.py's roofline_rows writes it to gpu_perf.json."""
    return {"phase": phase, "tokens": tokens or batch, "batch": batch, "context": 1000, "mode": mode,
            "graphs": {"count": 17, "capture_s": 4.5, "capture_bytes": 3 * 2**20, "captures_after_start": 0}
            if phase == "decode" else None, "step_ms": step_ms, "p50_ms": step_ms, "tok_s": 1000.0 * batch / step_ms,
            "hbm_gb_step": 2.0, "hbm_frac": 0.5, "flop_frac": 0.25, "planner_moe_ms": None,
            "measured_over_planner": None, "experts_touched": 6.0}


def _settings(tmp_path, *extra: str):
    return gpu_session.settings(["--out", str(tmp_path / "out"), "--work", str(tmp_path / "work"), "--layers", "1",
                                 "--async-scheduling", "off", *extra])


def _alive(pid: int) -> bool:
    return gpu_session._alive(pid)


def test_session_runs_steps_in_order_and_reports_every_outcome(tmp_path):
    a = _settings(tmp_path, "--budget-s", "1000")
    out, work = a.out, a.work
    model = os.path.join(work, "v2-lite")
    decode_json = {"ceilings": {"hbm_copy_bytes_per_s": 4.0e12, "bf16_gemm_flops": 8.0e14},
                   "bench": [_bench_row("decode", 1, 3.5), _bench_row("decode", 64, 10.0)]}
    steps = [
        gpu_session.Step("model", "fake model", _fake(f"""
            import os; os.makedirs({model!r}); open(os.path.join({model!r}, "config.json"), "w").write("{{}}")
            print("model written")"""), cap_s=60, min_s=1),
        # writes its results and leaves a detached process behind (a new session: not in its process group)
        gpu_session.Step("decode", "fake decode", _fake(f"""
            import json, os, subprocess, sys
            os.makedirs({os.path.join(out, 'decode')!r}, exist_ok=True)
            json.dump({decode_json!r}, open({os.path.join(out, 'decode', 'gpu_perf.json')!r}, "w"))
            child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
            open({str(tmp_path / 'leftover.pid')!r}, "w").write(str(child.pid))
            open({str(tmp_path / 'tmpdir.txt')!r}, "w").write(os.environ["TMPDIR"])
            assert os.path.isdir(os.environ["TMPDIR"])"""), cap_s=60, min_s=1, needs_model=True),
        # writes one check row, then hangs past its timeout
        gpu_session.Step("checks", "fake checks", _fake(f"""
            import json, os, time
            os.makedirs({os.path.join(out, 'checks')!r}, exist_ok=True)
            json.dump({{"checks": [["kernel vs fp64", "rel err 1e-7", "ok"]]}},
                      open({os.path.join(out, 'checks', 'gpu_perf.json')!r}, "w"))
            print("checks: first row written", flush=True)
            time.sleep(600)"""), cap_s=3, min_s=1),
        gpu_session.Step("fp8", "fake fp8", _fake("""
            import sys; print("fp8 bench broke", file=sys.stderr); sys.exit(3)"""), cap_s=60, min_s=1,
            needs_model=True),
        # ignores SIGINT: the driver goes on to SIGTERM
        gpu_session.Step("prefill", "fake prefill", _fake("""
            import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); time.sleep(600)"""),
            cap_s=2, min_s=1, needs_model=True),
        gpu_session.Step("serve", "fake serve", _fake("print(1)"), cap_s=60, min_s=1, needs_model=True,
                         skip="no --pack (the Dynamo pack folder)"),
        gpu_session.Step("planner", "fake planner", lambda: _fake("""
            print("| batch | measured ms | predicted ms |"); print("|---|---|---|"); print("| 64 | 10.00 | 9.50 |")
            print("other " + "output")"""), cap_s=60, min_s=1),
    ]
    info = {"date": "D", "machine": "M", "torch": "T", "command": "C"}
    written = []
    rows = gpu_session.run_session(steps, a, render=lambda rows: (gpu_session.write_results(rows, a, info),
                                                                    written.append([r.status for r in rows])))
    status = {r.name: r.status for r in rows}
    assert [r.name for r in rows] == ["model", "decode", "checks", "fp8", "prefill", "serve", "planner"]
    assert status["model"] == status["decode"] == status["planner"] == "ok"
    assert status["checks"].startswith("cut at") and "(timeout)" in status["checks"]
    assert status["prefill"].startswith("cut at")                     # SIGINT ignored: ended by SIGTERM
    assert status["fp8"] == "failed (rc 3)"
    assert status["serve"] == "skipped: no --pack (the Dynamo pack folder)"
    assert len(written) == len(steps)                                  # results written after every step
    assert written[0][1:] == ["not run"] * (len(steps) - 1)
    by = {r.name: r for r in rows}
    assert by["checks"].timeout_s == 3 and by["checks"].seconds >= 3
    assert by["fp8"].rc == 3 and "fp8 bench broke" in open(os.path.join(out, by["fp8"].log)).read()
    assert "checks: first row written" in open(os.path.join(out, by["checks"].log)).read()
    # the leftover detached process was ended by its id, the step's TMPDIR and the model were deleted
    pid = int((tmp_path / "leftover.pid").read_text())
    deadline = time.monotonic() + 30
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _alive(pid)
    assert not os.path.exists((tmp_path / "tmpdir.txt").read_text())
    assert not os.path.exists(model)                                   # after prefill, its last user
    md = open(os.path.join(out, "session.md")).read()
    doc = json.load(open(os.path.join(out, "session.json")))
    assert [s["name"] for s in doc["steps"]] == [r.name for r in rows]
    assert doc["steps"][3]["rc"] == 3 and doc["results"]["checks"]["checks"][0][2] == "ok"
    assert "| 64 | graphs | 10.00 |" in md                            # the decode table
    assert "17 decode graphs in 4.5 s, 3 MiB" in md                   # start-up capture
    assert "| kernel vs fp64 | rel err 1e-7 | ok |" in md              # the cut step's partial results
    assert "| 64 | 10.00 | 9.50 |" in md and "other output" not in md    # the planner's table from its log
    assert "| fp8 | fake fp8 | failed (rc 3) | 3 |" in md
    assert "no FP8 results" in md and "no serving results (no --pack given)" in md


def test_time_is_kept_for_later_steps_and_a_step_without_time_is_a_row(tmp_path):
    a = _settings(tmp_path, "--budget-s", "1000")
    record = tmp_path / "ran.txt"
    mark = _fake(f"open({str(record)!r}, 'a').write('x')")
    steps = [gpu_session.Step("first", "big cap", mark, cap_s=5000, min_s=1),
             gpu_session.Step("second", "needs more than the budget", mark, cap_s=5000, min_s=5000),
             gpu_session.Step("third", "last", mark, cap_s=5000, min_s=300)]
    rows = gpu_session.run_session(steps, a)
    # first may use the budget less the 300 s kept for third (none for second: it can never run)
    assert rows[0].status == "ok" and 600 < rows[0].timeout_s <= 700
    assert rows[1].status.startswith("skipped:") and "needs 5000 s" in rows[1].status
    assert rows[2].status == "ok" and 600 < rows[2].timeout_s <= 1000
    assert record.read_text() == "xx"
    # the same plan with its time spent: every step is a row saying so
    a = _settings(tmp_path, "--budget-s", "1000")
    a.t0 = time.monotonic() - 999.5
    rows = gpu_session.run_session(steps, a)
    assert all(r.status.startswith("skipped:") and "left of the 1000 s budget" in r.status for r in rows)
    assert all(r.rc is None and not r.log for r in rows)
    assert record.read_text() == "xx"


def test_no_disk_for_the_model_fails_it_and_skips_its_users(tmp_path):
    a = _settings(tmp_path)
    a.model_gb = 1e9                                                   # more than any disk
    steps = [gpu_session.Step("model", "model", _fake("print(1)"), cap_s=60, min_s=1),
             gpu_session.Step("decode", "uses it", _fake("print(1)"), cap_s=60, min_s=1, needs_model=True),
             gpu_session.Step("planner", "CPU", lambda: (_ for _ in ()).throw(gpu_session.SkipStep("nothing to do")),
                              cap_s=60, min_s=1)]
    rows = gpu_session.run_session(steps, a)
    assert rows[0].status.startswith("failed:") and "GB free on the disk" in rows[0].status and rows[0].rc is None
    assert rows[1].status == "skipped: needs the model (model step failed)"
    assert rows[2].status == "skipped: nothing to do"


def test_dry_run_checks_every_command_line_against_its_script(tmp_path):
    pack = tmp_path / "pack"
    pack.mkdir()
    (pack / "ai_dynamo-0-py3-none-any.whl").write_text("")
    p = subprocess.run([PY, "scripts/gpu_session.py", "--dry-run", "--out", str(tmp_path / "out"), "--pack",
                        str(pack), "--async-scheduling", "on"], cwd=str(REPO), env=_env(), capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    names = [ln.split()[0] for ln in p.stdout.splitlines() if ln and not ln.startswith((" ", "sum"))]
    assert names == ORDER                                              # serving last but one, the planner last
    decode = next(ln for ln in p.stdout.splitlines() if "--only bench_decode --decode-batches 1,32" in ln)
    assert "--async-scheduling" in decode and "error:" not in p.stdout
    # without a pack, serving is a skipped row; without async scheduling, so is decode_sync
    p = subprocess.run([PY, "scripts/gpu_session.py", "--dry-run", "--out", str(tmp_path / "out"),
                        "--async-scheduling", "off"], cwd=str(REPO), env=_env(), capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "serve        skipped: no --pack" in p.stdout and "decode_sync  skipped:" in p.stdout


def test_a_command_line_its_script_refuses_is_reported():
    bad = gpu_session.Step("decode", "bad", [sys.executable, "scripts/gpu_perf.py", "--no-such-flag"], cap_s=1,
                           min_s=1, script="gpu_perf")
    bad_model = gpu_session.Step("model", "bad", [sys.executable, "-m", "dynamo_dwdp.cli", "make-model", "M",
                                                  "--preset", "v2-lite-shape", "--layerz", "3"],
                                 cap_s=1, min_s=1, script="cli:make_model")
    good_model = gpu_session.Step("model", "good", bad_model.argv[:-2] + ["--layers", "3"], cap_s=1, min_s=1,
                                  script="cli:make_model")
    problems = gpu_session.check_argv([bad, bad_model, good_model])
    assert len(problems) == 2 and "scripts/gpu_perf.py does not accept: --no-such-flag" in problems[0]
    assert "dynamo-dwdp make-model does not accept: make-model M --preset v2-lite-shape --layerz 3" in problems[1]


@pytest.mark.parametrize("argv, words", [
    (["--pack", "/nonexistent-pack"], "--pack /nonexistent-pack: no wheels there"),
    (["--only", "decode,bogus"], "--only: unknown step(s) ['bogus']"),
    (["--budget-s", "0"], "argument --budget-s: '0' (allowed: a number of seconds > 0)"),
])
def test_bad_flags_are_one_line_errors(tmp_path, capsys, argv, words):
    with pytest.raises(SystemExit) as exc:
        gpu_session.main(["--out", str(tmp_path / "o"), "--async-scheduling", "off", "--dry-run", *argv])
    assert exc.value.code == 2
    assert words in capsys.readouterr().err


def test_help_through_gpu_perf_teaches_the_session():
    p = subprocess.run([PY, "scripts/gpu_perf.py", "--session", "--help"], cwd=str(REPO), env=_env(),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "gpu_perf.py --session" in p.stdout and "priority order" in p.stdout and "--pack" in p.stdout
    assert "--dry-run" in p.stdout and "--full-checks" in p.stdout


def test_planner_step_on_a_sessions_files_reproduces_the_committed_comparison(tmp_path):
    """The planner step's command, built over a session folder that holds the merged tree's profile (no
    8K prefill point: the committed profile serves the prefill records) and bench records, prints the
    table docs/performance.md shows for those files."""
    import re
    import shutil

    results = REPO / "docs" / "results"
    (tmp_path / "out" / "profile").mkdir(parents=True)
    (tmp_path / "out" / "decode").mkdir()
    shutil.copy(results / "profile_h200_merged_2026-12-01.json", tmp_path / "out" / "profile" / "profile.json")
    shutil.copy(results / "bench-h200-merged-2026-12-01.jsonl", tmp_path / "out" / "decode" / "bench.jsonl")
    a = _settings(tmp_path)
    argv = gpu_session.planner_argv(a) + ["--prefill-attention", "cudnn", "--routed-routing", "", "--fold", ""]   # that day's
    p = subprocess.run(argv, cwd=str(REPO), env=_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    got = {int(m[0]): (float(m[1]), float(m[2])) for m in
           re.findall(r"^\| decode \| (\d+) \| ([\d.]+) \| ([\d.]+) \|", p.stdout, re.M)}
    doc = (REPO / "docs" / "performance.md").read_text()
    section = doc[doc.index("**Planner against the merged tree**"):]
    section = section[:section.index("\n\n", section.index("| batch |"))]
    want = {int(m[0]): (float(m[1]), float(m[2])) for m in
            re.findall(r"^\| (\d+) \| ([\d.]+) \| ([\d.]+) \|", section, re.M)}
    assert want and got == want
    assert os.path.isfile(tmp_path / "out" / "planner" / "calibration.jsonl")
    # without any bench file of the session there is nothing to compare: a skipped row, not a crash
    os.remove(tmp_path / "out" / "decode" / "bench.jsonl")
    with pytest.raises(gpu_session.SkipStep):
        gpu_session.planner_argv(a)


def test_a_malformed_result_file_spoils_only_its_own_section(tmp_path):
    a = _settings(tmp_path)
    os.makedirs(os.path.join(a.out, "decode"))
    os.makedirs(os.path.join(a.out, "checks"))
    with open(os.path.join(a.out, "decode", "gpu_perf.json"), "w") as f:
        json.dump({"bench": [{"phase": "decode", "batch": 8}]}, f)           # a row without its figures
    with open(os.path.join(a.out, "checks", "gpu_perf.json"), "w") as f:
        f.write('{"checks": [["half written')                                 # cut while writing
    rows = [gpu_session.Row(n, n, status="ok", rc=0) for n in ("decode", "checks", "prefill")]
    md = gpu_session.render(rows, a, {"date": "D", "machine": "M", "torch": "T", "command": "C"})
    assert "could not read this step's results: KeyError" in md
    assert "no check results" in md and "no prefill results" in md
    assert md.index("## Decode") < md.index("## GPU correctness checks") < md.index("## Prefill")


def test_the_command_end_to_end_with_only_the_cpu_step(tmp_path):
    """`gpu_perf.py --session --only planner` over a results folder that holds a decode bench: the
    driver's whole path (flags, plan, run, tables, exit code) with the one step that needs no GPU."""
    import shutil

    out = tmp_path / "out"
    (out / "decode").mkdir(parents=True)
    shutil.copy(REPO / "docs" / "results" / "bench-h200-merged-2026-12-01.jsonl", out / "decode" / "bench.jsonl")
    p = subprocess.run([PY, "scripts/gpu_perf.py", "--session", "--out", str(out), "--only", "planner",
                        "--async-scheduling", "off", "--bundle"], cwd=str(REPO), env=_env(), capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    # --bundle: the tables stay beside one archive of everything else (logs, each step's files)
    import tarfile

    assert sorted(x.name for x in out.iterdir()) == ["session.json", "session.md", "session_files.tar.gz"]
    with tarfile.open(out / "session_files.tar.gz") as tar:
        names = set(tar.getnames())
    assert {"logs/planner.log", "decode/bench.jsonl", "planner/calibration.jsonl"} <= names
    md = (out / "session.md").read_text()
    assert "| planner | the planner's step model vs this session's steps (CPU) | ok | 0 |" in md
    assert "| decode | 64 | 10.13 | " in md                             # measured; predicted from the committed profile
    doc = json.loads((out / "session.json").read_text())
    assert [s["name"] for s in doc["steps"]] == ["planner"] and doc["planner_table"]
    assert p.stdout.rstrip().splitlines()[-2].startswith("planner      ok")


def test_a_stopped_session_ends_its_step_and_writes_what_it_has(tmp_path):
    """SIGTERM to the driver mid-step (the device call's limit): the step's processes are ended and
    session.md says which step was interrupted."""
    import signal

    pid_file = tmp_path / "step.pid"
    harness = textwrap.dedent(f"""
        import signal, sys
        sys.path.insert(0, {str(REPO / 'scripts')!r})
        import gpu_session as g
        a = g.settings(["--out", {str(tmp_path / 'out')!r}, "--work", {str(tmp_path / 'work')!r},
                        "--async-scheduling", "off"])
        signal.signal(signal.SIGTERM, g._stopped)
        step = g.Step("decode", "sleeps", [sys.executable, "-c",
                      "import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(600)"],
                      cap_s=600, min_s=1)
        info = {{"date": "D", "machine": "M", "torch": "T", "command": "C"}}
        g.run_session([step], a, render=lambda rows: g.write_results(rows, a, info))
    """)
    proc = subprocess.Popen([PY, "-c", harness], cwd=str(REPO), env=_env())
    deadline = time.monotonic() + 120
    while not (pid_file.exists() and pid_file.read_text()) and time.monotonic() < deadline:
        time.sleep(0.2)
    step_pid = int(pid_file.read_text())
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) != 0
    deadline = time.monotonic() + 30
    while _alive(step_pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _alive(step_pid)
    md = (tmp_path / "out" / "session.md").read_text()
    assert "| decode | sleeps | interrupted: the session was stopped during this step |" in md


def test_fp8_rows_are_compared_with_the_bf16_step_of_the_same_scheduling(tmp_path):
    """An FP8 step run with async scheduling is divided by the async bf16 step, one run without it by the
    synchronous bf16 step (decode and decode_sync hold one of each)."""
    def bench(step, rows):
        (tmp_path / step).mkdir()
        (tmp_path / step / "gpu_perf.json").write_text(json.dumps({"bench": [
            {"phase": "decode", "batch": 64, "mode": m, "step_ms": ms} for m, ms in rows]}))

    bench("decode", [("graphs async", 8.0)])
    bench("decode_sync", [("graphs", 10.0)])
    bench("fp8", [("graphs fp8-block-a8 async", 6.0), ("graphs fp8-block-a8", 9.0)])
    md = "\n".join(gpu_session._fp8_section(str(tmp_path), None))
    assert "| graphs fp8-block-a8 async | 64 | 6.00 | 8.00 (graphs async) | 0.75" in md
    assert "| graphs fp8-block-a8 | 64 | 9.00 | 10.00 (graphs) | 0.9" in md
