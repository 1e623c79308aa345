"""Prefill walls with the 2026-12-02 prefill changes switched off one by one, in one process (one H200).

  PYTHONPATH=.:scripts PYTHONUNBUFFERED=1 python3 scripts/gpu_prefill_variants.py --out $OUT

Variants (switched in the process between steps, one model load): "now" (the tree), "sep_inproj" (prefill
runs the query and kv_a projections as two GEMMs, as before: `MLAttention._input_projections` replaced),
"torch_sort" (`experts.PREFILL_SORT = "torch"`), "old" (both). For 2,048 and 8,192 tokens: the median wall of
7 eager steps (`execute` + sync, after 2 warm-ups), two rounds with the variants in turn; then a torch
profile (CUDA and CPU) of one 2,048-token step with "now" and "old": GPU busy time, kernels, top CPU ops.
Writes $OUT/prefill_variants.json. A measurement probe: it replaces engine internals in its own process only.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile

import torch

import gpu_profile
from gpu_common import BLOCK, prefill_runner, say, wall_ms, write_v2lite
from dynamo_dwdp.model import attention, experts

VARIANTS = ("now", "sep_inproj", "torch_sort", "old")
_inproj = attention.MLAttention._input_projections


def _separate_inproj(self, x, batch):
    """The prefill input projections as two GEMMs (the form before 2026-12-02's fused one)."""
    if batch.max_q != 1:
        first = self.q_proj if self.cfg.q_lora_rank is None else self.q_a_proj
        return first(x), None
    return _inproj(self, x, batch)


def set_variant(name: str) -> None:
    attention.MLAttention._input_projections = _separate_inproj if name in ("sep_inproj", "old") else _inproj
    experts.PREFILL_SORT = "torch" if name in ("torch_sort", "old") else "counting"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=".")
    p.add_argument("--rounds", type=int, default=2)
    a = p.parse_args()
    os.makedirs(a.out, exist_ok=True)
    res: dict = {"walls_ms": {}, "profiles_2048": {}}
    with tempfile.TemporaryDirectory() as tmp:
        runner, step8 = prefill_runner(write_v2lite(tmp, 27), 8192)
        step2 = ([step8[0][0][:2048]], [0], [list(range(2048 // BLOCK))], [True])
        for rnd in range(a.rounds):
            for v in VARIANTS:
                set_variant(v)
                for n, step in ((2048, step2), (8192, step8)):
                    w = wall_ms(runner, step, reps=7, warmup=2)
                    res["walls_ms"].setdefault(f"{v} {n}", []).append(round(w, 2))
                    say(f"round {rnd} {v} {n}: wall {w:.2f} ms")
        from torch.profiler import ProfilerActivity, profile    # local import: only for the profiles

        for v in ("now", "old"):
            set_variant(v)
            wall_ms(runner, step2, reps=1, warmup=2)
            with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
                runner.execute(*step2)
                torch.cuda.synchronize()
            s = gpu_profile.summarize(prof, 1, float("nan"))
            cpu = sorted(((e.cpu_time_total, e.key, e.count) for e in prof.key_averages()), reverse=True)[:25]
            s["cpu_top"] = [(round(t / 1e3, 2), k[:80], n) for t, k, n in cpu]
            res["profiles_2048"][v] = s
            say(f"profile {v} 2048: GPU busy {s['busy_ms']:.2f} ms, {s['kernels_per_step']:.0f} kernels")
    with open(os.path.join(a.out, "prefill_variants.json"), "w") as f:
        json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
