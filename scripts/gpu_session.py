"""The whole one-GPU session in one command, under a time budget, with one results file at the end.

  PYTHONPATH=.:scripts PYTHONUNBUFFERED=1 python3 scripts/gpu_perf.py --session --out $OUT --pack DYNAMO_PACK
  PYTHONPATH=.:scripts python3 scripts/gpu_session.py --dry-run --out out/session   # the plan, flags checked (CPU)

What it runs, in this priority order (each step a subprocess of the GPU scripts, under its own timeout):
  model       the 27-layer bf16 v2-lite-shape model, written once (disk checked first) and used by every
              step below; FP8 variants are quantized at load (`weights`), never written
  decode      `bench engine` decode from CUDA graphs at batch 1/32/64/128/256, % of the HBM roofline,
              start-up capture (graphs, seconds, MiB); with engine.async_scheduling where the bench has it
  checks      the GPU-only correctness checks: Triton kernels vs fp64/torch on the GPU, grouped experts
              (sync-free and host-synced) vs fp32, the engine's prefill attention vs the reference path and
              the Triton prefill kernel vs float64 at 4K tokens, a decode step from a
              CUDA graph vs eager (bitwise), the fp8-block and fp8-block-a8 engines' logits within
              tolerance (--full-checks adds expert GEMM timings, operation counts with the fused kernels
              off/on and an eager kernel profile: figures, not checks)
  fp8         decode at batch 64 with `fp8-block` and `fp8-block-a8` weights, against the bf16 step
  prefill     prefill 2K, 8K and 16K tokens, % of the bf16 GEMM peak; then the same prompts with
              engine.async_scheduling, as serving runs them (where the decode step has it)
  profile     where a decode step's time goes (graph replay, kernels, host) at batch 1/64/256, the W8A8
              (fp8-block-a8) step at the FP8 batch, prefill 8K
  decode_sync the decode bench without async scheduling (batch 1/64; only when `decode` ran with it)
  serve       serving through Dynamo (agg, largest concurrency) against the engine alone: `bench engine` and the
              same workload through the engine without Dynamo (scripts/gpu_engine_mix.py) (needs --pack)
  planner     (CPU) the planner's step model, calibrated with this session's profile, against this
              session's decode and prefill steps
A step starts only when the time left, less the minimum kept for every later step, covers its own
minimum; its timeout is that time or its own cap, whichever is smaller. A step that fails or is cut
leaves a row saying so and the next one runs. Every step's stdout and stderr go to OUT/logs/STEP.log;
its results to OUT/STEP/. After every step OUT/session.md (the tables of docs/performance.md, with date,
machine, torch and the exact command of each) and OUT/session.json are written again from what is on
disk, so a session cut short still brings back what it measured. Each step gets a temporary folder of
its own (TMPDIR), deleted when it ends; the model is deleted after its last user; processes a step
left behind (found by a marker in their environment) are ended.
"""
from __future__ import annotations

import argparse
import dataclasses
import glob
import importlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MARKER = "DWDP_GPU_SESSION_STEP"               # in every step's environment: finds what a step left running
MODEL_GB_PER_LAYER, MODEL_GB_BASE = 1.2, 1.0  # v2-lite-shape bf16: 27 layers measured at ~31 GB on disk
DISK_MARGIN_GB = 8.0                           # the 3-layer check models, logs, the Dynamo pack
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
T0 = time.monotonic()


def say(msg: str) -> None:
    print(f"[session {time.monotonic() - T0:6.1f}s] {msg}", flush=True)


class SkipStep(Exception):
    """Raised by a step's argv builder when there is nothing for the step to do (the row says why)."""


@dataclasses.dataclass
class Step:
    """One subprocess of the session. `argv` may be a callable (built when the step starts, from what
    the steps before it left); `script` names the scripts/ module whose `build_parser()` checks it."""

    name: str
    title: str
    argv: list | object
    cap_s: float                     # the longest this step may take
    min_s: float                     # below this much time it is not started (and kept for it by earlier steps)
    script: str | None = None
    needs_model: bool = False
    note: str = ""                   # why the step is planned the way it is (shown in the plan)
    skip: str = ""                   # known before the session starts: why it will not run (a row, no time kept)


@dataclasses.dataclass
class Row:
    name: str
    title: str
    status: str = "not run"          # ok | failed (rc N) | cut at N s (timeout) | skipped: why
    rc: int | None = None
    seconds: float = 0.0
    timeout_s: float | None = None
    started_s: float | None = None
    command: str = ""
    log: str = ""
    free_disk_gb: float | None = None


# ------------------------------------------------------------------------------------------ the plan
def _py(a) -> list[str]:
    return [a.python, "-u"]


