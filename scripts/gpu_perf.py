"""One GPU session in one command: machine ceilings, correctness of the fast paths, engine benchmarks.

  PYTHONPATH=.:scripts PYTHONUNBUFFERED=1 python3 scripts/gpu_perf.py --out $OUT [--layers 27]
  PYTHONPATH=.:scripts PYTHONUNBUFFERED=1 python3 scripts/gpu_perf.py --session --out $OUT --pack DYNAMO_PACK

`--session` runs the whole one-GPU session instead (scripts/gpu_session.py: these steps and the other
GPU scripts as subprocesses, each under its own timeout, within one time budget; `--session --help`).

Installs nothing, needs no network. Steps (each prints a line; a table comes last):
1. ceilings: HBM (device-to-device copy, bytes read + written) and bf16 GEMM (8192^3), CUDA events;
2. correctness on the GPU: sync-free vs host-synced grouped-GEMM experts against fp32; the fused
   Triton kernels (model/kernels/: router, MLA prep, experts bf16/FP8, FP8 linear, dense SwiGLU)
   against torch references; the prefill attention the engine runs vs the reference path (fp32, bf16),
   the Triton MLA prefill kernel vs float64 at 4K tokens and after 4.5K cached; one decode step from
   a CUDA graph vs eager, and the Triton MLA decode kernel vs the torch decode path (logits and KV);
   the FP8-resident engines (fp8-block; fp8-block-a8, W8A8 experts) vs the dequantized bf16 model
   (logits); routed experts at the v2-lite shapes timed three ways (torch._grouped_mm, Triton bf16, Triton FP8); GPU operations per decode
   step with the fused kernels off/on; a kernel-time profile of one eager decode step;
3. builds the v2-lite-shape random model (bf16, --layers deep) on the GPU;
4. single-GPU engine benchmarks (`bench engine --strategy single`): decode batches from CUDA graphs
   (captured at start-up: count, seconds, graph memory reported), FP8-resident weights, the same
   with the fused kernels off (DWDP_FUSED_KERNELS=0: the torch paths), eager decode, prefill
   lengths with SDPA (--more: torch._grouped_mm experts end to end, the torch attention paths);
   the HBM-roofline fraction uses the measured copy bandwidth of step 1, the planner runs with --hw;
5. the strategy matrix, decode steps from CUDA graphs for every strategy (`bench matrix --cuda-graphs`):
   with >= 2 GPUs one rank per GPU, prefill and decode, CV 0 and 20% ($OUT/matrix.jsonl); with one
   GPU two rank processes share it, decode only, captured and eager ($OUT/matrix_shared_gpu_*.jsonl,
   labelled: they measure graphs and peer collectives, not an interconnect).
Writes $OUT/gpu_perf.json (everything), $OUT/bench.jsonl (bench records), $OUT/gpu_perf.md (tables).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

if __name__ == "__main__" and "--session" in sys.argv[1:]:     # the session driver: no torch in its process
    import gpu_session

    sys.exit(gpu_session.main([x for x in sys.argv[1:] if x != "--session"]))

import torch  # noqa: E402

from gpu_common import (block_tables, ceilings, decode_runner, fp8_engine_logits, graph_us, lite3, median_ms,  # noqa: F401
                        rel, rotating, say, write_v2lite)


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
    from dynamo_dwdp.engine.model_runner import ModelRunner
    from dynamo_dwdp.model import prefill_attention
    from dynamo_dwdp.model.moe_executor import LocalExecutor

    lite = lite3(tmp)
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
        impl = prefill_attention.impl_for(torch.empty(0, dtype=getattr(torch, dtype), device="cuda"))
        rows.append((f"prefill attention ({impl}) vs reference, {dtype}, 600+400 tokens", f"rel err {e:.2e}",
                     "ok" if e < tol else "HIGH"))
    check_prefill_kernel(rows)
    # decode from graphs vs eager: the same step (same KV, same tokens) both ways, logits compared
    # (greedy tokens of a random-weight model flip on near-ties, so tokens alone prove little in bf16)
    cfg = EngineSettings(block_size=16, num_kv_blocks=160, device="cuda", dtype="bfloat16", cuda_graphs=True,
                       max_num_seqs=8, max_num_batched_tokens=2048)
    runner = ModelRunner(lite, cfg, LocalExecutor)
    lens = [7, 33, 80, 150, 260]
    prompts = [torch.randint(5, 1000, (n,), generator=g).tolist() for n in lens]
    tables, _ = block_tables(lens, 1)
    runner.execute(prompts, [0] * len(lens), tables, [True] * len(lens))
    saved = runner.kv_pool.clone()
    new_tokens = torch.randint(5, 1000, (len(lens),), generator=g).tolist()

    def traced_step():
        """Eager step (graphs off) recording every decoder layer's attention and MLP outputs."""
        outs, hooks = [], []
        for layer in runner.model.model.layers:
            for mod in (layer.self_attn, layer.mlp):
                hooks.append(mod.register_forward_hook(lambda m, i, o: outs.append(_summed(o).detach().float().clone())))
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

    def spy(query, kv_layer, block_tables, context_lens, latent_dim, scale, max_context, q_pe=None):
        got = inner(query, kv_layer, block_tables, context_lens, latent_dim, scale, max_context, q_pe=q_pe)
        if q_pe is not None:
            query = torch.cat([query, q_pe], -1)
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


