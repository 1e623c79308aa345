"""MLA prefill attention on one GPU in one command: every form of the Triton kernel (mla_prefill.GPU_TILES)
and the SDPA options checked and timed, then the engine's prefill step measured with the fastest form and
with the default tile (GPU_TILE), with the machine's ceilings of the same run.

  PYTHONPATH=.:scripts PYTHONUNBUFFERED=1 python3 scripts/gpu_prefill.py --out $OUT [--layers 27]

Installs nothing, needs no network. Steps:
0. in the background: every tile compiled (bf16, and FP32_TILE) in its own process into Triton's disk cache
   (a tile that does not compile in time is left out), and the model written by `dynamo-dwdp make-model`
   (v2-lite-shape, bf16, --layers deep, on the GPU);
1. ceilings: HBM copy and bf16 GEMM 8192^3 (scripts/gpu_perf.py's measurement);
2. correctness of each implementation of model/prefill_attention.py and of each tile against a float64
   softmax on the GPU, DeepSeek dims (16 heads, nope 128, rope 64, v 128), causal prefill, a chunk after
   cached tokens and one query, fp32 (mla_prefill.FP32_TILE) and bf16,
   fresh random inputs, every output element finite;
3. attention alone timed (CUDA events, median of 10) at 2K, 8K and 16K causal tokens and a 2K chunk after
   6K cached: every implementation, and every tile that passed, in two rounds (each form once per round,
   in turn: the spread of one form timed twice); achieved TFLOP/s counts the causal (query, key) pairs,
   2 * h * (192 + 128) FLOPs each;
4. the fastest passing tile (smallest summed time at 8K and 16K causal, mean of the rounds);
5. `scripts/gpu_perf.py --only bench_prefill --prefill 8192,16000` (`bench engine`, its own ceilings)
   with DWDP_PREFILL_TILE = that tile, then with GPU_TILE if that differs (--aba: then that tile again).
Writes $OUT/gpu_prefill.json, $OUT/gpu_prefill.md (the tables), $OUT/bench_<n>_<tile>/ (gpu_perf's files).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings

import torch

from gpu_common import ceilings, median_ms, rel, say

HERE = os.path.dirname(os.path.abspath(__file__))
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


def run_form(form: str, args, scale: float):
    """One attention call: 'tile:NAME' (a Triton tile; fp32 inputs take FP32_TILE) or an implementation."""
    from dynamo_dwdp.model.kernels import mla_prefill
    from dynamo_dwdp.model.prefill_attention import attend

    if form.startswith("tile:"):
        tile = mla_prefill.FP32_TILE if args[0].dtype == torch.float32 else mla_prefill.GPU_TILES[form[5:]]
        return mla_prefill.mla_prefill_attention(*args, scale, tile=tile)
    return attend(form, *args, scale)


def compile_tile(name: str) -> int:
    """--compile-only: build one tile for bf16 and fp32 (into Triton's disk cache) in this process."""
    gen = torch.Generator(device="cuda").manual_seed(1)
    for dtype in (torch.bfloat16, torch.float32):
        args = inputs(300, 300, dtype, gen)
        run_form(f"tile:{name}", args, 0.1)
    torch.cuda.synchronize()
    return 0


def precompile(names, timeout: float) -> dict:
    """Every tile compiled in its own process at once; {name: 'ok' | reason}."""
    procs = {n: subprocess.Popen([sys.executable, __file__, "--compile-only", n], stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True) for n in names}
    t0 = time.perf_counter()
    result = {}
    for n, p in procs.items():
        try:
            out, _ = p.communicate(timeout=max(1.0, timeout - (time.perf_counter() - t0)))
            last = out.strip().splitlines()[-1][:160] if out.strip() else f"exit {p.returncode}"
            result[n] = "ok" if p.returncode == 0 else f"compile failed: {last}"
        except subprocess.TimeoutExpired:
            p.kill()
            p.communicate()
            result[n] = f"compile did not finish in {timeout:.0f}s"
        say(f"compile {n}: {result[n]}")
    return result


def check_forms(rows: list, forms: list) -> dict:
    """Each form vs float64, fp32 and bf16; returns {form: passed (bf16 and, where it runs, fp32)}."""
    from dynamo_dwdp.model.kernels.mla_prefill import reference

    gen = torch.Generator(device="cuda").manual_seed(int.from_bytes(os.urandom(4), "little"))
    ok = {f: True for f in forms}
    scale = (NOPE + ROPE) ** -0.5
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        for T, S in ((1000, 1000), (400, 1000), (1, 777)):
            args = inputs(T, S, dtype, gen)
            ref = reference(*args, scale)
            for form in forms:
                name = f"prefill attention {form} vs float64, {str(dtype)[6:]}, {T} queries / {S} keys"
                try:
                    out = run_form(form, args, scale)
                    torch.cuda.synchronize()
                except Exception as exc:                       # e.g. a backend that refuses fp32
                    tiles = form.startswith("tile:")
                    rows.append((name, f"not run: {str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__}",
                                 "FAIL" if dtype != torch.float32 or tiles else "n/a"))
                    say(f"check: {rows[-1]}")
                    if rows[-1][2] == "FAIL":
                        ok[form] = False
                    continue
                e = rel(out, ref)
                good = bool(torch.isfinite(out).all()) and e < tol
                ok[form] &= good
                rows.append((name, f"rel err {e:.2e} (tol {tol:g})", "ok" if good else "FAIL"))
                say(f"check: {rows[-1]}")
    return ok


SIZES = ((2048, 2048), (8192, 8192), (16000, 16000), (2048, 8192))


def time_forms(rows: list, forms: list, rounds: int = 2) -> dict:
    """ms of one sequence's attention per form and size (bf16): {(form, T, S): [ms of each round]}; every
    form is timed once per round, in turn, so that each has `rounds` figures taken apart."""
    gen = torch.Generator(device="cuda").manual_seed(7)
    scale = (NOPE + ROPE) ** -0.5
    times: dict = {}
    for T, S in SIZES:
        args = inputs(T, S, torch.bfloat16, gen)
        for r in range(rounds):
            for form in forms:
                try:
                    ms = median_ms(lambda: run_form(form, args, scale), reps=10)
                except Exception as exc:
                    rows.append((f"time {form} {T}/{S}", f"failed: {str(exc)[:100]}", "FAIL"))
                    continue
                times.setdefault((form, T, S), []).append(ms)
                tf = causal_flops(T, S) / (ms / 1e3) / 1e12
                rows.append((f"attention {form}, {T} queries / {S} keys, bf16, round {r + 1}",
                             f"{ms:.3f} ms, {tf:.0f} TFLOP/s", "info"))
                say(f"attention {form} {T}/{S} round {r + 1}: {ms:.3f} ms {tf:.0f} TFLOP/s")
        del args
        torch.cuda.empty_cache()
    return times


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=".")
    p.add_argument("--layers", type=int, default=27)
    p.add_argument("--prefill", default="8192,16000")
    p.add_argument("--hw", default="h200-measured")
    p.add_argument("--compile-timeout", type=float, default=150.0)
    p.add_argument("--bench-timeout", type=float, default=150.0, help="each gpu_perf.py bench call")
    p.add_argument("--aba", action="store_true", help="bench the fastest tile once more after the former one")
    p.add_argument("--compile-only", default="", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    if a.compile_only:
        return compile_tile(a.compile_only)
    os.makedirs(a.out, exist_ok=True)
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as tmp:     # the model written here goes with it
        return run(a, tmp)


def bench_step(a, model: str, tile: str, label: str) -> str:
    """gpu_perf.py's bench_prefill with DWDP_PREFILL_TILE=tile into OUT/bench_<label>; its table lines."""
    out = os.path.join(a.out, f"bench_{label}")
    cmd = [sys.executable, os.path.join(HERE, "gpu_perf.py"), "--out", out, "--only", "bench_prefill", "--prefill",
           a.prefill, "--model", model, "--hw", a.hw, "--skip-checks", "--skip-matrix", "--context", "1000"]
    env = dict(os.environ, DWDP_PREFILL_TILE=tile)
    try:
        p = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           timeout=a.bench_timeout)
        text = p.stdout
    except subprocess.TimeoutExpired as exc:
        text = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        text += f"\nbench with tile {tile}: timed out after {a.bench_timeout:.0f}s"
    with open(os.path.join(a.out, f"bench_{label}.log"), "w") as f:
        f.write(" ".join(cmd) + f"\nDWDP_PREFILL_TILE={tile}\n" + text)
    lines = [ln for ln in text.splitlines() if ln.startswith(("| prefill", "ceilings", "|---", "| phase"))]
    print(f"bench, DWDP_PREFILL_TILE={tile}:\n" + "\n".join(lines), flush=True)
    return "\n".join(lines)


