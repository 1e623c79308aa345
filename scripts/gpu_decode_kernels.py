"""Decode-step kernels on one GPU at the v2-lite shapes (hidden 2048, 64 experts top-6, 16 heads, latent
512 + rope 64, context 1000, bf16): each kernel against the torch path it replaces (correctness), then
both timed as CUDA-graph replays (20 calls per graph, median of 7 replays: no launch gaps, as in a
decode step).

  PYTHONPATH=. PYTHONUNBUFFERED=1 python3 scripts/gpu_decode_kernels.py --out $OUT

Rows: fused add + RMSNorm vs add + `F.rms_norm`; the router with bf16 x (three-way bf16 split on tensor
cores) vs the IEEE fp32 logits kernel and vs cuBLAS fp32 logits, and its expert choice vs the torch
router; the router's one-launch form (up to 64 tokens: time, and 200 calls bitwise against the two-
kernel result) and fewer K splits at 256 tokens; the experts' pair sum vs zero fill + weight cast + bmm;
MLA decode with the chunked merge vs one merge program per sequence, tile/split choices at batch 1 and
one split (no merge) from 64 on; the shared expert (I = 2816) as `dense_swiglu` vs cuBLAS + silu + mul
at 64-256 rows.
Writes $OUT/decode_kernels.json.

`--only routed_routing --routing-model DIR` (not in the default set: it writes and loads a 27-layer
model): the bf16 routed experts under the routing of the bench model's own decode step (recorded at
256 tokens, 26 MoE layers; 64 and 128 tokens are its first rows) vs uniform routing, per tiling
(`routed_variants`: M tile, weight rows, K step, pipeline depth, work list), each variant checked
against an fp32 loop (beside the torch path's error) and against the torch path on all 26 layers;
then the shared experts folded into the routed call (`shared_fold`). `--routing-counts FILE` replays
the per-expert row counts an earlier run wrote (its decode_kernels.json) instead: no model, ~30 s:

  PYTHONPATH=.:scripts python3 scripts/gpu_decode_kernels.py --only routed_routing \
      --routing-counts docs/results/routed_routing_h200_2026-12-01.json --out $OUT [--routed-variants
      LABEL,...] [--routed-tokens 256,128,64,32] [--fold-tokens '']
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch
import torch.nn.functional as F

from dynamo_dwdp.model import mla_decode
from dynamo_dwdp.model.experts import ExpertBank, routed_experts_grouped
from dynamo_dwdp.model.kernels import moe_gemm, norm, router, sm_count
from dynamo_dwdp.model.moe import route_noaux_tc

DEV = "cuda"
BF = torch.bfloat16
ROWS: list[dict] = []


def graph_us(fn, calls: int = 20, reps: int = 7) -> float:
    """Microseconds per call of fn, replayed from a CUDA graph of `calls` calls (median of reps)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(calls):
            fn()
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / calls)
    return statistics.median(times)


def row(what: str, T: int, new_us: float, old_us: float, check: str, **extra) -> None:
    r = {"what": what, "rows": T, "new_us": round(new_us, 2), "old_us": round(old_us, 2), "check": check, **extra}
    ROWS.append(r)
    print(f"{what:34s} T={T:4d} new {new_us:8.2f} us  old {old_us:8.2f} us  {check} "
          f"{' '.join(f'{k}={v}' for k, v in extra.items())}", flush=True)


def add_norm(H: int = 2048) -> None:
    for T in (1, 64, 256):
        d, r = torch.randn(T, H, device=DEV, dtype=BF), torch.randn(T, H, device=DEV, dtype=BF)
        w = (1 + 0.05 * torch.randn(H, device=DEV)).to(BF)
        h, y = norm.add_rmsnorm(d, r, w, 1e-6)
        h_ref = r + d
        y_ref = F.rms_norm(h_ref, (H,), w, 1e-6)
        ok = torch.equal(h, h_ref)
        diff = (y.float() - y_ref.float()).abs().max().item()
        row("add_rmsnorm vs add + rms_norm", T, graph_us(lambda: norm.add_rmsnorm(d, r, w, 1e-6)),
            graph_us(lambda: F.rms_norm(r + d, (H,), w, 1e-6)), f"h_equal={ok} normed_maxdiff={diff:.3g}")
        d2 = torch.randn(T, H, device=DEV, dtype=BF)          # the MoE's routed + shared parts, added in the kernel
        h2, _ = norm.add_rmsnorm(d, r, w, 1e-6, d2)
        row("add_rmsnorm(2 deltas) vs 2 adds + rms_norm", T, graph_us(lambda: norm.add_rmsnorm(d, r, w, 1e-6, d2)),
            graph_us(lambda: F.rms_norm(r + (d + d2), (H,), w, 1e-6)), f"h_equal={torch.equal(h2, r + (d + d2))}")


