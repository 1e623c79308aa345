"""Async scheduling on the GPU: the same tokens as the synchronous engine, and what it saves per step.

    PYTHONPATH=.:scripts python3 scripts/gpu_async.py --out $OUT [--model DIR] [--batches 1,32,64,128,256]

1. check: a 3-layer v2-lite-shape model (bf16, CUDA graphs) generates the same requests with
   `engine.async_scheduling` off and on through `EngineCore` (greedy rows of several lengths, a seeded
   row, an EOS taken from the greedy run, min_tokens); the tokens and finish reasons must be equal, and
   the async run must have fed its decode tokens on the device and replayed graphs;
2. bench: `bench engine` decode from CUDA graphs at each batch (context 1000) on `--model` (default: a
   27-layer v2-lite-shape model written here), synchronous and `--async-scheduling`, in one table with
   the HBM-roofline fraction (ceiling: the copy bandwidth measured in the same run);
   `--weights` adds the same pair for an FP8 format at `--fp8-batches`.
Writes $OUT/gpu_async.md and $OUT/gpu_async.json (and bench.jsonl).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import torch

from gpu_perf import bench, ceilings, roofline_rows, say, write_v2lite


def check_tokens(tmp: str, device: str = "cuda") -> dict:
    from dynamo_dwdp.config.engine import EngineSettings
    from dynamo_dwdp.engine import engine_core
    from dynamo_dwdp.engine.engine_core import EngineCore
    from dynamo_dwdp.engine.model_runner import ModelRunner
    from dynamo_dwdp.engine.sampling import SamplingParams
    from dynamo_dwdp.model.moe_executor import LocalExecutor
    from dynamo_dwdp.synthetic.checkpoint import write_checkpoint

    model = os.path.join(tmp, "lite3-async")
    cuda = device == "cuda"
    write_checkpoint(model, "v2-lite-shape" if cuda else "tiny", seed=0, dtype="bf16" if cuda else "fp32",
                     num_layers=3, quiet=True, device=device, with_tokenizer=False)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 250, (n,), generator=g).tolist() for n in (17, 64, 5, 130, 33, 9, 250, 48)]

    def run(async_scheduling: bool, eos: int | None):
        cfg = EngineSettings(device=device, dtype="bfloat16" if cuda else "float32", cuda_graphs=cuda,
                             max_num_seqs=16, num_kv_blocks=256,
                             block_size=64, max_num_batched_tokens=4096, max_model_len=2048,
                             separate_prefill_steps=True, async_scheduling=async_scheduling)
        eng = EngineCore(ModelRunner(model, cfg, LocalExecutor))
        fed = [0]
        inner = eng._launch

        def launch(chunks):
            fed[0] += sum(1 for c in chunks if c.seq.output_ids and c.seq.output_ids[-1] == engine_core.PENDING)
            return inner(chunks)

        eng._launch = launch
        params = [SamplingParams(max_tokens=8 + 5 * i, temperature=0, ignore_eos=eos is None) for i in range(6)]
        params.append(SamplingParams(max_tokens=20, temperature=0.8, top_k=40, seed=77, ignore_eos=True))
        params.append(SamplingParams(max_tokens=24, min_tokens=6, temperature=0,
                                     eos_token_ids=(eos,) if eos is not None else (), ignore_eos=eos is None))
        if eos is not None:
            for p in params[:6]:
                p.eos_token_ids = (eos,)
        ids = [f"r{i}" for i in range(len(prompts))]
        for rid, prompt, p in zip(ids, prompts, params):
            eng.add_request(rid, prompt, p)
        toks = {rid: [] for rid in ids}
        reasons = {}
        t = time.perf_counter()
        while eng.has_unfinished():
            for o in eng.step():
                toks[o.request_id] += o.new_token_ids
                if o.finished:
                    reasons[o.request_id] = o.finish_reason
        wall = time.perf_counter() - t
        replays = eng.runner.graphs.replays if eng.runner.graphs is not None else 0
        free = eng.blocks.num_free == eng.blocks.num_blocks
        eng.runner.close()
        del eng
        torch.cuda.empty_cache()
        return toks, reasons, {"fed": fed[0], "replays": replays, "wall_s": wall, "blocks_freed": free}

    sync_toks, sync_reasons, sync_info = run(False, None)
    eos = sync_toks["r3"][4]                                   # a token greedy decoding emits mid-run
    sync_eos, sync_eos_reasons, _ = run(False, eos)
    async_toks, async_reasons, async_info = run(True, None)
    async_eos, async_eos_reasons, async_eos_info = run(True, eos)
    ok = (sync_toks == async_toks and sync_reasons == async_reasons and sync_eos == async_eos
          and sync_eos_reasons == async_eos_reasons and async_info["fed"] > 0
          and (async_info["replays"] > 0 or not cuda)
          and async_info["blocks_freed"] and async_eos_info["blocks_freed"]
          and any(r == "eos" for r in sync_eos_reasons.values()))
    shutil.rmtree(model, ignore_errors=True)
    return {"ok": ok, "sync": sync_info, "async": async_info, "async_eos": async_eos_info,
            "eos_stops": sum(r == "eos" for r in async_eos_reasons.values()),
            "mismatch": [rid for rid in sync_toks if sync_toks[rid] != async_toks[rid]]
            + [rid for rid in sync_eos if sync_eos[rid] != async_eos[rid]]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=".")
    p.add_argument("--model", default="", help="an existing model directory (default: write the v2-lite shape)")
    p.add_argument("--layers", type=int, default=27)
    p.add_argument("--batches", default="1,32,64,128,256")
    p.add_argument("--context", type=int, default=1000)
    p.add_argument("--weights", default="", help="also an FP8 format: fp8-block or fp8-block-a8")
    p.add_argument("--fp8-batches", default="64")
    p.add_argument("--hw", default="h200-measured")
    p.add_argument("--skip-check", action="store_true")
    a = p.parse_args()
    from dynamo_dwdp.bench.engine_bench import Point

    os.makedirs(a.out, exist_ok=True)
    tmp = tempfile.mkdtemp()
    info = {"name": torch.cuda.get_device_name(0), "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "argv": sys.argv}
    ceil = ceilings()
    say(f"ceilings: HBM copy {ceil['hbm_copy_bytes_per_s'] / 1e12:.2f} TB/s")
    res: dict = {"info": info, "ceilings": ceil}
    if not a.skip_check:
        res["check"] = check_tokens(tmp)
        say(f"check: {res['check']}")
    model = a.model or write_v2lite(tmp, a.layers)
    decode = [Point("decode", b, b, a.context, 0.0, 20, 3) for b in (int(x) for x in a.batches.split(",") if x)]
    setups = [({"cuda_graphs": True}, decode, {}), ({"cuda_graphs": True, "async_scheduling": True}, decode, {})]
    if a.weights:
        fp8 = [pt for pt in decode if str(pt.batch) in a.fp8_batches.split(",")]
        setups += [({"cuda_graphs": True, "weights": a.weights}, fp8, {}),
                   ({"cuda_graphs": True, "weights": a.weights, "async_scheduling": True}, fp8, {})]
    results = bench(model, os.path.join(a.out, "bench.jsonl"), setups, a.hw)
    rows = roofline_rows(results, ceil)
    for r, full in zip(rows, results):
        if full["setup"].get("async_scheduling"):
            r["mode"] += " async"
    res["bench"] = rows
    with open(os.path.join(a.out, "gpu_async.json"), "w") as f:
        json.dump(res, f, indent=1)
    lines = [f"# gpu_async {info['date']}: {info['name']}, torch {info['torch']}", f"command: {' '.join(sys.argv)}",
             f"HBM copy {ceil['hbm_copy_bytes_per_s'] / 1e12:.2f} TB/s", ""]
    if "check" in res:
        lines += [f"check (async tokens == sync tokens): {'ok' if res['check']['ok'] else 'FAIL'} {res['check']}", ""]
    lines += ["| batch | mode | step ms | % HBM roofline | tok/s |", "|---|---|---|---|---|"]
    lines += [f"| {r['batch']} | {r['mode']} | {r['step_ms']:.3f} | {100 * r['hbm_frac']:.1f} | {r['tok_s']:,.0f} |"
              for r in rows]
    with open(os.path.join(a.out, "gpu_async.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)
    shutil.rmtree(tmp, ignore_errors=True)
    return 0 if res.get("check", {"ok": True})["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
