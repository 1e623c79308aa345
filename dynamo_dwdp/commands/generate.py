"""`dynamo-dwdp generate`: one prompt through the engine, with any strategy on N local ranks."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

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
    p.add_argument("--strategy", default="single", choices=["single", "dp", "dwdp", "dep", "tp"])
    p.add_argument("--ranks", type=int, default=1, help="processes in the group (strategies other than single)")
    p.add_argument("--device", default="cpu", help="cpu | cuda (rank r uses cuda:r)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--num-kv-blocks", type=int, default=256)
    p.add_argument("--dwdp-experts-per-rank", type=int, default=None, help="L (default: chosen from E and N)")
    p.add_argument("--dwdp-prefetch-per-peer", type=int, default=None, help="P (E = L + (N-1)*P)")
    p.add_argument("--dwdp-routed-only", action="store_true", help="pull only the experts the router picked")
    p.add_argument("--dwdp-contention-opt", action="store_true", help="slice pulls and interleave peers")
    p.add_argument("--json", action="store_true", help="print one JSON object and nothing else on stdout")
    p.set_defaults(func=run)


def _tokenizer(model_dir: str):
    from tokenizers import Tokenizer

    from dynamo_dwdp.errors import CheckpointError

    path = os.path.join(model_dir, "tokenizer.json")
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: missing (needed for --prompt; use --token-ids otherwise)")
    try:
        return Tokenizer.from_file(path)
    except Exception as exc:
        raise CheckpointError(f"{path}: not a valid tokenizer ({exc})") from None


def run(args) -> int:
    from dynamo_dwdp.engine.config import EngineConfig
    from dynamo_dwdp.engine.sampling import SamplingParams
    from dynamo_dwdp.errors import PeerError, UserError
    from dynamo_dwdp.model.config import load_model_config
    from dynamo_dwdp.rank.build import DWDPOptions
    from dynamo_dwdp.rank.local_group import generate_rank, run_local_group

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
    if args.strategy == "single" and args.ranks != 1:
        raise UserError("--strategy single runs one rank; pick dp, dwdp, dep or tp for --ranks > 1")
    params = SamplingParams(max_tokens=args.max_tokens, min_tokens=args.min_tokens, temperature=args.temperature,
                            top_k=args.top_k, top_p=args.top_p, seed=args.seed, ignore_eos=args.ignore_eos)
    params.validate()
    cfg = EngineConfig(block_size=args.block_size, num_kv_blocks=args.num_kv_blocks, device=args.device,
                       dtype=args.dtype)
    dwdp = DWDPOptions(args.dwdp_experts_per_rank, args.dwdp_prefetch_per_peer, args.dwdp_contention_opt,
                       args.dwdp_routed_only)
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
