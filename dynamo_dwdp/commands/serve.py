"""`dynamo-dwdp serve GRAPH`: launch a serving graph locally and stream a compact status line."""
from __future__ import annotations

import argparse
import logging
import signal
import sys
import time

EPILOG = """\
examples:
  dynamo-dwdp serve graphs/disagg_dwdp_decode.yaml                 # tiny CPU model, embedded infra
  dynamo-dwdp serve graphs/agg.yaml --http-port 8000
  dynamo-dwdp serve graphs/disagg_dep.yaml -f configs/tiny-cpu.yaml --infra etcd   # real etcd + NATS
  curl -s 127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
       -d '{"model":"tiny","messages":[{"role":"user","content":"Hello"}],"max_tokens":8}'

Graphs (graphs/*.yaml) say which pools exist and how each splits the model (strategy, ranks,
replicas); configs (configs/*.yaml, several -f merge in order) say which model, engine sizes and
infra. Logs: one file per process under runs/logs/<graph>-<time>/. A process that exits while
serving is restarted (bounded back-off); a failed rank restarts its whole group.
Ctrl-C (or SIGTERM) drains: the frontend finishes in-flight requests for at most --drain-timeout
seconds, then every worker stops; an idle graph stops within seconds. A second Ctrl-C stops
everything at once.
"""


def register(sub) -> None:
    p = sub.add_parser("serve", help="launch a serving graph locally", epilog=EPILOG,
                       description="Launch a Dynamo serving graph (frontend + pools) on this machine.",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("graph", help="graph YAML, e.g. graphs/disagg_dwdp_decode.yaml")
    p.add_argument("-f", "--config", action="append", default=None,
                   help="settings YAML (repeatable, later wins); default configs/tiny-cpu.yaml")
    p.add_argument("--http-port", type=int, default=0, help="frontend port (0 = the config's, else a free one)")
    p.add_argument("--infra", choices=["embedded", "etcd"], default=None, help="override infra.mode")
    p.add_argument("--log-dir", default=None, help="run directory (default runs/logs/<graph>-<time>)")
    p.add_argument("--drain-timeout", type=float, default=30.0,
                   help="seconds in-flight requests get to finish on Ctrl-C/SIGTERM (default 30)")
    p.add_argument("--status-every", type=float, default=10.0, help="seconds between status lines (0 = off)")
    p.add_argument("--exit-after", type=float, default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=run)


def status_line(handle, started: float) -> str:
    from dynamo_dwdp.ab.server_metrics import scrape_total  # local import: keeps `serve --help` fast

    up = int(time.monotonic() - started)
    parts = [f"up {up // 3600:02d}:{up % 3600 // 60:02d}:{up % 60:02d}"]
    for c in handle.components:
        state = 'ok' if c.alive else f'DEAD({c.proc.returncode}), restarting'
        parts.append(f"{c.name} {state}" + (f" (restarted {c.restarts}x)" if c.restarts else ""))
    gen = sum(scrape_total(u, "dwdp_generated_tokens_total") for urls in handle.worker_metrics_urls.values()
              for u in urls)
    parts.append(f"generated {int(gen)} tok")
    return " | ".join(parts)


def run(args) -> int:
    from dynamo_dwdp.launch.launcher import serve_graph  # local import: keeps `serve --help` fast

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    if args.drain_timeout < 0:
        print(f"error: --drain-timeout {args.drain_timeout}: must be >= 0", file=sys.stderr)
        return 2
    configs = args.config or ["configs/tiny-cpu.yaml"]
    stop = {"now": False, "handle": None}

    def on_signal(signum, _frame):
        if stop["handle"] is None:                          # still starting: unwind (serve_graph stops all)
            raise KeyboardInterrupt
        if stop["now"]:                                     # the second Ctrl-C: stop at once
            print("second signal: killing every process now", file=sys.stderr, flush=True)
            stop["handle"].force_stop()
            return
        stop["now"] = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    with serve_graph(args.graph, configs, http_port=args.http_port, infra=args.infra, log_dir=args.log_dir,
                     drain_timeout=args.drain_timeout) as h:
        stop["handle"] = h
        print(f"serving model '{h.model_name}' at {h.url}  (graph {h.graph.name}, {h.num_gpus} ranks, logs {h.run_dir})",
              flush=True)
        started = time.monotonic()
        last = 0.0
        reported: set[str] = set()
        while not stop["now"]:
            time.sleep(0.5)
            dead = dict(h.dead_components())
            for name, code in dead.items():
                if name not in reported:
                    reported.add(name)
                    print(f"component {name} exited with code {code}; restarting it (log: {h.component(name).log_path})",
                          flush=True)
            reported &= set(dead)
            if args.status_every and time.monotonic() - last > args.status_every:
                last = time.monotonic()
                try:
                    print(status_line(h, started), flush=True)
                except Exception as exc:  # status is best-effort
                    print(f"status unavailable: {exc}", flush=True)
            if args.exit_after is not None and time.monotonic() - started > args.exit_after:
                break
        print(f"shutting down: draining in-flight requests (at most {args.drain_timeout:.0f}s; Ctrl-C again to "
              "stop at once), then every worker, then infra", flush=True)
    return 0
