"""The GPU reduction kernel of the peer-memory collectives (Triton, run by its CPU interpreter in a
fresh process) against the torch reference the CPU twin uses: fp32 bitwise, with and without the
fused residual add + RMSNorm, for 1-8 ranks."""
from __future__ import annotations

import os
import subprocess
import sys

CHECK = r"""
import torch
from dynamo_dwdp.collectives.cuda_ipc import triton_reduce
from dynamo_dwdp.collectives.protocol import reduce_reference
g = torch.Generator().manual_seed(3)
bad = []
for N in (1, 2, 3, 8):
    srcs = [torch.randn(3, 40, generator=g) for _ in range(N)]
    res, w = torch.randn(3, 40, generator=g), torch.randn(40, generator=g)
    a, b, c, d = (torch.full((3, 40), float("nan")) for _ in range(4))
    triton_reduce(srcs, a, res, w, 1e-6, b)
    reduce_reference(srcs, c, res, w, 1e-6, d)
    f, h = torch.full((120,), float("nan")), torch.full((120,), float("nan"))
    triton_reduce([s.view(-1) for s in srcs], f)
    reduce_reference([s.view(-1) for s in srcs], h)
    if not (torch.equal(a, c) and torch.equal(f, h) and (b - d).abs().max() < 1e-6):
        bad.append(N)
print("bad", bad)
"""


def test_reduction_kernel_matches_reference():
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "bad []" in out.stdout, out.stdout + out.stderr[-2000:]
