"""Launch a serving graph locally: infra, prefill pools, decode pools, frontend; wait for health;
keep it whole while serving; shut everything down with nothing left running.

Every process gets its own session (so a whole group supervisor tree is signalled at once) and its
own log file under the run directory. Every listener is on the infra host (127.0.0.1 by default).

Supervision: once the graph is healthy, a monitor thread restarts any top-level process that exits
(the frontend, a group supervisor, hence a prefill or decode worker) with a bounded exponential
back-off (RESTART_BACKOFF doubling up to RESTART_MAX_BACKOFF), and an infra process (etcd, NATS,
the ZMQ broker) at once, on the same ports and data directories. A rank inside a group is restarted
by its group supervisor (dynamo_dwdp/group/supervisor.py), which re-forms the group.

Shutdown (`ServeHandle.shutdown`, run on leaving `serve_graph`): SIGTERM the frontend, which stops
taking requests and drains the in-flight ones, for at most `drain_timeout` seconds; then SIGTERM
every worker group at once (their Dynamo pre-drain grace is 0: nothing routes to them any more),
SIGKILL whatever still runs `stop_timeout` seconds later; then the infra. `force_stop` SIGKILLs
everything at once (a second Ctrl-C).

    with serve_graph("graphs/disagg_dwdp_decode.yaml", ["configs/tiny-cpu.yaml"]) as h:
        requests.post(h.url + "/v1/completions", ...)
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from typing import Iterator

from dynamo_dwdp.config.graph import Graph, Pool, check_compatible, load_graph
from dynamo_dwdp.config.settings import Settings, load_settings
from dynamo_dwdp.errors import UserError
from dynamo_dwdp.launch import command_lines
from dynamo_dwdp.launch.infra import Infra, free_port, free_port_block
from dynamo_dwdp.strategies import get_strategy

log = logging.getLogger(__name__)

STOP_ORDER = ("frontend", "decode", "agg", "prefill")
DRAIN_TIMEOUT = 30.0             # seconds the frontend gets to finish in-flight requests at shutdown
STOP_TIMEOUT = 8.0               # seconds the workers get to exit after SIGTERM, then SIGKILL
RESTART_BACKOFF = 1.0
RESTART_MAX_BACKOFF = 30.0
STABLE_AFTER = 60.0


@dataclass
class Component:
    name: str                    # e.g. "decode-g0", "frontend"
    role: str                    # frontend | prefill | decode | agg
    proc: subprocess.Popen
    log_path: str
    system_ports: list[int] = field(default_factory=list)
    ranks: int = 1
    registers: int = 1           # Dynamo workers it registers (tp: 1, else ranks)
    argv: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    restarts: int = 0            # times the launcher restarted this process

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None


@dataclass
class ServeHandle:
    url: str
    model_name: str
    graph: Graph
    settings: Settings
    run_dir: str
    components: list[Component]
    infra: Infra
    _stopping: threading.Event = field(default_factory=threading.Event, repr=False)   # set once shutdown began

    @property
    def num_gpus(self) -> int:
        """Accelerators (rank processes) the graph's worker pools use."""
        return sum(p.ranks * p.replicas for p in self.graph.pools)

    @property
    def worker_metrics_urls(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for c in self.components:
            if c.role != "frontend":
                out.setdefault(c.name, []).extend(f"http://{self.infra.host}:{p}/metrics" for p in c.system_ports)
        return out

    def dead_components(self) -> list[tuple[str, int]]:
        return [(c.name, c.proc.returncode) for c in self.components if not c.alive]

    def component(self, name: str) -> Component:
        return next(c for c in self.components if c.name == name)

    def shutdown(self, drain_timeout: float = DRAIN_TIMEOUT, stop_timeout: float = STOP_TIMEOUT) -> None:
        """Drain, then stop every process (see the module docstring). Idempotent."""
        self._stopping.set()
        t0 = time.monotonic()
        _stop(self.components, drain_timeout, stop_timeout)
        self.infra.stop()
        log.info("graph %s stopped in %.1fs", self.graph.name, time.monotonic() - t0)

    def force_stop(self) -> None:
        """SIGKILL every process of the graph now (a second Ctrl-C)."""
        self._stopping.set()
        for c in self.components:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(c.proc.pid, signal.SIGKILL)
        for _name, proc in self.infra.procs:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)


def _ensure_model(settings: Settings) -> None:
    path = settings.model.path
    if os.path.isfile(os.path.join(path, "config.json")):
        return
    make = settings.model.make
    if make is None:
        raise UserError(f"model directory {path!r} has no config.json and the settings have no model.make")
    # local import: loads torch, which the launcher needs only to make a missing model
    from dynamo_dwdp.synthetic.checkpoint import write_checkpoint

    log.info("creating model %s (preset %s, seed %d)", path, make.preset, make.seed)
    write_checkpoint(path, make.preset, seed=make.seed, dtype=command_lines.MAKE_MODEL_DTYPES[make.dtype], force=True)


