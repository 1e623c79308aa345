"""W8A8 routed experts (`weight_format: fp8-block-a8`) on one GPU: checks, kernel times, engine step.

  PYTHONPATH=.:scripts PYTHONUNBUFFERED=1 python3 scripts/gpu_fp8a8.py --out $OUT --budget 120

1. HBM copy ceiling;
2. routed experts at the v2-lite shapes (64 experts, top-6, H 2048, I 1408) at 1/8/64/256 tokens:
   the activation quantizer against `model.fp8.quantize_act_fp8` (bytes, scales), the W8A8 kernel
   against the torch emulation of its quantization and against the dequantized model (float64),
   W8A16 against the dequantized model; then kernel time replayed from a CUDA graph (10 calls per
   replay, 3 weight sets rotated so that L2 does not serve them) for bf16, W8A16 and W8A8 (each W8A8
   tiling variant checked against the emulation before it is timed);
3. the engine on a 3-layer v2-lite-shape model: fp8-block-a8 and fp8-block logits (prefill, and a
   decode step from a CUDA graph) against the dequantized bf16 model, argmax agreement;
4. the 27-layer engine's decode step from CUDA graphs at batch 64, 1, 256 (context 1000; the KV
   pool left at zeros, so no prefill: attention reads the same bytes) for native bf16, fp8-block-a8
   and fp8-block, one model load per format, while the --budget (seconds since start) allows.
Writes $OUT/fp8a8.json and $OUT/fp8a8.md as it goes. `--smoke` runs step 2 alone at tiny shapes on the
CPU under Triton's interpreter (TRITON_INTERPRET=1): a check of this script, its times mean nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time

import torch

from gpu_common import (ceilings, fp8_engine_logits, graph_replay_ms, graph_us, lite3, rel, rotating, say, wall_ms,
                        write_v2lite)

T0 = time.perf_counter()
RES: dict = {"kernels": [], "variants": [], "engine_check": {}, "engine_step": {}}
MD: list[str] = []
OUT = "."
DEV, SHAPES, TOKENS = "cuda", (64, 2048, 1408, 6), (64, 1, 8, 256)     # experts, H, I, top-k
TIMER = graph_us


def flush() -> None:
    with open(os.path.join(OUT, "fp8a8.json"), "w") as f:
        json.dump(RES, f, indent=1)
    with open(os.path.join(OUT, "fp8a8.md"), "w") as f:
        f.write("\n".join(MD) + "\n")


def left(budget: float) -> float:
    return budget - (time.perf_counter() - T0)


DEFAULT = "swap128/swap64"     # what moe_fp8a8.choose_a8_tiles picks
VARIANTS = {   # name: (swiglu tiles, down tiles); block_m 0 = by rows per expert
    "swap64/swap64": ((0, 64, True), (0, 64, True)),
    "swap128/swap64": ((0, 128, True), (0, 64, True)),
    "plain64/plain64": ((0, 64, False), (0, 64, False)),
}


def kernels() -> str:
    from dynamo_dwdp.model.experts import ExpertBank
    from dynamo_dwdp.model.fp8 import quantize_act_fp8, quantize_block_fp8
    from dynamo_dwdp.model.kernels import moe_fp8a8, moe_gemm
    from dynamo_dwdp.model.kernels.moe_fp8a8 import A8Tiles
    from tests.model.fp8a8_reference import dequantized_experts, emulated_experts

    g = torch.Generator(device=DEV).manual_seed(9)
    E, H, I, k = SHAPES
    sets = []
    for _ in range(3):
        w13 = torch.randn(E, 2 * I, H, device=DEV, generator=g).bfloat16() * 0.02
        w2 = torch.randn(E, H, I, device=DEV, generator=g).bfloat16() * 0.02
        q13, s13 = zip(*(quantize_block_fp8(w) for w in w13))
        q2, s2 = zip(*(quantize_block_fp8(w) for w in w2))
        sets.append(([ExpertBank(0, w13, w2)],
                     [ExpertBank(0, torch.stack(q13), torch.stack(q2), torch.stack(s13), torch.stack(s2))]))
    MD.append("| tokens | experts | bf16 us | W8A16 us | W8A8 us (default tiles) | best W8A8 variant | "
              "GB/s FP8 bytes W8A16 / W8A8 | W8A8 vs emulation | W8A8 vs dequantized | W8A16 vs dequantized | "
              "act quant bytes equal |")
    MD.append("|---|---|---|---|---|---|---|---|---|---|---|")
    best_at_64 = DEFAULT
    for T in TOKENS:
        x = torch.randn(T, H, device=DEV, generator=g).bfloat16()
        ids = torch.stack([torch.randperm(E, device=DEV, generator=g)[:k] for _ in range(T)])
        wt = torch.rand(T, k, device=DEV, generator=g)
        touched = ids.unique().numel()
        fp8 = sets[0][1]
        q, s = moe_fp8a8.quantize_act(x)
        rq, rs = quantize_act_fp8(x)
        bytes_eq = (q.view(torch.uint8) == rq.view(torch.uint8)).float().mean().item()
        scales_eq = (s == rs).float().mean().item()
        moe_fp8a8.TILE_OVERRIDE.clear()
        deq = dequantized_experts(x, ids, wt, fp8)
        try:
            got = moe_fp8a8.routed_experts_fp8a8(x, ids, wt, fp8)
            e_emu = rel(got, emulated_experts(x, ids, wt, fp8, moe_fp8a8.h_group(T * k / E)))
            e_deq = rel(got, deq)
        except Exception as exc:
            e_emu = e_deq = float("nan")
            say(f"  default W8A8 T={T}: FAILED {type(exc).__name__}: {str(exc)[:300]}")
        e_w8a16 = rel(moe_gemm.routed_experts_fused(x, ids, wt, fp8), deq)

        def rot(fn, which):
            return rotating(fn, x, ids, wt, sets, which)
        t_bf16 = TIMER(rot(moe_gemm.routed_experts_fused, 0))
        t_w8a16 = TIMER(rot(moe_gemm.routed_experts_fused, 1))
        var_t = {}
        for name, (sw, dn) in VARIANTS.items():
            moe_fp8a8.TILE_OVERRIDE.clear()
            moe_fp8a8.TILE_OVERRIDE.update({"swiglu": A8Tiles(sw[0], sw[1], swap=sw[2]),
                                            "down": A8Tiles(dn[0], dn[1], swap=dn[2])})
            try:
                v = moe_fp8a8.routed_experts_fp8a8(x, ids, wt, fp8)
                ev = rel(v, emulated_experts(x, ids, wt, fp8, moe_fp8a8.h_group(T * k / E)))
                tv = TIMER(rot(moe_fp8a8.routed_experts_fp8a8, 1)) if ev < 1e-2 else None
            except Exception as exc:                       # a tiling that does not compile is a row, not a crash
                ev, tv = None, None
                say(f"  variant {name} T={T}: FAILED {type(exc).__name__}: {str(exc)[:300]}")
            var_t[name] = tv
            RES["variants"].append({"tokens": T, "variant": name, "us": tv, "rel_err_vs_emulation": ev})
            say(f"  T={T} {name}: {tv if tv is None else round(tv, 1)} us, vs emulation {ev}")
        moe_fp8a8.TILE_OVERRIDE.clear()
        t_a8 = var_t.get(DEFAULT)
        ok = {n: v for n, v in var_t.items() if v is not None}
        best = min(ok, key=ok.get) if ok else None
        if T == 64 and best:
            best_at_64 = best
        fp8_bytes = touched * 3 * H * I
        rec = {"tokens": T, "experts_touched": touched, "bf16_us": t_bf16, "w8a16_us": t_w8a16, "w8a8_us": t_a8,
               "w8a8_best": best, "w8a8_best_us": ok.get(best), "w8a16_GBps": fp8_bytes / t_w8a16 / 1e3,
               "w8a8_best_GBps": fp8_bytes / ok[best] / 1e3 if best else None,
               "rel_w8a8_vs_emulation": e_emu, "rel_w8a8_vs_dequantized": e_deq, "rel_w8a16_vs_dequantized": e_w8a16,
               "act_bytes_equal": bytes_eq, "act_scales_equal": scales_eq}
        RES["kernels"].append(rec)
        MD.append(f"| {T} | {touched} | {t_bf16:.1f} | {t_w8a16:.1f} | {t_a8 if t_a8 is None else round(t_a8, 1)} | "
                  f"{best} {ok.get(best, float('nan')):.1f} | {rec['w8a16_GBps']:.0f} / "
                  f"{rec['w8a8_best_GBps'] or float('nan'):.0f} | {e_emu:.1e} | {e_deq:.1e} | {e_w8a16:.1e} | "
                  f"{bytes_eq:.4f} (scales {scales_eq:.3f}) |")
        say(f"T={T}: bf16 {t_bf16:.1f} us, W8A16 {t_w8a16:.1f} us, W8A8 {t_a8} us (best {best} {ok.get(best)}); "
            f"rel vs emu {e_emu:.1e}, vs deq {e_deq:.1e} (W8A16 {e_w8a16:.1e}); act bytes eq {bytes_eq:.4f}")
        flush()
    del sets
    if DEV == "cuda":
        torch.cuda.empty_cache()
    return best_at_64


def engine_check(tmp: str) -> None:
    out = fp8_engine_logits(lite3(tmp), ("round-trip", "fp8-block", "fp8-block-a8"))
    out = {fmt: v[:2] for fmt, v in out.items()}
    ref_pre, ref_dec = out["round-trip"]
    MD.append("\n| format (3 layers) | prefill logits rel err | decode-graph logits rel err | decode argmax agree |")
    MD.append("|---|---|---|---|")
    for fmt in ("fp8-block", "fp8-block-a8"):
        pre, dec = out[fmt]
        rec = {"prefill_rel": rel(pre, ref_pre), "decode_rel": rel(dec, ref_dec),
               "decode_argmax_agree": (dec.argmax(-1) == ref_dec.argmax(-1)).float().mean().item(),
               "prefill_argmax_agree": (pre.argmax(-1) == ref_pre.argmax(-1)).float().mean().item()}
        RES["engine_check"][fmt] = rec
        MD.append(f"| {fmt} | {rec['prefill_rel']:.2e} | {rec['decode_rel']:.2e} | {rec['decode_argmax_agree']:.0%} |")
        say(f"engine 3 layers {fmt} vs dequantized bf16: {rec}")
    flush()


def engine_step(tmp: str, budget: float, batches=(64, 1, 256), context: int = 1000, model: str = "") -> None:
    from dynamo_dwdp.config.engine import EngineSettings
    from dynamo_dwdp.engine.model_runner import ModelRunner
    from dynamo_dwdp.model.moe_executor import LocalExecutor

    if left(budget) < 45:
        say("engine step: skipped (budget)")
        return
    model = model or write_v2lite(tmp, 27)
    MD.append(f"\n| format (27 layers, context {context}) | batch | graph replay ms | step wall ms |")
    MD.append("|---|---|---|---|")
    bs, per = 16, (context + 1 + 15) // 16
    B = max(batches)
    for fmt in ("native", "fp8-block-a8", "fp8-block"):
        if left(budget) < 25:
            say(f"engine step {fmt}: skipped (budget)")
            continue
        t = time.perf_counter()
        cfg = EngineSettings(block_size=bs, num_kv_blocks=B * per + 1, device="cuda", dtype="bfloat16",
                             max_num_seqs=B, max_num_batched_tokens=8192, cuda_graphs=True,
                             capture_graphs_at_start=False, weight_format=fmt)
        r = ModelRunner(model, cfg, LocalExecutor)
        say(f"engine {fmt}: loaded in {time.perf_counter() - t:.1f}s")
        g = torch.Generator().manual_seed(2)
        tables = [list(range(i * per, (i + 1) * per)) for i in range(B)]
        for b in batches:
            if left(budget) < 8:
                break
            tokens = [[int(x)] for x in torch.randint(5, 1000, (b,), generator=g)]
            step = (tokens, [context] * b, tables[:b], [True] * b)
            wall = wall_ms(r, step, 20, warmup=3)
            replay = graph_replay_ms(r, b, context, 20)
            rec = {"replay_ms": replay, "wall_ms": wall}
            RES["engine_step"].setdefault(fmt, {})[b] = rec
            MD.append(f"| {fmt} | {b} | {replay if replay is None else round(replay, 3)} | {rec['wall_ms']:.3f} |")
            say(f"engine {fmt} b{b}: replay {replay} ms, wall {rec['wall_ms']:.2f} ms")
            flush()
        del r
        torch.cuda.empty_cache()


def smoke() -> int:
    global DEV, SHAPES, TOKENS, TIMER
    assert os.environ.get("TRITON_INTERPRET") == "1", "--smoke runs under TRITON_INTERPRET=1"
    from tests.model import interpreter_numerics

    interpreter_numerics.install()

    def wall_us(fn):
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e6
    DEV, SHAPES, TOKENS, TIMER = "cpu", (8, 256, 128, 2), (3, 9), wall_us
    say(f"smoke: engine tiles {kernels()}")
    flush()
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=".")
    p.add_argument("--budget", type=float, default=120.0, help="seconds after which no new engine point starts")
    p.add_argument("--skip", default="", help="comma list of: kernels, check, step")
    p.add_argument("--smoke", action="store_true", help="step 2 only, tiny shapes, CPU interpreter")
    p.add_argument("--model", default="", help="step 4: an existing 27-layer model directory (default: write one)")
    return p


def main(argv: list[str] | None = None) -> int:
    global OUT
    a = build_parser().parse_args(argv)
    OUT = a.out
    os.makedirs(OUT, exist_ok=True)
    if a.smoke:
        return smoke()
    skip = set(a.skip.split(","))
    c = ceilings()
    RES["ceilings"] = c
    MD.append(f"# W8A8 experts, {torch.cuda.get_device_name(0)}, torch {torch.__version__}, "
              f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; HBM copy "
              f"{c['hbm_copy_bytes_per_s'] / 1e12:.2f} TB/s\n")
    say(f"HBM copy {c['hbm_copy_bytes_per_s'] / 1e12:.2f} TB/s")
    tmp = tempfile.mkdtemp()
    best = DEFAULT
    if "kernels" not in skip:
        try:
            best = kernels()
        except Exception as exc:
            say(f"kernels FAILED {type(exc).__name__}: {str(exc)[:500]}")
    RES["engine_tiles"] = best
    if best != DEFAULT:                  # the engine runs with the tiling fastest at 64 tokens
        from dynamo_dwdp.model.kernels import moe_fp8a8
        from dynamo_dwdp.model.kernels.moe_fp8a8 import A8Tiles

        sw, dn = VARIANTS[best]
        moe_fp8a8.TILE_OVERRIDE.update({"swiglu": A8Tiles(sw[0], sw[1], swap=sw[2]),
                                        "down": A8Tiles(dn[0], dn[1], swap=dn[2])})
    say(f"engine W8A8 tiles: {best}")
    if "check" not in skip:
        try:
            engine_check(tmp)
        except Exception as exc:
            say(f"engine check FAILED {type(exc).__name__}: {str(exc)[:500]}")
    if "step" not in skip:
        try:
            engine_step(tmp, a.budget, model=a.model)
        except Exception as exc:
            say(f"engine step FAILED {type(exc).__name__}: {str(exc)[:500]}")
    shutil.rmtree(tmp, ignore_errors=True)                 # the models written here
    flush()
    say("done")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
