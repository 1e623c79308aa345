"""One GPU session in one command: machine ceilings, correctness of the fast paths, engine benchmarks.

  PYTHONPATH=. PYTHONUNBUFFERED=1 python3 scripts/gpu_perf.py --out $OUT [--layers 27]

Installs nothing, needs no network. Steps (each prints a line; a table comes last):
1. ceilings: HBM (device-to-device copy, bytes read + written) and bf16 GEMM (8192^3), CUDA events;
2. correctness on the GPU: sync-free vs host-synced grouped-GEMM experts against fp32; SDPA vs
   reference prefill attention (fp32, bf16); one decode step from a CUDA graph vs eager, and the
   Triton MLA decode kernel vs the torch decode path (logits and KV);
   then a kernel-time profile of one eager decode step (torch profiler, 3-layer model);
3. builds the v2-lite-shape random model (bf16, --layers deep) on the GPU;
4. single-GPU engine benchmarks (`bench engine --strategy single`): decode batches from CUDA graphs
   (Triton kernel; some with the torch attention paths), eager decode, prefill lengths with SDPA and
   one with the reference attention (O(S^2) memory: short only); the HBM-roofline fraction uses the
   measured copy bandwidth of step 1, the planner runs with --hw (default h100-measured);
5. with >= 2 GPUs, the strategy matrix (`dynamo-dwdp bench matrix --ranks <all GPUs>`) into
   $OUT/matrix.jsonl (not run yet on a GPU machine: this project has been lent single GPUs only).
Writes $OUT/gpu_perf.json (everything), $OUT/bench.jsonl (bench records), $OUT/gpu_perf.md (tables).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch

T0 = time.perf_counter()


def say(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", flush=True)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


# ------------------------------------------------------------------------------------------ ceilings
def median_ms(fn, reps: int = 20) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def ceilings() -> dict:
    n = 1 << 29                                             # 1 GiB of bf16
    src = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src))
    hbm = 2 * src.numel() * 2 / (ms / 1e3)
    del src, dst
    m = 8192
    a = torch.randn(m, m, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(m, m, device="cuda", dtype=torch.bfloat16)
    ms_mm = median_ms(lambda: a @ b, reps=10)
    flops = 2 * m ** 3 / (ms_mm / 1e3)
    del a, b
    torch.cuda.empty_cache()
    return {"hbm_copy_bytes_per_s": hbm, "bf16_gemm_flops": flops, "copy_ms_1GiB": ms, "gemm_ms_8192": ms_mm}


# --------------------------------------------------------------------------------------- correctness
def check_grouped_experts(rows: list) -> None:
    from dynamo_dwdp.model import experts
    from dynamo_dwdp.model.experts import ExpertBank, routed_experts_grouped

    g = torch.Generator(device="cuda").manual_seed(0)
    E, H, I, T, k = 64, 2048, 1408, 96, 6
    banks = [ExpertBank(0, torch.randn(24, 2 * I, H, device="cuda", generator=g).bfloat16() * 0.02,
                        torch.randn(24, H, I, device="cuda", generator=g).bfloat16() * 0.02),
             ExpertBank(24, torch.randn(40, 2 * I, H, device="cuda", generator=g).bfloat16() * 0.02,
                        torch.randn(40, H, I, device="cuda", generator=g).bfloat16() * 0.02)]
    x = torch.randn(T, H, device="cuda", generator=g).bfloat16()
    ids = torch.stack([torch.randperm(E, device="cuda", generator=g)[:k] for _ in range(T)])
    w = torch.rand(T, k, device="cuda", generator=g)
    free = routed_experts_grouped(x, ids, w, banks)
    keep = experts.SYNC_FREE_MAX_ROWS
    experts.SYNC_FREE_MAX_ROWS = 0
    try:
        synced = routed_experts_grouped(x, ids, w, banks)
    finally:
        experts.SYNC_FREE_MAX_ROWS = keep
    ref = torch.zeros(T, H, device="cuda")
    for t in range(T):                                     # fp32 per-pair reference
        for j in range(k):
            e = int(ids[t, j])
            b = banks[0] if e < 24 else banks[1]
            i = e - b.first
            h = x[t].float() @ b.w13[i].float().T
            gate, up = h.chunk(2)
            ref[t] += w[t, j] * (torch.nn.functional.silu(gate) * up) @ b.w2[i].float().T
    rows.append(("grouped experts sync-free vs fp32 reference (2 banks, 96 tokens)", f"rel err {rel(free, ref):.2e}",
                 "ok" if rel(free, ref) < 2e-2 else "HIGH"))
    rows.append(("grouped experts host-synced vs fp32 reference", f"rel err {rel(synced, ref):.2e}",
                 "ok" if rel(synced, ref) < 2e-2 else "HIGH"))


def check_decode_kernel(rows: list) -> None:
    """The Triton MLA decode kernel against an fp64 reference on random caches (DeepSeek widths)."""
    from dynamo_dwdp.model import mla_decode

    g = torch.Generator(device="cuda").manual_seed(3)
    C, R, h, bs, nblk, layers = 512, 64, 16, 16, 700, 3
    for dtype in (torch.float32, torch.bfloat16):
        for ctxs in ([8, 34, 81, 151, 261], [1000] * 32, [3000]):
            pool = torch.randn(nblk, layers, bs, C + R, device="cuda", generator=g).to(dtype)
            layer = pool[:, 1]
            perm = torch.randperm(nblk, device="cuda", generator=g).tolist()
            tables, nxt = [], 0
            for c in ctxs:
                n = (c + bs - 1) // bs
                tables.append(perm[nxt:nxt + n] if nxt + n <= nblk else perm[:n])
                nxt += n
            width = max(len(t) for t in tables)
            q = (torch.randn(len(ctxs), h, C + R, device="cuda", generator=g) * 0.05).to(dtype)
            tab = torch.tensor([t + [0] * (width - len(t)) for t in tables], device="cuda")
            out = mla_decode.mla_decode_attention(q, layer, tab, torch.tensor(ctxs, device="cuda"), C, 0.1, max(ctxs))
            worst = 0.0
            for b, c in enumerate(ctxs):
                keys = layer[tables[b]].reshape(-1, C + R)[:c].double()
                ref = torch.softmax(q[b].double() @ keys.T * 0.1, -1) @ keys[:, :C]
                worst = max(worst, rel(out[b], ref))
            tol = 1e-4 if dtype == torch.float32 else 2e-2
            rows.append((f"Triton MLA decode kernel vs fp64, {str(dtype)[6:]}, contexts {ctxs[:5]}{'...' if len(ctxs) > 5 else ''}"
                         f" (B={len(ctxs)})", f"worst rel err {worst:.2e}", "ok" if worst < tol else "HIGH"))


def check_attention_and_graphs(rows: list, tmp: str) -> None:
    from dynamo_dwdp.config.engine import EngineSettings
    from dynamo_dwdp.engine.llm_engine import LLMEngine
    from dynamo_dwdp.engine.model_runner import ModelRunner
    from dynamo_dwdp.engine.sampling import SamplingParams
    from dynamo_dwdp.synthetic.checkpoint import write_checkpoint
    from dynamo_dwdp.model.moe_executor import LocalExecutor

    lite = os.path.join(tmp, "lite3")
    write_checkpoint(lite, "v2-lite-shape", seed=0, dtype="bf16", num_layers=3, quiet=True, device="cuda")
    g = torch.Generator().manual_seed(1)
    x = torch.randint(5, 1000, (1000,), generator=g).tolist()
    table = list(range(63))
    for dtype, tol in (("float32", 1e-4), ("bfloat16", 3e-2)):
        out = {}
        for backend in ("reference", "sdpa"):
            r = ModelRunner(lite, EngineSettings(block_size=16, num_kv_blocks=64, device="cuda", dtype=dtype,
                                               attention_backend=backend), LocalExecutor)
            # the prompt in two chunks: the second attends to the cached first one (bottom-right causal)
            r.execute([x[:600]], [0], [table], [True])
            out[backend] = r.execute([x[600:]], [600], [table], [True]).float().cpu()
            del r
            torch.cuda.empty_cache()
        e = rel(out["sdpa"], out["reference"])
        rows.append((f"prefill attention SDPA vs reference, {dtype}, 600+400 tokens", f"rel err {e:.2e}",
                     "ok" if e < tol else "HIGH"))
    # decode from graphs vs eager: the same step (same KV, same tokens) both ways, logits compared
    # (greedy tokens of a random-weight model flip on near-ties, so tokens alone prove little in bf16)
    cfg = EngineSettings(block_size=16, num_kv_blocks=160, device="cuda", dtype="bfloat16", cuda_graphs=True,
                       max_num_seqs=8, max_num_batched_tokens=2048)
    runner = ModelRunner(lite, cfg, LocalExecutor)
    lens = [7, 33, 80, 150, 260]
    prompts = [torch.randint(5, 1000, (n,), generator=g).tolist() for n in lens]
    tables, nxt = [], 0
    for n in lens:
        need = (n + 1 + 15) // 16
        tables.append(list(range(nxt, nxt + need)))
        nxt += need
    runner.execute(prompts, [0] * len(lens), tables, [True] * len(lens))
    saved = runner.kv_pool.clone()
    new_tokens = torch.randint(5, 1000, (len(lens),), generator=g).tolist()

    def traced_step():
        """Eager step (graphs off) recording every decoder layer's attention and MLP outputs."""
        outs, hooks = [], []
        for layer in runner.model.model.layers:
            for mod in (layer.self_attn, layer.mlp):
                hooks.append(mod.register_forward_hook(lambda m, i, o: outs.append(o.detach().float().clone())))
        keep, runner.graphs = runner.graphs, None
        try:
            runner.kv_pool.copy_(saved)
            logits = runner.execute([[t] for t in new_tokens], lens, tables, [True] * len(lens)).float()
        finally:
            runner.graphs = keep
            for h in hooks:
                h.remove()
        runner.kv_pool.copy_(saved)
        return logits, outs

    def diff(a, b):
        return " ".join(f"{rel(x, y):.0e}" for x, y in zip(a[1], b[1])) + f" | logits {rel(a[0], b[0]):.1e}"

    first, second = traced_step(), traced_step()
    same = all(rel(x, y) == 0 for x, y in zip(first[1], second[1])) and rel(first[0], second[0]) == 0
    rows.append(("eager decode step twice, same inputs: per attn/mlp output and logits (determinism)",
                 diff(first, second), "ok" if same else "FAIL"))
    graph_logits = runner.execute([[t] for t in new_tokens], lens, tables, [True] * len(lens)).float()
    graph_kv = runner.kv_pool[:-1].clone()
    runner.kv_pool.copy_(saved)
    runner.kv_pool.copy_(saved)
    third, fourth = traced_step(), traced_step()
    rows.append(("eager step twice more after the graph step (determinism)", diff(third, fourth), "info"))
    graphs, runner.graphs = runner.graphs, None
    from dynamo_dwdp.model import attention as attn_mod

    inner, per_layer = attn_mod.mla_decode.mla_decode_attention, []

    def spy(query, kv_layer, block_tables, context_lens, latent_dim, scale, max_context):
        got = inner(query, kv_layer, block_tables, context_lens, latent_dim, scale, max_context)
        from dynamo_dwdp.model.batch import ForwardBatch as FB
        b = FB(input_ids=context_lens, positions=context_lens, slot_mapping=context_lens, block_tables=block_tables,
               context_lens=context_lens, query_lens=[1] * query.shape[0], pad_index=torch.arange(query.shape[0],
               device=query.device), logits_indices=context_lens, max_q=1, max_context=max_context,
               query_lens_t=torch.ones_like(context_lens), context_lens_list=context_lens.tolist())
        ref = attn_mod.paged_latent_attention(query, b, kv_layer, latent_dim, scale)
        per_layer.append(f"{rel(got, ref):.1e}")
        return got

    attn_mod.mla_decode.mla_decode_attention = spy
    try:
        eager_logits = runner.execute([[t] for t in new_tokens], lens, tables, [True] * len(lens)).float()
    finally:
        attn_mod.mla_decode.mla_decode_attention = inner
    eager_kv = runner.kv_pool[:-1].clone()
    rows.append(("decode kernel vs torch path inside the model, per layer (same inputs)", " ".join(per_layer),
                 "ok" if all(float(x) < 2e-2 for x in per_layer) else "HIGH"))
    runner.kv_pool.copy_(saved)
    for layer in runner.model.model.layers:                 # the torch decode path instead of the Triton kernel
        layer.self_attn.backend = "reference"
    torch_logits = runner.execute([[t] for t in new_tokens], lens, tables, [True] * len(lens)).float()
    runner.kv_pool.copy_(saved)
    for layer in runner.model.model.layers:
        layer.self_attn.backend = "auto"
    eager2 = runner.execute([[t] for t in new_tokens], lens, tables, [True] * len(lens)).float()
    runner = None
    torch.cuda.empty_cache()
    ref_runner = ModelRunner(lite, EngineSettings(block_size=16, num_kv_blocks=160, device="cuda", dtype="float32",
                                                attention_backend="reference"), LocalExecutor)
    ref_runner.execute(prompts, [0] * len(lens), tables, [True] * len(lens))
    fp32 = ref_runner.execute([[t] for t in new_tokens], lens, tables, [True] * len(lens)).float()
    del ref_runner
    rows.append(("decode step vs fp32 torch reference: graph(kernel) / eager(kernel) / eager again / eager(torch)",
                 " / ".join(f"{rel(x, fp32):.2e}" for x in (graph_logits, eager_logits, eager2, torch_logits)),
                 "info"))
    ek = rel(eager_logits, torch_logits)
    rows.append(("decode step, Triton MLA kernel vs torch decode path, bf16, batch 5 (end to end: routing can "
                 "flip on near-ties)", f"logits rel err {ek:.2e}", "info"))
    e, ekv = rel(graph_logits, eager2), rel(graph_kv, eager_kv)
    agree = (graph_logits.argmax(-1) == eager2.argmax(-1)).float().mean().item()
    rows.append(("decode step from a CUDA graph vs eager, bf16, batch 5 (bucket 8): KV written by every layer; logits",
                 f"KV rel err {ekv:.2e}; logits rel err {e:.2e}, argmax agree {agree:.0%}; {graphs.replays} replays",
                 "ok" if ekv < 1e-2 and graphs.replays == 1 else "FAIL"))
    torch.cuda.empty_cache()