def _http_ok(url: str, timeout: float = 1.0) -> tuple[bool, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status == 200, r.read().decode(errors="replace")
    except OSError as exc:
        return False, str(exc)


def _signal(c: Component, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(c.proc.pid, sig)


def _wait(batch: list[Component], timeout: float) -> list[Component]:
    """Wait until every process of batch exited or timeout passed; returns those still running."""
    deadline = time.monotonic() + timeout
    for c in batch:
        try:
            c.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    return [c for c in batch if c.alive]


def _stop(components: list[Component], drain_timeout: float = DRAIN_TIMEOUT, stop_timeout: float = STOP_TIMEOUT) -> None:
    """Frontend first (it drains in-flight requests, bounded), then every worker group at once;
    SIGKILL whole sessions of stragglers. Nothing is left running when this returns."""
    frontends = [c for c in components if c.role == "frontend" and c.alive]
    for c in frontends:
        _signal(c, signal.SIGTERM)
    for c in _wait(frontends, drain_timeout):
        log.warning("%s still draining after %.0fs; killing it", c.name, drain_timeout)
    workers = [c for c in components if c.role != "frontend" and c.alive]
    for c in workers:
        _signal(c, signal.SIGTERM)
    for c in _wait(workers, stop_timeout):
        log.warning("%s did not stop in %.0fs; killing it", c.name, stop_timeout)
    for c in components:                 # whole sessions: nothing a process left behind survives
        _signal(c, signal.SIGKILL)
        c.proc.wait()


def _monitor(h: "ServeHandle", stop: threading.Event) -> None:
    """Restart a top-level process that exited while serving, with bounded exponential back-off
    (a process that then stays up for STABLE_AFTER seconds starts again from RESTART_BACKOFF)."""
    streak: dict[str, int] = {}            # name -> restarts in a row without a stable run
    due: dict[str, float] = {}             # name -> when to start it again
    started: dict[str, float] = {}         # name -> when it was last (re)started
    while not stop.wait(0.5):
        now = time.monotonic()
        if not (stop.is_set() or h._stopping.is_set()):
            for name in h.infra.restart_dead():               # etcd / NATS / the ZMQ broker: at once
                log.error("infra process %s had exited; started it again (log: %s/%s.log)", name, h.run_dir, name)
        for c in h.components:
            if stop.is_set() or h._stopping.is_set():
                return
            if c.alive:
                if streak.get(c.name) and now - started.get(c.name, now) > STABLE_AFTER:
                    streak[c.name] = 0
                continue
            if c.name not in due:                            # just seen dead: schedule the restart
                delay = min(RESTART_MAX_BACKOFF, RESTART_BACKOFF * 2 ** streak.get(c.name, 0))
                due[c.name] = now + delay
                log.error("%s exited with code %s; restarting it in %.1fs (log: %s)", c.name, c.proc.returncode,
                          delay, c.log_path)
            elif now >= due[c.name]:
                _signal(c, signal.SIGKILL)                   # anything left of the old session goes
                c.proc = _spawn(c.name, c.role, c.argv, c.env, os.path.dirname(c.log_path), c.system_ports, None).proc
                c.restarts += 1
                streak[c.name] = streak.get(c.name, 0) + 1
                started[c.name] = now
                del due[c.name]
                log.warning("%s restarted (restart %d)", c.name, c.restarts)


@contextlib.contextmanager
def serve_graph(graph_path: str, config_paths: list[str], overrides: dict | None = None, log_dir: str | None = None,
                http_port: int = 0, infra: str | None = None, health_timeout: float | None = None,
                worker_env: dict[str, str] | None = None, drain_timeout: float = DRAIN_TIMEOUT,
                stop_timeout: float = STOP_TIMEOUT) -> Iterator[ServeHandle]:
    """Start the graph, yield its handle while serving (processes restarted if they exit), then
    shut down: drain for at most `drain_timeout` s, stop workers within `stop_timeout` s."""
    overrides = dict(overrides or {})
    extra_env = dict(worker_env or {})
    skew = overrides.pop("expert_skew", None)
    if skew:
        hot = skew.get("hot_experts") or []
        extra_env["DWDP_EXPERT_SKEW"] = f"{','.join(str(e) for e in hot)}:{float(skew.get('bias', 0.0))}"
    if infra:
        overrides["infra.mode"] = infra
    graph = load_graph(graph_path)
    settings = load_settings(config_paths, overrides or None)
    check_compatible(graph, settings)
    if graph.engine != "native":
        raise UserError(f"{graph_path}: trtllm pools run on real clusters only (render them with `dynamo-dwdp k8s`)")
    _ensure_model(settings)
    run_dir = os.path.abspath(log_dir or os.path.join(settings.infra.log_dir, f"{graph.name}-{time.strftime('%Y%m%d-%H%M%S')}"))
    os.makedirs(run_dir, exist_ok=True)
    host = settings.infra.host
    inf = Infra(settings.infra.mode, run_dir, host)
    components: list[Component] = []
    stop_monitor = threading.Event()
    handle: ServeHandle | None = None
    monitor: threading.Thread | None = None
    try:
        inf.start()
        base_env = dict(os.environ, **inf.env(), **extra_env)
        # the launcher drains at the frontend before it stops a worker: no pre-drain sleep needed
        base_env.setdefault("DYN_GRACEFUL_SHUTDOWN_GRACE_PERIOD_SECS", "0")
        # Dynamo's canary checks (on by default in Kubernetes): an idle worker whose group is broken fails
        # them, so its /health says notready until the group is whole again
        base_env.setdefault("DYN_HEALTH_CHECK_ENABLED", "true")
        base_env.setdefault("DYN_CANARY_WAIT_TIME", "2")
        base_env.setdefault("DWDP_TORCH_THREADS", str(settings.engine.torch_threads or 1))
        base_env["PYTHONUNBUFFERED"] = "1"
        order = sorted(graph.pools, key=lambda p: {"prefill": 0, "agg": 1, "decode": 2}[p.role])
        for pool in order:
            env = dict(base_env, **command_lines.worker_env(settings, pool))
            for g in range(pool.replicas):
                argv = command_lines.group_argv(pool.ranks, command_lines.worker_argv(
                    graph, pool, settings, group_index=g, rank=None, rendezvous=inf.rendezvous(),
                    python=sys.executable), python=sys.executable)
                base_port = free_port_block(pool.ranks, host)
                name = f"{pool.name}-g{g}"
                components.append(_spawn(name, pool.role, argv, dict(env, DYN_SYSTEM_PORT=str(base_port)), run_dir,
                                         [base_port + r for r in range(pool.ranks)], pool))
        port = http_port or settings.infra.http_port or free_port(host)
        fe_argv = command_lines.frontend_argv(graph, settings, port, python=sys.executable)
        components.append(_spawn("frontend", "frontend", fe_argv, dict(base_env), run_dir, [], None))
        handle = ServeHandle(f"http://{host}:{port}", settings.model.name, graph, settings, run_dir, components, inf)
        _wait_healthy(handle, health_timeout or settings.infra.health_timeout_s)
        log.info("graph %s serving %s at %s (logs: %s)", graph.name, handle.model_name, handle.url, run_dir)
        monitor = threading.Thread(target=_monitor, args=(handle, stop_monitor), name="serve-monitor", daemon=True)
        monitor.start()
        yield handle
    finally:
        stop_monitor.set()
        if monitor is not None:
            monitor.join(timeout=5)
        if handle is not None:
            handle.shutdown(drain_timeout, stop_timeout)
        else:
            _stop(components, drain_timeout, stop_timeout)
            inf.stop()


def _spawn(name: str, role: str, argv: list[str], env: dict, run_dir: str, ports: list[int], pool: Pool | None) -> Component:
    path = os.path.join(run_dir, f"{name}.log")
    with open(path, "ab") as f:
        f.write(("$ " + " ".join(argv) + "\n").encode())
    logf = open(path, "ab")
    proc = subprocess.Popen(argv, stdout=logf, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    ranks = pool.ranks if pool else 1
    registers = 1 if (pool and get_strategy(pool.strategy).leader_only) else ranks
    return Component(name, role, proc, path, ports, ranks, registers if pool else 0, list(argv), dict(env))


def _wait_healthy(h: ServeHandle, timeout: float) -> None:
    """Every rank's /health is ready, the model is listed, and one real request completes."""
    deadline = time.monotonic() + timeout
    pending = {(c.name, p) for c in h.components for p in c.system_ports[: c.registers]}
    while True:
        dead = h.dead_components()
        if dead:
            name, code = dead[0]
            tail = _tail(h.component(name).log_path)
            raise UserError(f"{name} exited with code {code} during start-up; last log lines:\n{tail}")
        for name, port in list(pending):
            ok, body = _http_ok(f"http://{h.infra.host}:{port}/health")
            if ok and '"ready"' in body:
                pending.discard((name, port))
        if not pending:
            ok, body = _http_ok(h.url + "/v1/models")
            if ok and h.model_name in body and _probe(h):
                return
        if time.monotonic() > deadline:
            what = ", ".join(f"{n}:{p}" for n, p in sorted(pending)) or "the frontend / a first request"
            raise UserError(f"graph {h.graph.name} not healthy after {timeout:.0f}s (waiting for {what}); logs in {h.run_dir}")
        time.sleep(0.25)


def _probe(h: ServeHandle) -> bool:
    body = json.dumps({"model": h.model_name, "prompt": "warm up", "max_tokens": 1}).encode()
    req = urllib.request.Request(h.url + "/v1/completions", data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status == 200
    except OSError:
        return False


def _tail(path: str, n: int = 15) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-n:])
    except OSError:
        return "(no log)"
