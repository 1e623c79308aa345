"""Greedy tokens of the engine on the GPU's decode path, computed on the CPU (Triton's interpreter with
GPU arithmetic, tests/model/gpu_paths_on_cpu.py), and of the plain CPU engine, for the prompts and
model of `scripts/gpu_check.py` (tiny preset, seed 0; 3 prompts, 12 tokens). An fp32 dot left at
TF32 in a kernel shows here as it does on the GPU (interpreter_numerics emulates TF32 operands).

  TRITON_INTERPRET=1 PYTHONPATH=. python tests/model/gpu_path_tokens.py [--dtype float32]
      [--strategy single] [--without dense_swiglu,...]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"

from dynamo_dwdp.config.engine import EngineSettings  # noqa: E402
from dynamo_dwdp.engine.sampling import SamplingParams  # noqa: E402
from dynamo_dwdp.rank.local_group import run_local_group  # noqa: E402
from dynamo_dwdp.synthetic.checkpoint import write_checkpoint  # noqa: E402
from tests.model.gpu_paths_on_cpu import forced_tokens_and_routes  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--dtype", default="float32")
    p.add_argument("--strategy", default="single")
    p.add_argument("--without", default="", help="fused-path hooks left off, comma-separated")
    a = p.parse_args()
    model = os.path.join(tempfile.mkdtemp(), "tiny")
    write_checkpoint(model, "tiny", seed=0, dtype="fp32", quiet=True)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(5, 1024, (n,), generator=g).tolist() for n in (7, 33, 80)]
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    ranks = 1 if a.strategy == "single" else 2
    without = frozenset(w for w in a.without.split(",") if w)
    for fused in (False, True):
        cfg = EngineSettings(block_size=16, num_kv_blocks=256, device="cpu", dtype=a.dtype, max_num_batched_tokens=256)
        res = run_local_group(model, cfg, a.strategy, ranks, forced_tokens_and_routes,
                              [(prompts, params, fused, False, without)] * ranks, timeout=900,
                              spec_overrides={"collectives": "peer"} if ranks > 1 else None)
        errs = [r.error for r in res if r.error]
        assert not errs, errs[0]
        print(f"{'GPU decode path' if fused else 'CPU engine':<16} {a.strategy} {a.dtype}: {res[0].value[0]}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
