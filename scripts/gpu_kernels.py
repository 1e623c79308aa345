"""Decode-kernel tuning sweep in one GPU call: every variant checked against a reference, then timed.

  PYTHONPATH=. PYTHONUNBUFFERED=1 python3 scripts/gpu_kernels.py --out $OUT [--jobs 12]

Kernels and shapes (v2-lite: 64 experts, top-6, H 2048, I 1408; MLA 16 heads, latent 512 + rope 64):
- routed experts (`moe_gemm.routed_experts_fused`), bf16 and FP8 block-scaled weights, 1-256 tokens,
  against an fp32 reference over the (dequantized) weights; GB/s counts the touched experts' weight bytes
  in the weights' own format;
- the FP8 dense linear (`moe_gemm.fp8_linear`) at the v2-lite dense shapes vs cuBLAS bf16;
- the MLA decode kernel (`mla_decode.mla_decode_attention`), bf16 cache, context 1000, batch 32-256,
  against an fp64 softmax reference (and fp32 caches for the chosen configurations); GB/s counts the
  cache bytes read once.
Each variant is a tile configuration set through the kernels' override hooks (`moe_gemm.TILE_OVERRIDE`,
`moe_gemm.FAST_FP8_CONVERT`, `mla_decode_attention(config=...)`). Triton compiles every variant first in
--jobs worker processes (same shapes, so the workers fill Triton's on-disk cache), then one process
checks and times them in turn (one call = 10 launches captured in a CUDA graph, weights rotated over
3 sets so that nothing is served from L2). Prints a table per kernel; writes $OUT/gpu_kernels.json.
--short: the chosen configurations, the previous ones and a few candidates; --ncu-once: one launch of
each chosen kernel, for `ncu --clock-control none -k regex:'split_kernel|grouped_kernel' -c 4 ...`.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time
from dataclasses import asdict

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dynamo_dwdp.model import mla_decode  # noqa: E402
from dynamo_dwdp.model.kernels import moe_gemm  # noqa: E402
from dynamo_dwdp.model.kernels.moe_gemm import TileConfig  # noqa: E402
from dynamo_dwdp.model.mla_decode import DecodeConfig  # noqa: E402
from gpu_perf import graph_us  # noqa: E402  (scripts/ is on sys.path when run as a script)

T0 = time.perf_counter()
E, H, I, TOPK = 64, 2048, 1408, 6
C, R, HEADS, BS, CTX = 512, 64, 16, 16, 1000
MLA_CONFIG: list = [None]         # the DecodeConfig the MLA calls pass (None: decode_config's choice)


def say(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", flush=True)


def rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# ------------------------------------------------------------------------------------------ variants
def previous_tiles(tokens: int, fp8: bool) -> TileConfig:
    """The rule before this sweep (2026-12-01): plain orientation, N 32 below 4 programs per SM."""
    bm = 16 if tokens * TOPK / E <= 16 else 32
    active = min(tokens * TOPK, E)
    return TileConfig(bm, 64 if active * -(-I // 64) >= 4 * 132 else 32)


def expert_variants(fp8: bool, tokens: int, short: bool = False) -> list:
    """(label, fast e4m3 conversion, TileConfig or None = the library's choice, moe_gemm.choose_tiles).
    "previous" is the kernel as it was before this sweep (for FP8: Triton's own e4m3 conversion)."""
    bm = 16 if tokens * TOPK / E <= 16 else 32
    out = [("chosen", True, None), ("previous", False, previous_tiles(tokens, fp8))]
    if fp8:
        out += [("n128", True, TileConfig(bm, 128)), ("n64 s6", True, TileConfig(bm, 64, stages=6)),
                ("n64 w8", True, TileConfig(bm, 64, warps=8)), ("n32", True, TileConfig(bm, 32))]
        if not short:
            out += [("n128 w8", True, TileConfig(bm, 128, warps=8)),
                    ("swap n64", True, TileConfig(bm, 64, swap=True)),
                    ("swap n128", True, TileConfig(bm, 128, swap=True)),
                    ("swap n128 w8", True, TileConfig(bm, 128, warps=8, swap=True)),
                    ("swap n64 s6", True, TileConfig(bm, 64, stages=6, swap=True))]
    elif not short:
        out += [("swap n128 w8", True, TileConfig(bm, 128, warps=8, swap=True)),
                ("n128 w8", True, TileConfig(bm, 128, warps=8))]
    if tokens >= 256 and not short:
        out += [("m64 n64", True, TileConfig(64, 64)), ("swap m64 n64", True, TileConfig(64, 64, swap=True))]
    return out


DENSE_SHAPES = [("q_proj 3072x2048", 3072, 2048), ("kv_a 576x2048", 576, 2048), ("o_proj 2048x2048", 2048, 2048),
                ("shared down 2048x2816", 2048, 2816)]


def dense_variants(M: int) -> list:
    bm = 16 if M <= 16 else 64
    return [("chosen", True, None), ("previous", True, TileConfig(bm, 32)),
            ("m16 n32", True, TileConfig(16, 32)), ("m16 n32 split2", True, TileConfig(16, 32, split_k=2)),
            ("m16 n32 split4", True, TileConfig(16, 32, split_k=4)),
            ("m16 n32 split8", True, TileConfig(16, 32, split_k=8)),
            ("m16 n16 split4", True, TileConfig(16, 16, split_k=4)), ("cublas bf16", True, None)]


def mla_variants(short: bool = False) -> list:
    new = [("chosen", None), ("default", DecodeConfig()), ("waves1", DecodeConfig(waves=1))]
    if short:
        return new
    return new + [
            ("n32 s2 waves4 min2", DecodeConfig(32, 4, 2, 4, 2)),
            ("n32 s3 waves4 min2", DecodeConfig(32, 4, 3, 4, 2)),
            ("n32 w8 s2 waves4 min2", DecodeConfig(32, 8, 2, 4, 2)),
            ("n64 s2 waves4 min2", DecodeConfig(64, 4, 2, 4, 2)),
            ("n64 w8 s2 waves4 min1", DecodeConfig(64, 8, 2, 4, 1)),
            ("n16 s3 waves8 min2", DecodeConfig(16, 4, 3, 8, 2)),
            ("n32 s1 waves4 min2", DecodeConfig(32, 4, 1, 4, 2)),
            ("n64 s3 waves8 min1", DecodeConfig(64, 4, 3, 8, 1))]


MLA_BATCHES = (32, 64, 128, 256)
EXPERT_TOKENS = (1, 8, 64, 256)
DENSE_M = (1, 64)


def all_cases(short: bool = False) -> list:
    cases = []
    for fp8 in (True, False):
        for T in EXPERT_TOKENS:
            for label, fast, cfg in expert_variants(fp8, T, short):
                cases.append(("experts", {"fp8": fp8, "tokens": T, "label": label, "fast": fast, "cfg": cfg}))
    for name, N, K in DENSE_SHAPES:
        for M in DENSE_M:
            for label, fast, cfg in dense_variants(M):
                cases.append(("dense", {"shape": name, "N": N, "K": K, "M": M, "label": label, "fast": fast,
                                        "cfg": cfg}))
    for B in MLA_BATCHES:
        for label, cfg in mla_variants(short):
            cases.append(("mla", {"batch": B, "label": label, "cfg": cfg, "dtype": "bf16"}))
    return cases


# ------------------------------------------------------------------------------------------- inputs
_CACHE: dict = {}


def expert_weights(fp8: bool, sets: int):
    key = ("w", fp8, sets)
    if key not in _CACHE:
        from dynamo_dwdp.model.experts import ExpertBank
        from dynamo_dwdp.model.fp8 import quantize_block_fp8

        g = torch.Generator(device="cuda").manual_seed(9)
        banks = []
        for _ in range(sets):
            w13 = torch.randn(E, 2 * I, H, device="cuda", generator=g).bfloat16() * 0.02
            w2 = torch.randn(E, H, I, device="cuda", generator=g).bfloat16() * 0.02
            if fp8:
                q13, s13 = zip(*(quantize_block_fp8(w) for w in w13))
                q2, s2 = zip(*(quantize_block_fp8(w) for w in w2))
                banks.append([ExpertBank(0, torch.stack(q13), torch.stack(q2), torch.stack(s13), torch.stack(s2))])
            else:
                banks.append([ExpertBank(0, w13, w2)])
            del w13, w2
        _CACHE[key] = banks
    return _CACHE[key]


def set_expert_overrides(fast: bool, cfg) -> None:
    moe_gemm.FAST_FP8_CONVERT = fast
    moe_gemm.TILE_OVERRIDE.clear()
    if cfg is not None:
        moe_gemm.TILE_OVERRIDE.update(swiglu=cfg, down=cfg, dense=cfg)


def expert_inputs(T: int):
    g = torch.Generator(device="cuda").manual_seed(100 + T)
    x = torch.randn(T, H, device="cuda", generator=g).bfloat16()
    ids = torch.stack([torch.randperm(E, device="cuda", generator=g)[:TOPK] for _ in range(T)])
    wt = torch.rand(T, TOPK, device="cuda", generator=g)
    return x, ids, wt


def expert_reference(x, ids, wt, bank) -> torch.Tensor:
    """fp32 over the (dequantized) weights, expert by expert."""
    from dynamo_dwdp.model.fp8 import dequantize_block_fp8

    out = torch.zeros(x.shape, device="cuda")
    for e in ids.unique().tolist():
        t, j = (ids == e).nonzero(as_tuple=True)
        if bank.w13_scale is not None:
            w13 = dequantize_block_fp8(bank.w13[e], bank.w13_scale[e], dtype=torch.bfloat16).float()
            w2 = dequantize_block_fp8(bank.w2[e], bank.w2_scale[e], dtype=torch.bfloat16).float()
        else:
            w13, w2 = bank.w13[e].float(), bank.w2[e].float()
        gate, up = (x[t].float() @ w13.T).chunk(2, -1)
        out.index_add_(0, t, wt[t, j, None] * ((torch.nn.functional.silu(gate) * up) @ w2.T))
    return out


def mla_inputs(B: int, dtype=torch.bfloat16, sets: int = 1):
    key = ("mla", B, dtype, sets)
    if key not in _CACHE:
        g = torch.Generator(device="cuda").manual_seed(B)
        n = (CTX + BS - 1) // BS
        nblk = B * n + 8
        layers = []
        for _ in range(sets):                                 # caches rotated over sets: past L2
            pool = torch.randn(nblk, 2, BS, C + R, device="cuda", generator=g).to(dtype)
            layers.append(pool[:, 1])
        tables = torch.randperm(nblk, device="cuda", generator=g)[:B * n].view(B, n)
        ctx = torch.full((B,), CTX, device="cuda")
        q = (torch.randn(B, HEADS, C + R, device="cuda", generator=g) * 0.05).to(dtype)
        _CACHE[key] = (layers, tables, ctx, q)
    return _CACHE[key]


# -------------------------------------------------------------------------------------------- cases
def case_fn(kind: str, p: dict, sets: int):
    """(callable that runs the variant once, rotating weight sets) for a case."""
    if kind == "experts":
        banks = expert_weights(p["fp8"], sets)
        x, ids, wt = expert_inputs(p["tokens"])
        i = [0]

        def run():
            i[0] = (i[0] + 1) % len(banks)
            return moe_gemm.routed_experts_fused(x, ids, wt, banks[i[0]])
        return run
    if kind == "dense":
        from dynamo_dwdp.model.fp8 import quantize_block_fp8

        key = ("dense", p["N"], p["K"], sets)
        if key not in _CACHE:
            g = torch.Generator(device="cuda").manual_seed(p["N"] + p["K"])
            _CACHE[key] = [quantize_block_fp8(torch.randn(p["N"], p["K"], device="cuda", generator=g) * 0.02)
                           for _ in range(max(sets, 1) * 8)]      # 8x: a few MB each, rotate past L2
        ws = _CACHE[key]
        xm = torch.randn(p["M"], p["K"], device="cuda").bfloat16()
        i = [0]
        if p["label"] == "cublas bf16":                       # the bf16 model's matrix through cuBLAS
            from dynamo_dwdp.model.fp8 import dequantize_block_fp8

            wb = [dequantize_block_fp8(q, sc, dtype=torch.bfloat16) for q, sc in ws]

            def run():
                i[0] = (i[0] + 1) % len(wb)
                return torch.nn.functional.linear(xm, wb[i[0]])
            run.x, run.ws = xm, ws
            return run

        def run():
            i[0] = (i[0] + 1) % len(ws)
            return moe_gemm.fp8_linear(xm, *ws[i[0]])
        run.x = xm
        run.ws = ws
        return run
    layers, tables, ctx, q = mla_inputs(p["batch"], sets=sets)
    i = [0]

    def run():
        i[0] = (i[0] + 1) % len(layers)
        return mla_decode.mla_decode_attention(q, layers[i[0]], tables, ctx, C, 0.1, CTX, config=MLA_CONFIG[0])
    return run


def apply(kind: str, p: dict) -> None:
    if kind in ("experts", "dense"):
        set_expert_overrides(p["fast"], p["cfg"])
    else:
        MLA_CONFIG[0] = p["cfg"]


def compile_worker(cases: list) -> list:
    """Run each case once (Triton compiles it into the shared on-disk cache); returns the errors."""
    errs = []
    for kind, p in cases:
        try:
            apply(kind, p)
            case_fn(kind, p, 1)()
            torch.cuda.synchronize()
        except Exception as exc:                           # reported by the timing pass too
            errs.append(f"{kind} {p.get('label')}: {str(exc)[:300]}")
    return errs


def check_and_time(kind: str, p: dict) -> dict:
    apply(kind, p)
    fn = case_fn(kind, p, 3)
    rec = {"kind": kind, **{k: (asdict(v) if hasattr(v, "__dataclass_fields__") else v) for k, v in p.items()}}
    if kind == "experts":
        banks = expert_weights(p["fp8"], 3)
        x, ids, wt = expert_inputs(p["tokens"])
        got = moe_gemm.routed_experts_fused(x, ids, wt, banks[0])
        rec["rel_err"] = rel(got, expert_reference(x, ids, wt, banks[0][0]))
        touched = ids.unique().numel()
        nbytes = touched * 3 * H * I * (1 if p["fp8"] else 2)
        rec["tol"] = 2e-2
    elif kind == "dense":
        from dynamo_dwdp.model.fp8 import dequantize_block_fp8

        q, s = fn.ws[0]
        if p["label"] == "cublas bf16":
            got = torch.nn.functional.linear(fn.x, dequantize_block_fp8(q, s, dtype=torch.bfloat16))
        else:
            got = moe_gemm.fp8_linear(fn.x, q, s)
        rec["rel_err"] = rel(got, fn.x.float() @ dequantize_block_fp8(q, s).T)
        nbytes = p["N"] * p["K"] * (2 if p["label"] == "cublas bf16" else 1)
        rec["tol"] = 1e-2
    else:
        layers, tables, ctx, q = mla_inputs(p["batch"], sets=3)
        got = mla_decode.mla_decode_attention(q, layers[0], tables, ctx, C, 0.1, CTX, config=MLA_CONFIG[0])
        worst = 0.0
        for b in range(0, p["batch"], max(1, p["batch"] // 8)):     # 8 sequences against fp64
            keys = layers[0][tables[b]].reshape(-1, C + R)[:CTX].double()
            ref = torch.softmax(q[b].double() @ keys.T * 0.1, -1) @ keys[:, :C]
            worst = max(worst, rel(got[b], ref))
        rec["rel_err"] = worst
        rec["tol"] = 2e-2
        nbytes = p["batch"] * CTX * (C + R) * 2
    rec["us"] = graph_us(fn, reps=30)
    rec["GBps"] = nbytes / rec["us"] / 1e3
    rec["ok"] = rec["rel_err"] < rec["tol"]
    return rec


def mla_fp32_checks(cfgs: list) -> list:
    """The chosen decode configs on an fp32 cache, ragged contexts (not multiples of the tile or the
    block; batch 1 too), against fp64."""
    out = []
    g = torch.Generator(device="cuda").manual_seed(5)
    for label, cfg in cfgs:
        MLA_CONFIG[0] = cfg
        for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 2e-2)):
            for ctxs in ([1000], [8, 34, 81, 151, 261], [3000, 17, 999]):
                n = [(c + BS - 1) // BS for c in ctxs]
                nblk = sum(n) + 4
                pool = torch.randn(nblk, 2, BS, C + R, device="cuda", generator=g).to(dtype)[:, 1]
                perm = torch.randperm(nblk, device="cuda", generator=g)
                tabs, at = [], 0
                for k in n:
                    tabs.append(perm[at:at + k].tolist() + [0] * (max(n) - k))
                    at += k
                tab = torch.tensor(tabs, device="cuda")
                q = (torch.randn(len(ctxs), HEADS, C + R, device="cuda", generator=g) * 0.05).to(dtype)
                o = mla_decode.mla_decode_attention(q, pool, tab, torch.tensor(ctxs, device="cuda"), C, 0.1, max(ctxs), config=MLA_CONFIG[0])
                worst = 0.0
                for b, c in enumerate(ctxs):
                    keys = pool[tab[b, :n[b]]].reshape(-1, C + R)[:c].double()
                    ref = torch.softmax(q[b].double() @ keys.T * 0.1, -1) @ keys[:, :C]
                    worst = max(worst, rel(o[b], ref))
                out.append({"label": label, "dtype": str(dtype)[6:], "contexts": ctxs, "rel_err": worst,
                            "ok": worst < tol})
    MLA_CONFIG[0] = None
    return out


def copy_bandwidth() -> float:
    src = torch.randn(1 << 29, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    ts = []
    for _ in range(10):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dst.copy_(src)
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b))
    return 2 * src.numel() * 2 / (sorted(ts)[5] / 1e3)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=".")
    ap.add_argument("--jobs", type=int, default=12, help="compile worker processes (0: compile in the timing pass)")
    ap.add_argument("--only", default="experts,dense,mla")
    ap.add_argument("--short", action="store_true", help="the chosen configurations and the previous ones only")
    ap.add_argument("--ncu-once", action="store_true",
                    help="for a profiler: the chosen MLA kernel at batch 64 and 256, then the chosen FP8 experts at "
                         "64 tokens, one launch each (split_kernel x2, grouped_kernel x2), nothing else")
    a = ap.parse_args()
    if a.ncu_once:
        for B in (64, 256):
            case_fn("mla", {"batch": B}, 1)()
        set_expert_overrides(True, None)
        case_fn("experts", {"fp8": True, "tokens": 64}, 1)()
        torch.cuda.synchronize()
        return 0
    os.makedirs(a.out, exist_ok=True)
    only = set(a.only.split(","))
    cases = [c for c in all_cases(a.short) if c[0] in only]
    say(f"{torch.cuda.get_device_name(0)}; torch {torch.__version__}; {len(cases)} variants")
    if a.jobs:
        chunks = [cases[i::a.jobs] for i in range(a.jobs)]
        with mp.get_context("spawn").Pool(a.jobs) as pool:
            errs = sum(pool.map(compile_worker, chunks), [])
        say(f"compiled in {a.jobs} workers; {len(errs)} errors" + "".join(f"\n  {e}" for e in errs[:10]))
    bw = copy_bandwidth()
    say(f"HBM copy {bw / 1e12:.2f} TB/s")
    results = []
    for kind, p in cases:
        try:
            rec = check_and_time(kind, p)
        except Exception as exc:
            rec = {"kind": kind, "label": p.get("label"), "error": str(exc)[:300], "ok": False}
        results.append(rec)
        if "error" in rec:
            say(f"{kind} {p.get('label')}: ERROR {rec['error'][:200]}")
        with open(os.path.join(a.out, "gpu_kernels.json"), "w") as f:
            json.dump({"hbm_copy_bytes_per_s": bw, "device": torch.cuda.get_device_name(0), "results": results},
                      f, indent=1, default=str)
    set_expert_overrides(True, None)
    best_mla = {}
    for r in results:
        if r["kind"] == "mla" and r.get("ok"):
            best_mla.setdefault(r["label"], []).append(r["us"])
    fp32 = []
    if "mla" in only:
        lookup = dict(mla_variants(a.short))
        picks = [k for k in sorted(best_mla, key=lambda k: sum(best_mla[k])) if lookup[k] is not None][:2]
        fp32 = mla_fp32_checks([(k, lookup[k]) for k in picks] + [("chosen", None)])
    with open(os.path.join(a.out, "gpu_kernels.json"), "w") as f:
        json.dump({"hbm_copy_bytes_per_s": bw, "device": torch.cuda.get_device_name(0), "results": results,
                   "mla_fp32_checks": fp32}, f, indent=1, default=str)
    # tables
    print(f"\nHBM copy {bw / 1e12:.2f} TB/s (read + write)")
    for kind, keyf, head in (("experts", lambda r: (r["fp8"], r["tokens"]), "fp8 tokens"),
                             ("dense", lambda r: (r["shape"], r["M"]), "shape M"),
                             ("mla", lambda r: (r["batch"],), "batch")):
        rows = [r for r in results if r["kind"] == kind and "us" in r]
        if not rows:
            continue
        print(f"\n## {kind}: {head} | variant | us | GB/s | rel err | ok")
        for r in sorted(rows, key=lambda r: (keyf(r), r["us"])):
            print(f"{keyf(r)} | {r['label']} | {r['us']:.1f} | {r['GBps']:.0f} | {r['rel_err']:.1e} | "
                  f"{'ok' if r['ok'] else 'FAIL'}")
    for c in fp32:
        print(f"mla check {c['label']} {c['dtype']} {c['contexts']}: {c['rel_err']:.1e} {'ok' if c['ok'] else 'FAIL'}")
    bad = [r for r in results if not r.get("ok")]
    say(f"done; {len(bad)} variants failed or errored")
    return 0


if __name__ == "__main__":
    sys.exit(main())
