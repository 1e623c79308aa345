"""`dynamo-dwdp`: one entry point, one sub-command per job.

Each sub-command lives in `dynamo_dwdp/commands/<name>.py` and exposes `register(subparsers)`, which
adds its parser and sets `func=run` (a callable taking the parsed args and returning an exit code).
Modules are imported lazily so that `dynamo-dwdp --help` stays fast; for the same reason a command
module imports what loads torch (the engine, the rank group, the checkpoint writer) inside `run()`,
so that `dynamo-dwdp COMMAND --help` loads nothing heavy. Each such function-local import says why
with a `# local import: <reason>` comment (`scripts/check_layers.py` fails on one without).
"""
from __future__ import annotations

import argparse
import importlib
import sys

# (sub-command, module under dynamo_dwdp.commands, one-line help)
COMMANDS = [
    ("make-model", "make_model", "write a random DeepSeek-V3 checkpoint + offline tokenizer"),
    ("generate", "generate", "generate from a checkpoint with one engine (any strategy, N local ranks)"),
    ("serve", "serve", "launch a serving graph (frontend + prefill/decode pools) locally"),
    ("k8s", "k8s", "render/validate DynamoGraphDeployment manifests for the graphs"),
    ("ab", "ab", "A/B compare serving graphs over a load sweep; Pareto report"),
    ("plan", "plan", "roofline model: which strategy should win, and why"),
    ("bench", "bench", "engine micro-benchmarks (step-time split, tokens/s per GPU)"),
]

EPILOG = """\
typical session:
  dynamo-dwdp make-model models/tiny --preset tiny
  dynamo-dwdp generate --model models/tiny --prompt "Hello" --strategy dwdp --ranks 2
  dynamo-dwdp serve graphs/disagg_dwdp_decode.yaml
  dynamo-dwdp ab graphs/disagg_dep.yaml graphs/disagg_dwdp_decode.yaml --workload configs/workloads/tiny-cv20.yaml --out out/ab
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dynamo-dwdp",
        description="DWDP (Distributed Weight Data Parallelism) for MoE serving on NVIDIA Dynamo.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    wanted = sys.argv[1] if len(sys.argv) > 1 else None
    for name, module, help_text in COMMANDS:
        if wanted in (name,):
            mod = importlib.import_module(f"dynamo_dwdp.commands.{module}")
            mod.register(sub)
        else:
            sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    parser = build_parser()
    args, _ = parser.parse_known_args()
    if not args.command:
        parser.print_help()
        return 2
    args = parser.parse_args()
    from dynamo_dwdp.errors import run_with_clean_errors   # local import: keeps `dynamo-dwdp --help` to argparse

    return run_with_clean_errors(args.func, args)


if __name__ == "__main__":
    sys.exit(main())