def plan(a, async_ok: bool) -> list[Step]:
    """The session's steps in priority order (serving last but one, the CPU planner comparison last)."""
    out, model = a.out, os.path.join(a.work, "v2-lite")
    perf = _py(a) + [os.path.join("scripts", "gpu_perf.py")]
    common = ["--model", model, "--hw", a.hw, "--skip-checks", "--skip-matrix", "--context", str(a.context)]
    steps = [Step("model", f"v2-lite-shape {a.layers} layers, bf16, written once", _py(a) + [
        "-m", "dynamo_dwdp.cli", "make-model", model, "--preset", "v2-lite-shape", "--dtype", "bf16",
        "--layers", str(a.layers), "--device", "cuda", "--force", "-q"], cap_s=120, min_s=30, script="cli:make_model")]
    decode = perf + ["--out", os.path.join(out, "decode"), "--only", "bench_decode", "--decode-batches",
                     a.decode_batches] + common + (["--async-scheduling"] if async_ok else [])
    steps.append(Step("decode", "decode, bf16, CUDA graphs" + (", async scheduling" if async_ok else ""), decode,
                      cap_s=200, min_s=60, script="gpu_perf", needs_model=True,
                      note="engine.async_scheduling: " + ("on (the bench lists --async-scheduling)" if async_ok else
                                                          "off (this tree's bench has no --async-scheduling)")))
    checks = ["decode_kernel", "grouped_experts", "fused_kernels", "graphs", "fp8_engine", "fp8a8_engine"]
    if a.full_checks:
        checks += ["expert_gemms", "op_count", "profile"]
    steps.append(Step("checks", "GPU correctness checks" + (" (full)" if a.full_checks else " (GPU-only)"),
                      perf + ["--out", os.path.join(out, "checks"), "--only", ",".join(checks), "--skip-bench",
                              "--skip-matrix", "--profile-batch", "32" if a.full_checks else "0", "--context",
                              str(a.context)],
                      cap_s=240 if a.full_checks else 150, min_s=60, script="gpu_perf"))
    steps.append(Step("fp8", f"decode at batch {a.fp8_batch}: fp8-block and fp8-block-a8 weights",
                      perf + ["--out", os.path.join(out, "fp8"), "--only", "bench_fp8", "--fp8-batches",
                              str(a.fp8_batch), "--fp8-weights", "fp8-block,fp8-block-a8"] + common
                      + (["--async-scheduling"] if async_ok else []),
                      cap_s=120, min_s=40, script="gpu_perf", needs_model=True,
                      note=f"one engine per format, graphs captured up to batch {a.fp8_batch} only"
                           + (", async scheduling as the bf16 decode step" if async_ok else "")))
    steps.append(Step("prefill", f"prefill {a.prefill} tokens, eager" + (", then again with async scheduling"
                                                                          if async_ok else ""), perf + [
        "--out", os.path.join(out, "prefill"), "--only", "bench_prefill", "--prefill", a.prefill] + common
        + (["--async-scheduling"] if async_ok else []),
        cap_s=120 if async_ok else 90, min_s=30, script="gpu_perf", needs_model=True))
    steps.append(Step("profile", "where a step's time goes (graph replay, kernels, host)", _py(a) + [
        os.path.join("scripts", "gpu_profile.py"), "--out", os.path.join(out, "profile"), "--model", model,
        "--context", str(a.context), "--batches", a.profile_batches, "--fp8-batches", "",
        "--fp8a8-batches", str(a.fp8_batch), "--prefill", a.profile_prefill], cap_s=150, min_s=40, script="gpu_profile",
        needs_model=True))
    steps.append(Step("decode_sync", "decode, bf16, CUDA graphs, without async scheduling", perf + [
        "--out", os.path.join(out, "decode_sync"), "--only", "bench_decode", "--decode-batches",
        a.sync_batches] + common, cap_s=100, min_s=40, script="gpu_perf", needs_model=True,
        skip="" if async_ok else "the decode step already ran without async scheduling"))
    steps.append(Step("serve", f"serving through Dynamo: agg at concurrency {a.concurrency} vs the engine alone",
                      _py(a) + [os.path.join("scripts", "gpu_serve.py"), "--out", os.path.join(out, "serve"),
                                "--pack", os.path.abspath(a.pack) if a.pack else "DYNAMO_PACK", "--model", model,
                                "--layers", str(a.layers), "--graphs", "graphs/agg.yaml",
                                "--concurrency", str(a.concurrency),
                                "--requests-per-concurrency", str(a.requests_per_concurrency),
                                "--work", os.path.join(a.work, "serve")],
                      cap_s=330, min_s=150, script="gpu_serve", needs_model=True,
                      note="launch (load, capture), a greedy probe, --requests-per-concurrency x concurrency "
                           "requests, then bench engine at that batch and context", skip="" if a.pack else "no --pack (the Dynamo pack folder)"))
    steps.append(Step("planner", "the planner's step model vs this session's steps (CPU)",
                      lambda: planner_argv(a), cap_s=60, min_s=10, script="build_calibration",
                      note="calibrated with this session's profile where it ran (else the committed one)"))
    return steps


COMMITTED_PROFILE = "profile_h200_graphs_2026-12-01.json"    # build_calibration's default: decode and prefill 8192


