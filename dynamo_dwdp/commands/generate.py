"""`dynamo-dwdp generate`: one prompt through the engine, with any strategy on N local ranks."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from dynamo_dwdp.config.dwdp import DwdpSettings
from dynamo_dwdp.config.engine import EngineSettings
from dynamo_dwdp.errors import CheckpointError, PeerError, UserError
from dynamo_dwdp.model.config import load_model_config
from dynamo_dwdp.strategies import NAMES as STRATEGY_NAMES
from dynamo_dwdp.strategies import STRATEGIES, get_strategy
from dynamo_dwdp.worker.flags import add_setting_flags, section_values

ENGINE_AND_DWDP_FLAGS = ("--device", "--dtype", "--block-size", "--num-kv-blocks", "--dwdp-experts-per-rank",
                         "--dwdp-prefetch-per-peer", "--dwdp-routed-only", "--dwdp-contention-opt")
"""The worker flags `generate` takes too (same type, default and help as the worker's)."""

EPILOG = """\
examples:
  dynamo-dwdp generate --model models/tiny --prompt "Hello" --max-tokens 8
  dynamo-dwdp generate --model models/tiny --token-ids 5,17,99 --json
  dynamo-dwdp generate --model models/tiny --prompt "Hello" --strategy dwdp --ranks 2 --json
  dynamo-dwdp generate --model models/tiny --prompt "Hello" --strategy dep --ranks 3 --temperature 0.8 --seed 7

Every strategy prints rank 0's result; greedy output is identical across strategies (that is tested).
With --json, stdout holds exactly one JSON object: {"token_ids": [...], "text": "..."}.
"""


def register(sub) -> None:
    p = sub.add_parser("generate", help="generate from a checkpoint (any strategy, N local ranks)",
                       description="Generate from a DeepSeek-V3 checkpoint with this project's engine.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="model directory (config.json, *.safetensors, tokenizer.json)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text (tokenized with the model's tokenizer.json)")
    src.add_argument("--token-ids", help="comma-separated prompt token ids, e.g. 1,2,3")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--min-tokens", type=int, default=0)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--strategy", default="single", choices=STRATEGY_NAMES)
    p.add_argument("--ranks", type=int, default=1, help="processes in the group (strategies other than single)")
    add_setting_flags(p, ENGINE_AND_DWDP_FLAGS)
    p.add_argument("--json", action="store_true", help="print one JSON object and nothing else on stdout")
    p.set_defaults(func=run)


def _tokenizer(model_dir: str):
    from tokenizers import Tokenizer

    path = os.path.join(model_dir, "tokenizer.json")
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: missing (needed for --prompt; use --token-ids otherwise)")
    try:
        return Tokenizer.from_file(path)
    except Exception as exc:
        raise CheckpointError(f"{path}: not a valid tokenizer ({exc})") from None


def run(args) -> int:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    load_model_config(args.model)                      # fail fast with a clear message
    tok = None
    if args.token_ids is not None:
        try:
            prompt = [int(x) for x in args.token_ids.split(",") if x.strip()]
        except ValueError:
            raise UserError(f"--token-ids {args.token_ids!r}: expected comma-separated integers") from None
    else:
        tok = _tokenizer(args.model)
        prompt = tok.encode(args.prompt).ids
    strategy = get_strategy(args.strategy)
    if strategy.max_ranks is not None and args.ranks > strategy.max_ranks:
        groups = [n for n, s in STRATEGIES.items() if s.max_ranks is None]
        groups = ", ".join(groups[:-1]) + " or " + groups[-1]
        raise UserError(f"--strategy {args.strategy} runs one rank; pick {groups} for --ranks > 1")
    # local import: both load torch; `generate --help` and the checks above answer without it
    from dynamo_dwdp.engine.sampling import SamplingParams
    from dynamo_dwdp.rank.local_group import generate_rank, run_local_group

    params = SamplingParams(max_tokens=args.max_tokens, min_tokens=args.min_tokens, temperature=args.temperature,
                            top_k=args.top_k, top_p=args.top_p, seed=args.seed, ignore_eos=args.ignore_eos)
    params.validate()
    cfg = EngineSettings(**section_values(args, "engine"))
    dwdp = DwdpSettings(**section_values(args, "dwdp"))
    results = run_local_group(args.model, cfg, args.strategy, args.ranks, generate_rank,
                              [([prompt], params)] * args.ranks, dwdp=dwdp)
    failed = [r for r in results if r.error]
    if failed:
        first = failed[0]
        if first.user_error:
            raise UserError(first.error.splitlines()[0])
        raise PeerError(f"rank {first.rank} failed: {first.error}")
    ids = results[0].value[0]
    if tok is None and os.path.isfile(os.path.join(args.model, "tokenizer.json")):
        tok = _tokenizer(args.model)
    text = tok.decode(ids, skip_special_tokens=False) if tok is not None else ""
    if args.json:
        print(json.dumps({"token_ids": ids, "text": text}))
    else:
        print(text if text else " ".join(map(str, ids)))
    return 0
