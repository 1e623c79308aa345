"""`dynamo-dwdp make-model`: write a random DeepSeek checkpoint + offline tokenizer (see synthetic/checkpoint.py)."""
from __future__ import annotations

import argparse

from dynamo_dwdp.errors import UserError
from dynamo_dwdp.synthetic.presets import DTYPES, LIKE, PRESETS, WEIGHT_FORMATS, get_preset

EXAMPLES = """\
examples:
  dynamo-dwdp make-model models/tiny --preset tiny
  dynamo-dwdp make-model models/small --preset small --seed 7
  dynamo-dwdp make-model models/v2l-4 --preset v2-lite-shape --num-layers 4 --device cuda
  dynamo-dwdp make-model models/tiny --preset tiny --dtype bf16 --force
  dynamo-dwdp make-model models/v3-4 --like deepseek-v3 --layers 4 --weight-format fp8 --device cuda
  dynamo-dwdp make-model models/v2l --like deepseek-v2-lite --layers 6

The same preset + seed + dtype (+ --num-layers) gives byte-identical files on any machine and device.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    presets = "; ".join(f"{p.name}: {p.description}" for p in PRESETS.values() if not p.like)
    likes = "; ".join(f"{p.name}: {p.description}" for p in PRESETS.values() if p.like)
    p = subparsers.add_parser(
        "make-model",
        help="write a random DeepSeek checkpoint + offline tokenizer",
        description="Write a DeepSeek-V3/V2-architecture checkpoint with random weights in the official Hugging Face "
                    "layout (config.json, model*.safetensors, generation_config.json) plus an offline byte-level "
                    "BPE tokenizer with a DeepSeek chat template.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("out", metavar="OUT", help="output directory (created; must be empty unless --force)")
    shape = p.add_mutually_exclusive_group(required=True)
    shape.add_argument("--preset", metavar="NAME", help=f"model shape. {presets}")
    shape.add_argument("--like", metavar="MODEL", choices=LIKE,
                       help=f"the shape and config.json fields of a published model. {likes}")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--dtype", default=None, metavar="{fp32,bf16}",
                   help="weight dtype (default: fp32 for tiny/small, bf16 for v2-lite-shape)")
    p.add_argument("--num-layers", "--layers", dest="num_layers", type=int, default=None, metavar="N",
                   help="override the preset's number of layers (benchmarks use fewer)")
    p.add_argument("--weight-format", default="float", choices=WEIGHT_FORMATS,
                   help="float: every tensor in --dtype (default); fp8: the official DeepSeek-V3 FP8 layout "
                        "(float8_e4m3fn projections + float32 weight_scale_inv per 128x128 block, the rest in --dtype)")
    p.add_argument("--force", action="store_true",
                   help="write into a non-empty OUT, replacing the files this command writes")
    p.add_argument("--device", default="cpu",
                   help="device that generates the values, e.g. cuda (same bytes as cpu, faster; default cpu)")
    p.add_argument("--max-shard-gib", type=float, default=4.0, metavar="GIB",
                   help="split the weights into shards of at most this size (default 4)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar and no summary")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    preset = args.preset or args.like
    get_preset(preset)                                       # bad input -> UserError before torch or any I/O
    if args.dtype is not None and args.dtype not in DTYPES:
        raise UserError(f"unknown --dtype {args.dtype!r}; choose one of: {', '.join(DTYPES)}")
    if not args.max_shard_gib > 0:
        raise UserError(f"--max-shard-gib must be > 0, got {args.max_shard_gib}")
    device = _check_device(args.device)

    from dynamo_dwdp.synthetic.checkpoint import write_checkpoint   # local import: loads torch, after input is checked
    summary = write_checkpoint(
        args.out, preset, seed=args.seed, dtype=args.dtype, num_layers=args.num_layers,
        force=args.force, quiet=args.quiet, device=device, max_shard_bytes=int(args.max_shard_gib * 2**30),
        weight_format=args.weight_format,
    )
    if not args.quiet:
        size = sum(summary.files.values())
        print(f"wrote {summary.out_dir}: preset {preset} ({args.weight_format}), {summary.params:,} parameters, "
              f"{len(summary.files)} files, {size / 2**20:,.1f} MiB, {summary.seconds:.1f} s")
    return 0


def _check_device(name: str):
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UserError(f"unknown --device {name!r}; use cpu or cuda[:N]") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine")
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--device {name!r} is not supported; use cpu or cuda[:N]")
    return device
