"""`dynamo-dwdp bench engine|table|matrix`: engine micro-benchmarks on N local ranks.

Thin wrapper: the work lives in `dynamo_dwdp.bench.engine_bench` (measurement, JSON layout),
`dynamo_dwdp.planner.flops` (FLOP / HBM-byte model) and `dynamo_dwdp.bench.matrix` (matrix, table).
"""
from __future__ import annotations

import argparse
import ast
import functools
import importlib.util
import json
import logging
import sys

from dynamo_dwdp.bench import matrix
from dynamo_dwdp.bench.engine_bench import (DTYPES, PHASES, BenchSetup, Point, append_jsonl, parse_expert_skew,
                                            render_text, run_engine_bench)
from dynamo_dwdp.config.dwdp import DwdpSettings
from dynamo_dwdp.errors import UserError
from dynamo_dwdp.model.config import load_model_config
from dynamo_dwdp.worker.flags import add_setting_flags, section_values
from dynamo_dwdp.worker.main import SWITCH_INTERVAL_S as WORKER_SWITCH_INTERVAL_S

DESCRIPTION = """\
Engine micro-benchmarks: N rank processes drive the model runner directly with fixed shapes
(no scheduler), and report the step time (max over ranks per step), its split into compute /
exposed DWDP prefetch / sync wait (DEP all-to-all, TP all-reduce), remote bytes pulled, tokens/s
per GPU, achieved FLOP/s and HBM bytes/s (fractions of the --hw ceilings on CUDA), and the roofline
planner's prediction for the same point."""

ENGINE_EPILOG = """\
examples:
  # CPU: DWDP on 2 ranks, 64 prefill tokens per rank per step in 2 sequences
  dynamo-dwdp bench engine --model models/tiny --strategy dwdp --ranks 2 --phase prefill --tokens-per-iter 64 --batch 2

  # DEP with imbalanced ranks (CV 0.2), decode 8 sequences over 128 cached tokens, JSON appended to a file
  dynamo-dwdp bench engine --model models/tiny --strategy dep --ranks 2 --phase decode --batch 8 --context 128 \\
      --imbalance-cv 0.2 --json --out out/bench/engine.jsonl

  # GPU: 2 x H200, bf16, 8K prefill tokens per rank, DWDP with sliced, peer-interleaved pulls
  dynamo-dwdp bench engine --model models/v2-lite --strategy dwdp --ranks 2 --phase prefill \\
      --tokens-per-iter 8192 --device cuda --dtype bfloat16 --dwdp-contention-opt

strategies: single (every rank holds the whole model; N independent replicas), dwdp, dep, tp (rank 0
drives all ranks' tokens as one batch). --json prints one JSON object per run (layout in
dynamo_dwdp/bench/engine_bench.py). Errors print "error: ..." and exit 2.
"""

HOST_EPILOG = """\
examples:
  # the default sweep: batch 1, 8, 64, 256 at the EngineCore, AsyncEngine, worker and Dynamo levels
  dynamo-dwdp bench host

  # per-sequence Python work only (tiny vocabulary: the sampling math is negligible), with a profile
  dynamo-dwdp bench host --batch 64 --vocab 1024 --levels core --profile
"""

TABLE_EPILOG = """\
examples:
  dynamo-dwdp bench table out/bench/engine.jsonl            # aligned text
  dynamo-dwdp bench table out/bench/engine.jsonl --md       # markdown, e.g. for docs/performance.md
"""

MATRIX_EPILOG = """\
examples:
  # the standard matrix on 2 GPUs (resumable: re-running skips the points already in --out)
  dynamo-dwdp bench matrix --model models/v2-lite --ranks 2 --device cuda --out out/bench/matrix-n2.jsonl

  # a smaller sweep on 4 GPUs
  dynamo-dwdp bench matrix --model models/v2-lite --ranks 4 --device cuda --prefill-tokens 4096,16384 \\
      --decode-batches 32,128 --context 2048 --steps 5

  # CPU smoke: tiny model written to a temporary folder, tiny shapes
  dynamo-dwdp bench matrix --quick --ranks 2 --out out/bench/quick.jsonl
"""


