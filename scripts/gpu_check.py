"""GPU correctness checks for the CUDA path (one command; no network, installs nothing).

  PYTHONPATH=. python3 scripts/gpu_check.py --out OUT [--baselines-only]

1. the engine on CUDA (fp32) gives the same greedy tokens as on CPU (tiny model);
2. DWDP with the CUDA IPC transport (N ranks, one per visible GPU, or all on GPU 0 when there is
   one) gives the same greedy tokens as a single rank, all-remote and routed-only;
3. bf16 on CUDA (grouped-GEMM expert path) stays close to fp32 (v2-lite-shape, few layers);
4. TP, DEP (peer-memory collectives) and DWDP (N ranks, sharing GPU 0 when there is one): fp32 eager
   greedy tokens against single fp32 on the same GPU and on the CPU (the fp32 path uses no TF32),
   bf16 decode from CUDA graphs against the same strategy eager and against single bf16 (per-step
   logits errors), TP bf16 also on the torch paths and over the library collectives; DWDP with the
   ring-wrapped prefetch on a 5-layer model. These groups run concurrently (`--baselines-only` runs
   this part alone, in about a minute; NCCL over >= 2 GPUs stays the library fallback).
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
    inner = runner.launch

    decode_s = []

    def launch(token_chunks, *args, **kwargs):
        t0 = time.perf_counter()
        logits = inner(token_chunks, *args, **kwargs)
        torch.cuda.current_stream().synchronize()
        if token_chunks and all(len(c) == 1 for c in token_chunks):
            decode_s.append(time.perf_counter() - t0)
        if logits.numel():
            steps.append(logits.detach().float().cpu().numpy())
        return logits

    runner.launch = launch
    tokens = generate_rank(rank_engine, payload)
    graphs = runner.graphs
    decode_s = sorted(decode_s[2:]) or [float("nan")]        # the first decode steps capture graphs
    return tokens, steps, (graphs.replays if graphs is not None else 0), 1e3 * decode_s[len(decode_s) // 2]


def step_errors(a_steps, b_steps) -> list[str]:
    """Per-step relative error of a's logits against b's ("*": the greedy choice differs in that
    step), over the steps up to and including the first disagreement (after it the two runs decode
    different tokens and their logits need not agree)."""
    out = []
    for a, b in zip(a_steps, b_steps):
        if a.shape != b.shape:
            out.append(f"shape {a.shape} vs {b.shape}")
            break
        ta, tb = torch.from_numpy(a).double(), torch.from_numpy(b).double()
        same = torch.equal(ta.argmax(-1), tb.argmax(-1))
        out.append(f"{((ta - tb).norm() / tb.norm()).item():.1e}{'' if same else '*'}")
        if not same:
            break
    return out


def logits_rel_err(a_steps, b_steps) -> float:
    """Largest per-step relative error of `step_errors`."""
    errs = [float(e.rstrip("*")) for e in step_errors(a_steps, b_steps) if not e.startswith("shape")]
    return max(errs, default=0.0)


def first_diff(out, ref) -> str:
    """'MATCH', or where two runs' greedy tokens part (prompt, token index) and both continuations."""
    for i, (a, b) in enumerate(zip(out, ref)):
        if a != b:
            j = next(j for j, (x, y) in enumerate(zip(a, b)) if x != y) if any(x != y for x, y in zip(a, b)) \
                else min(len(a), len(b))
            return f"DIFF prompt {i} token {j}: {a[j:]} vs {b[j:]}"
    return "MATCH" if len(out) == len(ref) else f"DIFF {len(out)} vs {len(ref)} prompts"


