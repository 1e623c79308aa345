"""Build the single-GPU step model's calibration file from the H200 result files of 2026-12-01.

  python3 scripts/build_calibration.py [--results docs/results] [--out docs/results/calibration_h200_2026-12-01.jsonl]
  PYTHONPATH=. python3 scripts/build_calibration.py --compare      # + the prediction against the bench steps

Every record is a microbenchmark or a per-kernel time, never a step time the model is compared with
(`dynamo-dwdp plan --calibrate FILE --explain`; record kinds in dynamo_dwdp/planner/calibrate.py):

- ceilings (hbm_copy, gemm bf16): every run's own probe (kernel sweep, gpu_perf, gpu_prefill, profile);
  the planner keeps the best of each;
- kernel routed_experts bf16 at 64/128/256 tokens: the real-routing sweep of 2026-12-02 (the tiling
  `moe_gemm.routed_tiles` runs; routed_routing_h200_2026-12-02.json);
- kernel routed_experts (bf16, fp8), mla_decode, dense_linear (bf16: cuBLAS; fp8: the Triton
  kernel): the "chosen" / "cublas bf16" rows of kernel sweep 2 (the configuration the code runs);
- kernel prefill_attention: the isolated attention timings of gpu_prefill for the implementation the
  engine runs (--prefill-attention: triton, the engine's default since 2026-12-02; cudnn before),
  fresh causal prompts only;
- kernel router, mla_prep: gpu_perf's isolated checks (64 tokens) and the profile's per-kernel times
  (decode batch 1 / 64 / 256, prefill 8192);
- kernel grouped_gemm: the profile's grouped-GEMM kernel at prefill 8192 (FLOPs of the routed experts);
- small_kernel: the profile's kernels that no named term covers, at decode batch 64 and prefill 8192
  (kernels past the profile's top 25 as one "other" entry);
- host_step: the profile's step wall time minus its GPU kernel time (decode batch 1 / 64 / 256,
  prefill 8192);
- kernel routed_shared_folded at 1-16 tokens: scripts/gpu_b1.py's timing of the folded call (--fold).
The v2-lite shape (H 2048, 64 experts top-6, I 1408, 16 heads, 27 layers) is what all of them ran.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys

DAY = "2026-12-01"
LAYERS, MOE_LAYERS = 27, 26
H, I, TOPK, HEADS, QK, V = 2048, 1408, 6, 16, 192, 128

# profile kernel names -> the named term that covers them (anything else is a small kernel)
DECODE_COVERED = (("grouped_kernel", "experts / shared / dense MLP (Triton)"), ("align_kernel", "routed_experts"),
                  ("FillFunctor", "routed_experts"), ("bfloat16_copy_kernel", "routed_experts"),
                  ("gemv2N_kernel", "routed_experts (combine)"), ("split_kernel", "mla_decode"),
                  ("combine_kernel", "mla_decode"), ("logits_kernel", "router"), ("select_kernel", "router"),
                  ("prep_kernel", "mla_prep"), ("nvjet", "dense_linear"), ("splitKreduce", "dense_linear"),
                  ("splitk_reduce_kernel", "dense_linear"))
PREFILL_COVERED = (("GemmUniversal", "grouped_gemm"), ("cudnn_generated", "prefill_attention"),
                   ("mla_prefill_kernel", "prefill_attention"),
                   ("nvjet", "dense GEMMs"), ("prep_kernel", "mla_prep"), ("sm80_xmma_gemm_f32", "router"),
                   ("select_kernel", "router"))


def short_name(name: str) -> str:
    m = re.search(r"native::(?:\(anonymous namespace\)::)?(\w+)", name)
    if "CUDAFunctor_add" in name:
        return "add"
    if "direct_copy" in name:
        return "copy"
    return (m.group(1) if m else name.split("<")[0].split("(")[0]).strip()[:40]


def covered(name: str, table) -> bool:
    return any(k in name for k, _ in table)


def rec(**kw) -> dict:
    return kw


def sweep_records(path: str, src: str) -> list[dict]:
    d = json.load(open(path))
    out = [rec(measure="hbm_copy", bytes_per_s=d["hbm_copy_bytes_per_s"], source=f"{src} copy probe")]
    for r in d["results"]:
        if not r.get("ok") or "us" not in r:
            continue
        nbytes = r["GBps"] * r["us"] * 1e3
        s = r["us"] * 1e-6
        if r["kind"] == "experts" and r["label"] == "chosen":
            dt = "fp8" if r["fp8"] else "bf16"
            out.append(rec(measure="kernel", op="routed_experts", dtype=dt, tokens=r["tokens"], bytes=round(nbytes),
                           seconds=s, source=f"{src} experts {dt} {r['tokens']} tokens, chosen"))
        elif r["kind"] == "mla" and r["label"] == "chosen":
            out.append(rec(measure="kernel", op="mla_decode", dtype="bf16", tokens=r["batch"], bytes=round(nbytes),
                           seconds=s, source=f"{src} mla batch {r['batch']} context 1000, chosen"))
        elif r["kind"] == "dense" and r["label"] in ("chosen", "cublas bf16"):
            dt = "bf16" if r["label"] == "cublas bf16" else "fp8"
            out.append(rec(measure="kernel", op="dense_linear", dtype=dt, tokens=r["M"], bytes=round(nbytes),
                           seconds=s, source=f"{src} dense {r['N']}x{r['K']} M={r['M']}, {r['label']}"))
    return out


def gpu_perf_records(path: str, src: str) -> list[dict]:
    d = json.load(open(path))
    c = d["ceilings"]
    out = [rec(measure="hbm_copy", bytes_per_s=c["hbm_copy_bytes_per_s"], source=f"{src} ceilings"),
           rec(measure="gemm", dtype="bf16", flops_per_s=c["bf16_gemm_flops"], source=f"{src} ceilings")]
    for name, result, _ in d["checks"]:
        if name.startswith("router kernels vs torch router, v2-lite"):
            us = float(re.search(r"; ([\d.]+) us vs torch", result).group(1))
            tokens = int(re.search(r"(\d+) tokens", name).group(1))
            out.append(rec(measure="kernel", op="router", dtype="bf16", tokens=tokens, seconds=us * 1e-6,
                           source=f"{src} check: {name}"))
        elif name.startswith("MLA norm+rope+cache-write kernel"):
            us = float(re.search(r"; ([\d.]+) us", result).group(1))
            tokens = int(re.search(r"(\d+) tokens", name).group(1))
            out.append(rec(measure="kernel", op="mla_prep", dtype="bf16", tokens=tokens, seconds=us * 1e-6,
                           source=f"{src} check: {name}"))
    return out


# moe_gemm.routed_tiles' choice per token count, as named in the 2026-12-02 real-routing sweep
ROUTED_NOW_ON = {64: "m32 k64 8 stages", 128: "m32 wl k64 8 stages", 256: "m32 wl n128 k64 w8 5 stages"}


def routed_routing_records(path: str, src: str) -> list[dict]:
    """bf16 routed_experts records from the real-routing sweep (routed_routing_h200_2026-12-02.json): the
    tiling the engine now runs at 64/128/256 tokens, under the bench model's own routing, from the
    last call that measured it (they replace the uniform-routing sweep's records at those sizes)."""
    found: dict[int, dict] = {}
    for call in json.load(open(path))["calls"]:
        for r in call["rows"]:
            if r.get("what") == "routed experts real routing" and ROUTED_NOW_ON.get(r["rows"]) == r["variant"]:
                found[r["rows"]] = dict(r, call=call["call"])
    return [rec(measure="kernel", op="routed_experts", dtype="bf16", tokens=n,
                bytes=round(r["gb_per_s"] * r["us_per_layer"] * 1e3), seconds=r["us_per_layer"] * 1e-6,
                source=f"{src} call {r['call']} real routing {n} tokens, {r['variant']}")
            for n, r in sorted(found.items())]


def prefill_records(path: str, src: str, impl: str) -> list[dict]:
    text = open(path).read()
    out = []
    m = re.search(r"ceilings: HBM copy ([\d.]+) TB/s, bf16 GEMM ([\d.]+) TFLOP/s", text)
    if m:
        out += [rec(measure="hbm_copy", bytes_per_s=float(m.group(1)) * 1e12, source=f"{src} ceilings"),
                rec(measure="gemm", dtype="bf16", flops_per_s=float(m.group(2)) * 1e12, source=f"{src} ceilings")]
    for q, k, ms in re.findall(rf"\| attention {impl}, (\d+) queries / (\d+) keys, bf16 \| ([\d.]+) ms", text):
        if q != k:                                   # fresh causal prompts only (no cached prefix)
            continue
        n = int(q)
        flops = 2.0 * HEADS * (QK + V) * n * (n + 1) / 2
        out.append(rec(measure="kernel", op="prefill_attention", dtype="bf16", tokens=n, flops=flops,
                       seconds=float(ms) * 1e-3, source=f"{src} attention {impl} {n} causal"))
    return out


def profile_records(path: str, src: str, decode: bool = True, prefill: bool = True) -> list[dict]:
    """Records from a scripts/gpu_profile.py JSON: its ceilings, and its decode points and/or its 8192-token prefill."""
    d = json.load(open(path))
    out = [rec(measure="hbm_copy", bytes_per_s=d["ceilings"]["hbm_copy_bytes_per_s"], source=f"{src} ceilings"),
           rec(measure="gemm", dtype="bf16", flops_per_s=d["ceilings"]["bf16_gemm_flops"], source=f"{src} ceilings")]
    for b, p in sorted(d["decode"].items() if decode else (), key=lambda kv: int(kv[0])):
        b = int(b)
        out.append(rec(measure="host_step", phase="decode", tokens=b, seconds=(p["wall_ms"] - p["busy_ms"]) * 1e-3,
                       source=f"{src} decode batch {b}: wall - GPU kernel time"))
        us = {k: sum(t["us_per_step"] for t in p["top"] if k in t["name"]) for k in
              ("logits_kernel", "select_kernel", "prep_kernel")}
        out.append(rec(measure="kernel", op="router", dtype="bf16", tokens=b,
                       seconds=(us["logits_kernel"] + us["select_kernel"]) / MOE_LAYERS * 1e-6,
                       source=f"{src} decode batch {b}: logits_kernel + select_kernel per MoE layer"))
        out.append(rec(measure="kernel", op="mla_prep", dtype="bf16", tokens=b,
                       seconds=us["prep_kernel"] / LAYERS * 1e-6, source=f"{src} decode batch {b}: prep_kernel"))
        if b == 64:
            out += small_kernels(p, "decode", b, DECODE_COVERED, f"{src} decode batch 64")
    if not prefill:
        return out
    p = d["prefill"]["8192"]
    n = 8192
    out.append(rec(measure="host_step", phase="prefill", tokens=n, seconds=(p["wall_ms"] - p["busy_ms"]) * 1e-3,
                   source=f"{src} prefill {n}: wall - GPU kernel time"))
    grouped = sum(t["us_per_step"] for t in p["top"] if "GemmUniversal" in t["name"]) / MOE_LAYERS
    out.append(rec(measure="kernel", op="grouped_gemm", dtype="bf16", tokens=n, flops=2.0 * 3 * H * I * TOPK * n,
                   seconds=grouped * 1e-6, source=f"{src} prefill {n}: grouped GEMM kernels per MoE layer"))
    # the router: fp32 logits GEMM (engines before the bf16 split GEMM; that one is an nvjet GEMM among the
    # dense ones, ~6.4 GFLOP per MoE layer at 8192 tokens, not priced) + the selection kernel
    router = sum(t["us_per_step"] for t in p["top"]
                 if "sm80_xmma_gemm_f32" in t["name"] or "select_kernel" in t["name"]) / MOE_LAYERS
    if router > 0:
        out.append(rec(measure="kernel", op="router", dtype="bf16", tokens=n, seconds=router * 1e-6,
                       source=f"{src} prefill {n}: router logits (fp32 GEMM, when there) + select_kernel per MoE layer"))
    prep = sum(t["us_per_step"] for t in p["top"] if "prep_kernel" in t["name"]) / LAYERS
    out.append(rec(measure="kernel", op="mla_prep", dtype="bf16", tokens=n, seconds=prep * 1e-6,
                   source=f"{src} prefill {n}: prep_kernel"))
    out += small_kernels(p, "prefill", n, PREFILL_COVERED, f"{src} prefill {n}")
    return out


def small_kernels(p: dict, phase: str, tokens: int, table, src: str) -> list[dict]:
    out = []
    for t in p["top"]:
        if covered(t["name"], table) or not t["calls_per_step"]:
            continue
        out.append(rec(measure="small_kernel", phase=phase, name=short_name(t["name"]),
                       calls_per_layer=t["calls_per_step"] / LAYERS,
                       seconds=t["us_per_step"] / t["calls_per_step"] * 1e-6,
                       tokens=tokens, source=f"{src}: {t['name'][:60]}"))
    rest_us = p["kernel_sum_ms"] * 1e3 - sum(t["us_per_step"] for t in p["top"])
    rest_calls = p["kernels_per_step"] - sum(t["calls_per_step"] for t in p["top"])
    if rest_us > 0 and rest_calls > 0:
        out.append(rec(measure="small_kernel", phase=phase, name="other (past the top 25)",
                       calls_per_layer=rest_calls / LAYERS, seconds=rest_us / rest_calls * 1e-6, tokens=tokens,
                       source=f"{src}: kernel time past the profile's top 25"))
    return out


def fold_records(path: str, src: str) -> list[dict]:
    """The shared experts folded into the routed call, one MoE layer, from scripts/gpu_b1.py's JSON (its
    kernel timing rows: 4 layers' weights in one CUDA graph, random routing)."""
    d = json.load(open(path))
    return [rec(measure="kernel", op="routed_shared_folded", dtype="bf16", tokens=r["T"],
                seconds=r["folded_us_per_layer"] * 1e-6, source=f"{src} fold T={r['T']}: folded_us_per_layer")
            for r in d["fold"] if r.get("ok")]


def build(results: str, prefill_attention: str = "cudnn", profile: str = f"profile_h200_graphs_{DAY}.json",
          prefill_profile: str | None = None, routed_routing: str | None = None,
          fold: str | None = None) -> list[dict]:
    """The records; the defaults rebuild calibration_h200_2026-12-01.jsonl exactly (the command's
    defaults follow the engine as it is now: Triton prefill attention, the real-routing expert tiles)."""
    def at(name: str) -> tuple[str, str]:
        return os.path.join(results, name), f"docs/results/{name}"
    recs = sweep_records(*at(f"gpu_kernels_sweep2_h200_{DAY}.json"))
    if routed_routing:
        routed = routed_routing_records(*at(routed_routing))
        replaced = {r["tokens"] for r in routed}
        recs = [r for r in recs if not (r.get("op") == "routed_experts" and r.get("dtype") == "bf16"
                                        and r["tokens"] in replaced)] + routed
    recs += gpu_perf_records(*at(f"gpu_perf_h200_kernels_{DAY}.json"))
    recs += prefill_records(*at(f"gpu_prefill_h200_{DAY}.md"), prefill_attention)
    if prefill_profile and prefill_profile != profile:      # decode points from one profile, prefill from another
        recs += profile_records(*at(profile), prefill=False)
        recs += profile_records(*at(prefill_profile), decode=False)
    else:
        recs += profile_records(*at(profile))
    if fold:
        recs += fold_records(*at(fold))
    return recs


BENCH_FILES = (f"bench-h200-kernels-{DAY}.jsonl", f"bench-h200-prefill-{DAY}.jsonl")


def compare(results: str, calibration: str, bench_files: tuple[str, ...] = BENCH_FILES) -> list[str]:
    """Markdown rows: each bench point's measured step against the step model's prediction (the
    routed experts touched per MoE layer as the bench recorded them), and the same with uniform routing."""
    # local import: the package is needed by --compare only (building the file reads JSON alone)
    from dynamo_dwdp.planner.calibrate import load_calibration
    from dynamo_dwdp.planner.hardware import get_hardware
    from dynamo_dwdp.planner.roofline import parse_model_shape
    from dynamo_dwdp.planner.step_model import predict_step
    from dynamo_dwdp.synthetic.presets import preset_config

    hw, cal = load_calibration(get_hardware("h200"), calibration)
    model = parse_model_shape(preset_config("v2-lite-shape"), "v2-lite-shape")
    rows = ["| phase | tokens | measured ms | predicted ms | measured / predicted "
            "| uniform routing: predicted ms, ratio | within 15% |", "|---|---|---|---|---|---|---|"]
    for name in bench_files:
        for line in open(os.path.join(results, name)):
            r = json.loads(line)
            s, rank = r["setup"], r["per_rank"][0]
            kw = (dict(phase="decode", tokens=s["batch"], context=s["context"]) if s["phase"] == "decode"
                  else dict(phase="prefill", tokens=s["tokens_per_iter"], batch=s["batch"]))
            kw["overlap_host"] = bool(s.get("async_scheduling"))
            touched = rank["experts_touched_per_moe_layer"] if s["phase"] == "decode" else None
            p = predict_step(model, hw, cal, experts_touched=touched, **kw).total_ms
            u = predict_step(model, hw, cal, **kw).total_ms
            meas = r["step_ms"]["mean"]
            rows.append(f"| {s['phase']}{' async' * kw['overlap_host']} | {s['tokens_per_iter']:,} | {meas:.2f} | {p:.2f} | {meas / p:.3f} | "
                        f"{u:.2f}, {meas / u:.3f} | {'yes' if abs(meas / p - 1) <= 0.15 else 'no'} |")
    return rows


def build_parser() -> argparse.ArgumentParser:
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", default=os.path.join(here, "docs", "results"), help="folder of the result files")
    ap.add_argument("--out", default=None, help=f"output JSONL (default RESULTS/calibration_h200_{DAY}.jsonl)")
    ap.add_argument("--prefill-attention", default="triton",
                    help="the attention implementation the engine ran (DWDP_PREFILL_ATTENTION; cudnn before 2026-12-02)")
    ap.add_argument("--routed-routing", default="routed_routing_h200_2026-12-02.json",
                    help="the real-routing expert sweep whose now-on tiles replace the bf16 routed_experts records at "
                         "its token counts ('' to keep the uniform-routing sweep's)")
    ap.add_argument("--compare", action="store_true", help="then print the prediction against the bench step times")
    ap.add_argument("--profile", default=f"profile_h200_graphs_{DAY}.json",
                    help="the scripts/gpu_profile.py JSON (in --results, or an absolute path) the small-kernel and "
                         "host records come from")
    ap.add_argument("--prefill-profile", default=None,
                    help="a second gpu_profile.py JSON for the 8192-token prefill records (default: --profile)")
    ap.add_argument("--fold", default="decode_b1_h200_2026-12-02.json",
                    help="scripts/gpu_b1.py's JSON: the folded routed + shared call per MoE layer at 1-16 tokens "
                         "(the engine's small decode batches; '' to price them as separate calls)")
    ap.add_argument("--bench", default=",".join(BENCH_FILES),
                    help="comma list of bench JSONL files (in --results, or absolute paths) that --compare predicts")
    return ap


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    out = a.out or os.path.join(a.results, f"calibration_h200_{DAY}.jsonl")
    recs = build(a.results, a.prefill_attention, a.profile, a.prefill_profile, a.routed_routing or None,
                 a.fold or None)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        for r in recs:
            f.write(json.dumps(r) + "\n")
    print(f"{len(recs)} records -> {out}", file=sys.stderr)
    if a.compare:
        print("\n".join(compare(a.results, out, tuple(b for b in a.bench.split(",") if b))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