def check_prefill_kernel(rows: list) -> None:
    """The Triton MLA prefill kernel with the tile the engine runs, against its float64 reference at
    prompt lengths the engine serves (a fresh causal prompt, and a chunk after cached tokens), bf16,
    DeepSeek-V2-Lite's head dims (16 heads, nope 128, rope 64, v 128)."""
    from dynamo_dwdp.model.kernels import mla_prefill

    g = torch.Generator(device="cuda").manual_seed(11)
    for T, S in ((4093, 4093), (1500, 6000)):
        q_n, k_n, v = (torch.randn(n, 16, 128, device="cuda", generator=g).bfloat16() for n in (T, S, S))
        q_p = torch.randn(T, 16, 64, device="cuda", generator=g).bfloat16()
        k_p = torch.randn(S, 64, device="cuda", generator=g).bfloat16()
        scale = 192 ** -0.5
        e = rel(mla_prefill.mla_prefill_attention(q_n, q_p, k_n, k_p, v, scale).double(),
                mla_prefill.reference(q_n, q_p, k_n, k_p, v, scale))
        rows.append((f"Triton MLA prefill kernel vs float64, bf16, {T} queries / {S} keys", f"rel err {e:.2e}",
                     "ok" if e < 2e-2 else "HIGH"))
        del q_n, k_n, v, q_p, k_p
        torch.cuda.empty_cache()