def planner_argv(a) -> list[str]:
    """build_calibration --compare over this session's bf16 decode and prefill bench records, with the
    small-kernel and host records from this session's profile where it has them."""
    prof = os.path.join(a.out, "profile", "profile.json")
    doc = _load(prof) or {}
    decode_prof = os.path.abspath(prof) if doc.get("decode") else COMMITTED_PROFILE
    prefill_prof = os.path.abspath(prof) if "8192" in (doc.get("prefill") or {}) else COMMITTED_PROFILE
    bench = [os.path.abspath(os.path.join(a.out, s, "bench.jsonl")) for s in ("decode", "prefill")]
    if not a.dry_run:
        bench = [b for b in bench if os.path.isfile(b)]
        if not bench:
            raise SkipStep("no decode or prefill bench results of this session to compare with")
    return _py(a) + [os.path.join("scripts", "build_calibration.py"), "--profile", decode_prof,
                     "--prefill-profile", prefill_prof, "--bench", ",".join(bench),
                     "--out", os.path.join(a.out, "planner", "calibration.jsonl"), "--compare"]


def check_argv(steps: list[Step]) -> list[str]:
    """Each step's command line against its script's own parser; the problems found, one line each."""
    if os.path.join(ROOT, "scripts") not in sys.path:
        sys.path.insert(0, os.path.join(ROOT, "scripts"))
    problems = []
    for st in steps:
        if not st.script or st.skip:
            continue
        argv = st.argv() if callable(st.argv) else st.argv
        if st.script.startswith("cli:"):                    # a `dynamo-dwdp` sub-command: its own parser
            tail = argv[argv.index("dynamo_dwdp.cli") + 2:]
            parser = argparse.ArgumentParser(prog=f"dynamo-dwdp {argv[argv.index('dynamo_dwdp.cli') + 1]}")
            importlib.import_module(f"dynamo_dwdp.commands.{st.script[4:]}").register(parser.add_subparsers())
            tail = [argv[argv.index("dynamo_dwdp.cli") + 1]] + tail
        else:
            tail = argv[argv.index(next(x for x in argv if x.endswith(st.script + ".py"))) + 1:]
            parser = importlib.import_module(st.script).build_parser()
        try:
            parser.parse_args(tail)
        except SystemExit:
            where = f"dynamo-dwdp {tail[0]}" if st.script.startswith("cli:") else f"scripts/{st.script}.py"
            problems.append(f"step {st.name}: {where} does not accept: {shlex.join(tail)}")
    return problems


def async_scheduling_available(a) -> bool:
    """Whether this tree's `bench engine --help` lists --async-scheduling (the decode bench then runs with it)."""
    if a.async_scheduling != "auto":
        return a.async_scheduling == "on"
    p = subprocess.run([a.python, "-m", "dynamo_dwdp.cli", "bench", "engine", "--help"], cwd=ROOT,
                       env=step_env(a), capture_output=True, text=True, timeout=120)
    return "--async-scheduling" in p.stdout


# ------------------------------------------------------------------------------------------- running
def free_gb(path: str) -> float:
    while not os.path.exists(path):
        path = os.path.dirname(path) or "/"
    return shutil.disk_usage(path).free / 1e9


def _marked(marker: str) -> list[int]:
    """Live processes (other than this one) whose environment carries MARKER=marker."""
    want = f"{MARKER}={marker}".encode()
    pids = []
    for env in glob.glob("/proc/[0-9]*/environ"):
        pid = int(env.split("/")[2])
        if pid == os.getpid():
            continue
        try:
            with open(env, "rb") as f:
                if want in f.read().split(b"\0"):
                    pids.append(pid)
        except OSError:
            continue
    return pids


def end_leftovers(marker: str, grace_s: float = 10.0) -> list[int]:
    """End the processes a step left behind (its own or ones that started new sessions), by their id:
    SIGTERM, then SIGKILL after `grace_s`."""
    pids = _marked(marker)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and any(os.path.exists(f"/proc/{p}") and _alive(p) for p in pids):
            time.sleep(0.2)
        pids = [p for p in pids if _alive(p)]
        if not pids:
            break
    return pids


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[-1][:1] not in ("Z", "X")
    except OSError:
        return False