def concurrently(jobs: dict, env: dict | None = None) -> dict:
    """Run independent groups at once (name -> zero-argument callable); `env` is set for the rank
    processes they spawn. The GPU is shared by all of them: step times measured here are not timings."""
    from concurrent.futures import ThreadPoolExecutor

    old = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update(env or {})
    try:
        with ThreadPoolExecutor(len(jobs)) as pool:
            futures = {}
            for name, job in jobs.items():
                futures[name] = pool.submit(job)
                time.sleep(0.5)                      # each group picks its own free rendezvous port
            return {name: f.result() for name, f in futures.items()}
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def check_baselines(rows, tiny, prompts, params, ref_cpu, ranks, ngpu) -> None:
    """TP, DEP (peer-memory collectives) and DWDP (CUDA IPC): fp32 eager greedy tokens identical to
    `single` fp32 on the same GPU and on the CPU (a strategy divergence is told apart from a device
    divergence); bf16 decode from CUDA graphs equal to the same strategy eager, logits close to
    single bf16 (per-step errors printed); TP bf16 against single bf16 also with the torch paths
    (fused kernels off) and with the library collectives, to place any drift. The groups run
    concurrently on the GPU (the check fits a short device lease), so no step times are reported."""
    from dynamo_dwdp.config.engine import EngineSettings
    from dynamo_dwdp.rank.local_group import run_local_group
    from dynamo_dwdp.synthetic.checkpoint import write_checkpoint

    where = f"{ranks} ranks on {min(ngpu, ranks)} GPU(s)" + (" (shared GPU)" if ngpu < ranks else "")
    tiny5 = tiny + "5"          # DWDP's ring-wrapped prefetch needs >= 4 MoE layers
    write_checkpoint(tiny5, "tiny", seed=0, dtype="fp32", quiet=True, num_layers=5)

    def go(strategy, n, dtype, graphs, model=tiny, collectives="peer"):
        def job():
            cfg = EngineSettings(block_size=16, num_kv_blocks=256, device="cuda", dtype=dtype,
                                 max_num_batched_tokens=256, cuda_graphs=graphs)
            t0 = time.perf_counter()
            res = run_local_group(model, cfg, strategy, n, tokens_logits_replays, [(prompts, params)] * n,
                                  timeout=150, spec_overrides={"collectives": collectives} if n > 1 else None)
            errs = [r.error for r in res if r.error]
            if errs:
                return None, errs[0][:300], time.perf_counter() - t0
            return [r.value for r in res], None, time.perf_counter() - t0
        return job

    # first the runs that compile every kernel variant (single's and TP's shapes, both dtypes), then the rest
    got = concurrently({"single fp32": go("single", 1, "float32", False),
                        "single bf16": go("single", 1, "bfloat16", False),
                        "tp fp32": go("tp", ranks, "float32", False),
                        "tp bf16 eager": go("tp", ranks, "bfloat16", False)})
    jobs = {"tp bf16 graphs": go("tp", ranks, "bfloat16", True),
            "tp bf16 library": go("tp", ranks, "bfloat16", False, collectives="library")}
    for s in ("dep", "dwdp"):
        jobs[f"{s} fp32"] = go(s, ranks, "float32", False)
        jobs[f"{s} bf16 eager"] = go(s, ranks, "bfloat16", False)
        jobs[f"{s} bf16 graphs"] = go(s, ranks, "bfloat16", True)
    jobs["dwdp5 eager"] = go("dwdp", ranks, "bfloat16", False, tiny5)
    jobs["dwdp5 graphs"] = go("dwdp", ranks, "bfloat16", True, tiny5)
    got.update(concurrently(jobs))
    got.update(concurrently({"dwdp5 wrapped": go("dwdp", ranks, "bfloat16", True, tiny5)}, {"DWDP_GRAPH_WRAP": "1"}))
    got.update(concurrently({"single bf16 torch": go("single", 1, "bfloat16", False),
                             "tp bf16 torch": go("tp", ranks, "bfloat16", False)}, {"DWDP_FUSED_KERNELS": "0"}))

    def add(name, status, *keys):
        rows.append((name, status, f"{sum(got[k][2] for k in keys):.1f}s"))
        print(rows[-1], flush=True)

    single32 = got["single fp32"]
    status = (f"ERR {single32[1]}" if single32[1] else
              first_diff(single32[0][0][0], ref_cpu).replace("MATCH", "MATCH single cpu fp32"))
    add("tiny single cuda fp32 vs single cpu fp32", status, "single fp32")
    gpu32 = single32[0][0][0] if not single32[1] else None
    for s in ("tp", "dep", "dwdp"):
        out, err, _ = got[f"{s} fp32"]
        if err:
            status = f"ERR {err}"
        else:
            vs_gpu = first_diff(out[0][0], gpu32) if gpu32 is not None else "no single cuda fp32"
            vs_cpu = first_diff(out[0][0], ref_cpu)
            status = f"vs single cuda fp32: {vs_gpu}; vs single cpu fp32: {vs_cpu}"
        add(f"tiny {s}{ranks} fp32 eager vs single fp32 [{where}]", status, f"{s} fp32")

    single16 = got["single bf16"]
    for s in ("tp", "dep", "dwdp"):
        (eager, err1, _), (graphs, err2, _) = got[f"{s} bf16 eager"], got[f"{s} bf16 graphs"]
        if err1 or err2 or single16[1]:
            status = f"ERR {err1 or err2 or single16[1]}"
        else:
            ref = single16[0][0]
            replays = [v[2] for v in graphs]
            same = graphs[0][0] == eager[0][0]
            agree = sum(x == y for a, b in zip(graphs[0][0], ref[0]) for x, y in zip(a, b))
            total = sum(len(b) for b in ref[0])
            status = (f"{'MATCH' if same else 'DIFF'} captured vs eager; replays {replays}; vs single bf16: "
                      f"{agree}/{total} tokens, logits rel err {logits_rel_err(graphs[0][1], ref[1]):.1e} "
                      f"(per step, captured: {' '.join(step_errors(graphs[0][1], ref[1]))}; "
                      f"eager: {' '.join(step_errors(eager[0][1], ref[1]))})")
            if same and not all(r > 0 for r in replays):
                status = "NO-REPLAY " + status
        add(f"tiny {s}{ranks} bf16 CUDA graphs [{where}]", status, f"{s} bf16 eager", f"{s} bf16 graphs")

    # where a TP bf16 drift comes from: the fused kernels (torch paths on both sides) or the peer protocol
    for name, key, ref_key in (("torch paths (DWDP_FUSED_KERNELS=0) vs single bf16 on the torch paths",
                                "tp bf16 torch", "single bf16 torch"),
                               ("library collectives vs single bf16", "tp bf16 library", "single bf16")):
        (out, err, _), (ref, rerr, _) = got[key], got[ref_key]
        if err or rerr:
            status = f"ERR {err or rerr}"
        else:
            agree = sum(x == y for a, b in zip(out[0][0], ref[0][0]) for x, y in zip(a, b))
            status = (f"{agree}/{sum(len(b) for b in ref[0][0])} tokens, per-step logits rel err "
                      f"{' '.join(step_errors(out[0][1], ref[0][1]))}")
        add(f"tiny tp{ranks} bf16 eager, {name} [{where}]", status, key)

    (eager5, e1, _), (plain5, e2, _), (wrap5, e3, _) = got["dwdp5 eager"], got["dwdp5 graphs"], got["dwdp5 wrapped"]
    if e1 or e2 or e3:
        status = f"ERR {e1 or e2 or e3}"
    else:
        same = wrap5[0][0] == eager5[0][0] == plain5[0][0]
        status = f"{'MATCH' if same else 'DIFF'} wrapped / self-contained graphs / eager; replays {[v[2] for v in wrap5]}"
    add(f"tiny(5 layers) dwdp{ranks} bf16 CUDA graphs, wrapped prefetch [{where}]", status,
        "dwdp5 eager", "dwdp5 graphs", "dwdp5 wrapped")


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
