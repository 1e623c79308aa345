"""`dynamo-dwdp ab`: A/B compare serving graphs over a load sweep; Pareto report.

Thin wrapper: the work lives in `dynamo_dwdp.ab.harness` (files and layout documented there).
"""
from __future__ import annotations

import argparse

from dynamo_dwdp.errors import UserError

DEFAULT_CONFIG = "configs/tiny-cpu.yaml"  # as `dynamo-dwdp serve`

DESCRIPTION = """\
Launch each GRAPH in turn (A = the baseline, then B, ...), warm it up, drive the same requests
(same seed) through the frontend's OpenAI API over the workload's concurrency or request-rate sweep,
scrape the workers' /metrics around every point, and tear it down. Then write to --out:

  results.json  every number, per graph and point (and the server-side deltas)
  results.csv   one row per (graph, point)
  pareto.png    output TPS/GPU vs TPS/user, one curve (Pareto frontier) per graph, points labelled
  report.md     per point: requests ok/failed, TTFT p50/p99 (incl. queueing), ITL p50/p99, TPS/user,
                TPS/GPU, goodput under the workload's TTFT/TPOT SLOs; the ratio B/A of TPS/GPU at
                matched TPS/user (interpolated along both frontiers, matched range stated); the
                step-time split per pool (compute / exposed prefetch / sync wait); the roofline
                planner's prediction next to it for DWDP pools.

TPS/GPU divides by the GPUs the graph really uses (sum over pools of ranks x replicas). A finished
(graph, point) is kept in --out; --resume runs only the missing ones."""

EPILOG = """\
examples:
  # the decode A/B on the CPU tiny model: DEP x2 baseline vs DWDP x2
  dynamo-dwdp ab graphs/disagg_dep.yaml graphs/disagg_dwdp_decode.yaml -f configs/tiny-cpu.yaml \\
      --workload configs/workloads/tiny-cv20.yaml --out out/ab-tiny

  # finish an interrupted run (points already in out/ab-tiny are not re-run)
  dynamo-dwdp ab graphs/disagg_dep.yaml graphs/disagg_dwdp_decode.yaml -f configs/tiny-cpu.yaml \\
      --workload configs/workloads/tiny-cv20.yaml --out out/ab-tiny --resume

  # three graphs (B and C are each compared with A), driven by aiperf instead of the built-in client
  dynamo-dwdp ab graphs/disagg_dep.yaml graphs/disagg_dwdp_decode.yaml graphs/disagg_dwdp_prefill.yaml \\
      -f configs/h200-v2lite.yaml --workload configs/workloads/gpu-isl8k.yaml --out out/ab-gpu --client aiperf

  # rebuild the report from the points already measured (nothing is launched)
  dynamo-dwdp ab graphs/disagg_dep.yaml graphs/disagg_dwdp_decode.yaml -f configs/tiny-cpu.yaml \\
      --workload configs/workloads/tiny-cv20.yaml --out out/ab-tiny --report-only

workload files: configs/workloads/*.yaml (schema in dynamo_dwdp/ab/workload.py): ISL/OSL mean + CV
(lognormal or normal, clipped), concurrency or request_rate list, requests per point, warm-up,
shared-prefix ratio, expert_skew {hot_experts, bias}, SLOs {ttft_ms, tpot_ms}, seed.
Requests use top-level `ignore_eos` + `min_tokens` (exact OSL) and token-id prompts on
/v1/completions (exact ISL). Errors print "error: ..." and exit 2; exit 1 when a graph failed.
"""


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "ab",
        help="A/B compare serving graphs over a load sweep; Pareto report",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("graphs", nargs="+", metavar="GRAPH", help="graph files (graphs/*.yaml); the first is the baseline A")
    p.add_argument("-f", "--config", dest="configs", action="append", default=None, metavar="CONFIG",
                   help="settings file (configs/*.yaml), repeatable; merged in order, later wins "
                        f"(default {DEFAULT_CONFIG}); every graph is launched with the same settings")
    p.add_argument("--workload", required=True, metavar="WORKLOAD.yaml", help="workload file (configs/workloads/*.yaml)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (results, per-point files, logs)")
    p.add_argument("--client", choices=("native", "aiperf"), default="native",
                   help="load generator: the built-in asyncio client (default) or aiperf (optional extra)")
    p.add_argument("--resume", action="store_true", help="keep the finished points in DIR and run the rest")
    p.add_argument("--overwrite", action="store_true", help="discard the points already in DIR and start again")
    p.add_argument("--report-only", action="store_true", help="only rebuild the report files from DIR")
    p.add_argument("--http-port", type=int, default=0, help="frontend port for every graph (default 0 = a free port)")
    p.add_argument("--infra", choices=("embedded", "etcd"), default=None,
                   help="discovery/event plane for the launch (default: the settings' infra.mode)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from dynamo_dwdp.ab import harness   # local import: loads numpy and the load generator; keeps `ab --help` fast

    if args.resume and args.overwrite:
        raise UserError("--resume and --overwrite exclude each other (allowed: one of them)")
    args.configs = args.configs or [DEFAULT_CONFIG]
    if args.report_only:
        res = harness.report_only(args.graphs, workload_path=args.workload, out_dir=args.out, config_paths=args.configs,
                             client=args.client)
    else:
        res = harness.run_ab(args.graphs, workload_path=args.workload, out_dir=args.out, config_paths=args.configs,
                        client=args.client, resume=args.resume, overwrite=args.overwrite,
                        progress=not args.no_progress, http_port=args.http_port, infra=args.infra)
    print(f"wrote {args.out}/report.md, results.json, results.csv, pareto.png")
    for c in res.get("comparisons", []):
        if c.get("mean") is not None:
            lo, hi = c["matched_range"]
            print(f"{c['candidate']}/{c['baseline']} TPS/GPU at matched TPS/user: {c['mean']:.3f}x "
                  f"(TPS/user {lo:.1f}-{hi:.1f})")
        else:
            print(f"{c['candidate']}/{c['baseline']}: not comparable ({c.get('note')})")
    failed = [g for g in res.get("graphs", []) if str(g.get("status", "")).startswith("failed")]
    for g in failed:
        print(f"{g['label']} {g['name']}: {g['status']}")
    return 1 if failed else 0