def check_fused_kernels(rows: list) -> None:
    """The Triton kernels of dynamo_dwdp/model/kernels/ against torch references on the GPU, bf16,
    DeepSeek shapes (v2-lite, and a V3-sized router)."""
    import torch.nn.functional as F
    from types import SimpleNamespace

    from dynamo_dwdp.model.fp8 import dequantize_block_fp8, quantize_block_fp8
    from dynamo_dwdp.model.kernels import mla_prep, moe_gemm, router
    from dynamo_dwdp.model.moe import Router
    from dynamo_dwdp.model.rope import RotaryEmbedding
    from dynamo_dwdp.model.experts import ExpertBank

    g = torch.Generator(device="cuda").manual_seed(7)
    for name, E, G, TG, K, H, norm, T in (("v2-lite", 64, 1, 1, 6, 2048, False, 64), ("V3", 256, 8, 4, 8, 7168, True, 64),
                                          ("v2-lite", 64, 1, 1, 6, 2048, False, 4096)):
        cfg = SimpleNamespace(topk_method="noaux_tc", uses_correction_bias=True,
                              n_routed_experts=E, hidden_size=H, n_group=G, topk_group=TG, num_experts_per_tok=K,
                              norm_topk_prob=norm, routed_scaling_factor=2.5)
        r = Router(cfg)
        r.weight.data = torch.randn(E, H, device="cuda", generator=g).cpu() * 0.02
        r.e_score_correction_bias.copy_(torch.randn(E, device="cuda", generator=g).cpu() * 0.01)
        x = torch.randn(T, H, device="cuda", generator=g).bfloat16()
        ref_ids, ref_w = r(x.cpu())                                        # the torch path (CPU, fp32)
        rc = r.cuda()
        ids, w = router.noaux_tc_route(x, rc.weight, rc.e_score_correction_bias, rc.selection_skew, K, G, TG, norm, 2.5)
        a, b = ids.cpu().sort(1), ref_ids.sort(1)
        same = (a.values == b.values).all(1).float().mean().item()
        werr = rel(w.cpu().gather(1, a.indices), ref_w.gather(1, b.indices))
        us = graph_us(lambda: router.noaux_tc_route(x, rc.weight, rc.e_score_correction_bias, rc.selection_skew,
                                                    K, G, TG, norm, 2.5))
        us_ref = graph_us(lambda: _torch_router(rc, x))
        rows.append((f"router kernels vs torch router, {name} ({E} experts, {G} groups), {T} tokens",
                     f"same expert sets {same:.0%}, weights rel err {werr:.1e}; {us:.1f} us vs torch {us_ref:.1f} us",
                     "ok" if same == 1.0 and werr < 1e-5 else "FAIL"))
    # MLA prep: norm + rope + cache write vs the torch sequence (bf16)
    C, R, N, h, bs, T = 512, 64, 128, 16, 16, 64
    rope = RotaryEmbedding(SimpleNamespace(qk_rope_head_dim=R, rope=SimpleNamespace(kind="default", theta=10000.0,
                                                                                        interleave=True))).cuda()
    q = torch.randn(T, h, N + R, device="cuda", generator=g).bfloat16()
    kv = torch.randn(T, C + R, device="cuda", generator=g).bfloat16()
    nw = (torch.rand(C, device="cuda", generator=g) + 0.5).bfloat16()
    cos, sin = rope.cos_sin(torch.randint(0, 4000, (T,), device="cuda", generator=g))
    pool = torch.randn(200, 3, bs, C + R, device="cuda", generator=g).bfloat16()
    slots = torch.randperm(200 * bs, device="cuda", generator=g)[:T]
    ref_pool = pool.clone()
    lat = F.rms_norm(kv[:, :C], (C,), nw, 1e-6)
    ref_pool[:, 1][slots // bs, slots % bs] = torch.cat([lat, rope.apply(kv[:, C:], cos, sin)], -1)
    q_pe = mla_prep.mla_prep(q, kv, nw, 1e-6, cos, sin, slots, pool[:, 1], N, True)
    e_q, e_kv = rel(q_pe, rope.apply(q[..., N:], cos, sin)), rel(pool, ref_pool)
    us = graph_us(lambda: mla_prep.mla_prep(q, kv, nw, 1e-6, cos, sin, slots, pool[:, 1], N, True))
    rows.append(("MLA norm+rope+cache-write kernel vs torch path, bf16, 64 tokens",
                 f"q_pe rel err {e_q:.1e}, cache rel err {e_kv:.1e}; {us:.1f} us", "ok" if max(e_q, e_kv) < 1e-2 else "FAIL"))
    # experts: fused (bf16 and FP8 banks) vs fp32 reference; FP8 linear vs the dequantized weight
    E, H, I, T, k = 64, 2048, 1408, 96, 6
    w13 = torch.randn(E, 2 * I, H, device="cuda", generator=g).bfloat16() * 0.02
    w2 = torch.randn(E, H, I, device="cuda", generator=g).bfloat16() * 0.02
    banks = [ExpertBank(0, w13[:24], w2[:24]), ExpertBank(24, w13[24:], w2[24:])]
    x = torch.randn(T, H, device="cuda", generator=g).bfloat16()
    ids = torch.stack([torch.randperm(E, device="cuda", generator=g)[:k] for _ in range(T)])
    wt = torch.rand(T, k, device="cuda", generator=g)

    def ref_experts(w13f, w2f):
        out = torch.zeros(T, H, device="cuda")
        for t in range(T):
            for j in range(k):
                e = int(ids[t, j])
                gate, up = (x[t].float() @ w13f(e).T).chunk(2)
                out[t] += wt[t, j] * (F.silu(gate) * up) @ w2f(e).T
        return out

    ref = ref_experts(lambda e: w13[e].float(), lambda e: w2[e].float())
    got = moe_gemm.routed_experts_fused(x, ids, wt, banks)
    rows.append(("fused experts (Triton) vs fp32 reference, bf16, 2 banks, 96 tokens", f"rel err {rel(got, ref):.2e}",
                 "ok" if rel(got, ref) < 2e-2 else "HIGH"))
    q13, s13 = zip(*(quantize_block_fp8(w) for w in w13))
    q2, s2 = zip(*(quantize_block_fp8(w) for w in w2))
    q13, s13, q2, s2 = (torch.stack(t) for t in (q13, s13, q2, s2))
    fbanks = [ExpertBank(0, q13, q2, s13, s2)]
    ref8 = ref_experts(lambda e: dequantize_block_fp8(q13[e], s13[e], dtype=torch.bfloat16).float(),
                       lambda e: dequantize_block_fp8(q2[e], s2[e], dtype=torch.bfloat16).float())
    got8 = moe_gemm.routed_experts_fused(x, ids, wt, fbanks)
    rows.append(("fused FP8 experts vs fp32 reference over the dequantized weights", f"rel err {rel(got8, ref8):.2e}",
                 "ok" if rel(got8, ref8) < 2e-2 else "HIGH"))
    wl = torch.randn(3072, 2048, device="cuda", generator=g) * 0.02
    ql, sl = quantize_block_fp8(wl)
    for M in (1, 64, 1024):
        xm = torch.randn(M, 2048, device="cuda", generator=g).bfloat16()
        e = rel(moe_gemm.fp8_linear(xm, ql, sl), xm.float() @ dequantize_block_fp8(ql, sl).T)
        rows.append((f"FP8 linear vs fp32 over the dequantized weight, M={M}", f"rel err {e:.2e}",
                     "ok" if e < 1e-2 else "HIGH"))
    mlp_w = torch.randn(2 * 2816, 2048, device="cuda", generator=g).bfloat16() * 0.02
    xm = torch.randn(8, 2048, device="cuda", generator=g).bfloat16()
    gate, up = (xm.float() @ mlp_w.float().T).chunk(2, -1)
    e = rel(moe_gemm.dense_swiglu(xm, mlp_w), F.silu(gate) * up)
    rows.append(("dense SwiGLU kernel (shared experts) vs fp32, M=8", f"rel err {e:.2e}", "ok" if e < 1e-2 else "HIGH"))
    q13m, s13m = quantize_block_fp8(mlp_w)
    dq = dequantize_block_fp8(q13m, s13m)
    for M in (1, 200):
        xm = torch.randn(M, 2048, device="cuda", generator=g).bfloat16()
        gate, up = (xm.float() @ dq.T).chunk(2, -1)
        e = rel(moe_gemm.dense_swiglu(xm, q13m, s13m), F.silu(gate) * up)
        rows.append((f"dense SwiGLU kernel, FP8 weights, vs fp32 over the dequantized weight, M={M}",
                     f"rel err {e:.2e}", "ok" if e < 1e-2 else "HIGH"))


def _torch_router(r, x):
    """The torch noaux_tc router (moe.Router's reference body) on the GPU, for timing."""
    cfg = r.cfg
    T, E, G = x.shape[0], cfg.n_routed_experts, cfg.n_group
    scores = torch.nn.functional.linear(x.float(), r.weight).sigmoid()
    choice = scores + r.e_score_correction_bias + r.selection_skew
    if G > 1:
        gs = choice.view(T, G, E // G).topk(2, dim=-1)[0].sum(dim=-1)
        keep = torch.topk(gs, k=cfg.topk_group, dim=-1, sorted=False)[1]
        mask = torch.zeros_like(gs).scatter_(1, keep, 1.0)
        choice = choice.masked_fill(mask.unsqueeze(-1).expand(T, G, E // G).reshape(T, E) == 0, float("-inf"))
    ids = torch.topk(choice, k=cfg.num_experts_per_tok, dim=-1, sorted=False)[1]
    return ids, scores.gather(1, ids)


def bench_expert_gemms(rows: list) -> list[dict]:
    """Routed experts at the real v2-lite shapes (64 experts, top-6, H 2048, I 1408), decode batch
    sizes, each call replayed from a CUDA graph: torch._grouped_mm (sync-free path, with its sort and
    gathers) vs the Triton kernels (bf16 and FP8 weights). GB/s counts the touched experts' weights."""
    from dynamo_dwdp.model.fp8 import quantize_block_fp8
    from dynamo_dwdp.model.kernels import moe_gemm
    from dynamo_dwdp.model.experts import ExpertBank, routed_experts_grouped

    g = torch.Generator(device="cuda").manual_seed(9)
    E, H, I, k = 64, 2048, 1408, 6
    sets = []
    for _ in range(3):                                       # rotate weight sets: more than L2
        w13 = torch.randn(E, 2 * I, H, device="cuda", generator=g).bfloat16() * 0.02
        w2 = torch.randn(E, H, I, device="cuda", generator=g).bfloat16() * 0.02
        q13, s13 = zip(*(quantize_block_fp8(w) for w in w13))
        q2, s2 = zip(*(quantize_block_fp8(w) for w in w2))
        sets.append(([ExpertBank(0, w13, w2)], [ExpertBank(0, torch.stack(q13), torch.stack(q2), torch.stack(s13),
                                                            torch.stack(s2))]))
    out = []
    for T in (1, 8, 64, 256):
        x = torch.randn(T, H, device="cuda", generator=g).bfloat16()
        ids = torch.stack([torch.randperm(E, device="cuda", generator=g)[:k] for _ in range(T)])
        wt = torch.rand(T, k, device="cuda", generator=g)
        touched = ids.unique().numel()

        def rot(fn, which):
            return rotating(fn, x, ids, wt, sets, which)
        ref = routed_experts_grouped(x, ids, wt, sets[0][0]).float()
        err = rel(moe_gemm.routed_experts_fused(x, ids, wt, sets[0][0]), ref)     # bf16 weights both
        times = {"grouped_mm bf16": graph_us(rot(routed_experts_grouped, 0)),
                 "triton bf16": graph_us(rot(moe_gemm.routed_experts_fused, 0)),
                 "triton fp8": graph_us(rot(moe_gemm.routed_experts_fused, 1))}
        bytes_bf16 = touched * 3 * H * I * 2
        rec = {"tokens": T, "experts_touched": touched, **{f"{n} us": v for n, v in times.items()},
               "grouped_mm GB/s": bytes_bf16 / times["grouped_mm bf16"] / 1e3,
               "triton bf16 GB/s": bytes_bf16 / times["triton bf16"] / 1e3,
               "triton fp8 GB/s (fp8 bytes)": bytes_bf16 / 2 / times["triton fp8"] / 1e3}
        out.append(rec)
        rows.append((f"experts v2-lite T={T} ({touched} experts): grouped_mm / triton bf16 / triton fp8",
                     " / ".join(f"{v:.1f} us" for v in times.values()) +
                     f" ({rec['grouped_mm GB/s']:.0f} / {rec['triton bf16 GB/s']:.0f} / "
                     f"{rec['triton fp8 GB/s (fp8 bytes)']:.0f} GB/s); triton bf16 vs grouped_mm rel err {err:.1e}",
                     "ok" if err < 3e-2 else "HIGH"))
    return out


def check_fp8_engine(rows: list, tmp: str, fmt: str = "fp8-block", tol: float = 3e-2) -> None:
    """The FP8-resident engine (3-layer v2-lite-shape) vs the same model with its weights rounded
    through FP8 and kept bf16 (the dequantized bf16 model): one prefill and one decode step, logits.
    fp8-block-a8 also quantizes the routed experts' activations, hence its wider tolerance (8e-2, the
    W8A8 experts' stated tolerance against the dequantized model)."""
    out = fp8_engine_logits(lite3(tmp), (fmt, "round-trip"))
    ep, ed = rel(out[fmt][0], out["round-trip"][0]), rel(out[fmt][1], out["round-trip"][1])
    agree = (out[fmt][1].argmax(-1) == out["round-trip"][1].argmax(-1)).float().mean().item()
    st = out[fmt][2]
    name = "FP8-resident engine" if fmt == "fp8-block" else f"engine with weight_format {fmt}"
    rows.append((f"{name} vs dequantized bf16 model (3 layers): prefill / decode-graph logits "
                 f"(tolerance {tol:.0e})", f"rel err {ep:.2e} / {ed:.2e}, decode argmax agree {agree:.0%}; weights "
                 f"{st['bytes_before'] / 1e9:.2f} -> {st['bytes_after'] / 1e9:.2f} GB",
                 "ok" if max(ep, ed) < tol else "HIGH"))


def count_kernels(tmp: str, batch: int, context: int, fused: bool) -> int:
    """CUDA kernels one decode step of the 3-layer model launches (torch profiler), fused kernels on/off."""
    from torch.profiler import ProfilerActivity, profile

    from dynamo_dwdp.config.engine import EngineSettings
    from dynamo_dwdp.engine.model_runner import ModelRunner
    from dynamo_dwdp.model import kernels
    from dynamo_dwdp.model.moe_executor import LocalExecutor

    os.environ["DWDP_FUSED_KERNELS"] = "1" if fused else "0"
    kernels.available.cache_clear()
    try:
        lite = lite3(tmp)
        per = (context + 2 + 15) // 16
        r = ModelRunner(lite, EngineSettings(block_size=16, num_kv_blocks=batch * per + 1, device="cuda",
                                           dtype="bfloat16", max_num_seqs=batch, max_num_batched_tokens=8192),
                        LocalExecutor)
        tables = [list(range(i * per, (i + 1) * per)) for i in range(batch)]
        step = ([[7]] * batch, [context] * batch, tables, [True] * batch)
        r.execute(*step)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            r.execute(*step)
        try:
            n = sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
        except AttributeError:
            n = len(prof.events())
        del r
        torch.cuda.empty_cache()
        return n
    finally:
        os.environ["DWDP_FUSED_KERNELS"] = "1"
        kernels.available.cache_clear()


def profile_decode(tmp: str, batch: int, context: int) -> str:
    """Kernel-time table of one eager decode step (v2-lite-shape, 3 layers) from the torch profiler:
    what a graph replay executes, without the host gaps."""
    from torch.profiler import ProfilerActivity, profile

    r, step = decode_runner(lite3(tmp), batch, context, cuda_graphs=False)
    for _ in range(3):
        r.execute(*step)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            r.execute(*step)
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=70)


# ---------------------------------------------------------------------------------------- benchmarks
def _summed(out):
    """A module's output as one tensor (an MoE block asked for its parts returns (routed, shared or None))."""
    if isinstance(out, tuple):
        return out[0] if out[1] is None else out[0] + out[1]
    return out


def bench(model: str, out_jsonl: str, setups: list, hw: str, on_done=None, failed: list | None = None) -> list[dict]:
    """`bench engine --strategy single` setups, one model load each: [(BenchSetup keywords, points, env)].
    A setup that raises is said and appended to `failed` (setup, env, error); the next one still runs."""
    from dynamo_dwdp.bench.engine_bench import BenchSetup, append_jsonl, run_points

    results = []
    for kw, points, env in setups:
        t = time.perf_counter()
        setup = BenchSetup(model_dir=model, strategy="single", ranks=1, device="cuda", dtype="bfloat16", hw=hw,
                           timeout=900, **kw)
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)                             # read by the spawned rank process
        try:
            res = run_points(setup, points)
        except Exception as exc:                           # keep going: one failed setup is a row, not a crash
            say(f"bench {kw} {env} FAILED: {str(exc)[:400]}")
            if failed is not None:
                failed.append({"setup": kw, "env": env, "error": str(exc)[:400]})
            continue
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        for r in res:
            r["env"] = env
            r["bench_setup"] = kw                          # as asked (the record's setup may not list every field)
        append_jsonl(out_jsonl, res)
        results += res
        gr = res[0].get("graphs") if res else None
        say(f"bench {kw} {env}: {len(points)} points in {time.perf_counter() - t:.1f}s"
            + (f"; start-up capture {gr['count']} graphs in {gr['capture_s']:.1f}s, "
               f"{gr['capture_bytes'] / 2**20:.0f} MiB, {gr['captures_after_start']} captures after start" if gr else ""))
        if on_done:
            on_done(results)
    return results


PREFILL_ENV = "DWDP_PREFILL_ATTENTION"      # the engine's prefill attention override (model/prefill_attention.py)


def roofline_rows(results: list[dict], ceil: dict) -> list[dict]:
    rows = []
    for r in results:
        st = r["setup"]
        step_s = r["step_ms"]["mean"] / 1e3
        hbm_bytes = r["hbm"]["bytes_per_step_per_gpu"]
        flops = r["flops"]["per_step"]
        pred = r["prediction"].get("step_ms_moe_layers")
        mode = ((("graphs" if st.get("cuda_graphs") else "eager") + (" torch-attn" if st["attention"] == "reference"
                                                                       else "")) if st["phase"] == "decode"
                else ("attn " + (r.get("env", {}).get(PREFILL_ENV) or os.environ.get(PREFILL_ENV) or "auto")
                      if st["attention"] == "auto" else st["attention"]))
        if st.get("weights", "native") != "native":
            mode += " " + st["weights"]
        if st.get("async_scheduling") or r.get("bench_setup", {}).get("async_scheduling"):
            mode += " async"
        if r.get("env", {}).get("DWDP_FUSED_KERNELS") == "0":
            mode += " unfused"
        if r.get("env", {}).get("DWDP_EXPERT_GEMM") == "grouped_mm":
            mode += " grouped_mm"
        rows.append({
            "phase": st["phase"], "tokens": st["tokens_per_iter"], "batch": st["batch"], "context": st["context"],
            "mode": mode, "graphs": r.get("graphs"),
            "step_ms": r["step_ms"]["mean"], "p50_ms": r["step_ms"]["p50"],
            "tok_s": r["tokens_per_s_per_gpu"], "hbm_gb_step": hbm_bytes / 1e9,
            "hbm_frac": hbm_bytes / step_s / ceil["hbm_copy_bytes_per_s"],
            "flop_frac": flops / step_s / ceil["bf16_gemm_flops"],
            "planner_moe_ms": pred, "measured_over_planner": (r["step_ms"]["mean"] / pred) if pred else None,
            "experts_touched": r["per_rank"][0]["experts_touched_per_moe_layer"],
        })
    return rows


def write_tables(out: str, info: dict, ceil: dict, checks: list, table: list[dict], extra: dict) -> None:
    """$OUT/gpu_perf.json (everything) and $OUT/gpu_perf.md (the tables docs/performance.md shows)."""
    with open(os.path.join(out, "gpu_perf.json"), "w") as f:
        json.dump({"info": info, "ceilings": ceil, "checks": checks, "bench": table, **extra}, f, indent=1)
    lines = [f"# gpu_perf {info['date']}: {info['gpus']} x {info['name']}, torch {info['torch']}",
             f"command: {' '.join(info['argv'])}",
             f"ceilings: HBM copy {ceil['hbm_copy_bytes_per_s'] / 1e12:.2f} TB/s, bf16 GEMM "
             f"{ceil['bf16_gemm_flops'] / 1e12:.0f} TFLOP/s", ""]
    lines += ["| check | result | status |", "|---|---|---|"] + [f"| {c[0]} | {c[1]} | {c[2]} |" for c in checks]
    bf16 = {r["batch"]: r["step_ms"] for r in table if r["phase"] == "decode" and r["mode"] == "graphs"}
    lines += ["", "% HBM roofline: bytes the step touches at bf16 weights / measured copy bandwidth (for FP8 rows "
              "the same bf16 byte count: read it as the bf16-equivalent rate; 'vs bf16' is the step-time ratio)", "",
              "| phase | tokens | ctx | mode | step ms | vs bf16 | tok/s | HBM GB/step | % HBM roofline | % GEMM peak "
              "| planner ms (MoE layers) | measured/planner | experts touched |", "|" + "---|" * 13]
    for r in table:
        vs = (f"{r['step_ms'] / bf16[r['batch']]:.2f}" if r["phase"] == "decode" and r["batch"] in bf16 else "")
        lines.append(f"| {r['phase']} | {r['tokens']} | {r['context']} | {r['mode']} | {r['step_ms']:.2f} | {vs} | "
                     f"{r['tok_s']:,.0f} | {r['hbm_gb_step']:.2f} | {100 * r['hbm_frac']:.1f} | "
                     f"{100 * r['flop_frac']:.1f} | {r['planner_moe_ms'] or 0:.2f} | "
                     f"{r['measured_over_planner'] or 0:.2f} | {r['experts_touched']:.1f} |")
    seen = set()
    for r in table:
        gr = r.get("graphs")
        if gr and r["mode"] not in seen:
            seen.add(r["mode"])
            lines.append(f"\nstart-up capture ({r['mode']}): {gr['count']} decode graphs in {gr['capture_s']:.1f} s, "
                         f"{gr['capture_bytes'] / 2**20:.0f} MiB of graph memory, {gr['captures_after_start']} "
                         "captures after start")
    if extra.get("async_scheduling"):
        lines.append(f"\n--async-scheduling: {extra['async_scheduling']}")
    for fail in extra.get("bench_failures", []):
        lines.append(f"\nbench setup FAILED: {fail['setup']} {fail['env']}: {fail['error']}")
    with open(os.path.join(out, "gpu_perf.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def run_matrices(model: str, ngpu: int, a) -> None:
    """The strategy matrix (DWDP/DEP/TP, decode from CUDA graphs). With >= 2 GPUs: one rank per GPU,
    prefill and decode, imbalance CV 0 and 20% (the two-GPU comparison). With one GPU: two rank
    processes share it (CUDA IPC between them; figures labelled "shared GPU": the ranks time-slice
    the chip), decode only, captured and eager, which measures the graphs and the peer collectives,
    not the interconnect."""
    import subprocess

    ranks = ngpu if ngpu >= 2 else 2
    base = [sys.executable, "-m", "dynamo_dwdp.cli", "bench", "matrix", "--model", model, "--ranks", str(ranks),
            "--device", "cuda", "--dtype", "bfloat16", "--context", str(a.context), "--steps", "5", "--warmup", "2",
            "--hw", a.hw]
    if ngpu >= 2:
        runs = [("matrix.jsonl", ["--prefill-tokens", "4096,16384", "--decode-batches", "8,32,128", "--cuda-graphs"])]
    else:
        one = ["--prefill-tokens", "", "--decode-batches", a.shared_decode_batches, "--imbalance", "0"]
        runs = [("matrix_shared_gpu_graphs.jsonl", one + ["--cuda-graphs"]), ("matrix_shared_gpu_eager.jsonl", one)]
    for name, extra in runs:
        cmd = base + extra + ["--out", os.path.join(a.out, name)]
        say(("" if ngpu >= 2 else "[2 ranks sharing one GPU] ") + "matrix: " + " ".join(cmd[1:]))
        try:
            rc = subprocess.call(cmd, timeout=a.matrix_timeout)
        except subprocess.TimeoutExpired:
            rc = "timeout"
        say(f"matrix {name} finished rc={rc}")


STEPS = ("decode_kernel", "grouped_experts", "fused_kernels", "graphs", "fp8_engine", "fp8a8_engine",
         "expert_gemms", "op_count",
         "profile", "bench_decode", "bench_fp8", "bench_eager", "bench_prefill", "bench_unfused", "matrix")
DEFAULT_STEPS = tuple(s for s in STEPS if s != "bench_prefill")     # bench_eager already runs the prefill points


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="The whole GPU session (these steps and the other GPU scripts, each under "
                                       "its own timeout, one results file): scripts/gpu_perf.py --session --help")
    p.add_argument("--session", action="store_true",
                   help="run the whole GPU session instead (scripts/gpu_session.py; its flags follow)")
    p.add_argument("--out", default=".")
    p.add_argument("--layers", type=int, default=27, help="v2-lite-shape depth for the benchmarks (27 = full)")
    p.add_argument("--model", default="", help="an existing model directory for the benchmarks (default: write the "
                   "v2-lite shape, --layers deep, and delete it at the end)")
    p.add_argument("--decode-batches", default="1,8,32,64,128,256")
    p.add_argument("--fp8-batches", default="1,64,256",
                   help="bench_fp8: the decode batches (of --decode-batches' points or not) run per --fp8-weights")
    p.add_argument("--fp8-weights", default="fp8-block",
                   help="bench_fp8: comma list of weight formats, one model load each (fp8-block, fp8-block-a8)")
    p.add_argument("--context", type=int, default=1000, help="decode context (1000: the graphs' block bucket fits exactly)")
    p.add_argument("--prefill", default="2048,8192,16000")
    p.add_argument("--reference-prefill", default="4096", help="prefill lengths also run with reference attention")
    p.add_argument("--hw", default="h100-measured")
    p.add_argument("--async-scheduling", action="store_true",
                   help="bench_decode with engine.async_scheduling (host work overlapped with the GPU step), and "
                        "bench_prefill's points once more with it after the plain ones; where "
                        "this tree's bench has no such setting a line says so and the bench runs without it (the "
                        "mode column ends in 'async' only when it ran with it)")
    p.add_argument("--skip-checks", action="store_true")
    p.add_argument("--profile-batch", type=int, default=32,
                   help="decode batch of the kernel profile (0: none; skipped with --skip-checks)")
    p.add_argument("--skip-bench", action="store_true")
    p.add_argument("--more", action="store_true", help="also: grouped_mm experts end to end, torch attention paths")
    p.add_argument("--skip-matrix", action="store_true", help="do not run the strategy matrix")
    p.add_argument("--matrix-timeout", type=float, default=300.0)
    p.add_argument("--shared-decode-batches", default="8,32",
                   help="one GPU: decode batches of the two-ranks-on-one-GPU matrix (default 8,32)")
    p.add_argument("--matrix-only", action="store_true",
                   help="build the model and run the strategy matrix only (no ceilings' checks, no single bench)")
    p.add_argument("--only", default="",
                   help="comma list of steps to run (default: all but bench_prefill, which bench_eager "
                        "includes): " + ",".join(STEPS))
    return p


def _ints(text: str) -> list[int]:
    return [int(b) for b in text.split(",") if b]


def bench_setups(a, only: set, graph_kw: dict) -> list[tuple[dict, list, dict]]:
    """The `bench` setups the selected steps run, one model load each: (BenchSetup keywords, points, env)."""
    from dynamo_dwdp.bench.engine_bench import Point

    batches = _ints(a.decode_batches)
    decode = [Point("decode", b, b, a.context, 0.0, 10, 3) for b in batches]
    prefill = [Point("prefill", n, 1, 0, 0.0, 3, 1) for n in _ints(a.prefill)]
    ref_prefill = [Point("prefill", n, 1, 0, 0.0, 3, 1) for n in _ints(a.reference_prefill)]
    eager_decode = [pt for pt in decode if pt.batch in (1, 32)]
    ref_decode = [pt for pt in decode if pt.batch in (32, 128)]
    fp8_decode = [Point("decode", b, b, a.context, 0.0, 10, 3) for b in _ints(a.fp8_batches)]
    before = [pt for pt in decode if pt.batch in (1, 64)]
    eager = ((eager_decode if "bench_eager" in only else [])
             + (prefill if only & {"bench_eager", "bench_prefill"} else []))
    setups = [(graph_kw, decode if "bench_decode" in only else [], {})]        # fused kernels, bf16
    setups += [({**graph_kw, "weights": w}, fp8_decode if "bench_fp8" in only else [], {})   # as bf16 decode
               for w in a.fp8_weights.split(",") if w]
    # bench_prefill with --async-scheduling: the same prompts again as the engine serves them (the next step's
    # host work under this step's GPU work); 5 steps, so that the pipeline's first launch weighs less
    prefill_async = ([Point("prefill", n, 1, 0, 0.0, 5, 1) for n in _ints(a.prefill)]
                     if graph_kw.get("async_scheduling") and "bench_prefill" in only else [])
    setups += [({}, eager, {}), ({"async_scheduling": True}, prefill_async, {}),
               ({"cuda_graphs": True}, before if "bench_unfused" in only else [], {"DWDP_FUSED_KERNELS": "0"})]
    if a.more:
        setups += [({"cuda_graphs": True}, [pt for pt in decode if pt.batch == 64], {"DWDP_EXPERT_GEMM": "grouped_mm"}),
                   ({"cuda_graphs": True, "attention": "reference"}, ref_decode + ref_prefill, {})]
    setups = [st for st in setups if st[1]]
    return setups


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--session" in argv:
        import gpu_session   # local import: the session driver, a torch-free module of its own

        return gpu_session.main([x for x in argv if x != "--session"])
    p = build_parser()
    a = p.parse_args(argv)
    only = set(a.only.split(",")) - {""} or set(DEFAULT_STEPS)
    if only - set(STEPS):
        p.error(f"--only: unknown step(s) {sorted(only - set(STEPS))}; choose from {','.join(STEPS)}")
    bad = [w for w in a.fp8_weights.split(",") if w and w not in ("fp8-block", "fp8-block-a8")]
    if bad:
        p.error(f"--fp8-weights: {bad} (allowed: fp8-block, fp8-block-a8)")
    os.makedirs(a.out, exist_ok=True)
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as tmp:     # the models written here go with it
        return run(a, only, tmp)


def run(a, only: set, tmp: str) -> int:
    from dynamo_dwdp.bench.engine_bench import BenchSetup

    ngpu = torch.cuda.device_count()
    info = {"gpus": ngpu, "name": torch.cuda.get_device_name(0), "torch": torch.__version__,
            "cuda": torch.version.cuda, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "argv": sys.argv}
    say(f"{ngpu} x {info['name']}; torch {info['torch']} (CUDA {info['cuda']})")
    ceil = ceilings()
    say(f"ceilings: HBM copy {ceil['hbm_copy_bytes_per_s'] / 1e12:.2f} TB/s, bf16 GEMM "
        f"{ceil['bf16_gemm_flops'] / 1e12:.0f} TFLOP/s")
    with open(os.path.join(a.out, "calibration.jsonl"), "a") as f:   # for `dynamo-dwdp plan --calibrate`
        f.write(json.dumps({"measure": "hbm_copy", "bytes_per_s": ceil["hbm_copy_bytes_per_s"],
                            "source": "scripts/gpu_perf.py ceilings"}) + "\n")
        f.write(json.dumps({"measure": "gemm", "dtype": "bf16", "flops_per_s": ceil["bf16_gemm_flops"],
                            "source": "scripts/gpu_perf.py ceilings"}) + "\n")
    checks: list = []
    extra: dict = {}
    if not a.skip_checks:
        for name, check in (("decode_kernel", check_decode_kernel), ("grouped_experts", check_grouped_experts),
                            ("fused_kernels", check_fused_kernels),
                            ("graphs", lambda rows: check_attention_and_graphs(rows, tmp)),
                            ("fp8_engine", lambda rows: check_fp8_engine(rows, tmp)),
                            ("fp8a8_engine", lambda rows: check_fp8_engine(rows, tmp, "fp8-block-a8", 8e-2)),
                            ("expert_gemms", lambda rows: extra.update(experts=bench_expert_gemms(rows))),
                            ("op_count", lambda rows: rows.append((
                                "GPU operations in one eager decode step, 3-layer model, batch 32: torch paths / "
                                "fused kernels", f"{count_kernels(tmp, 32, a.context, False)} / "
                                f"{count_kernels(tmp, 32, a.context, True)}", "info")))):
            if name not in only:
                continue
            try:
                check(checks)
            except Exception as exc:                       # a broken check is a row, the benchmarks still run
                import traceback

                traceback.print_exc()
                checks.append((name, f"ERR {str(exc)[:200]}", "FAIL"))
            write_tables(a.out, info, ceil, checks, [], extra)     # each check's rows on disk as it ends
        for c in checks:
            say(f"check: {c}")
        write_tables(a.out, info, ceil, checks, [], extra)
    if a.profile_batch and not a.skip_checks and "profile" in only:
        try:
            text = profile_decode(tmp, a.profile_batch, a.context)
            with open(os.path.join(a.out, "profile_decode.txt"), "w") as f:
                f.write(text)
            print(text, flush=True)
        except Exception:
            import traceback

            traceback.print_exc()
    checks_ok = all(c[2] in ("ok", "info") for c in checks)
    if a.skip_bench:
        say("done (checks only)")
        return 0 if checks_ok else 1
    graph_kw: dict = {"cuda_graphs": True}
    if a.async_scheduling:
        import dataclasses

        if "async_scheduling" in {f.name for f in dataclasses.fields(BenchSetup)}:
            graph_kw["async_scheduling"] = True
        else:                                              # the table's mode column says " async" only when it ran
            extra["async_scheduling"] = "requested, but this tree's bench has no async_scheduling setting: not used"
            say(f"--async-scheduling: {extra['async_scheduling']}")
    model = a.model or write_v2lite(tmp, a.layers)
    if a.matrix_only:
        run_matrices(model, ngpu, a)
        say("done (matrix only)")
        return 0
    jsonl = os.path.join(a.out, "bench.jsonl")
    setups = bench_setups(a, only, graph_kw)
    failed: list = []

    def write(results):
        table = roofline_rows(results, ceil)
        write_tables(a.out, info, ceil, checks, table, {**extra, "bench_failures": failed})
        return table

    results = bench(model, jsonl, setups, a.hw, on_done=write, failed=failed)
    write(results)
    if not a.skip_matrix and "matrix" in only:
        run_matrices(model, ngpu, a)
    print(open(os.path.join(a.out, "gpu_perf.md")).read())
    say("done" if not failed else f"done, {len(failed)} bench setup(s) FAILED (see above)")
    return 0 if checks_ok and not failed else 1


if __name__ == "__main__":
    sys.exit(main())