def profile_decode(tmp: str, batch: int, context: int) -> str:
    """Kernel-time table of one eager decode step (v2-lite-shape, 3 layers) from the torch profiler:
    what a graph replay executes, without the host gaps."""
    from torch.profiler import ProfilerActivity, profile

    from dynamo_dwdp.config.engine import EngineSettings
    from dynamo_dwdp.engine.model_runner import ModelRunner
    from dynamo_dwdp.model.moe_executor import LocalExecutor

    lite = os.path.join(tmp, "lite3")
    bs = 16
    per = (context + 1 + bs - 1) // bs
    cfg = EngineSettings(block_size=bs, num_kv_blocks=batch * per + 1, device="cuda", dtype="bfloat16",
                       max_num_seqs=batch, max_num_batched_tokens=8192)
    r = ModelRunner(lite, cfg, LocalExecutor)
    g = torch.Generator().manual_seed(2)
    tables = [list(range(i * per, (i + 1) * per)) for i in range(batch)]
    for i in range(0, batch, 8):
        chunk = list(range(i, min(batch, i + 8)))
        r.execute([torch.randint(5, 1000, (context,), generator=g).tolist() for _ in chunk], [0] * len(chunk),
                  [tables[j] for j in chunk], [True] * len(chunk))
    step = ([[int(t)] for t in torch.randint(5, 1000, (batch,), generator=g)], [context] * batch, tables, [True] * batch)
    for _ in range(3):
        r.execute(*step)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            r.execute(*step)
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=70)


