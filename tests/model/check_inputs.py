"""What the interpreter check scripts (tests/model/*_checks.py) share: fresh random inputs whose seed
is printed (a failure is repeated with DWDP_TEST_SEED=<seed>), and the relative error they report."""
from __future__ import annotations

import os

import torch


def fresh_generator() -> torch.Generator:
    """A CPU generator seeded from $DWDP_TEST_SEED, else from the OS (fresh inputs every run); the seed is
    printed first, so that a failing run's output says how to repeat it."""
    seed = int(os.environ.get("DWDP_TEST_SEED") or int.from_bytes(os.urandom(4), "little"))
    print(f"seed {seed} (DWDP_TEST_SEED={seed} repeats this run)", flush=True)
    return torch.Generator().manual_seed(seed)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||, in float64."""
    return ((a.double() - b.double()).norm() / b.double().norm()).item()
