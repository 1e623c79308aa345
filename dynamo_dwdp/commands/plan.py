"""`dynamo-dwdp plan`: roofline model of one MoE layer per rank; which strategy should win, and why.

Thin wrapper: the model lives in `dynamo_dwdp.planner.roofline` (JSON layout documented there).
"""
from __future__ import annotations

import argparse
import json

from dynamo_dwdp.errors import UserError
from dynamo_dwdp.planner.calibrate import load_calibration
from dynamo_dwdp.planner.hardware import HARDWARE, get_hardware
from dynamo_dwdp.planner.recommend import Workload, recommend
from dynamo_dwdp.planner.roofline import build_report, load_model_shape, render_table
from dynamo_dwdp.planner.step_model import predict_step, render_terms

DESCRIPTION = """\
Predict, per MoE layer and per rank, the compute time, DWDP's prefetch of all remote experts, DEP's
all-to-all + sync wait and TP's all-reduce, from MODEL_DIR/config.json and the datasheet (or
measured) rates of --gpu times a fixed achievable-efficiency factor. Says which strategy should win
for prefill and decode, why, and where DWDP's compute window starts to cover its prefetch
(the crossover tokens per iteration)."""

EPILOG = """\
examples:
  # DeepSeek-R1 NVFP4 on GB200, DWDP4 vs DEP4, one 16K prompt per rank per iteration
  dynamo-dwdp plan models/DeepSeek-R1 --gpu gb200 --ranks 4 --weight-dtype nvfp4 --tokens-per-iter 16384

  # the same, four 4K prompts per iteration (cheaper attention, same MoE work), prefill only, as JSON
  dynamo-dwdp plan models/DeepSeek-R1 --gpu gb200 --ranks 4 --weight-dtype nvfp4 \\
      --tokens-per-iter 16384 --batch 4 --phase prefill --json

  # the 2 x H200 test machine with its measured link; decode 128 sequences over 4K of context
  dynamo-dwdp plan models/tiny --gpu h200-measured --ranks 2 --tokens-per-iter 8192 \\
      --decode-batch 128 --context 4096

  # overlapping placement (L > P): 24 local experts, 20 fetched from each of 2 peers (E = 64)
  dynamo-dwdp plan models/DeepSeek-V2-Lite --gpu h200 --ranks 3 --tokens-per-iter 8192 \\
      --experts-per-rank 24 --prefetch-per-peer 20

  # one GPU's whole step, term by term, from the measured kernel records (docs/performance.md)
  dynamo-dwdp plan models/DeepSeek-V2-Lite --gpu h200 --ranks 2 --tokens-per-iter 8192 --decode-batch 64 \\
      --context 1000 --calibrate docs/results/calibration_h200_2026-12-02b.jsonl --explain --async-scheduling

  # deployment question: strategy and placement per pool, calibrated with measurements
  dynamo-dwdp plan models/DeepSeek-R1 --gpu gb200 --ranks 4 --weight-dtype nvfp4 --recommend \\
      --isl 8192 --osl 1024 --concurrency 256 --calibrate out/calibration.jsonl --json

JSON: prefill.dwdp.per_moe_layer.{t_compute_ms,t_prefetch_ms}, prefill.verdict, prefill.crossover, ...
(see the docstring of dynamo_dwdp/planner/roofline.py). Errors print "error: ..." and exit 2.
"""


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "plan",
        help="roofline model: which strategy should win, and why",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model_dir", metavar="MODEL_DIR", help="checkpoint directory holding config.json")
    p.add_argument("--gpu", required=True, help=f"machine model: {', '.join(HARDWARE)}")
    p.add_argument("--ranks", type=int, required=True, help="GPUs per group (DWDP group / DEP / TP size)")
    p.add_argument("--tokens-per-iter", type=int, metavar="T",
                   help="prefill tokens per rank per iteration (required without --recommend)")
    p.add_argument("--batch", type=int, default=1,
                   help="number of prefill sequences T is split into (attention is causal per sequence; default 1)")
    p.add_argument("--weight-dtype", choices=("bf16", "fp8", "nvfp4"),
                   help="expert weight format (default: from config.json quantization, else bf16)")
    p.add_argument("--dense-dtype", choices=("bf16", "fp8"),
                   help="attention projections / dense MLPs (default fp8 beside fp8/nvfp4 experts, else bf16)")
    p.add_argument("--attn-dtype", choices=("bf16", "fp8"), help="attention-core math (default bf16)")
    p.add_argument("--kv-dtype", choices=("bf16", "fp8"),
                   help="KV-cache storage (default fp8 beside fp8/nvfp4 experts, else bf16)")
    p.add_argument("--imbalance-cv", type=float, default=0.2,
                   help="CV of per-rank step time for DEP's sync wait (default 0.2; 0 = perfectly balanced)")
    p.add_argument("--experts-per-rank", type=int, metavar="L", help="DWDP local experts per rank")
    p.add_argument("--prefetch-per-peer", type=int, metavar="P",
                   help="DWDP experts pulled from each peer (E = L + (N-1)P; default P = floor(E/N))")
    p.add_argument("--phase", choices=("prefill", "decode", "both"), default="both",
                   help="which verdicts to compute (default both)")
    p.add_argument("--decode-batch", type=int, default=64, help="decode sequences per rank per step (default 64)")
    p.add_argument("--context", type=int,
                   help="cached tokens per decode sequence (default: prefill length T / batch)")
    p.add_argument("--link-gbps", type=float,
                   help="override the achieved peer-link bandwidth, GB/s per direction (e.g. a probe result)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--calibrate", metavar="BENCH.jsonl",
                   help="measured rates and latency floors replace the datasheet's (dynamo_dwdp/planner/calibrate.py)")
    p.add_argument("--explain", action="store_true",
                   help="also predict one GPU's whole step (strategy single) as a sum of named terms, each "
                        "from its measured record (dynamo_dwdp/planner/step_model.py); JSON: single_gpu_step")
    p.add_argument("--experts-touched", type=float, metavar="U",
                   help="with --explain: routed experts read per MoE layer in a decode step (e.g. measured; "
                        "default: the uniform-routing expectation)")
    p.add_argument("--async-scheduling", action="store_true",
                   help="with --explain: each step's host work overlaps its GPU work (engine.async_scheduling): "
                        "only the host time beyond the GPU terms counts")
    r = p.add_argument_group("deployment recommendation (dynamo_dwdp/planner/recommend.py)")
    r.add_argument("--recommend", action="store_true",
                   help="which strategy and DWDP placement per pool (prefill, decode), with predicted TPS/GPU")
    r.add_argument("--isl", type=int, help="input tokens per request")
    r.add_argument("--osl", type=int, help="output tokens per request")
    r.add_argument("--concurrency", type=int, help="requests in flight in the decode pool")
    r.add_argument("--tps-per-user", type=float, help="decode target, tokens/s per user (instead of --concurrency)")
    r.add_argument("--max-num-tokens", type=int, default=32768,
                   help="prefill tokens per rank per iteration (default 32768)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    hw = get_hardware(args.gpu)
    cal = None
    if args.calibrate:
        hw, cal = load_calibration(hw, args.calibrate)
    if args.link_gbps is not None:
        hw = hw.with_link_gbps(args.link_gbps)
    model = load_model_shape(args.model_dir)
    if args.recommend:
        if args.isl is None or args.osl is None:
            raise UserError("--recommend needs --isl and --osl")
        work = Workload(args.isl, args.osl, args.concurrency, args.tps_per_user, args.max_num_tokens,
                        args.imbalance_cv)
        answer = recommend(model, hw, args.ranks, work, weight_dtype=args.weight_dtype, calibration=cal)
        if args.json:
            print(json.dumps(answer, indent=2))
        else:
            for name, pool in answer["pools"].items():
                print(f"{name:<8} {pool['strategy']:<5} experts_per_rank={pool['experts_per_rank']} "
                      f"prefetch_per_peer={pool['prefetch_per_peer']} {pool['predicted_tps_per_gpu']:,.0f} tok/s/GPU")
            print(answer["reason"])
        return 0
    if args.tokens_per_iter is None:
        raise UserError("--tokens-per-iter is required (or use --recommend)")
    phases = ("prefill", "decode") if args.phase == "both" else (args.phase,)
    report = build_report(
        model,
        hw,
        args.ranks,
        args.tokens_per_iter,
        batch=args.batch,
        phases=phases,
        decode_batch=args.decode_batch,
        context=args.context,
        weight_dtype=args.weight_dtype,
        dense_dtype=args.dense_dtype,
        attn_dtype=args.attn_dtype,
        kv_dtype=args.kv_dtype,
        imbalance_cv=args.imbalance_cv,
        experts_per_rank=args.experts_per_rank,
        prefetch_per_peer=args.prefetch_per_peer,
    )
    steps = {}
    if args.explain:
        if args.experts_touched is not None and not 0 < args.experts_touched <= model.n_routed_experts:
            raise UserError(f"--experts-touched must be in (0, {model.n_routed_experts}], got {args.experts_touched}")
        for phase in phases:
            if phase == "prefill":
                steps[phase] = predict_step(model, hw, cal, phase="prefill", tokens=args.tokens_per_iter,
                                            batch=args.batch, weight_dtype=args.weight_dtype,
                                            dense_dtype=args.dense_dtype, kv_dtype=args.kv_dtype,
                                            overlap_host=args.async_scheduling)
            else:
                ctx = args.context if args.context is not None else args.tokens_per_iter / args.batch
                steps[phase] = predict_step(model, hw, cal, phase="decode", tokens=args.decode_batch, context=ctx,
                                            weight_dtype=args.weight_dtype, dense_dtype=args.dense_dtype,
                                            kv_dtype=args.kv_dtype, experts_touched=args.experts_touched,
                                            overlap_host=args.async_scheduling)
        report["single_gpu_step"] = {ph: pred.as_dict() for ph, pred in steps.items()}
        if cal is not None:
            report["calibration"] = cal.as_dict()
    elif args.experts_touched is not None:
        raise UserError("--experts-touched needs --explain")
    elif args.async_scheduling:
        raise UserError("--async-scheduling needs --explain")
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(render_table(report))
        for pred in steps.values():
            print()
            print(render_terms(pred))
    return 0