# ---------------------------------------------------------------------------------------- benchmarks
def bench(model: str, out_jsonl: str, setups: list, hw: str) -> list[dict]:
    from dynamo_dwdp.bench.engine_bench import BenchSetup, append_jsonl, run_points

    results = []
    for kw, points in setups:
        t = time.perf_counter()
        setup = BenchSetup(model_dir=model, strategy="single", ranks=1, device="cuda", dtype="bfloat16", hw=hw,
                           timeout=900, **kw)
        try:
            res = run_points(setup, points)
        except Exception as exc:                           # keep going: one failed setup is a row, not a crash
            say(f"bench {kw} FAILED: {str(exc)[:400]}")
            continue
        append_jsonl(out_jsonl, res)
        results += res
        say(f"bench {kw}: {len(points)} points in {time.perf_counter() - t:.1f}s")
    return results


def roofline_rows(results: list[dict], ceil: dict) -> list[dict]:
    rows = []
    for r in results:
        st = r["setup"]
        step_s = r["step_ms"]["mean"] / 1e3
        hbm_bytes = r["hbm"]["bytes_per_step_per_gpu"]
        flops = r["flops"]["per_step"]
        pred = r["prediction"].get("step_ms_moe_layers")
        rows.append({
            "phase": st["phase"], "tokens": st["tokens_per_iter"], "batch": st["batch"], "context": st["context"],
            "mode": (("graphs" if st.get("cuda_graphs") else "eager") + (" torch-attn" if st["attention"] == "reference"
                                                                          else "")) if st["phase"] == "decode"
                    else ("sdpa" if st["attention"] == "auto" else st["attention"]),
            "step_ms": r["step_ms"]["mean"], "p50_ms": r["step_ms"]["p50"],
            "tok_s": r["tokens_per_s_per_gpu"], "hbm_gb_step": hbm_bytes / 1e9,
            "hbm_frac": hbm_bytes / step_s / ceil["hbm_copy_bytes_per_s"],
            "flop_frac": flops / step_s / ceil["bf16_gemm_flops"],
            "planner_moe_ms": pred, "measured_over_planner": (r["step_ms"]["mean"] / pred) if pred else None,
            "experts_touched": r["per_rank"][0]["experts_touched_per_moe_layer"],
        })
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=".")
    p.add_argument("--layers", type=int, default=27, help="v2-lite-shape depth for the benchmarks (27 = full)")
    p.add_argument("--decode-batches", default="1,8,32,64,128,256")
    p.add_argument("--context", type=int, default=1000, help="decode context (1000: the graphs' block bucket fits exactly)")
    p.add_argument("--prefill", default="2048,8192,16000")
    p.add_argument("--reference-prefill", default="4096", help="prefill lengths also run with reference attention")
    p.add_argument("--hw", default="h100-measured")
    p.add_argument("--skip-checks", action="store_true")
    p.add_argument("--profile-batch", type=int, default=32,
                   help="decode batch of the kernel profile (0: none; skipped with --skip-checks)")
    p.add_argument("--skip-bench", action="store_true")
    p.add_argument("--skip-matrix", action="store_true", help="with >= 2 GPUs: do not run the strategy matrix")
    p.add_argument("--matrix-timeout", type=float, default=300.0)
    a = p.parse_args()
    os.makedirs(a.out, exist_ok=True)
    from dynamo_dwdp.bench.engine_bench import Point
    from dynamo_dwdp.synthetic.checkpoint import write_checkpoint

    ngpu = torch.cuda.device_count()
    info = {"gpus": ngpu, "name": torch.cuda.get_device_name(0), "torch": torch.__version__,
            "cuda": torch.version.cuda, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "argv": sys.argv}
    say(f"{ngpu} x {info['name']}; torch {info['torch']} (CUDA {info['cuda']})")
    ceil = ceilings()
    say(f"ceilings: HBM copy {ceil['hbm_copy_bytes_per_s'] / 1e12:.2f} TB/s, bf16 GEMM "
        f"{ceil['bf16_gemm_flops'] / 1e12:.0f} TFLOP/s")
    tmp = tempfile.mkdtemp()
    checks: list = []
    if not a.skip_checks:
        for check in (check_decode_kernel, check_grouped_experts, lambda rows: check_attention_and_graphs(rows, tmp)):
            try:
                check(checks)
            except Exception as exc:                       # a broken check is a row, the benchmarks still run
                import traceback

                traceback.print_exc()
                checks.append((getattr(check, "__name__", "check"), f"ERR {str(exc)[:200]}", "FAIL"))
        for c in checks:
            say(f"check: {c}")
    if a.profile_batch and not a.skip_checks:       # the profile uses the 3-layer model the checks build
        try:
            text = profile_decode(tmp, a.profile_batch, a.context)
            with open(os.path.join(a.out, "profile_decode.txt"), "w") as f:
                f.write(text)
            print(text, flush=True)
        except Exception:
            import traceback

            traceback.print_exc()
    if a.skip_bench:
        say("done (checks only)")
        return 0 if all(c[2] in ("ok", "info") for c in checks) else 1
    model = os.path.join(tmp, "v2-lite")
    t = time.perf_counter()
    write_checkpoint(model, "v2-lite-shape", seed=0, dtype="bf16", num_layers=a.layers, quiet=True, device="cuda",
                     with_tokenizer=False)
    say(f"v2-lite-shape {a.layers} layers written in {time.perf_counter() - t:.1f}s")
    jsonl = os.path.join(a.out, "bench.jsonl")
    batches = [int(b) for b in a.decode_batches.split(",") if b]
    decode = [Point("decode", b, b, a.context, 0.0, 10, 3) for b in batches]
    prefill = [Point("prefill", n, 1, 0, 0.0, 3, 1) for n in (int(x) for x in a.prefill.split(",") if x)]
    ref_prefill = [Point("prefill", n, 1, 0, 0.0, 3, 1) for n in (int(x) for x in a.reference_prefill.split(",") if x)]
    eager_decode = [pt for pt in decode if pt.batch in (1, 32, 128)]
    ref_decode = [pt for pt in decode if pt.batch in (32, 128)]
    setups = [({"cuda_graphs": True}, decode),                                   # Triton decode kernel
              ({"cuda_graphs": True, "attention": "reference"}, ref_decode + ref_prefill),   # torch paths
              ({}, eager_decode + prefill)]
    results = bench(model, jsonl, setups, a.hw)
    table = roofline_rows(results, ceil)
    if ngpu >= 2 and not a.skip_matrix:
        import subprocess

        cmd = [sys.executable, "-m", "dynamo_dwdp.cli", "bench", "matrix", "--model", model, "--ranks", str(ngpu),
               "--device", "cuda", "--dtype", "bfloat16", "--prefill-tokens", "4096,16384", "--decode-batches",
               "8,32,128", "--context", str(a.context), "--steps", "5", "--warmup", "2", "--hw", a.hw,
               "--out", os.path.join(a.out, "matrix.jsonl")]
        say("matrix: " + " ".join(cmd[1:]))
        rc = subprocess.call(cmd, timeout=a.matrix_timeout)
        say(f"matrix finished rc={rc}")
    summary = {"info": info, "ceilings": ceil, "checks": checks, "bench": table}
    with open(os.path.join(a.out, "gpu_perf.json"), "w") as f:
        json.dump(summary, f, indent=1)
    lines = [f"# gpu_perf {info['date']}: {ngpu} x {info['name']}, torch {info['torch']}",
             f"ceilings: HBM copy {ceil['hbm_copy_bytes_per_s'] / 1e12:.2f} TB/s, bf16 GEMM "
             f"{ceil['bf16_gemm_flops'] / 1e12:.0f} TFLOP/s", ""]
    lines += [f"| {c[0]} | {c[1]} | {c[2]} |" for c in checks]
    lines += ["", "| phase | tokens | ctx | mode | step ms | tok/s | HBM GB/step | % HBM roofline | % GEMM peak "
              "| planner ms (MoE layers) | measured/planner | experts touched |", "|" + "---|" * 12]
    for r in table:
        lines.append(f"| {r['phase']} | {r['tokens']} | {r['context']} | {r['mode']} | {r['step_ms']:.2f} | "
                     f"{r['tok_s']:,.0f} | {r['hbm_gb_step']:.2f} | {100 * r['hbm_frac']:.1f} | "
                     f"{100 * r['flop_frac']:.1f} | {r['planner_moe_ms'] or 0:.2f} | "
                     f"{r['measured_over_planner'] or 0:.2f} | {r['experts_touched']:.1f} |")
    with open(os.path.join(a.out, "gpu_perf.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    say("done")
    return 0 if all(c[2] in ("ok", "info") for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