def routers(shapes=((64, 1, 1, 6, 2048), (256, 8, 4, 8, 7168))) -> None:
    for E, G, TG, K, H in shapes:
        w = torch.randn(E, H, device=DEV) * 0.02
        bias = torch.randn(E, device=DEV) * 0.1
        skew = torch.zeros(E, device=DEV)
        for T in (1, 64, 256):
            x = torch.randn(T, H, device=DEV, dtype=BF)
            x32 = x.float()
            cfg = type("C", (), dict(n_routed_experts=E, n_group=G, topk_group=TG, num_experts_per_tok=K,
                                     norm_topk_prob=True, routed_scaling_factor=2.5))
            ids, wts = router.noaux_tc_route(x, w, bias, skew, K, G, TG, True, 2.5)
            ref_ids, ref_w = route_noaux_tc(F.linear(x32, w), cfg, bias, skew)
            same = (ids.sort(1).values == ref_ids.sort(1).values).all(1)
            wd = (wts.sort(1).values - ref_w.sort(1).values).abs().max().item()
            new = graph_us(lambda: router.noaux_tc_route(x, w, bias, skew, K, G, TG, True, 2.5))
            old = graph_us(lambda: router.noaux_tc_route(x32, w, bias, skew, K, G, TG, True, 2.5))
            cublas = graph_us(lambda: F.linear(x.float(), w))
            extra = {}
            if T <= router.FUSED_SELECT_ROWS_TESTED:      # one launch (last program selects) vs the two kernels
                saved, router.FUSED_SELECT_MAX_ROWS = router.FUSED_SELECT_MAX_ROWS, router.FUSED_SELECT_ROWS_TESTED
                one = lambda: router.noaux_tc_route(x, w, bias, skew, K, G, TG, True, 2.5)   # noqa: E731
                extra["one_launch_us"] = round(graph_us(one), 2)
                bad = sum(not (torch.equal(a, ids) and torch.equal(b, wts)) for a, b in (one() for _ in range(200)))
                extra["one_launch_mismatches_of_200"] = bad
                router.FUSED_SELECT_MAX_ROWS = saved
            if T > router.FUSED_SELECT_ROWS_TESTED:       # fewer K splits: less for the select kernel to sum
                for n in (4, 8):
                    router.SPLITS_OVERRIDE = n
                    extra[f"splits{n}_us"] = round(graph_us(lambda: router.noaux_tc_route(x, w, bias, skew, K, G, TG,
                                                                                          True, 2.5)), 2)
                router.SPLITS_OVERRIDE = None
            row(f"router E={E} H={H} (bf16 split vs ieee)", T, new, old,
                f"tokens_same_experts={int(same.sum())}/{T} weight_maxdiff={wd:.2g}", cublas_logits_us=round(cublas, 2),
                **extra)


def pair_sums(H: int = 2048, k: int = 6, E: int = 64) -> None:
    for T in (1, 64, 256):
        ids = torch.stack([torch.randperm(E, device=DEV)[:k] for _ in range(T)])
        wts = torch.rand(T, k, device=DEV)
        y = torch.randn(T * k, H, device=DEV, dtype=BF)

        def old():                          # what routed_experts_fused ran: y zero-filled, weights cast, bmm
            z = torch.zeros(T * k, H, device=DEV, dtype=BF)
            return torch.bmm(wts.to(BF).view(T, 1, k), z.view(T, k, H)).view(T, H)

        ref = torch.bmm(wts.to(BF).view(T, 1, k), y.view(T, k, H)).view(T, H)
        got = moe_gemm.pair_sum(y, wts, ids, [(0, E)])
        diff = (got.float() - ref.float()).abs().max().item()
        row("pair_sum vs zeros + cast + bmm", T, graph_us(lambda: moe_gemm.pair_sum(y, wts, ids, [(0, E)])),
            graph_us(old), f"maxdiff={diff:.3g} (bf16 ulp at |x|~4: 0.03)")