def run(a, tmp: str) -> int:
    from dynamo_dwdp.model.kernels import mla_prefill
    from dynamo_dwdp.model.prefill_attention import IMPLS

    info = {"name": torch.cuda.get_device_name(0), "torch": torch.__version__, "cuda": torch.version.cuda,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "argv": sys.argv}
    import triton

    info["triton"] = triton.__version__
    say(f"{info['name']}; torch {info['torch']}; triton {info['triton']}")
    model = os.path.join(tmp, "m")
    make = subprocess.Popen([sys.executable, "-m", "dynamo_dwdp.cli", "make-model", model, "--preset", "v2-lite-shape",
                             "--dtype", "bf16", "--layers", str(a.layers), "--device", "cuda", "--force", "-q"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    compiled = precompile(list(mla_prefill.GPU_TILES), a.compile_timeout)
    rows: list = [(f"compile tile {n}", r, "ok" if r == "ok" else "FAIL") for n, r in compiled.items()]
    warnings.filterwarnings("ignore", message=".*(kernel not used because|has been runtime disabled|Expected query).*")
    forms = [f"tile:{n}" for n, r in compiled.items() if r == "ok"] + [i for i in IMPLS if i != "triton"]
    ok = check_forms(rows, forms)
    made, _ = make.communicate()                          # no timing while the model is written on the GPU
    say(f"make-model: rc {make.returncode} {made.strip()[-300:]}")
    ceil = ceilings()
    say(f"ceilings: HBM copy {ceil['hbm_copy_bytes_per_s'] / 1e12:.2f} TB/s, bf16 GEMM "
        f"{ceil['bf16_gemm_flops'] / 1e12:.0f} TFLOP/s")
    passing = [f for f in forms if ok[f]]
    times = time_forms(rows, passing)
    score = {f[5:]: (sum(times[(f, 8192, 8192)]) + sum(times[(f, 16000, 16000)])) / len(times[(f, 8192, 8192)])
             for f in passing if f.startswith("tile:") and (f, 8192, 8192) in times and (f, 16000, 16000) in times}
    chosen = min(score, key=score.get) if score else mla_prefill.GPU_TILE
    say(f"fastest passing tile (8K + 16K): {chosen} ({', '.join(f'{k} {v:.3f} ms' for k, v in score.items())})")
    extra = {"chosen": chosen, "score_ms": score, "compiled": compiled,
             "times_ms": {f"{f} {T}/{S}": v for (f, T, S), v in times.items()}}

    def dump(bench_text=""):
        with open(os.path.join(a.out, "gpu_prefill.json"), "w") as f:
            json.dump({"info": info, "ceilings": ceil, "checks": rows, "bench": bench_text, **extra}, f, indent=1)
        lines = [f"# gpu_prefill {info['date']}: {info['name']}, torch {info['torch']}, triton {info['triton']}",
                 f"command: {' '.join(info['argv'])}",
                 f"ceilings: HBM copy {ceil['hbm_copy_bytes_per_s'] / 1e12:.2f} TB/s, bf16 GEMM "
                 f"{ceil['bf16_gemm_flops'] / 1e12:.0f} TFLOP/s; fastest tile {chosen}", "",
                 "| check / timing | result | status |", "|---|---|---|"]
        lines += [f"| {c[0]} | {c[1]} | {c[2]} |" for c in rows]
        lines += ["", "attention ms (bf16, median of 10, one figure a round; TFLOP/s in the rows above):", "",
                  "| form | " + " | ".join(f"{T}/{S}" for T, S in SIZES) + " |", "|---" * (len(SIZES) + 1) + "|"]
        for f in dict.fromkeys(f for f, _, _ in times):
            lines.append(f"| {f} | " + " | ".join(", ".join(f"{x:.3f}" for x in times.get((f, T, S), []))
                                                   for T, S in SIZES) + " |")
        lines += ["", bench_text]
        with open(os.path.join(a.out, "gpu_prefill.md"), "w") as f:
            f.write("\n".join(lines) + "\n")
        return lines

    dump()
    bench_text = ""
    if make.returncode == 0:
        order = [chosen] + [mla_prefill.GPU_TILE] * (chosen != mla_prefill.GPU_TILE) + [chosen] * a.aba
        for i, tile in enumerate(order):
            table = bench_step(a, model, tile, f"{i + 1}_{tile}")
            bench_text += f"\nbench {i + 1}: DWDP_PREFILL_TILE={tile}\n{table}\n"
            dump(bench_text)
    print("\n".join(dump(bench_text)), flush=True)
    say("done")
    return 0 if all(c[2] in ("ok", "info", "n/a") for c in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
