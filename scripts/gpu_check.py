"""GPU correctness checks for the CUDA path (one command; no network, installs nothing).

  PYTHONPATH=. python3 scripts/gpu_check.py --out OUT [--baselines-only]

1. the engine on CUDA (fp32) gives the same greedy tokens as on CPU (tiny model);
2. DWDP with the CUDA IPC transport (N ranks, one per visible GPU, or all on GPU 0 when there is
   one) gives the same greedy tokens as a single rank, all-remote and routed-only;
3. bf16 on CUDA (grouped-GEMM expert path) stays close to fp32 (v2-lite-shape, few layers);
4. DEP and TP over the peer-memory collectives (N ranks, sharing GPU 0 when there is one): fp32 eager
   greedy tokens against single, bf16 decode from CUDA graphs against the same strategy eager and
   against single bf16; DWDP from CUDA graphs, and with the ring-wrapped prefetch on a 5-layer model
   (`--baselines-only` runs this part alone; NCCL over >= 2 GPUs stays the library fallback).
Prints a table; writes OUT/gpu_check.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch


def generate_and_replays(rank_engine, payload):
    """run_local_group target: greedy tokens, and how many decode steps this rank replayed from graphs."""
    from dynamo_dwdp.rank.local_group import generate_rank

    tokens = generate_rank(rank_engine, payload)
    graphs = rank_engine.runner.graphs
    return tokens, (graphs.replays if graphs is not None else 0)


def tokens_logits_replays(rank_engine, payload):
    """run_local_group target: greedy tokens, the float32 logits of every step, graph replays."""
    from dynamo_dwdp.rank.local_group import generate_rank

    steps = []
    runner = rank_engine.runner
    inner = runner.execute

    decode_s = []

    def execute(token_chunks, *args, **kwargs):
        t0 = time.perf_counter()
        logits = inner(token_chunks, *args, **kwargs)         # ends with a stream sync
        if token_chunks and all(len(c) == 1 for c in token_chunks):
            decode_s.append(time.perf_counter() - t0)
        if logits.numel():
            steps.append(logits.detach().float().cpu().numpy())
        return logits

    runner.execute = execute
    tokens = generate_rank(rank_engine, payload)
    graphs = runner.graphs
    decode_s = sorted(decode_s[2:]) or [float("nan")]        # the first decode steps capture graphs
    return tokens, steps, (graphs.replays if graphs is not None else 0), 1e3 * decode_s[len(decode_s) // 2]


def logits_rel_err(a_steps, b_steps) -> float:
    """Largest per-step relative error over the steps before the first greedy disagreement (after it
    the two runs decode different tokens and their logits need not agree)."""
    worst = 0.0
    for a, b in zip(a_steps, b_steps):
        if a.shape != b.shape:
            break
        ta, tb = torch.from_numpy(a).double(), torch.from_numpy(b).double()
        worst = max(worst, ((ta - tb).norm() / tb.norm()).item())
        if not torch.equal(ta.argmax(-1), tb.argmax(-1)):
            break
    return worst


def check_baselines(rows, tiny, prompts, params, ref_fp32, ranks, ngpu) -> None:
    """DEP and TP over the peer-memory collectives: fp32 eager greedy tokens identical to single;
    bf16 decode from CUDA graphs equal to the same strategy eager, logits close to single bf16."""
    from dynamo_dwdp.config.engine import EngineSettings
    from dynamo_dwdp.rank.local_group import run_local_group

    where = f"{ranks} ranks on {min(ngpu, ranks)} GPU(s)" + (" (shared GPU)" if ngpu < ranks else "")

    def go(strategy, n, dtype, graphs, model=tiny):
        cfg = EngineSettings(block_size=16, num_kv_blocks=256, device="cuda", dtype=dtype, max_num_batched_tokens=256,
                           cuda_graphs=graphs)
        t0 = time.perf_counter()
        res = run_local_group(model, cfg, strategy, n, tokens_logits_replays, [(prompts, params)] * n, timeout=120,
                              spec_overrides={"collectives": "peer"} if n > 1 else None)
        errs = [r.error for r in res if r.error]
        if errs:
            return None, errs[0][:300], time.perf_counter() - t0
        return [r.value for r in res], None, time.perf_counter() - t0

    single_bf16, err, _ = go("single", 1, "bfloat16", False)
    for strategy in ("tp", "dep", "dwdp"):
        if strategy != "dwdp":
            out, err, dt = go(strategy, ranks, "float32", False)
            status = f"ERR {err}" if err else ("MATCH" if out[0][0] == ref_fp32 else f"DIFF {out[0][0]} vs {ref_fp32}")
            rows.append((f"tiny {strategy}{ranks} peer collectives fp32 eager vs single fp32 [{where}]", status,
                         f"{dt:.1f}s"))
            print(rows[-1], flush=True)
        eager, err1, dt1 = go(strategy, ranks, "bfloat16", False)
        graphs, err2, dt2 = go(strategy, ranks, "bfloat16", True)
        if err1 or err2 or single_bf16 is None:
            status = f"ERR {err1 or err2 or 'no single bf16 reference'}"
        else:
            replays = [v[2] for v in graphs]
            same = graphs[0][0] == eager[0][0]
            rel = logits_rel_err(graphs[0][1], single_bf16[0][1])
            agree = sum(x == y for a, b in zip(graphs[0][0], single_bf16[0][0]) for x, y in zip(a, b))
            total = sum(len(b) for b in single_bf16[0][0])
            status = (f"{'MATCH' if same else 'DIFF'} captured vs eager; replays {replays}; vs single bf16: "
                      f"{agree}/{total} tokens, logits rel err {rel:.1e}; median decode step (rank 0) "
                      f"eager {eager[0][3]:.2f} ms, graphs {graphs[0][3]:.2f} ms")
            if same and not all(r > 0 for r in replays):
                status = "NO-REPLAY " + status
        rows.append((f"tiny {strategy}{ranks} bf16 CUDA graphs [{where}]", status, f"{dt1 + dt2:.1f}s"))
        print(rows[-1], flush=True)
    # DWDP's ring-wrapped prefetch between captured steps (DWDP_GRAPH_WRAP=1; needs >= 4 MoE layers:
    # tiny with 5 layers) against the same model eager and captured self-contained
    from dynamo_dwdp.synthetic.checkpoint import write_checkpoint

    tiny5 = tiny + "5"
    write_checkpoint(tiny5, "tiny", seed=0, dtype="fp32", quiet=True, num_layers=5)
    eager5, err1, dt1 = go("dwdp", ranks, "bfloat16", False, tiny5)
    plain5, err2, dt2 = go("dwdp", ranks, "bfloat16", True, tiny5)
    os.environ["DWDP_GRAPH_WRAP"] = "1"
    try:
        wrap5, err3, dt3 = go("dwdp", ranks, "bfloat16", True, tiny5)
    finally:
        os.environ.pop("DWDP_GRAPH_WRAP", None)
    if err1 or err2 or err3:
        status = f"ERR {err1 or err2 or err3}"
    else:
        same = wrap5[0][0] == eager5[0][0] == plain5[0][0]
        status = (f"{'MATCH' if same else 'DIFF'} wrapped / self-contained graphs / eager; replays "
                  f"{[v[2] for v in wrap5]}; median decode step (rank 0) eager {eager5[0][3]:.2f} ms, "
                  f"self-contained {plain5[0][3]:.2f} ms, wrapped {wrap5[0][3]:.2f} ms")
    rows.append((f"tiny(5 layers) dwdp{ranks} bf16 CUDA graphs, wrapped prefetch [{where}]", status,
                 f"{dt1 + dt2 + dt3:.1f}s"))
    print(rows[-1], flush=True)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=".")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--baselines-only", action="store_true",
                   help="only the fp32 reference and the DEP/TP/DWDP peer-collective and CUDA-graph checks")
    a = p.parse_args()
    from dynamo_dwdp.config.engine import EngineSettings
    from dynamo_dwdp.engine.sampling import SamplingParams
    from dynamo_dwdp.synthetic.checkpoint import write_checkpoint
    from dynamo_dwdp.config.dwdp import DwdpSettings
    from dynamo_dwdp.rank.local_group import generate_rank, run_local_group

    ngpu = torch.cuda.device_count()
    print(f"GPUs: {ngpu} x {torch.cuda.get_device_name(0)}; torch {torch.__version__}", flush=True)
    rows = []
    tmp = tempfile.mkdtemp()
    tiny = os.path.join(tmp, "tiny")
    write_checkpoint(tiny, "tiny", seed=0, dtype="fp32", quiet=True)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(5, 1024, (n,), generator=g).tolist() for n in (7, 33, 80)]
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)

    def run(model, strategy, ranks, device, dtype="float32", dwdp=None, prompts=prompts, graphs=False,
            spec_overrides=None):
        cfg = EngineSettings(block_size=16, num_kv_blocks=256, device=device, dtype=dtype, max_num_batched_tokens=256,
                           cuda_graphs=graphs)
        t0 = time.perf_counter()
        res = run_local_group(model, cfg, strategy, ranks, generate_and_replays if graphs else generate_rank,
                              [(prompts, params)] * ranks, dwdp=dwdp, timeout=300, spec_overrides=spec_overrides)
        errs = [r.error for r in res if r.error]
        return (res[0].value if not errs else None), errs, time.perf_counter() - t0

    ref, errs, dt = run(tiny, "single", 1, "cpu")
    rows.append(("tiny single cpu fp32 (reference)", "ok" if ref else f"ERR {errs}", f"{dt:.1f}s"))

    def check(name, model, strategy, ranks, device, dwdp=None, dtype="float32"):
        out, errs, dt = run(model, strategy, ranks, device, dtype, dwdp)
        status = "MATCH" if out == ref else (f"ERR {errs[0][:300]}" if errs else f"DIFF {out} vs {ref}")
        rows.append((name, status, f"{dt:.1f}s"))
        print(rows[-1], flush=True)

    n = a.ranks
    check_baselines(rows, tiny, prompts, params, ref, n, ngpu)
    if a.baselines_only:
        return report(rows, a.out)
    check("tiny single cuda fp32", tiny, "single", 1, "cuda")
    check(f"tiny dwdp{n} cuda_ipc fp32", tiny, "dwdp", n, "cuda", DwdpSettings(transport="cuda_ipc"))
    check(f"tiny dwdp{n} cuda_ipc routed-only", tiny, "dwdp", n, "cuda", DwdpSettings(transport="cuda_ipc", routed_only=True))
    check(f"tiny dwdp{n} cuda_ipc contention-opt", tiny, "dwdp", n, "cuda", DwdpSettings(transport="cuda_ipc", contention_opt=True))
    # bf16: the grouped-GEMM expert path walks DWDP's banks (local shard + prefetch slot) in place;
    # the deterministic combine makes it agree with the single rank's one bank
    ref_bf16, errs, dt = run(tiny, "single", 1, "cuda", "bfloat16")
    out, errs2, dt2 = run(tiny, "dwdp", n, "cuda", "bfloat16", DwdpSettings(transport="cuda_ipc"))
    if errs or errs2:
        status = f"ERR {(errs or errs2)[0][:300]}"
    else:
        same = sum(a == b for x, y in zip(out, ref_bf16) for a, b in zip(x, y))
        total = sum(len(x) for x in ref_bf16)
        status = "MATCH" if out == ref_bf16 else f"DIFF {same}/{total} tokens equal"
    rows.append((f"tiny dwdp{n} cuda_ipc bf16 (grouped GEMM over banks) vs single bf16", status, f"{dt + dt2:.1f}s"))
    print(rows[-1], flush=True)
    # decode steps from CUDA graphs: single, and DWDP with its pulls captured (cudaMemcpyAsync on the copy stream)
    for strategy, ranks, opts in (("single", 1, None), ("dwdp", n, DwdpSettings(transport="cuda_ipc"))):
        t0 = time.perf_counter()
        cfg = EngineSettings(block_size=16, num_kv_blocks=256, device="cuda", dtype="bfloat16",
                           max_num_batched_tokens=256, cuda_graphs=True)
        res = run_local_group(tiny, cfg, strategy, ranks, generate_and_replays, [(prompts, params)] * ranks,
                              dwdp=opts, timeout=300)
        errs = [r.error for r in res if r.error]
        if errs or ref_bf16 is None:
            status = f"ERR {errs[0][:300] if errs else 'no bf16 reference'}"
        else:
            toks, replays = res[0].value[0], [r.value[1] for r in res]
            ok = toks == ref_bf16 and all(x > 0 for x in replays)
            status = f"{'MATCH' if toks == ref_bf16 else 'DIFF'} (graph replays per rank {replays})"
            status = status if ok else status.replace("MATCH", "NO-REPLAY")
        rows.append((f"tiny {strategy}{ranks if ranks > 1 else ''} bf16 CUDA graphs vs single bf16 eager", status,
                     f"{time.perf_counter() - t0:.1f}s"))
        print(rows[-1], flush=True)
    if ngpu >= 2:        # the library collectives alone (the peer protocol off)
        for strategy in ("dep", "tp"):
            out, errs, dt = run(tiny, strategy, n, "cuda", spec_overrides={"collectives": "library"})
            status = "MATCH" if out == ref else (f"ERR {errs[0][:300]}" if errs else f"DIFF {out} vs {ref}")
            rows.append((f"tiny {strategy}{n} nccl (library collectives) fp32", status, f"{dt:.1f}s"))
    else:
        rows.append(("dep/tp over NCCL", "SKIPPED: one GPU (NCCL needs one GPU per rank)", ""))

    # bf16 grouped-GEMM path vs fp32 on a v2-lite-shaped model with 3 layers (logits of one prefill)
    lite = os.path.join(tmp, "lite")
    write_checkpoint(lite, "v2-lite-shape", seed=0, dtype="bf16", num_layers=3, quiet=True, device="cuda")
    from dynamo_dwdp.engine.model_runner import ModelRunner
    from dynamo_dwdp.model.moe_executor import LocalExecutor

    x = torch.randint(5, 1000, (300,), generator=g).tolist()
    logits = {}
    for dtype in ("float32", "bfloat16"):
        r = ModelRunner(lite, EngineSettings(block_size=16, num_kv_blocks=64, device="cuda", dtype=dtype), LocalExecutor)
        logits[dtype] = r.execute([x], [0], [list(range(19))], [True]).float().cpu()
        del r
        torch.cuda.empty_cache()
    rel = ((logits["bfloat16"] - logits["float32"]).norm() / logits["float32"].norm()).item()
    rows.append(("v2-lite 3 layers bf16 (grouped GEMM) vs fp32 logits", f"rel err {rel:.2e}", "ok" if rel < 3e-2 else "HIGH"))
    return report(rows, a.out)


def report(rows, out_dir) -> int:
    width = max(len(r[0]) for r in rows)
    print("\n== GPU check ==")
    for r in rows:
        print(f"{r[0]:<{width}}  {r[1]:<40}  {r[2]}")
    with open(os.path.join(out_dir, "gpu_check.json"), "w") as f:
        json.dump(rows, f, indent=1)
    return 0 if all(("ERR" not in r[1] and "DIFF" not in r[1] and "NO-REPLAY" not in r[1]) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