def mla(C: int = 512, R: int = 64, h: int = 16, ctx: int = 1000, bs: int = 16) -> None:
    per = -(-ctx // bs)
    for B in (1, 64, 256):
        cache = torch.randn(B * per, bs, C + R, device=DEV, dtype=BF)
        tables = torch.arange(B * per, device=DEV).view(B, per)
        lens = torch.full((B,), ctx, device=DEV)
        q = torch.randn(B, h, C, device=DEV, dtype=BF)
        qpe = torch.randn(B, h, R, device=DEV, dtype=BF)

        def run(cfg=None):
            return mla_decode.mla_decode_attention(q, cache, tables, lens, C, 0.05, ctx, q_pe=qpe, config=cfg)

        out = run()
        keys = cache[tables[0]].reshape(-1, C + R)[:ctx].double()
        ref = torch.softmax(torch.cat([q[0], qpe[0]], -1).double() @ keys.T * 0.05, -1) @ keys[:, :C]
        err = ((out[0].double() - ref).norm() / ref.norm()).item()
        new = graph_us(run)
        saved = mla_decode.combine_chunks
        mla_decode.combine_chunks = lambda *a: 1
        old = graph_us(run)
        mla_decode.combine_chunks = saved
        extra = {}
        if B == 1:
            for cfg in (mla_decode.DecodeConfig(16, 0, 3, 4, 1), mla_decode.DecodeConfig(32, 0, 3, 4, 1)):
                extra[f"n{cfg.block_n}_w{cfg.waves}_t{cfg.min_tiles}"] = round(graph_us(lambda: run(cfg)), 2)
        if B >= 64:                                       # one context split (no merge) vs the default's
            one = mla_decode.DecodeConfig(32, 0, 3, 2, 1 << 20)                 # >= 2^20 tiles a split: 1
            extra["one_split_us"] = round(graph_us(lambda: run(one)), 2)
        row("mla decode (chunked merge vs one)", B, new, old, f"rel_err_vs_fp64={err:.2g}", **extra)


# ------------------------------------------------------------------------ MLA decode sweep (--only mla_sweep)
MLA_BASELINE: list = []           # --mla-baseline: another mla_decode.py (an older tree's) timed beside this one
MLA_SWEEP_BATCHES = (1, 64, 128, 256)
MLA_SWEEP_CONTEXTS = (1000, 4000)


def mla_candidates(B: int) -> list:
    """(label, DecodeConfig) per batch: decode_config's choice first, then the alternatives swept.
    Fields: tokens per tile, warps (0: automatic), pipeline stages, waves, min tiles per split."""
    D = mla_decode.DecodeConfig
    if B <= 32:
        alts = [D(32, 0, 3, 4, 1), D(16, 0, 3, 4, 1), D(16, 0, 4, 4, 2), D(32, 8, 3, 4, 1), D(32, 0, 3, 8, 1),
                D(16, 0, 3, 8, 1), D(64, 8, 3, 4, 1), D(32, 0, 2, 4, 2), D(32, 0, 4, 4, 2)]
    else:
        alts = [D(32, 0, 3, 2, 4), D(32, 8, 3, 2, 4), D(32, 0, 4, 2, 4), D(32, 8, 4, 2, 4), D(16, 0, 4, 2, 4),
                D(16, 0, 6, 2, 4), D(64, 8, 3, 2, 4), D(32, 0, 3, 1, 4), D(32, 0, 3, 4, 4), D(32, 8, 3, 1, 4),
                D(32, 0, 2, 2, 4), D(32, 0, 3, 2, 1 << 20), D(32, 8, 3, 2, 1 << 20),    # these two: one split
                D(32, 0, 5, 1, 4), D(32, 0, 6, 1, 4)]      # one program per SM with 3-4 cache tiles in flight
    chosen = mla_decode.decode_config(B, 1)
    return [("chosen", None)] + [(f"n{c.block_n} w{c.warps} s{c.stages} wv{c.waves} t{c.min_tiles}", c)
                                 for c in alts if c != chosen]


def _mla_case_inputs(B: int, ctx: int, sets: int, C: int = 512, R: int = 64, h: int = 16, bs: int = 16):
    """`sets` disjoint caches (block ranges of one pool, rotated per call: no L2 reuse between calls),
    random block order within each sequence."""
    per = -(-ctx // bs)
    pool = torch.randn(sets * B * per, bs, C + R, device=DEV, dtype=BF)
    tables = [(torch.randperm(B * per, device=DEV) + k * B * per).view(B, per) for k in range(sets)]
    lens = torch.full((B,), ctx, device=DEV)
    q = torch.randn(B, h, C, device=DEV, dtype=BF)
    qpe = torch.randn(B, h, R, device=DEV, dtype=BF)
    return pool, tables, lens, q, qpe


def _mla_call(mod, cfg, pool, table, lens, q, qpe, ctx):
    kw = {} if cfg is None else {"config": cfg}
    return mod.mla_decode_attention(q, pool, table, lens, 512, 0.05, ctx, q_pe=qpe, **kw)


def _mla_compile(cases: list) -> str:
    """Worker process: run each (module path or '', batch, context, config) once, so that Triton's on-disk
    cache holds every variant before the timing pass (the same shapes: the same specialisations)."""
    errs = []
    for path, B, ctx, cfg in cases:
        try:
            mod = _load_module(path) if path else mla_decode
            pool, tables, lens, q, qpe = _mla_case_inputs(B, ctx, 1)
            _mla_call(mod, cfg, pool, tables[0], lens, q, qpe, ctx)
            torch.cuda.synchronize()
        except Exception as exc:                         # the timing pass reports it again
            errs.append(f"{B} {ctx} {cfg}: {str(exc)[:200]}")
    return "; ".join(errs)


def _load_module(path: str):
    import importlib.util

    if "mla_decode_baseline" not in sys.modules:
        spec = importlib.util.spec_from_file_location("mla_decode_baseline", path)
        sys.modules[spec.name] = importlib.util.module_from_spec(spec)       # dataclasses look their module up
        spec.loader.exec_module(sys.modules[spec.name])
    return sys.modules["mla_decode_baseline"]


def _copy_tbps() -> float:
    """gpu_perf's copy ceiling, bytes read + written (the sweep's 100%). Not a copy replayed from a CUDA
    graph: on one H200 that read 2.75 TB/s against 4.18 for gpu_perf's eager copy in the same call."""
    import gpu_perf                                         # scripts/ on PYTHONPATH

    return gpu_perf.ceilings()["hbm_copy_bytes_per_s"] / 1e12


def mla_sweep(jobs: int = 8) -> None:
    """Old (--mla-baseline) vs this tree's MLA decode at batch 1/64/128/256, contexts 1000 and 4000, and
    `mla_candidates`' alternatives: each against an fp64 reference (4 sequences), timed from CUDA graphs
    over rotated caches; GB/s counts the cache bytes read once. Then gpu_perf's fp64 check (fp32 and bf16,
    ragged contexts) with the chosen configurations."""
    import concurrent.futures as cf
    import multiprocessing as mp
    import time

    t0 = time.perf_counter()
    base = MLA_BASELINE[0] if MLA_BASELINE else ""
    plan = []
    for B in MLA_SWEEP_BATCHES:
        for ctx in MLA_SWEEP_CONTEXTS:
            if base:
                plan.append((base, B, ctx, None))
            plan += [("", B, ctx, cfg) for _, cfg in mla_candidates(B)]
    if jobs > 1:
        with cf.ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn")) as ex:
            errs = [e for e in ex.map(_mla_compile, [plan[i::jobs] for i in range(jobs)]) if e]
    else:
        errs = [e for e in [_mla_compile(plan)] if e]
    print(f"mla_sweep: {len(plan)} cases compiled in {time.perf_counter() - t0:.0f} s; errors: {errs or 'none'}",
          flush=True)
    tbps = _copy_tbps()
    print(f"mla_sweep: copy rate {tbps:.2f} TB/s", flush=True)
    base_mod = _load_module(base) if base else None
    table = []
    for B in MLA_SWEEP_BATCHES:
        for ctx in MLA_SWEEP_CONTEXTS:
            nbytes = B * ctx * 576 * 2
            sets = max(2, min(100, -(-400_000_000 // nbytes)))   # >= 400 MB per graph replay: not L2 (~50 MB)
            calls = max(20, sets)
            pool, tables, lens, q, qpe = _mla_case_inputs(B, ctx, sets)
            refs = {}
            for b in sorted({0, B // 3, 2 * B // 3, B - 1}):
                keys = pool[tables[0][b]].reshape(-1, 576)[:ctx].double()
                qq = torch.cat([q[b], qpe[b]], -1).double()
                refs[b] = torch.softmax(qq @ keys.T * 0.05, -1) @ keys[:, :512]
            variants = ([("baseline", base_mod, None)] if base_mod else []) + \
                [(label, mla_decode, cfg) for label, cfg in mla_candidates(B)]
            for label, mod, cfg in variants:
                try:
                    got = _mla_call(mod, cfg, pool, tables[0], lens, q, qpe, ctx)
                    err = max(((got[b].double() - r).norm() / r.norm()).item() for b, r in refs.items())
                    k = [0]

                    def run(mod=mod, cfg=cfg):
                        k[0] += 1
                        return _mla_call(mod, cfg, pool, tables[k[0] % sets], lens, q, qpe, ctx)

                    us = graph_us(run, calls=calls)
                except Exception as exc:
                    print(f"mla_sweep B={B} ctx={ctx} {label}: FAILED {str(exc)[:200]}", flush=True)
                    continue
                eff = cfg or mla_decode.decode_config(B, 1)
                splits = mla_decode.num_splits(B, 1, ctx, torch.cuda.get_device_properties(0).multi_processor_count,
                                               eff.waves, eff.block_n, eff.min_tiles) if mod is mla_decode else None
                r = {"what": "mla_sweep", "batch": B, "context": ctx, "label": label,
                     "config": None if cfg is None else list(cfg.__dict__.values()), "splits": splits,
                     "us": round(us, 2), "GBps": round(nbytes / us / 1e3), "pct_copy": round(100 * nbytes / us / 1e6 / tbps, 1),
                     "rel_err_vs_fp64": float(f"{err:.2g}"), "ok": err < 2e-2}
                ROWS.append(r)
                table.append(r)
                print(f"mla_sweep B={B:3d} ctx={ctx:4d} {label:26s} {us:8.2f} us {r['GBps']:5d} GB/s {r['pct_copy']:5.1f}% "
                      f"splits={splits} err={err:.2g}", flush=True)
            del pool, tables
    ROWS.append({"what": "mla_sweep copy rate", "TBps": round(tbps, 3)})
    print("\nbest per (batch, context) vs chosen and baseline:")
    for B in MLA_SWEEP_BATCHES:
        for ctx in MLA_SWEEP_CONTEXTS:
            rs = [r for r in table if r["batch"] == B and r["context"] == ctx and r["ok"]]
            if not rs:
                continue
            best = min(rs, key=lambda r: r["us"])
            pick = {r["label"]: r for r in rs}
            print(f"B={B:3d} ctx={ctx:4d} best {best['label']:26s} {best['us']:8.2f} us ({best['pct_copy']}%)  "
                  f"chosen {pick.get('chosen', {}).get('us')}  baseline {pick.get('baseline', {}).get('us')}")
    import gpu_perf                                         # scripts/ on PYTHONPATH

    checks: list = []
    gpu_perf.check_decode_kernel(checks)
    for c in checks:
        print("mla_sweep check:", *c, flush=True)
        ROWS.append({"what": "mla_sweep check", "check": c[0], "result": c[1], "status": c[2]})


def shared_expert(H: int = 2048, inter: int = 2816) -> None:
    w13 = (torch.randn(2 * inter, H, device=DEV) * 0.02).to(BF)
    gate, up = w13[:inter], w13[inter:]
    for T in (64, 128, 256):
        x = torch.randn(T, H, device=DEV, dtype=BF)
        ref = F.silu(F.linear(x, gate)) * F.linear(x, up)
        got = moe_gemm.dense_swiglu(x, w13)
        err = ((got.double() - ref.double()).norm() / ref.double().norm()).item()

        def fused_cublas():
            g, u = F.linear(x, w13).chunk(2, -1)
            return F.silu(g) * u

        row("shared expert dense_swiglu vs cuBLAS x2", T, graph_us(lambda: moe_gemm.dense_swiglu(x, w13)),
            graph_us(lambda: F.silu(F.linear(x, gate)) * F.linear(x, up)), f"rel_err={err:.2g}",
            cublas_one_gemm_us=round(graph_us(fused_cublas), 2))


# ---- routed experts under the bench model's real routing (moe_gemm's bf16 decode tiles) ----
ROUTING_BATCH = 256           # decode tokens recorded; 64 and 128 are the first rows of the same step
ROUTING_MODEL: list[str] = []  # --routing-model
ROUTING_COUNTS: list[str] = []  # --routing-counts
VARIANT_FILTER: list[str] = []  # --routed-variants (empty: all)
OUT_DIR: list[str] = []        # --out (the routed sweep writes its rows after each token count)


def routed_variants() -> dict:
    """label -> TileConfig for swiglu and down (None: choose_tiles' default) for the routed-experts sweep."""
    TC = moe_gemm.TileConfig
    v = {"default": None}
    for bm in (16, 32, 64):
        v[f"m{bm}"] = TC(bm, 64, swap=True)
        v[f"m{bm} work-list"] = TC(bm, 64, swap=True, work_list=True)
    v["m64 4 stages"] = TC(64, 64, swap=True, stages=4)     # the default budget gives M 64 three: MMA or depth?
    v["m64 4 stages work-list"] = TC(64, 64, swap=True, stages=4, work_list=True)
    # deeper pipelines and wider weight tiles on the work list ((swiglu, down) pairs: one TileConfig each)
    v["m32 wl 5 stages"] = TC(32, 64, swap=True, stages=5, work_list=True)
    v["m32 wl down 6 stages"] = (TC(32, 64, swap=True, work_list=True), TC(32, 64, swap=True, stages=6, work_list=True))
    v["m32 wl k64 8 stages"] = TC(32, 64, block_k=64, swap=True, stages=8, work_list=True)
    v["m32 wl n128 k64 w8"] = TC(32, 128, block_k=64, warps=8, swap=True, stages=4, work_list=True)
    v["m32 wl w8"] = TC(32, 64, warps=8, swap=True, work_list=True)
    v["m64 wl 4 stages down 6"] = (TC(64, 64, swap=True, stages=4, work_list=True),
                                   TC(64, 64, swap=True, stages=6, work_list=True))
    # K steps of 64: more, smaller copies in flight for the same shared memory
    v["m32 k64 8 stages"] = TC(32, 64, block_k=64, swap=True, stages=8)
    v["m32 wl k64 6 stages"] = TC(32, 64, block_k=64, swap=True, stages=6, work_list=True)
    v["m32 wl k64 10 stages"] = TC(32, 64, block_k=64, swap=True, stages=10, work_list=True)
    v["m32 wl k32 16 stages"] = TC(32, 64, block_k=32, swap=True, stages=16, work_list=True)
    v["m32 wl n128 k64 w8 5 stages"] = TC(32, 128, block_k=64, warps=8, swap=True, stages=5, work_list=True)
    v["m16 k64 8 stages"] = TC(16, 64, block_k=64, swap=True, stages=8)
    v["m16 wl k64 8 stages"] = TC(16, 64, block_k=64, swap=True, stages=8, work_list=True)
    return {k: c for k, c in v.items() if not VARIANT_FILTER or k in VARIANT_FILTER}


FOLD_VARIANTS = ("default", "m32 work-list", "m64 work-list", "m64 4 stages work-list")
FOLD_TOKENS = (256, 128, 64, 1)
ROUTED_TOKENS = (256, 128, 64)   # the first, most loaded, first: a call cut short still has it
REPLAY_SHAPE = {"k": 6, "H": 2048, "I": 1408}   # v2-lite


def _override(label: str) -> None:
    moe_gemm.TILE_OVERRIDE.clear()
    cfg = routed_variants()[label]
    if cfg is not None:
        swiglu, down = cfg if isinstance(cfg, tuple) else (cfg, cfg)
        moe_gemm.TILE_OVERRIDE.update(swiglu=swiglu, down=down)


def _fp32_loop(x, ids, w, bank) -> torch.Tensor:
    """sum_k w[t,k] * expert_{ids[t,k]}(x[t]) in fp32 over the bank's experts (the checks' reference)."""
    ref = torch.zeros(x.shape[0], bank.w2.shape[1], device=DEV, dtype=torch.float32)
    for e in ids.unique().tolist():
        t, j = (ids == e).nonzero(as_tuple=True)
        gate, up = (x[t].float() @ bank.w13[e].float().T).chunk(2, -1)
        ref.index_add_(0, t, w[t, j, None].float() * ((F.silu(gate) * up) @ bank.w2[e].float().T))
    return ref


def _rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def shared_fold(seen: list, n_shared: int = 2) -> None:
    """The shared experts (n_shared x the routed width, one DenseMLP as the model runs it) folded into the
    routed call as always-selected experts with weight 1: one bank of E + n_shared experts (a merged
    copy here; the model would store it so), ids [T, k + n_shared], one launch per projection. Timed as
    all 26 layers in one graph against routed call (default tiles) + DenseMLP, at 1-256 tokens; both sums'
    error vs fp32 (fresh x per variant).
    Rounding: the torch path rounds the shared output once (K = n_shared x I in fp32) and the decoder adds
    the routed and shared outputs in fp32 (add_rmsnorm); folded, each shared half is rounded to bf16
    before pair_sum's fp32 sum of all k + n_shared terms, rounded once."""
    from dynamo_dwdp.model.layers import DenseMLP
    from dynamo_dwdp.model.tensor_parallel import TensorParallel

    E, I, H = seen[0][3].count, seen[0][3].w2.shape[2], seen[0][3].w2.shape[1]
    layers = []
    for x, ids, w, bank in seen:
        mlp = DenseMLP(H, n_shared * I, TensorParallel())
        for lin in (mlp.gate_proj, mlp.up_proj, mlp.down_proj):
            lin.weight.data = torch.randn(lin.weight.shape, device=DEV, dtype=BF) * 0.02
        mlp.fuse_gate_up()
        g, u = mlp.gate_up.view(2, n_shared, I, H).unbind(0)
        s13 = torch.cat([g, u], 1)                                       # [n_shared, 2I, H]
        s2 = mlp.down_proj.weight.view(H, n_shared, I).permute(1, 0, 2)  # [n_shared, H, I]
        merged = ExpertBank(0, torch.cat([bank.w13, s13]), torch.cat([bank.w2, s2]))
        layers.append((x, ids, w, bank, mlp, merged))
    for T in FOLD_TOKENS:
        extra = torch.arange(E, E + n_shared, device=DEV).expand(T, n_shared)
        runs = [(x[:T], ids[:T], w[:T], bank, mlp, merged, torch.cat([ids[:T], extra], 1),
                 torch.cat([w[:T], torch.ones(T, n_shared, device=DEV)], 1)) for x, ids, w, bank, mlp, merged in layers]

        def separate():
            for x, ids, w, bank, mlp, *_ in runs:
                moe_gemm.routed_experts_fused(x, ids, w, [bank])
                mlp(x)

        def folded():
            for x, _, _, _, _, merged, ids2, w2 in runs:
                moe_gemm.routed_experts_fused(x, ids2, w2, [merged])

        _, ids, w, bank, mlp, merged, ids2, w2 = runs[0]
        x = torch.randn(T, H, device=DEV, dtype=BF)
        ref = _fp32_loop(x, ids2, w2, merged)
        sep_err = float(f"{_rel(moe_gemm.routed_experts_fused(x, ids, w, [bank]).float() + mlp(x).float(), ref):.3g}")
        sep_us = graph_once_us(separate, len(runs))
        shared_us = graph_once_us(lambda: [mlp(x) for x, *_, mlp, _, _, _ in runs], len(runs))
        for label in (v for v in FOLD_VARIANTS if v in routed_variants()):
            _override(label)
            try:
                x = torch.randn(T, H, device=DEV, dtype=BF)             # fresh input: no stale buffer passes
                got = moe_gemm.routed_experts_fused(x, ids2, w2, [merged])
                f_err = float(f"{_rel(got, _fp32_loop(x, ids2, w2, merged)):.3g}")
                us = graph_once_us(folded, len(runs))
            except Exception as exc:
                print(f"shared fold T={T} {label}: FAILED {type(exc).__name__}: {str(exc)[:200]}", flush=True)
                continue
            finally:
                moe_gemm.TILE_OVERRIDE.clear()
            row(f"routed + shared folded ({label}) vs routed + DenseMLP", T, us, sep_us,
                f"rel_err_vs_fp32 folded={f_err} separate={sep_err}", variant=label,
                dense_mlp_alone_us=round(shared_us, 1),
                ok=bool(f_err < 1e-2 and f_err <= 2 * sep_err + 2e-3))
        _dump()


def graph_once_us(fn, per: int, reps: int = 5) -> float:
    """Microseconds per `per` of one fn call (fn = `per` layers), captured once in a CUDA graph, median of reps."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / per)
    del g
    return statistics.median(times)


def _compile_routed(jobs: list) -> list:
    """Pool worker: run each (variant label, folded, tokens) once at the v2-lite expert shapes (fills Triton's
    on-disk cache; folded: a bank of 64 + 2 experts, ids with the two shared ones appended)."""
    torch.manual_seed(1)
    E, H, I, k = 64, 2048, 1408, 6
    bank = ExpertBank(0, torch.randn(E + 2, 2 * I, H, device=DEV, dtype=BF) * 0.02,
                      torch.randn(E + 2, H, I, device=DEV, dtype=BF) * 0.02)
    plain = ExpertBank(0, bank.w13[:E], bank.w2[:E])
    errs = []
    for label, fold, T in jobs:
        x = torch.randn(T, H, device=DEV, dtype=BF)
        ids = torch.rand(T, E, device=DEV).argsort(1)[:, :k]
        if fold:
            ids = torch.cat([ids, torch.arange(E, E + 2, device=DEV).expand(T, 2)], 1)
        _override(label)
        try:
            moe_gemm.routed_experts_fused(x, ids, torch.rand(ids.shape, device=DEV), [bank if fold else plain])
            torch.cuda.synchronize()
        except Exception as exc:
            errs.append(f"{label} fold={fold} T={T}: {str(exc)[:200]}")
        finally:
            moe_gemm.TILE_OVERRIDE.clear()
    return errs


def record_routing(model: str, batch: int, context: int = 1000) -> list:
    """The bench model's decode step at `batch` (scripts/gpu_profile.py's inputs: seed 2, context 1000),
    eager: per MoE layer (x, topk_ids, topk_weights, bank) as the executor sees them."""
    from dynamo_dwdp.config.engine import EngineSettings
    from dynamo_dwdp.engine.model_runner import ModelRunner
    from dynamo_dwdp.model.moe_executor import LocalExecutor

    seen: list = []
    recording = [False]
    plain = LocalExecutor.forward

    def spy(self, layer, x, ids, weights):
        if recording[0]:
            seen.append((x.clone(), ids.clone(), weights.clone(), self.banks[layer]))
        return plain(self, layer, x, ids, weights)

    LocalExecutor.forward = spy
    try:
        bs = 16
        per = (context + 1 + bs - 1) // bs
        r = ModelRunner(model, EngineSettings(block_size=bs, num_kv_blocks=batch * per + 1, device="cuda",
                                              dtype="bfloat16", max_num_seqs=batch, max_num_batched_tokens=8192,
                                              cuda_graphs=False), LocalExecutor)
        g = torch.Generator().manual_seed(2)
        tables = [list(range(i * per, (i + 1) * per)) for i in range(batch)]
        for i in range(0, batch, 8):
            chunk = list(range(i, min(batch, i + 8)))
            r.execute([torch.randint(5, 1000, (context,), generator=g).tolist() for _ in chunk], [0] * len(chunk),
                      [tables[j] for j in chunk], [True] * len(chunk))
        recording[0] = True
        r.execute([[int(t)] for t in torch.randint(5, 1000, (batch,), generator=g)], [context] * batch, tables,
                  [True] * batch)
    finally:
        LocalExecutor.forward = plain
    del r
    return seen


def ids_from_counts(counts: dict, k: int, gen: torch.Generator) -> torch.Tensor:
    """[T_max, k] expert ids whose first T rows give exactly `counts[T]` pairs per expert for every T
    ({T: [E] ints}, T ascending, each block's counts <= the block's tokens): within each block of new
    tokens the pairs are listed by expert and pair p goes to token p mod n (a shuffled token order),
    so one token never gets an expert twice and every token gets k."""
    rows, prev_T, prev = [], 0, torch.zeros_like(next(iter(counts.values())))
    for T in sorted(counts):
        c, n = counts[T] - prev, T - prev_T
        if int(c.sum()) != n * k or int(c.min()) < 0 or int(c.max()) > n:
            raise ValueError(f"routing counts at {T} tokens are not {k} distinct experts per token")
        pairs = torch.repeat_interleave(torch.arange(c.numel()), c)
        block = torch.empty(n, k, dtype=torch.long)
        block[torch.arange(pairs.numel()) % n, torch.arange(pairs.numel()) // n] = pairs
        rows.append(block[torch.randperm(n, generator=gen)])
        prev_T, prev = T, counts[T]
    return torch.cat(rows)


def replay_routing(path: str, k: int = 6, H: int = 2048, I: int = 1408) -> list:
    """Per MoE layer (x, ids, weights, bank) with the per-expert row counts that an earlier routed_routing
    run recorded from the bench model's decode step (its "routing counts" rows at 64 / 128 / 256 tokens:
    the same loads per layer and per expert, exactly; which token holds which pair differs): the sweep
    without writing and running the 27-layer model. Random bf16 weights (0.02 randn, as the model's),
    x randn, weights uniform in [0, 0.5)."""
    with open(path) as f:
        recorded = [r for r in json.load(f)["rows"] if r.get("what") == "routing counts"]
    if not recorded:
        raise ValueError(f"--routing-counts {path}: no 'routing counts' rows")
    counts = {r["rows"]: torch.tensor(r["counts"]) for r in recorded}
    T_max, (L, E) = max(counts), counts[max(counts)].shape
    gen = torch.Generator().manual_seed(2)
    seen = []
    for layer in range(L):
        ids = ids_from_counts({T: c[layer] for T, c in counts.items()}, k, gen).to(DEV)
        bank = ExpertBank(0, torch.randn(E, 2 * I, H, device=DEV, dtype=BF) * 0.02,
                          torch.randn(E, H, I, device=DEV, dtype=BF) * 0.02)
        seen.append((torch.randn(T_max, H, device=DEV, dtype=BF), ids, torch.rand(T_max, k, device=DEV) * 0.5, bank))
    return seen


def layers_us(layers: list, reps: int = 5) -> float:
    """Microseconds per layer of routed_experts_fused over `layers` [(x, ids, weights, bank)], all of them
    captured in one CUDA graph (each layer its own weights: nothing served from L2), median of reps."""
    def fn():
        for x, ids, w, bank in layers:
            moe_gemm.routed_experts_fused(x, ids, w, [bank])
    return graph_once_us(fn, len(layers), reps)


def _dump() -> None:
    if OUT_DIR:
        with open(os.path.join(OUT_DIR[0], "decode_kernels.json"), "w") as f:
            json.dump({"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "rows": ROWS}, f, indent=1)


def routed_routing(jobs: int = 12) -> None:
    """Routed experts (bf16, v2-lite) at 256/128/64 tokens with the routing the bench model's router gives
    (recorded from its decode step, 26 MoE layers; or replayed from recorded counts, --routing-counts) vs
    uniform routing, per tile variant: us per layer (all 26 layers in one graph), GB/s over the touched
    experts' weight bytes; checks per variant: layer 0 with a fresh x vs an fp32 loop over its experts
    (beside the torch path's error vs the same), and every layer vs the torch path (torch._grouped_mm).
    "default (repeat)" times the default again after the others: the spread of a repeated measurement.
    Then the shared-experts fold (shared_fold)."""
    import multiprocessing as mp
    import time

    from gpu_kernels import copy_bandwidth

    t0 = time.perf_counter()
    labels = list(routed_variants())
    plan = [(label, False, 64) for label in labels]
    if FOLD_TOKENS:
        plan += [(label, True, 64) for label in FOLD_VARIANTS[1:] if label in labels] + \
            [("default", True, T) for T in (1, 64, 256)]
    n = min(jobs, len(plan))
    pool = mp.get_context("spawn").Pool(n) if n else None
    compiling = pool.map_async(_compile_routed, [plan[i::n] for i in range(n)]) if n else None
    if ROUTING_COUNTS:
        seen = replay_routing(ROUTING_COUNTS[0], **REPLAY_SHAPE)
        source = f"replayed counts of {os.path.basename(ROUTING_COUNTS[0])}"
    elif ROUTING_MODEL:
        from gpu_perf import write_v2lite

        model = ROUTING_MODEL[0]
        if not os.path.isdir(model):
            write_v2lite(os.path.dirname(model), 27)
        seen = record_routing(model, ROUTING_BATCH)
        source = "recorded from the model"
    else:
        raise ValueError("routed_routing needs --routing-model DIR or --routing-counts FILE")
    errs = sum(compiling.get(), []) if n else []
    if pool:
        pool.close()
    print(f"routed: {len(seen)} layers ({source}); {len(plan)} variants compiled in {time.perf_counter() - t0:.0f} s, "
          f"{len(errs)} errors {errs[:3]}", flush=True)
    bw = copy_bandwidth()
    ROWS.append({"what": "routed copy rate", "TBps": round(bw / 1e12, 3), "routing": source})
    E = seen[0][3].count
    I, H = seen[0][3].w2.shape[2], seen[0][3].w2.shape[1]
    for T in ROUTED_TOKENS:
        counts = torch.stack([torch.bincount(ids[:T].reshape(-1), minlength=E) for _, ids, _, _ in seen]).cpu()
        mean = T * seen[0][1].shape[1] / E
        print(f"routing T={T}: mean rows/expert {mean:.1f}; per-layer max: median {counts.max(1).values.median().item()} "
              f"max {counts.max().item()}; experts above 2x mean: {(counts > 2 * mean).float().mean():.1%}; empty "
              f"{(counts == 0).float().mean():.1%}", flush=True)
        ROWS.append({"what": "routing counts", "rows": T, "counts": counts.tolist()})
        gen = torch.Generator(device=DEV).manual_seed(T)
        uniform = [(x[:T], torch.rand(T, E, device=DEV, generator=gen).argsort(1)[:, :ids.shape[1]], w[:T], b)
                   for x, ids, w, b in seen]
        for name, layers in (("real", [(x[:T], ids[:T], w[:T], b) for x, ids, w, b in seen]), ("uniform", uniform)):
            touched = sum(ids.unique().numel() for _, ids, _, _ in layers) / len(layers)
            nbytes = touched * 3 * H * I * 2
            torch_out = [routed_experts_grouped(x, ids, w, [b]) for x, ids, w, b in layers]
            _, ids0, w0, bank0 = layers[0]
            for label in labels + ["default (repeat)"]:
                _override(label.replace(" (repeat)", ""))
                try:
                    x0 = torch.randn(T, H, device=DEV, dtype=BF)              # fresh input per check
                    ref = _fp32_loop(x0, ids0, w0, bank0)
                    err = _rel(moe_gemm.routed_experts_fused(x0, ids0, w0, [bank0]), ref)
                    torch_err = _rel(routed_experts_grouped(x0, ids0, w0, [bank0]), ref)
                    vs_torch = max(_rel(moe_gemm.routed_experts_fused(x, ids, w, [b]), t)
                                   for (x, ids, w, b), t in zip(layers, torch_out))
                    us = layers_us(layers)
                except Exception as exc:
                    print(f"routed {name} T={T} {label}: FAILED {type(exc).__name__}: {str(exc)[:200]}", flush=True)
                    continue
                finally:
                    moe_gemm.TILE_OVERRIDE.clear()
                cfg = routed_variants()[label.replace(" (repeat)", "")]
                ok = err < 1e-2 and err <= 2 * torch_err + 2e-3 and vs_torch < 1e-2
                r = {"what": f"routed experts {name} routing", "rows": T, "variant": label, "us_per_layer": round(us, 1),
                     "gb_per_s": round(nbytes / us / 1e3), "pct_copy_bw": round(100 * nbytes / us / 1e-6 / bw, 1),
                     "rel_err_vs_fp32": float(f"{err:.3g}"), "torch_path_rel_err": float(f"{torch_err:.3g}"),
                     "max_rel_diff_vs_torch_path_26_layers": float(f"{vs_torch:.3g}"), "ok": ok,
                     "default_tiles": str(moe_gemm.choose_tiles("swiglu", mean, min(T * 6, E), I, False,
                                                                sm_count(DEV))) if cfg is None else ""}
                ROWS.append(r)
                print(f"routed {name:7s} T={T:3d} {label:24s} {us:7.1f} us/layer {r['gb_per_s']:5d} GB/s "
                      f"{r['pct_copy_bw']:5.1f}% of copy  err {err:.2g} (torch path {torch_err:.2g}) "
                      f"vs torch {vs_torch:.2g} {'ok' if ok else 'BAD'}", flush=True)
            del torch_out
        _dump()
    print(f"routed: sweep done at {time.perf_counter() - t0:.0f} s", flush=True)
    if FOLD_TOKENS:
        shared_fold(seen)
    print(f"routed: fold done at {time.perf_counter() - t0:.0f} s\n\nsummary (us per layer; real routing):", flush=True)
    for T in ROUTED_TOKENS:
        rs = {r["variant"]: r for r in ROWS if r.get("what") == "routed experts real routing" and r["rows"] == T}
        if rs:
            print(f"T={T:3d} " + "  ".join(f"{k}={v['us_per_layer']}{'' if v['ok'] else '!'}" for k, v in rs.items()))
    for T in FOLD_TOKENS:
        rs = [r for r in ROWS if r.get("what", "").startswith("routed + shared folded") and r["rows"] == T]
        if rs:
            print(f"fold T={T:3d} separate={rs[0]['old_us']} " +
                  "  ".join(f"{r['variant']}={r['new_us']}{'' if r['ok'] else '!'}" for r in rs))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=".")
    p.add_argument("--only", default="", help="comma-separated parts (default: all but mla_sweep and routed_routing): "
                                               "add_norm, routers, pair_sums, mla, shared_expert, mla_sweep, routed_routing")
    p.add_argument("--mla-baseline", default="", help="mla_sweep: another mla_decode.py to time beside this tree's")
    p.add_argument("--routing-model", default="", help="routed_routing: the 27-layer v2-lite-shape model directory "
                                                        "(written there first when missing)")
    p.add_argument("--routed-variants", default="", help="routed_routing: only these variants (comma-separated "
                                                          "labels) beside the default")
    p.add_argument("--routed-tokens", default=None, help="routed_routing: token counts (default 256,128,64)")
    p.add_argument("--fold-tokens", default=None, help="routed_routing: shared-fold token counts (default "
                                                       "256,128,64,1; empty: no fold)")
    p.add_argument("--routing-counts", default="", help="routed_routing: replay the per-expert row counts of an "
                                                         "earlier run's decode_kernels.json instead of recording a "
                                                         "model's")
    a = p.parse_args()
    os.makedirs(a.out, exist_ok=True)
    torch.manual_seed(0)
    if a.mla_baseline:
        MLA_BASELINE.append(os.path.abspath(a.mla_baseline))
    if a.routing_model:
        ROUTING_MODEL.append(os.path.abspath(a.routing_model))
    if a.routing_counts:
        ROUTING_COUNTS.append(os.path.abspath(a.routing_counts))
    OUT_DIR.append(a.out)
    global ROUTED_TOKENS, FOLD_TOKENS
    if a.routed_variants:
        VARIANT_FILTER.extend(["default"] + a.routed_variants.split(","))
    if a.routed_tokens is not None:
        ROUTED_TOKENS = tuple(int(t) for t in a.routed_tokens.split(",") if t)
    if a.fold_tokens is not None:
        FOLD_TOKENS = tuple(int(t) for t in a.fold_tokens.split(",") if t)
    parts = {f.__name__: f for f in (add_norm, routers, pair_sums, mla, shared_expert, mla_sweep, routed_routing)}
    names = a.only.split(",") if a.only else [n for n in parts if n not in ("mla_sweep", "routed_routing")]
    if unknown := [n for n in names if n not in parts]:
        p.error(f"--only: unknown part(s) {unknown}; parts: {', '.join(parts)}")
    for part in (parts[n] for n in names):
        try:
            part()
        except Exception as exc:                     # one failed part is a line, the rest still run
            print(f"{part.__name__}: FAILED {type(exc).__name__}: {str(exc)[:300]}", flush=True)
    with open(os.path.join(a.out, "decode_kernels.json"), "w") as f:
        json.dump({"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "rows": ROWS}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
