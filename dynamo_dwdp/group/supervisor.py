"""Rank supervisor: `python -m dynamo_dwdp.group --ranks N -- <worker command>`.

Starts N copies of the worker command, appending `--group-rank r` (rank r gets
DYN_SYSTEM_PORT = $DYN_SYSTEM_PORT + r when that is set, and DWDP_GROUP_RANK=r). It is the unit a
Kubernetes pod runs (one pod = one NVLink domain = one group) and what the local launcher starts.

A group is one failure domain: when a rank exits unexpectedly the supervisor announces it
(NATS `rank_down` when NATS_SERVER is set, so peers react at once; otherwise their heartbeat
timeout does), SIGTERMs the survivors at once (a Dynamo worker leaves discovery first, so no new
request is routed to the broken group, then fails or drains its in-flight requests), SIGKILLs any
still running after `--grace` seconds, and exits non-zero so that the pod restarts as one group.
SIGTERM/SIGINT are forwarded to every rank (graceful drain), then the supervisor waits for them.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import time

log = logging.getLogger("dynamo_dwdp.group")


def _group_name(cmd: list[str]) -> str:
    return cmd[cmd.index("--group-name") + 1] if "--group-name" in cmd else "g0"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--" not in argv:
        print("usage: python -m dynamo_dwdp.group --ranks N [--grace S] -- <worker command ...>", file=sys.stderr)
        return 2
    split = argv.index("--")
    p = argparse.ArgumentParser(prog="python -m dynamo_dwdp.group")
    p.add_argument("--ranks", type=int, required=True)
    p.add_argument("--grace", type=float, default=8.0,
                   help="seconds survivors get to shut down (after SIGTERM) once a rank died")
    a = p.parse_args(argv[:split])
    cmd = argv[split + 1:]
    if not cmd or a.ranks < 1:
        print("error: need --ranks >= 1 and a worker command after --", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s group: %(message)s")
    base_port = os.environ.get("DYN_SYSTEM_PORT")
    procs: list[subprocess.Popen] = []
    for r in range(a.ranks):
        env = dict(os.environ, DWDP_GROUP_RANK=str(r))
        if base_port:
            env["DYN_SYSTEM_PORT"] = str(int(base_port) + r)
        procs.append(subprocess.Popen(cmd + ["--group-rank", str(r)], env=env))
    stopping = False

    def forward(signum, _frame):
        nonlocal stopping
        stopping = True
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    group = _group_name(cmd)
    nats = os.environ.get("NATS_SERVER")
    rc = 0
    reported: set[int] = set()
    termed: set[int] = set()      # ranks this supervisor sent SIGTERM (a clean -15/0 exit is then ours)
    killed: set[int] = set()      # ranks this supervisor SIGKILLed after the grace period

    def report_crashes() -> bool:
        """Log (and announce) every rank that died on its own; True if any did, ever."""
        for r, proc in enumerate(procs):
            code = proc.poll()
            if code is None or code == 0 or r in reported or r in killed:
                continue
            if r in termed and code in (-signal.SIGTERM, 128 + signal.SIGTERM):
                continue
            reported.add(r)
            log.error("rank %d of group %s exited with code %s", r, group, code)
            if nats:
                from dynamo_dwdp.group.events import publish_once

                publish_once(nats, group, "rank_down", r, reason=f"exit code {code}")
        return bool(reported)

    while True:
        if report_crashes() and not stopping:
            stopping = True
            rc = 1
            for r, proc in enumerate(procs):     # a Dynamo worker unregisters at once on SIGTERM, then drains:
                if proc.poll() is None:          # no new request reaches the broken group meanwhile
                    termed.add(r)
                    proc.terminate()
            deadline = time.monotonic() + a.grace
            while time.monotonic() < deadline and any(proc.poll() is None for proc in procs):
                report_crashes()
                time.sleep(0.2)
            report_crashes()
            for r, proc in enumerate(procs):
                if proc.poll() is None:
                    killed.add(r)
                    proc.kill()
        if all(proc.poll() is not None for proc in procs):   # every rank may die at once
            report_crashes()
            break
        time.sleep(0.2)
    for proc in procs:
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    return rc or max((abs(proc.returncode or 0) for proc in procs), default=0) and 1


if __name__ == "__main__":
    sys.exit(main())
