"""MLA prefill on one GPU in one command: the attention options checked and timed, then the engine's
prefill re-measured with the fastest, with the machine's ceilings of the same run.

  PYTHONPATH=.:scripts PYTHONUNBUFFERED=1 python3 scripts/gpu_prefill.py --out $OUT [--layers 27]

Installs nothing, needs no network. Steps:
1. ceilings: HBM copy and bf16 GEMM 8192^3 (scripts/gpu_perf.py's measurement);
2. correctness of each prefill attention implementation (model/prefill_attention.py: triton,
   cudnn, flash_pad, sdpa) against a float64 softmax on the GPU, DeepSeek dims (16 heads, nope 128,
   rope 64, v 128), causal prefill and a chunk after cached tokens, fp32 and bf16, fresh random
   inputs, every output element finite;
3. attention alone timed (CUDA events, median) at 2K, 8K and 16K causal tokens, and a 2K chunk after
   6K cached, for each implementation; the Triton kernel at each tile of GPU_TILES; achieved TFLOP/s
   counts the causal (query, key) pairs, 2 * h * (192 + 128) FLOPs each;
4. the fastest implementation that passed (smallest summed time at 8K and 16K) is the one the engine
   runs next (DWDP_PREFILL_ATTENTION);
5. `bench engine` prefill 2K/8K/16K (v2-lite-shape, --layers deep, one rank) with it;
6. while the time budget allows: a kernel-time profile of one 8K-token prefill of the 3-layer
   v2-lite-shape model with it, and the engine bench with the former path (sdpa).
Writes $OUT/gpu_prefill.json, $OUT/gpu_prefill.md (the tables), $OUT/bench.jsonl, $OUT/profile_prefill.txt.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings

import torch

from gpu_common import ceilings, lite3, median_ms, prefill_runner, rel, say, write_v2lite
from gpu_perf import bench, roofline_rows

H, NOPE, ROPE, VD = 16, 128, 64, 128                     # DeepSeek-V2-Lite / V3 per-head dims


def inputs(T: int, S: int, dtype: torch.dtype, gen: torch.Generator):
    """Engine-shaped inputs: q_nope a view of the [T, h, 192] query, k_nope and v views of one expanded
    [S, h, 256] tensor, k_pe [S, 64] shared."""
    dev = "cuda"
    q = torch.randn(T, H, NOPE + ROPE, device=dev, generator=gen).to(dtype)
    q_pe = torch.randn(T, H, ROPE, device=dev, generator=gen).to(dtype)
    kv = torch.randn(S, H, NOPE + VD, device=dev, generator=gen).to(dtype)
    k_pe = torch.randn(S, ROPE, device=dev, generator=gen).to(dtype)
    return q[..., :NOPE], q_pe, kv[..., :NOPE], k_pe, kv[..., NOPE:]


def causal_flops(T: int, S: int) -> float:
    pairs = T * (S - T) + T * (T + 1) // 2
    return pairs * 2.0 * H * (NOPE + ROPE + VD)


def check_impls(rows: list) -> dict:
    """Each implementation vs float64, fp32 and bf16; returns {impl: passed (bf16 and, where it runs, fp32)}."""
    from dynamo_dwdp.model.kernels.mla_prefill import reference
    from dynamo_dwdp.model.prefill_attention import IMPLS, attend

    gen = torch.Generator(device="cuda").manual_seed(int.from_bytes(os.urandom(4), "little"))
    ok = {impl: True for impl in IMPLS}
    scale = (NOPE + ROPE) ** -0.5
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        for T, S in ((1000, 1000), (400, 1000), (1, 777)):
            args = inputs(T, S, dtype, gen)
            ref = reference(*args, scale)
            for impl in IMPLS:
                name = f"prefill attention {impl} vs float64, {str(dtype)[6:]}, {T} queries / {S} keys"
                try:
                    out = attend(impl, *args, scale)
                    torch.cuda.synchronize()
                except Exception as exc:                       # e.g. a backend that refuses fp32
                    rows.append((name, f"not run: {str(exc).splitlines()[0][:120]}",
                                 "n/a" if dtype == torch.float32 else "FAIL"))
                    say(f"check: {rows[-1]}")
                    if dtype != torch.float32:
                        ok[impl] = False
                    continue
                e = rel(out, ref)
                good = bool(torch.isfinite(out).all()) and e < tol
                ok[impl] &= good
                rows.append((name, f"rel err {e:.2e} (tol {tol:g})", "ok" if good else "FAIL"))
                say(f"check: {rows[-1]}")
    return ok


def time_impls(rows: list, ok: dict) -> dict:
    """ms of one sequence's attention per implementation and size; the Triton tiles at 8K/16K."""
    from dynamo_dwdp.model.kernels import mla_prefill
    from dynamo_dwdp.model.prefill_attention import IMPLS, attend

    gen = torch.Generator(device="cuda").manual_seed(7)
    scale = (NOPE + ROPE) ** -0.5
    times: dict = {}
    for T, S in ((2048, 2048), (8192, 8192), (16000, 16000), (2048, 8192)):
        args = inputs(T, S, torch.bfloat16, gen)
        for impl in IMPLS:
            if not ok.get(impl):
                continue
            try:
                ms = median_ms(lambda: attend(impl, *args, scale), reps=10)
            except Exception as exc:
                rows.append((f"time {impl} {T}/{S}", f"failed: {str(exc)[:100]}", "FAIL"))
                continue
            times[(impl, T, S)] = ms
            tf = causal_flops(T, S) / (ms / 1e3) / 1e12
            rows.append((f"attention {impl}, {T} queries / {S} keys, bf16", f"{ms:.3f} ms, {tf:.0f} TFLOP/s", "info"))
            say(f"attention {impl} {T}/{S}: {ms:.3f} ms {tf:.0f} TFLOP/s")
        if T == S and T >= 8192:
            for tile in mla_prefill.GPU_TILES:
                try:
                    ms = median_ms(lambda: mla_prefill.mla_prefill_attention(*args, scale, tile=tile), reps=10)
                except Exception as exc:
                    rows.append((f"triton tile {tile} {T}", f"failed: {str(exc)[:100]}", "info"))
                    continue
                tf = causal_flops(T, S) / (ms / 1e3) / 1e12
                rows.append((f"triton tile (BM, BN, warps, stages) = {tile}, {T} causal", f"{ms:.3f} ms, {tf:.0f} TFLOP/s",
                             "info"))
                say(f"triton tile {tile} {T}: {ms:.3f} ms {tf:.0f} TFLOP/s")
        del args
        torch.cuda.empty_cache()
    return times


