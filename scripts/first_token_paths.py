"""Which forward computes a served request's first token: the greedy probe, re-run in one process.

  python3 scripts/first_token_paths.py --model DIR --dtype bfloat16 --device cuda --tokens 24 PROMPT [PROMPT ...]

An aggregated worker samples the first output token from the prompt's prefill forward. A disaggregated
decode worker (like vLLM's) is handed the KV of all prompt tokens but the last and computes that last
token itself as a decode step (`EngineCore.add_prefilled`: num_computed = len(prompt) - 1), so its first
token comes from the decode path (absorbed MLA, the decode kernels), not from the prefill path (expanded
attention). Both are exact in fp32; in bf16 they round differently, and on a random-weight model whose top
logits lie close together the greedy token can differ. This script runs both paths for each prompt
(greedy, `--tokens` tokens, the same engine as the workers) and prints one JSON object:
{"prefill": [text, ...], "decode_last": [text, ...], "first_token": {"prefill": [id, ...], "decode_last": [...]},
 "first_text": {same, each first token decoded alone}, "top2_gap": [...]} (the prefill path's gap between its two best logits, relative to the largest |logit|).
"""
from __future__ import annotations

import argparse
import json

import torch


def greedy(runner, prompt: list[int], n: int, path: str) -> tuple[list[int], float]:
    bs = runner.config.block_size
    table = list(range((len(prompt) + n) // bs + 1))
    if path == "prefill" or len(prompt) == 1:
        logits = runner.execute([prompt], [0], [table], [True])
    else:
        runner.execute([prompt[:-1]], [0], [table], [False])
        logits = runner.execute([[prompt[-1]]], [len(prompt) - 1], [table], [True])
    top = logits[0].float().topk(2).values
    gap = float((top[0] - top[1]) / logits[0].float().abs().max())
    out = [int(logits[0].argmax())]
    for i in range(n - 1):
        logits = runner.execute([[out[-1]]], [len(prompt) + i], [table], [True])
        out.append(int(logits[0].argmax()))
    return out, gap


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device", default="cuda")
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--tokens", type=int, default=24)
    p.add_argument("prompts", nargs="+")
    a = p.parse_args()
    from tokenizers import Tokenizer

    from dynamo_dwdp.config.engine import EngineSettings
    from dynamo_dwdp.engine.model_runner import ModelRunner
    from dynamo_dwdp.model.moe_executor import LocalExecutor

    tok = Tokenizer.from_file(f"{a.model}/tokenizer.json")
    longest = max(len(tok.encode(t).ids) for t in a.prompts) + a.tokens
    cfg = EngineSettings(device=a.device, dtype=a.dtype, block_size=a.block_size,
                         num_kv_blocks=longest // a.block_size + 2, max_num_batched_tokens=max(512, longest))
    runner = ModelRunner(a.model, cfg, LocalExecutor)
    res: dict = {"prefill": [], "decode_last": [], "first_token": {"prefill": [], "decode_last": []},
                 "first_text": {"prefill": [], "decode_last": []}, "top2_gap": []}
    with torch.inference_mode():
        for text in a.prompts:
            ids = tok.encode(text).ids
            for path in ("prefill", "decode_last"):
                out, gap = greedy(runner, ids, a.tokens, path)
                res[path].append(tok.decode(out))
                res["first_token"][path].append(out[0])
                res["first_text"][path].append(tok.decode(out[:1]))
                if path == "prefill":
                    res["top2_gap"].append(gap)
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