def run_step(argv: list[str], timeout: float, log_path: str, env: dict, marker: str) -> tuple[int | None, float, bool]:
    """Run one step's command under `timeout`; stdout and stderr to `log_path`. On timeout: SIGINT to
    its process group (Python's finally blocks tear down what it launched), then SIGTERM after 10 s,
    SIGKILL after 5 more (the budget's margin to the device call's limit covers these); then
    whatever still carries the step's marker. Returns (rc, seconds, cut)."""
    t = time.monotonic()
    with open(log_path, "w") as log:
        log.write(f"$ {shlex.join(argv)}\n")
        log.flush()
        try:
            proc = subprocess.Popen(argv, cwd=ROOT, env={**env, MARKER: marker}, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        except OSError as exc:
            log.write(f"could not start: {exc}\n")
            return 127, time.monotonic() - t, False
        cut = False
        try:
            rc = proc.wait(timeout=timeout)
        except BaseException as exc:                             # timeout, or the session itself stopped
            if not isinstance(exc, subprocess.TimeoutExpired):
                for sig in (signal.SIGTERM, signal.SIGKILL):
                    try:
                        os.killpg(proc.pid, sig)
                        proc.wait(timeout=3)
                        break
                    except (ProcessLookupError, subprocess.TimeoutExpired):
                        continue
                end_leftovers(marker, grace_s=3.0)
                raise
            cut = True
            for sig, grace in ((signal.SIGINT, 10.0), (signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=grace)
                    break
                except subprocess.TimeoutExpired:
                    continue
            rc = proc.poll()
        left = end_leftovers(marker)
        if left:
            log.write(f"\n[session] processes still alive after SIGKILL: {left}\n")
    return rc, time.monotonic() - t, cut


def step_env(a) -> dict:
    """Every step's environment: this checkout and scripts/ first on PYTHONPATH, unbuffered output, one
    torch thread unless set, one inductor cache for the session, no NVLink multicast."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
               TORCHINDUCTOR_CACHE_DIR=os.path.join(a.work, "inductor-cache"), **NO_MULTICAST)
    env["PYTHONPATH"] = os.pathsep.join([ROOT, os.path.join(ROOT, "scripts")] + [
        p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


def run_session(steps: list[Step], a, render=None) -> list[Row]:
    """Run `steps` in order within a.budget_s; after each, `render(rows)` writes the results so far."""
    os.makedirs(os.path.join(a.out, "logs"), exist_ok=True)
    os.makedirs(a.work, exist_ok=True)
    rows = [Row(st.name, st.title, command=_command(st)) for st in steps]
    model_dir = os.path.join(a.work, "v2-lite")
    last_model_user = max((i for i, st in enumerate(steps) if st.needs_model and not st.skip), default=-1)
    model_state = "not written" if any(st.name == "model" for st in steps) else "its step is not in --only"
    model_lost = model_state != "not written"           # no model to come: later users are not kept time for
    env = step_env(a)
    for i, (st, row) in enumerate(zip(steps, rows)):
        row.free_disk_gb = round(free_gb(a.work), 1)
        left = a.budget_s - (time.monotonic() - a.t0)
        keep = sum(s.min_s for s in steps[i + 1:]            # not for steps that cannot run anyway
                   if not (s.skip or (s.needs_model and model_lost) or s.min_s > left))
        timeout = min(st.cap_s, left - keep)
        try:
            argv = [] if st.skip else (st.argv() if callable(st.argv) else st.argv)
            skip = st.skip
        except SkipStep as exc:
            argv, skip = [], str(exc)
        if skip:
            row.status = f"skipped: {skip}"
        elif st.needs_model and model_state != "written":
            row.status = f"skipped: needs the model ({model_state})"
        elif timeout < st.min_s:
            row.status = (f"skipped: {max(left, 0):.0f} s left of the {a.budget_s:.0f} s budget, {keep:.0f} s kept "
                          f"for later steps; needs {st.min_s:.0f} s")
        elif st.name == "model" and free_gb(a.work) < a.model_gb + DISK_MARGIN_GB:
            row.status = (f"failed: {free_gb(a.work):.1f} GB free on the disk of {a.work}, the model needs "
                          f"~{a.model_gb:.0f} GB + {DISK_MARGIN_GB:.0f} GB margin")
        else:
            row.timeout_s = round(timeout, 1)
            row.started_s = round(time.monotonic() - a.t0, 1)
            row.log = os.path.join("logs", f"{st.name}.log")
            tmp = os.path.join(a.work, f"tmp-{st.name}")
            os.makedirs(tmp, exist_ok=True)
            say(f"{st.name}: {st.title} (timeout {timeout:.0f} s)")
            try:
                rc, secs, cut = run_step(argv, timeout, os.path.join(a.out, row.log), {**env, "TMPDIR": tmp},
                                         f"{a.session_id}-{st.name}")
                row.command = _command(st)                        # a callable argv: as it really ran
            except BaseException:                                 # the session itself was stopped
                row.status = "interrupted: the session was stopped during this step"
                if render:
                    render(rows)
                raise
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            row.rc, row.seconds = rc, round(secs, 1)
            row.status = f"cut at {secs:.0f} s (timeout)" if cut else ("ok" if rc == 0 else f"failed (rc {rc})")
        if st.name == "model":
            model_state = "written" if row.status == "ok" else "model step " + row.status.split(":")[0]
            model_lost = row.status != "ok"
        if i == last_model_user and os.path.isdir(model_dir):
            shutil.rmtree(model_dir, ignore_errors=True)
            model_state = "deleted after its last user"
        say(f"{st.name}: {row.status}" + (f", {row.seconds:.0f} s" if row.rc is not None else ""))
        if render:
            render(rows)
    shutil.rmtree(model_dir, ignore_errors=True)
    return rows


def _command(st: Step) -> str:
    try:
        argv = st.argv() if callable(st.argv) else st.argv
    except SkipStep as exc:
        return f"(none: {exc})"
    return shlex.join(["PYTHONPATH=.:scripts"] + [("python3" if j == 0 else x) for j, x in enumerate(argv)
                                                  if not (j == 1 and x == "-u")])


def _load(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


# ------------------------------------------------------------------------------------------- tables
def _f(v, nd: int = 2) -> str:
    return "—" if v is None else f"{v:,.{nd}f}"


def _bench_rows(out: str, step: str) -> list[dict]:
    return (_load(os.path.join(out, step, "gpu_perf.json")) or {}).get("bench") or []


def render(rows: list[Row], a, info: dict) -> str:
    """session.md: the step table, then one section per measurement from what the steps left on disk.
    A section whose files cannot be read says so; the other sections are still written."""
    by = {r.name: r for r in rows}
    md = [f"# GPU session {info['date']}: {info['machine']}, torch {info['torch']}", "",
          f"command: `{info['command']}`", f"budget {a.budget_s:.0f} s; steps in priority order (log: stdout and "
          "stderr of the step; status: ok, failed, cut by its timeout, or skipped and why):", "",
          "| step | what | status | rc | seconds | timeout s | started at s | free disk GB | log |",
          "|---|---|---|---|---|---|---|---|---|"]
    md += [f"| {r.name} | {r.title} | {r.status} | {'' if r.rc is None else r.rc} | {r.seconds:.1f} | "
           f"{'' if r.timeout_s is None else f'{r.timeout_s:.0f}'} | {'' if r.started_s is None else r.started_s} | "
           f"{'' if r.free_disk_gb is None else r.free_disk_gb} | {r.log} |" for r in rows]
    for name, title, body in SECTIONS:
        if name == "decode_sync" and name not in by:
            continue
        r = by.get(name)
        md += [f"\n## {title.format(a=a)}", ""]
        if r is None:
            md.append("not planned")
            continue
        md += [f"step `{name}`: {r.status}; command (OUT: --out, WORK: the session's model and temporary "
               "folder):", "", "```", r.command.replace(a.out, "OUT").replace(a.work, "WORK"), "```", ""]
        try:
            md += body(a.out, a)
        except Exception as exc:                               # a malformed or partial file: this section only
            md.append(f"could not read this step's results: {type(exc).__name__}: {exc}")
    return "\n".join(md) + "\n"


def _decode_section(out: str, a) -> list[str]:
    md = []
    ceil = (_load(os.path.join(out, "decode", "gpu_perf.json")) or {}).get("ceilings")
    if ceil:
        md.append(f"ceilings in the same run: HBM copy {ceil['hbm_copy_bytes_per_s'] / 1e12:.2f} TB/s, bf16 GEMM "
                  f"{ceil['bf16_gemm_flops'] / 1e12:.0f} TFLOP/s\n")
    decode = [b for b in _bench_rows(out, "decode") if b["phase"] == "decode"]
    sync = {b["batch"]: b for b in _bench_rows(out, "decode_sync") if b["phase"] == "decode"}
    if not decode:
        return md + ["no decode results"]
    md += ["| batch | mode | step ms | tok/s | HBM GB/step | % HBM roofline | without async: step ms |",
           "|---|---|---|---|---|---|---|"]
    md += [f"| {b['batch']} | {b['mode']} | {b['step_ms']:.2f} | {b['tok_s']:,.0f} | {b['hbm_gb_step']:.2f} | "
           f"{100 * b['hbm_frac']:.1f} | {_f(sync[b['batch']]['step_ms']) if b['batch'] in sync else ''} |"
           for b in decode]
    gr = next((b["graphs"] for b in decode if b.get("graphs")), None)
    md += ["", "**Start-up capture**: " + (f"{gr['count']} decode graphs in {gr['capture_s']:.1f} s, "
                                           f"{gr['capture_bytes'] / 2**20:.0f} MiB of graph memory, "
                                           f"{gr['captures_after_start']} captures after start" if gr
                                           else "not recorded")]
    return md


def _sync_section(out: str, a) -> list[str]:
    rows = [b for b in _bench_rows(out, "decode_sync") if b["phase"] == "decode"]
    return [f"batch {b['batch']}: {b['step_ms']:.2f} ms ({b['mode']})" for b in rows] or ["no results"]


def _checks_section(out: str, a) -> list[str]:
    checks = (_load(os.path.join(out, "checks", "gpu_perf.json")) or {}).get("checks") or []
    if not checks:
        return ["no check results"]
    bad = [c for c in checks if c[2] not in ("ok", "info")]
    return (["| check | result | status |", "|---|---|---|"] + [f"| {c[0]} | {c[1]} | {c[2]} |" for c in checks]
            + [f"\n{len(checks) - len(bad)} of {len(checks)} rows ok or info; " +
               ("**not passed: " + "; ".join(c[0] for c in bad) + "**" if bad else "every check passed")])


def _fp8_section(out: str, a) -> list[str]:
    fp8 = [b for b in _bench_rows(out, "fp8") if b["phase"] == "decode"]
    if not fp8:
        return ["no FP8 results"]
    # the bf16 step of the same batch and the same scheduling (async or not), from either decode step
    bf16 = {(b["batch"], "async" in b["mode"]): b for step in ("decode", "decode_sync")
            for b in _bench_rows(out, step) if b["phase"] == "decode"}
    md = ["| weights | batch | step ms | bf16 step ms (its mode) | vs bf16 |", "|---|---|---|---|---|"]
    for b in fp8:
        ref = bf16.get((b["batch"], "async" in b["mode"]))
        ref_text = f"{ref['step_ms']:.2f} ({ref['mode']})" if ref else "—"
        md.append(f"| {b['mode']} | {b['batch']} | {b['step_ms']:.2f} | {ref_text} | "
                  f"{_f(ref and b['step_ms'] / ref['step_ms'])} |")
    return md


def _prefill_section(out: str, a) -> list[str]:
    pre = [b for b in _bench_rows(out, "prefill") if b["phase"] == "prefill"]
    if not pre:
        return ["no prefill results"]
    return (["| tokens | mode | step ms | tok/s | % GEMM peak | % HBM roofline |", "|---|---|---|---|---|---|"]
            + [f"| {b['tokens']:,} | {b['mode']} | {b['step_ms']:.2f} | {b['tok_s']:,.0f} | "
               f"{100 * b['flop_frac']:.1f} | {100 * b['hbm_frac']:.1f} |" for b in pre]
            + ["", "mode 'attn auto': the engine's own prefill attention (model/prefill_attention.py: the Triton "
               "kernel for 16-bit models on CUDA); 'async': steps launched one ahead as the engine serves them "
               "(engine.async_scheduling): the next prompt's batch build and launches run under this step's GPU work"])


def _profile_section(out: str, a) -> list[str]:
    prof = _load(os.path.join(out, "profile", "profile.json")) or {}
    prow = [(f"decode b{k}", v) for k, v in sorted((prof.get("decode") or {}).items(), key=lambda kv: int(kv[0]))]
    prow += [(f"decode b{k} fp8-block-a8", v) for k, v in sorted((prof.get("fp8a8") or {}).items(),
                                                                 key=lambda kv: int(kv[0]))]
    prow += [(f"prefill {k}", v) for k, v in sorted((prof.get("prefill") or {}).items(), key=lambda kv: int(kv[0]))]
    md = []
    if prow:
        md += ["| point | wall ms | replay ms | GPU busy ms | host (wall - busy) ms | kernels per step | largest "
               "kernels (us per step) |", "|---|---|---|---|---|---|---|"]
        for name, v in prow:
            top = ", ".join(f"{t['name'][:40]} {t['us_per_step']:.0f}" for t in v.get("top", [])[:4])
            md.append(f"| {name} | {v['wall_ms']:.2f} | {_f(v.get('graph_replay_ms'))} | {v['busy_ms']:.2f} | "
                      f"{v['wall_ms'] - v['busy_ms']:.2f} | {v['kernels_per_step']:.0f} | {top} |")
        md.append("\nper-kernel tables: profile/profile.md")
    md += [f"\nprofile point FAILED: {fail}" for fail in prof.get("failed") or []]
    return md or ["no profile results"]


def _serve_section(out: str, a) -> list[str]:
    summ = (_load(os.path.join(out, "serve", "serve.json")) or {}).get("summary") or {}
    if not summ.get("points"):
        return ["no serving results" + ("" if a.pack else " (no --pack given)")]
    md = ["| graph | concurrency | ok/sent | TTFT p50 ms | ITL p50 ms | output TPS | TPS/GPU |",
          "|---|---|---|---|---|---|---|"]
    md += [f"| {p['graph']} | {p['concurrency']} | {p['ok']}/{p['sent']} | {_f(p['ttft_ms_p50'], 1)} | "
           f"{_f(p['itl_ms_p50'])} | {_f(p['output_tps'], 1)} | {_f(p['tps_gpu'], 1)} |" for p in summ["points"]]
    for p in summ["points"]:
        for pool, ev in (p.get("steps") or {}).items():
            md.append(f"\n{p['graph']} c{p['concurrency']} {pool}: " + ", ".join(
                f"{k} {_f(v)}" for k, v in ev.items()))
    b = summ.get("bench") or {}
    if b:
        md.append(f"\nengine alone (`bench engine`, decode batch {b.get('batch')}, context {b.get('context')}): "
                  f"{_f(b.get('tokens_per_s_per_gpu'), 0)} tokens/s per GPU")
    md += [f"{g}: serving TPS/GPU / engine decode TPS = {r:.3f}" for g, r in (summ.get("ratio") or {}).items()]
    mix = summ.get("engine_mix") or {}
    if mix.get("output_tps"):
        md.append(f"engine alone on the same workload (`scripts/gpu_engine_mix.py`, {mix.get('requests')} requests, "
                  f"ISL mean {_f(mix.get('isl_mean'), 0)}): {_f(mix['output_tps'], 1)} output tokens/s")
    md += [f"{g}: **serving / engine alone on the same workload = {r:.3f}**" for g, r in (summ.get("vs_engine_mix") or {}).items()]
    md += [f"{g}: serving / expected from the engine alone (prompts at the prefill rate + decode steps) = "
           f"{r['ratio']:.3f} (expected {r['expected_tps']:,.0f} tokens/s)"
           for g, r in (summ.get("vs_expected") or {}).items()]
    return md + ["\nfull tables: serve/serve.md"]


def _planner_section(out: str, a) -> list[str]:
    return _planner_table(out) or ["no planner comparison"]


SECTIONS = (("decode", "Decode, bf16, CUDA graphs (v2-lite-shape, {a.layers} layers, context {a.context})",
             _decode_section),
            ("decode_sync", "Decode without async scheduling (the last column above)", _sync_section),
            ("checks", "GPU correctness checks", _checks_section),
            ("fp8", "FP8 decode at batch {a.fp8_batch} against bf16", _fp8_section),
            ("prefill", "Prefill, eager (one sequence)", _prefill_section),
            ("profile", "Where a step's time goes (torch profiler over graph replays)", _profile_section),
            ("serve", "Serving through Dynamo against the engine alone", _serve_section),
            ("planner", "The planner's prediction against the measured steps", _planner_section))


def _planner_table(out: str) -> list[str]:
    """The markdown rows build_calibration --compare printed (its log's table lines)."""
    log = os.path.join(out, "logs", "planner.log")
    if not os.path.isfile(log):
        return []
    with open(log) as f:
        return [ln.rstrip() for ln in f if ln.startswith("|")]


def write_results(rows: list[Row], a, info: dict) -> None:
    with open(os.path.join(a.out, "session.md"), "w") as f:
        f.write(render(rows, a, info))
    with open(os.path.join(a.out, "session.json"), "w") as f:
        json.dump({"info": info, "budget_s": a.budget_s, "steps": [dataclasses.asdict(r) for r in rows],
                   "results": {name: _load(os.path.join(a.out, *path)) for name, path in (
                       ("decode", ("decode", "gpu_perf.json")), ("decode_sync", ("decode_sync", "gpu_perf.json")),
                       ("checks", ("checks", "gpu_perf.json")), ("fp8", ("fp8", "gpu_perf.json")),
                       ("prefill", ("prefill", "gpu_perf.json")), ("profile", ("profile", "profile.json")),
                       ("serve", ("serve", "serve.json")))},
                   "planner_table": _planner_table(a.out)}, f, indent=1, default=str)


def machine_info(argv: list[str]) -> dict:
    """Date, GPU (nvidia-smi, no CUDA context here), torch version (package metadata), the command."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        p = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=30)
        gpus = [ln.strip() for ln in p.stdout.splitlines() if ln.strip()]
        machine = f"{len(gpus)} x {gpus[0]}" if gpus else "no GPU listed by nvidia-smi"
    except (OSError, subprocess.TimeoutExpired):
        machine = "no nvidia-smi"
    try:
        torch_v = version("torch")
    except PackageNotFoundError:
        torch_v = "not installed"
    return {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": machine, "torch": torch_v,
            "command": shlex.join(["python3", "scripts/gpu_perf.py", "--session"] + argv)}


# ---------------------------------------------------------------------------------------------- main
def _positive(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        v = -1.0
    if v <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} (allowed: a number of seconds > 0)")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gpu_perf.py --session", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  # the whole session on the GPU machine (the Dynamo pack carried as .gpu-servepack)\n"
               "  PYTHONPATH=.:scripts python3 scripts/gpu_perf.py --session --out $OUT --pack .gpu-servepack\n"
               "  # the plan and every step's command line, checked against the scripts' flags (no GPU)\n"
               "  PYTHONPATH=.:scripts python3 scripts/gpu_session.py --dry-run --out out/session\n"
               "  # a shorter session without serving, only some steps\n"
               "  PYTHONPATH=.:scripts python3 scripts/gpu_perf.py --session --out $OUT --budget-s 300 "
               "--only model,decode,checks\n")
    p.add_argument("--out", required=True, help="results folder ($OUT on the GPU machine)")
    p.add_argument("--pack", default=None, help="the Dynamo pack folder (pack-dynamo-for-gpu.sh output) for the "
                   "serving step; without it serving is skipped")
    p.add_argument("--work", default=None, help="model and temporary files (default: a new folder under the "
                   "system's temporary folder, deleted at the end)")
    p.add_argument("--budget-s", type=_positive, default=540.0,
                   help="seconds for the whole session, start-up of the steps included (default 540: a 600 s "
                        "device call less its start)")
    p.add_argument("--full-checks", action="store_true",
                   help="the checks step also records gpu_perf's GPU figures that are not pass/fail checks "
                        "(expert GEMM timings, operation counts with the fused kernels off/on, an eager kernel "
                        "profile of the 3-layer model)")
    p.add_argument("--only", default="", help="comma list of steps to run (the rest are skipped rows): "
                   "model,decode,checks,fp8,prefill,profile,decode_sync,serve,planner")
    p.add_argument("--async-scheduling", choices=("auto", "on", "off"), default="auto",
                   help="the decode bench with engine.async_scheduling: auto = when `bench engine --help` lists "
                        "--async-scheduling (then decode_sync measures without it) (default auto)")
    p.add_argument("--layers", type=int, default=27, help="v2-lite-shape depth (default 27, the full model)")
    p.add_argument("--context", type=int, default=1000, help="decode context (default 1000)")
    p.add_argument("--decode-batches", default="1,32,64,128,256", help="the decode step's batches (default "
                   "1,32,64,128,256)")
    p.add_argument("--sync-batches", default="1,64", help="decode_sync's batches (default 1,64: graphs captured "
                   "up to batch 64 only)")
    p.add_argument("--fp8-batch", type=int, default=64, help="the FP8 decode batch (default 64)")
    p.add_argument("--prefill", default="2048,8192,16000", help="prefill lengths (default 2048,8192,16000: the "
                   "issue's 8K and 16K points, and 2K for the planner's short-prefill check)")
    p.add_argument("--profile-batches", default="1,64,256", help="the profile's decode batches, one engine each "
                   "(default 1,64,256: the planner's host and small-kernel records)")
    p.add_argument("--profile-prefill", default="8192", help="the profile's prefill lengths (default 8192: the "
                   "planner's prefill records)")
    p.add_argument("--concurrency", type=int, default=64, help="serving concurrency (default 64)")
    p.add_argument("--requests-per-concurrency", type=int, default=2,
                   help="serving: requests sent = this x concurrency (default 2)")
    p.add_argument("--hw", default="h200-measured", help="the planner's machine for the bench (default h200-measured)")
    p.add_argument("--python", default=sys.executable, help="the interpreter of every step (default this one)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the plan and check every step's command line against its script's flags; run nothing")
    p.add_argument("--bundle", action="store_true",
                   help="at the end, pack everything under --out but session.md and session.json into "
                        "OUT/session_files.tar.gz (for a transport that brings back only a few files)")
    return p


def settings(argv: list[str], p: argparse.ArgumentParser | None = None) -> argparse.Namespace:
    """The parsed flags plus what the session derives from them (absolute folders, its id, the model's size)."""
    import tempfile

    p = p or build_parser()
    a = p.parse_args(argv)
    if a.pack and not glob.glob(os.path.join(a.pack, "*.whl")):
        p.error(f"--pack {a.pack}: no wheels there (allowed: a pack-dynamo-for-gpu.sh output folder)")
    if a.layers < 1 or a.context < 1 or a.fp8_batch < 1 or a.concurrency < 1 or a.requests_per_concurrency < 1:
        p.error("--layers, --context, --fp8-batch, --concurrency and --requests-per-concurrency must be >= 1")
    a.t0 = time.monotonic()                          # the budget runs from here (not from the import)
    a.out = os.path.abspath(a.out)
    a.session_id = f"{os.getpid()}-{int(time.time())}"
    a.model_gb = MODEL_GB_BASE + MODEL_GB_PER_LAYER * a.layers
    a.own_work = a.work is None
    a.work = os.path.abspath(a.work or os.path.join(tempfile.gettempdir(), f"gpu-session-{a.session_id}"))
    return a


def _stopped(signum, frame):
    raise SystemExit(f"session stopped by signal {signum}")


def bundle(out: str, keep: tuple[str, ...] = ("session.md", "session.json")) -> str:
    """Move everything under `out` except `keep` into out/session_files.tar.gz; returns its path."""
    import tarfile

    path = os.path.join(out, "session_files.tar.gz")
    names = sorted(n for n in os.listdir(out) if n not in keep and n != os.path.basename(path))
    with tarfile.open(path, "w:gz") as tar:
        for n in names:
            tar.add(os.path.join(out, n), arcname=n)
    for n in names:
        full = os.path.join(out, n)
        shutil.rmtree(full) if os.path.isdir(full) else os.remove(full)
    return path


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = build_parser()
    a = settings(argv, p)
    async_ok = async_scheduling_available(a)
    steps = plan(a, async_ok)
    names = [st.name for st in steps]
    only = [x for x in a.only.split(",") if x]
    unknown = [x for x in only if x not in names]
    if unknown:
        p.error(f"--only: unknown step(s) {unknown}; choose from {','.join(names)}")
    if only:
        steps = [st for st in steps if st.name in only]
    if a.dry_run:
        keep = 0.0
        for st in steps:
            if st.skip:
                print(f"{st.name:12s} skipped: {st.skip}")
                continue
            print(f"{st.name:12s} cap {st.cap_s:4.0f} s, min {st.min_s:4.0f} s  {st.title}" +
                  (f"  [{st.note}]" if st.note else ""))
            print(f"{'':12s} {_command(st)}")
            keep += st.min_s
        print(f"sum of minimums {keep:.0f} s of the {a.budget_s:.0f} s budget; model ~{a.model_gb:.0f} GB on disk")
        problems = check_argv(steps)
        for line in problems:
            print(f"error: {line}")
        return 2 if problems else 0
    os.makedirs(a.out, exist_ok=True)
    signal.signal(signal.SIGTERM, _stopped)          # finally blocks run: the step ended, results written
    info = machine_info(argv)
    say(f"{info['machine']}; torch {info['torch']}; {len(steps)} steps; budget {a.budget_s:.0f} s; work {a.work}")
    try:
        rows = run_session(steps, a, render=lambda rows: write_results(rows, a, info))
    finally:
        if a.own_work:
            shutil.rmtree(a.work, ignore_errors=True)
    print(render(rows, a, info), flush=True)
    if a.bundle:
        bundle(a.out)
    for r in rows:                                           # last, so that a short output tail still shows it
        print(f"{r.name:12s} {r.status}" + (f" ({r.seconds:.0f} s, log {r.log})" if r.log else ""))
    failed = [r for r in rows if r.status != "ok"]
    say("done" if not failed else f"done; not ok: {', '.join(f'{r.name} ({r.status})' for r in failed)}")
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
