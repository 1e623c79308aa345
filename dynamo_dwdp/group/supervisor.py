"""Rank supervisor: `python -m dynamo_dwdp.group --ranks N -- <worker command>`.

Starts N copies of the worker command, appending `--group-rank r` (rank r gets
DYN_SYSTEM_PORT = $DYN_SYSTEM_PORT + r when that is set, and DWDP_GROUP_RANK=r). It is the unit a
Kubernetes pod runs (one pod = one NVLink domain = one group) and what the local launcher starts.

A group is one failure domain, and it heals. When a rank exits while the group is not being
stopped (crash, SIGKILL, or a DEP/TP rank that stopped itself because its collectives broke), the
supervisor announces it (NATS `rank_down` when NATS_SERVER is set, so peers react at once), SIGTERMs
the survivors (a Dynamo worker leaves discovery first, then fails or drains its in-flight requests),
SIGKILLs any still running after `--grace` seconds, and starts the whole group again after a
bounded exponential back-off (`--backoff` doubling up to `--max-backoff`; back to `--backoff` once
a generation has served for `--stable-after` seconds). Every start of the group is a new
*generation*: DWDP_GROUP_GENERATION names the rendezvous namespace its ranks meet in (no stale key
of a previous incarnation is ever read), and DWDP_GROUP_FAILED_AT (wall-clock seconds) lets the
ranks report the time to recovery (log line + `dwdp_group_recovery_seconds`). The same path serves
DWDP, DP, DEP and TP: a process group is re-formed only by restarting all of its ranks.

A first generation whose rank exits on its own (a non-zero exit code, not a signal) before the
group ever became ready (every registering rank's /health on its DYN_SYSTEM_PORT "ready") is a
start-up error, not a fault: the supervisor exits non-zero at once, so the launcher shows the log
instead of retrying a bad configuration. A rank killed by a signal is always a fault. `--max-restarts`
bounds the restarts (default: unbounded, like a pod's restartPolicy); beyond it the supervisor exits
non-zero (and the pod restarts as one group).
SIGTERM/SIGINT are forwarded to every rank (graceful drain), then the supervisor waits for them.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request

from dynamo_dwdp.group.events import publish_once
from dynamo_dwdp.strategies import get_strategy

log = logging.getLogger("dynamo_dwdp.group")


def _flag(cmd: list[str], flag: str, default: str) -> str:
    return cmd[cmd.index(flag) + 1] if flag in cmd and cmd.index(flag) + 1 < len(cmd) else default


def _ready(port: int) -> bool:
    host = os.environ.get("DYN_SYSTEM_HOST", "127.0.0.1")
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/health", timeout=1) as r:
            return r.status == 200 and b'"ready"' in r.read()
    except OSError:
        return False


class Supervisor:
    def __init__(self, ranks: int, cmd: list[str], grace: float, backoff: float, max_backoff: float,
                 stable_after: float, max_restarts: int | None):
        self.ranks, self.cmd, self.grace = ranks, cmd, grace
        self.backoff, self.max_backoff, self.stable_after = backoff, max_backoff, stable_after
        self.max_restarts = max_restarts
        self.group = _flag(cmd, "--group-name", "g0")
        strategy = _flag(cmd, "--strategy", "dwdp")
        # leader-only strategies (TP): the followers run no Dynamo endpoint
        self.registering = 1 if get_strategy(strategy).leader_only else ranks
        self.base_port = os.environ.get("DYN_SYSTEM_PORT")
        self.nats = os.environ.get("NATS_SERVER")
        self.stopping = threading.Event()
        self.signum: int | None = None
        self.procs: list[subprocess.Popen] = []
        self._signalled: set[int] = set()
        self.generation = 0
        self.restarts = 0

    # ------------------------------------------------------------------ one generation
    def _start(self, failed_at: float | None) -> None:
        self.generation += 1
        token = f"{os.getpid()}-{self.generation}-{int(time.time() * 1000)}"
        self.procs = []
        for r in range(self.ranks):
            env = dict(os.environ, DWDP_GROUP_RANK=str(r), DWDP_GROUP_GENERATION=token)
            if failed_at is not None:
                env["DWDP_GROUP_FAILED_AT"] = f"{failed_at:.3f}"
            else:
                env.pop("DWDP_GROUP_FAILED_AT", None)
            if self.base_port:
                env["DYN_SYSTEM_PORT"] = str(int(self.base_port) + r)
            self.procs.append(subprocess.Popen(self.cmd + ["--group-rank", str(r)], env=env))
        log.info("group %s: generation %d started (%s), ranks %s", self.group, self.generation, token,
                 [p.pid for p in self.procs])

    def _is_ready(self) -> bool:
        if not self.base_port:
            return True
        return all(_ready(int(self.base_port) + r) for r in range(self.registering))

    def _stop_survivors(self) -> set[int]:
        """SIGTERM, then after the grace SIGKILL, every rank still running; returns the ranks this
        supervisor signalled (a rank that died on its own is not among them)."""
        ours = set()
        for r, proc in enumerate(self.procs):
            if proc.poll() is None:
                ours.add(r)
                proc.terminate()
        deadline = time.monotonic() + self.grace
        while time.monotonic() < deadline and any(p.poll() is None for p in self.procs):
            time.sleep(0.1)
        for r, proc in enumerate(self.procs):
            if proc.poll() is None:
                log.warning("group %s: rank %d did not stop within %.0fs; killing it", self.group, r, self.grace)
                proc.kill()
        for proc in self.procs:
            proc.wait()
        return ours

    def _announce(self, rank: int, code: int) -> None:
        if self.nats:
            publish_once(self.nats, self.group, "rank_down", rank, reason=f"exit code {code}")

    def forward(self, signum: int, _frame=None) -> None:
        self.signum = signum
        self.stopping.set()
        self._forward()

    def _forward(self) -> None:
        for proc in list(self.procs):
            if proc.poll() is None and proc.pid not in self._signalled:
                self._signalled.add(proc.pid)
                proc.send_signal(self.signum or signal.SIGTERM)

    def _wait_all(self) -> None:
        self._forward()                          # ranks started while the signal arrived get it too
        for proc in self.procs:
            proc.wait()

    # ------------------------------------------------------------------ main loop
    def run(self) -> int:
        failed_at: float | None = None
        consecutive = 0
        while True:
            self._start(failed_at)
            started, ready_at = time.monotonic(), None
            last_probe = 0.0
            failed = None
            while failed is None:
                if self.stopping.is_set():
                    self._wait_all()
                    return 0
                for r, proc in enumerate(self.procs):
                    if proc.poll() is not None:
                        failed = (r, proc.returncode)
                        break
                if failed is None and ready_at is None and time.monotonic() - last_probe > 1.0:
                    last_probe = time.monotonic()
                    if self._is_ready():
                        ready_at = time.monotonic()
                        log.info("group %s: generation %d ready", self.group, self.generation)
                time.sleep(0.1)
            if self.stopping.is_set():        # a rank ended because we forwarded a signal
                self._wait_all()
                return 0
            failed_at = time.time()
            rank, code = failed
            log.error("rank %d of group %s exited with code %s", rank, self.group, code)
            self._announce(rank, code)
            ours = self._stop_survivors()
            for r, proc in enumerate(self.procs):      # report every other rank that died on its own too
                if r != rank and r not in ours:
                    log.error("rank %d of group %s exited with code %s", r, self.group, proc.returncode)
                    self._announce(r, proc.returncode)
            if ready_at is None and self.generation == 1 and code > 0:
                log.error("group %s failed while starting (rank %d exited with code %s): not restarting",
                          self.group, rank, code)
                return 1
            if self.max_restarts is not None and self.restarts >= self.max_restarts:
                log.error("group %s: %d restarts used up; giving up", self.group, self.restarts)
                return 1
            if ready_at is not None and time.monotonic() - ready_at >= self.stable_after:
                consecutive = 0
            delay = min(self.max_backoff, self.backoff * 2 ** consecutive)
            consecutive += 1
            self.restarts += 1
            log.warning("group %s: restarting all %d ranks in %.1fs (restart %d, generation %d served %.0fs)",
                        self.group, self.ranks, delay, self.restarts, self.generation, time.monotonic() - started)
            if self.stopping.wait(delay):
                return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--" not in argv:
        print("usage: python -m dynamo_dwdp.group --ranks N [--grace S] [--backoff S] [--max-backoff S] "
              "[--max-restarts N] -- <worker command ...>", file=sys.stderr)
        return 2
    split = argv.index("--")
    p = argparse.ArgumentParser(prog="python -m dynamo_dwdp.group")
    p.add_argument("--ranks", type=int, required=True)
    p.add_argument("--grace", type=float, default=8.0,
                   help="seconds survivors get to shut down (after SIGTERM) once a rank died")
    p.add_argument("--backoff", type=float, default=1.0, help="first restart delay in seconds (doubles per failure)")
    p.add_argument("--max-backoff", type=float, default=30.0, help="longest restart delay in seconds")
    p.add_argument("--stable-after", type=float, default=60.0,
                   help="a generation that served this long resets the back-off")
    p.add_argument("--max-restarts", type=int, default=None, help="give up (exit 1) after this many restarts")
    a = p.parse_args(argv[:split])
    cmd = argv[split + 1:]
    if not cmd or a.ranks < 1:
        print("error: need --ranks >= 1 and a worker command after --", file=sys.stderr)
        return 2
    if a.backoff <= 0 or a.max_backoff < a.backoff:
        print("error: need 0 < --backoff <= --max-backoff", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s group: %(message)s")
    sup = Supervisor(a.ranks, cmd, a.grace, a.backoff, a.max_backoff, a.stable_after, a.max_restarts)
    signal.signal(signal.SIGTERM, sup.forward)
    signal.signal(signal.SIGINT, sup.forward)
    return sup.run()


if __name__ == "__main__":
    sys.exit(main())