def register(subparsers) -> None:
    p = subparsers.add_parser("bench", help="engine micro-benchmarks (step-time split, tokens/s per GPU)",
                              description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="bench_command", metavar="{engine,host,table,matrix}")
    p.set_defaults(func=_missing)

    e = sub.add_parser("engine", help="measure one point (strategy x shape) on N local ranks",
                       description=DESCRIPTION, epilog=ENGINE_EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    e.add_argument("--model", required=True, help="model directory (config.json + safetensors)")
    e.add_argument("--strategy", required=True, help="single | dwdp | dep | tp")
    e.add_argument("--ranks", type=int, default=2, help="rank processes (GPUs) in the group (default 2)")
    e.add_argument("--phase", required=True, help="prefill | decode")
    e.add_argument("--tokens-per-iter", type=int, metavar="T",
                   help="prefill: tokens per rank per step (required); decode: sequences per rank if --batch is not given")
    e.add_argument("--batch", type=int, metavar="B",
                   help="prefill: sequences T is split into (default 1); decode: sequences per rank")
    e.add_argument("--context", type=int, default=1024, metavar="C",
                   help="decode: cached tokens per sequence (default 1024)")
    e.add_argument("--imbalance-cv", type=float, default=0.0, metavar="CV",
                   help="rank r's share is T*(1+CV*z), z a seeded standard-normal draw per (rank, step) (default 0)")
    e.add_argument("--expert-skew", metavar="K:BIAS",
                   help="make experts 0..K-1 hot: +BIAS on their router selection score (e.g. 4:0.5)")
    e.add_argument("--steps", type=int, default=10, help="timed steps (default 10)")
    e.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    e.add_argument("--seed", type=int, default=0, help="seed of the imbalance draws and token ids (default 0)")
    e.add_argument("--device", default="cpu", help="cpu | cuda (rank r uses cuda:r) (default cpu)")
    e.add_argument("--dtype", default="float32", help="float32 | bfloat16 (default float32)")
    e.add_argument("--hw", default="h200-measured",
                   help="machine model for the ceilings and the planner (see `dynamo-dwdp plan --help`)")
    e.add_argument("--block-size", type=int, default=16, help="KV block size in tokens (default 16)")
    add_setting_flags(e, ("--dwdp-routed-only", "--dwdp-contention-opt"))      # DWDP variants (strategy dwdp)
    e.add_argument("--cuda-graphs", action="store_true",
                   help="replay decode steps from CUDA graphs (cuda, bf16; strategies single and dwdp all-remote: "
                        "dep and tp run eagerly)")
    e.add_argument("--async-scheduling", action="store_true",
                   help="time steps as the engine runs them with engine.async_scheduling: each step launched "
                        "before the previous one is waited for, its tokens (greedy) fed on the device; a step's "
                        "time is then its share of the pipeline's wall time (strategies single, dp, dwdp)")
    e.add_argument("--attention", default="auto",
                   help="prefill attention: auto (SDPA on cuda, reference on cpu) | reference | sdpa (default auto)")
    e.add_argument("--weights", default="native",
                   help="native | fp8-block: experts and dense linears quantized to FP8 (128x128 blocks) at load, "
                        "cuda only | fp8-block-a8: the same, routed experts with FP8 activations (default native)")
    e.add_argument("--calibrate", metavar="CALIBRATION.jsonl",
                   help="`plan --calibrate` file: strategy single also records the step model's whole-step "
                        "prediction (prediction.step_model)")
    e.add_argument("--timeout", type=float, default=1800.0, help="seconds before the group is abandoned")
    e.add_argument("--json", action="store_true", help="print one JSON object (and nothing else) on stdout")
    e.add_argument("--out", metavar="FILE.jsonl", help="append the result as one JSON line")
    e.set_defaults(func=run_engine)

    h = sub.add_parser("host", help="host ms per decode step at batch B (everything real but the forward)",
                       description=_module_doc("dynamo_dwdp.bench.host_bench"), epilog=HOST_EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    h.add_argument("--batch", default="1,8,64,256", help="running sequences, comma list (default 1,8,64,256)")
    h.add_argument("--levels", default="core,async,worker,dynamo",
                   help="comma list of core, async, worker, dynamo (default all)")
    h.add_argument("--prompt-len", type=int, default=1024, help="prompt tokens per request (default 1024)")
    h.add_argument("--steps", type=int, default=32, help="timed decode steps (default 32)")
    h.add_argument("--warmup", type=int, default=4, help="untimed decode steps first (default 4)")
    h.add_argument("--vocab", type=int, default=102400, help="logits width (default 102400, DeepSeek-V2-Lite)")
    h.add_argument("--temperature", type=float, default=1.0,
                   help="sampling temperature (default 1.0: what the frontend sends when a request names none)")
    h.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (default 1.0: off)")
    h.add_argument("--engine-busy-ms", type=float, default=0.0,
                   help="dynamo level: a thread in the serving process holds the GIL like an engine thread, this "
                        "many ms of Python work between hand-overs (default 0: no such thread)")
    h.add_argument("--switch-interval-ms", type=float, default=None,
                   help="dynamo level: the serving process's GIL switch interval (default: the worker's, "
                        f"{WORKER_SWITCH_INTERVAL_S * 1e3:g} ms)")
    h.add_argument("--profile", action="store_true", help="print a cProfile (by own time) of each timed window")
    h.add_argument("--json", action="store_true", help="print one JSON object per point (and nothing else)")
    h.set_defaults(func=run_host)

    t = sub.add_parser("table", help="render results (JSONL) as a table", epilog=TABLE_EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("results", metavar="RESULTS.jsonl")
    t.add_argument("--md", action="store_true", help="markdown instead of aligned text")
    t.set_defaults(func=run_table)

    m = sub.add_parser("matrix", help="the standard strategy x phase x imbalance matrix (resumable)",
                       description="Run the standard matrix; see dynamo_dwdp/bench/matrix.py.",
                       epilog=MATRIX_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    m.add_argument("--model", help="model directory (optional with --quick)")
    m.add_argument("--ranks", type=int, default=2, help="GPUs per group, any N >= 2 (default 2)")
    m.add_argument("--device", help="cpu | cuda (default cuda; --quick: cpu)")
    m.add_argument("--dtype", help="float32 | bfloat16 (default bfloat16; --quick: float32)")
    m.add_argument("--strategies", default="dwdp,dep,tp", help="comma list (default dwdp,dep,tp)")
    m.add_argument("--prefill-tokens",
                   help="prefill tokens per rank per step, comma list (default 2048,4096,8192,16384; "
                        "--quick: 16,32; '' for none)")
    m.add_argument("--prefill-batch", type=int, default=1, help="prefill sequences per rank per step (default 1)")
    m.add_argument("--decode-batches",
                   help="decode sequences per rank, comma list (default 8,32,64,128; --quick: 2,4; '' for none)")
    m.add_argument("--context", type=int, help="decode: cached tokens per sequence (default 4096; --quick: 8)")
    m.add_argument("--imbalance", default="0,0.2", help="imbalance CVs, comma list (default 0,0.2)")
    m.add_argument("--expert-skew", metavar="K:BIAS", help="hot experts for every point")
    m.add_argument("--steps", type=int, help="timed steps per point (default 10; --quick: 2)")
    m.add_argument("--warmup", type=int, help="untimed steps per point (default 3; --quick: 1)")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--hw", default="h200-measured")
    m.add_argument("--out", metavar="FILE.jsonl",
                   help="results (appended; default out/bench/engine-matrix-n<N>-<device>.jsonl); table beside it (.md)")
    m.add_argument("--quick", action="store_true", help="CPU smoke: tiny model and shapes")
    m.add_argument("--cuda-graphs", action="store_true",
                   help="decode steps from CUDA graphs for every strategy that allows capture")
    m.set_defaults(func=run_matrix)


def _missing(args) -> int:
    raise UserError("bench: choose a sub-command: engine, host, table or matrix (see `dynamo-dwdp bench --help`)")


def _ints(text: str, flag: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise UserError(f"{flag} {text!r}: expected comma-separated integers") from None
    if any(v < 1 for v in vals):
        raise UserError(f"{flag} {text!r}: every value must be >= 1")
    return vals


def _floats(text: str, flag: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise UserError(f"{flag} {text!r}: expected comma-separated numbers") from None


def _dtype(text: str) -> str:
    if text not in DTYPES:
        raise UserError(f"--dtype {text!r} is not one of float32, bfloat16")
    return DTYPES[text]


def run_engine(args) -> int:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    setup = BenchSetup(model_dir=args.model, strategy=args.strategy, ranks=args.ranks, device=args.device,
                       dtype=_dtype(args.dtype),
                       dwdp=DwdpSettings(**section_values(args, "dwdp")),
                       hw=args.hw, block_size=args.block_size,
                       timeout=args.timeout, cuda_graphs=args.cuda_graphs, attention=args.attention,
                       weights=args.weights, calibration=args.calibrate,
                       async_scheduling=args.async_scheduling).validate()
    if args.phase not in PHASES:
        raise UserError(f"--phase {args.phase!r} is not one of {', '.join(PHASES)}")
    cfg = load_model_config(args.model)
    skew = parse_expert_skew(args.expert_skew, cfg.n_routed_experts)
    if skew:
        setup = BenchSetup(**{**setup.__dict__, "expert_skew": skew})
    if args.phase == "prefill":
        if args.tokens_per_iter is None:
            raise UserError("--phase prefill needs --tokens-per-iter T (prefill tokens per rank per step)")
        point = Point("prefill", args.tokens_per_iter, args.batch or 1, 0, args.imbalance_cv, args.steps,
                      args.warmup, args.seed)
    else:
        b = args.batch if args.batch is not None else args.tokens_per_iter
        if b is None:
            raise UserError("--phase decode needs --batch B (sequences per rank)")
        if args.tokens_per_iter is not None and args.batch is not None and args.tokens_per_iter != args.batch:
            raise UserError(f"--phase decode: --tokens-per-iter {args.tokens_per_iter} must equal --batch "
                            f"{args.batch} (one new token per sequence) or be left out")
        point = Point("decode", b, b, args.context, args.imbalance_cv, args.steps, args.warmup, args.seed)
    point.validate()
    result = run_engine_bench(setup, point)
    if args.out:
        append_jsonl(args.out, [result])
    if args.json:
        print(json.dumps(result, sort_keys=True))
    else:
        print(render_text(result))
        if args.out:
            print(f"  appended to {args.out}")
    return 0


def _module_doc(name: str) -> str | None:
    """A module's docstring read from its source, without importing it (bench host's module imports torch and
    the engine; every other bench command, its errors included, answers without them)."""
    with open(importlib.util.find_spec(name).origin, encoding="utf-8") as f:
        return ast.get_docstring(ast.parse(f.read()), clean=False)


def run_host(args) -> int:
    from dynamo_dwdp.bench import host_bench  # local import: torch and the engine, for `bench host` only

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    levels = [x.strip() for x in args.levels.split(",") if x.strip()]
    bad = [x for x in levels if x not in host_bench.LEVELS]
    if bad or not levels:
        raise UserError(f"--levels {args.levels!r}: choose from {', '.join(host_bench.LEVELS)}")
    points = [host_bench.HostPoint(b, args.prompt_len, args.steps, args.warmup, args.vocab, args.temperature,
                                   args.top_p).validate() for b in _ints(args.batch, "--batch")]
    setup = stream = chunks = None
    if "worker" in levels or "dynamo" in levels:
        from dynamo_dwdp.worker.host_path import dynamo_chunk_seconds, worker_stream  # local import: needs Dynamo

        setup, stream = worker_stream()
        switch_s = WORKER_SWITCH_INTERVAL_S if args.switch_interval_ms is None else args.switch_interval_ms / 1e3
        if args.engine_busy_ms < 0 or switch_s <= 0:
            raise UserError("--engine-busy-ms must be >= 0 and --switch-interval-ms > 0")
        chunks = functools.partial(dynamo_chunk_seconds, engine_busy_ms=args.engine_busy_ms,
                                   switch_interval_s=switch_s)
    results = []
    for level in levels:
        for point in points:
            r = host_bench.run_point(point, level, stream, setup, profile=args.profile, dynamo_chunks=chunks)
            results.append(r)
            if args.json:
                print(json.dumps(r.as_dict(), sort_keys=True), flush=True)
            elif args.profile:
                print(f"--- {level} batch {point.batch}: {r.window.host_ms():.3f} host ms/step\n{r.window.profile}")
    if not args.json:
        print(host_bench.render(results))
    return 0


def run_table(args) -> int:
    print(matrix.render_results_table(matrix.load_jsonl(args.results), markdown=args.md), end="")
    return 0


def run_matrix(args) -> int:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    spec = matrix.MatrixSpec(
        model_dir=args.model, ranks=args.ranks, device=args.device,
        dtype=None if args.dtype is None else _dtype(args.dtype),
        strategies=tuple(s.strip() for s in args.strategies.split(",") if s.strip()),
        prefill_tokens=None if args.prefill_tokens is None else _ints(args.prefill_tokens, "--prefill-tokens"),
        prefill_batch=args.prefill_batch,
        decode_batches=None if args.decode_batches is None else _ints(args.decode_batches, "--decode-batches"),
        context=args.context,
        imbalance=_floats(args.imbalance, "--imbalance"), steps=args.steps, warmup=args.warmup, seed=args.seed,
        hw=args.hw, expert_skew=parse_expert_skew(args.expert_skew), out=args.out, quick=args.quick,
        cuda_graphs=args.cuda_graphs,
    )
    out, md, ran = matrix.run_matrix(spec, progress=lambda line: print(line, flush=True))
    print(f"{ran} point(s) run; results {out}; table {md}")
    return 0