def profile_prefill(tmp: str, tokens: int) -> str:
    """Kernel-time table of one prefill forward (3-layer v2-lite-shape model) with the current
    DWDP_PREFILL_ATTENTION."""
    from torch.profiler import ProfilerActivity, profile

    r, step = prefill_runner(lite3(tmp), tokens)
    for _ in range(2):
        r.execute(*step)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        r.execute(*step)
        torch.cuda.synchronize()
    del r
    torch.cuda.empty_cache()
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=80)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=".")
    p.add_argument("--layers", type=int, default=27)
    p.add_argument("--prefill", default="2048,8192,16000")
    p.add_argument("--hw", default="h200-measured")
    p.add_argument("--budget-s", type=float, default=150.0,
                   help="after the engine bench: the profile runs only before this many seconds, the former "
                        "path's bench only before budget - 40")
    p.add_argument("--impl", default="", help="skip the choice: run the engine with this implementation")
    p.add_argument("--model", default="", help="an existing model directory for the engine bench (default: write "
                   "the v2-lite shape, --layers deep, and delete it at the end)")
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as tmp:     # the models written here go with it
        return run(a, tmp)


def run(a, tmp: str) -> int:
    from dynamo_dwdp.bench.engine_bench import Point

    t0 = time.perf_counter()
    info = {"name": torch.cuda.get_device_name(0), "torch": torch.__version__, "cuda": torch.version.cuda,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "argv": sys.argv}
    import triton

    info["triton"] = triton.__version__
    say(f"{info['name']}; torch {info['torch']}; triton {info['triton']}")
    ceil = ceilings()
    say(f"ceilings: HBM copy {ceil['hbm_copy_bytes_per_s'] / 1e12:.2f} TB/s, bf16 GEMM "
        f"{ceil['bf16_gemm_flops'] / 1e12:.0f} TFLOP/s")
    rows: list = []
    warnings.filterwarnings("ignore", message=".*(kernel not used because|has been runtime disabled|Expected query).*")
    ok = check_impls(rows)
    times = time_impls(rows, ok)
    score = {impl: times[(impl, 8192, 8192)] + times[(impl, 16000, 16000)] for impl in ok
             if (impl, 8192, 8192) in times and (impl, 16000, 16000) in times}
    chosen = a.impl or (min(score, key=score.get) if score else "sdpa")
    say(f"fastest passing implementation (8K + 16K): {chosen} ({', '.join(f'{k} {v:.1f} ms' for k, v in score.items())})")
    os.environ["DWDP_PREFILL_ATTENTION"] = chosen
    extra: dict = {"chosen": chosen, "score_ms": score}

    def dump(table=()):
        with open(os.path.join(a.out, "gpu_prefill.json"), "w") as f:
            json.dump({"info": info, "ceilings": ceil, "checks": rows, "bench": list(table), **extra}, f, indent=1)

    dump()

    def report(results) -> list[dict]:
        table = roofline_rows(results, ceil)
        for row, r in zip(table, results):
            row["mode"] = r["env"]["DWDP_PREFILL_ATTENTION"]
            row["flop_components"] = r["flops"]["by_component"]
        dump(table)
        lines = [f"# gpu_prefill {info['date']}: {info['name']}, torch {info['torch']}, triton {info['triton']}",
                 f"command: {' '.join(info['argv'])}",
                 f"ceilings: HBM copy {ceil['hbm_copy_bytes_per_s'] / 1e12:.2f} TB/s, bf16 GEMM "
                 f"{ceil['bf16_gemm_flops'] / 1e12:.0f} TFLOP/s; engine ran prefill attention = {chosen}", "",
                 "| check / timing | result | status |", "|---|---|---|"]
        lines += [f"| {c[0]} | {c[1]} | {c[2]} |" for c in rows]
        lines += ["", "| tokens | attention | step ms | tok/s | % GEMM peak | planner ms (MoE layers) | measured/planner |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['tokens']} | {r['mode']} | {r['step_ms']:.2f} | {r['tok_s']:,.0f} | "
                  f"{100 * r['flop_frac']:.1f} | {r['planner_moe_ms'] or 0:.2f} | {r['measured_over_planner'] or 0:.2f} |"
                  for r in table]
        with open(os.path.join(a.out, "gpu_prefill.md"), "w") as f:
            f.write("\n".join(lines) + "\n")
        return lines

    model = a.model or write_v2lite(tmp, a.layers)
    points = [Point("prefill", n, 1, 0, 0.0, 3, 1) for n in (int(x) for x in a.prefill.split(",") if x)]
    jsonl = os.path.join(a.out, "bench.jsonl")
    results = bench(model, jsonl, [({}, points, {"DWDP_PREFILL_ATTENTION": chosen})], a.hw)
    report(results)
    if time.perf_counter() - t0 < a.budget_s:
        try:
            text = profile_prefill(tmp, 8192)
            with open(os.path.join(a.out, "profile_prefill.txt"), "w") as f:
                f.write(f"one 8192-token prefill, v2-lite-shape 3 layers, bf16, DWDP_PREFILL_ATTENTION={chosen}\n{text}")
            print(text, flush=True)
        except Exception:
            import traceback

            traceback.print_exc()
    else:
        say("profile skipped: time budget")
    if chosen != "sdpa" and time.perf_counter() - t0 < a.budget_s - 40:
        results += bench(model, jsonl, [({}, points, {"DWDP_PREFILL_ATTENTION": "sdpa"})], a.hw)
    else:
        say("former path (sdpa) engine bench skipped: time budget")
    print("\n".join(report(results)), flush=True)
    say("done")
    return 0 if all(c[2] in ("ok", "info", "n/a") for c in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
