"""`TensorParallel`: what the dense part of the model needs to know about TP (size, rank, all-reduce).

Strategies other than `tp` use the trivial instance (size 1): attention is data-parallel there.
The all-reduce is timed into `stats.sync_wait_s`, so that benchmarks can split a step into compute and sync.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from dynamo_dwdp.errors import UserError


@dataclass
class TensorParallel:
    size: int = 1
    rank: int = 0
    group: Any = None                      # torch.distributed ProcessGroup when size > 1
    stats: Any = None                      # ExecutorStats to charge all-reduce time to (sync_wait_s)
    peer: Any = None                       # PeerCollectives (collectives/protocol.py) or None: library only

    def shard(self, n: int, what: str) -> int:
        if n % self.size:
            raise UserError(f"tensor parallel size {self.size} does not divide {what} ({n})")
        return n // self.size

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over the group: the peer-memory protocol when it is set up and x fits its arena (decode
        sizes; capturable on GPU), else the library collective (gloo/NCCL; prefill sizes)."""
        if self.size == 1:
            return x
        if self.peer is not None and self.peer.fits(x):
            return self.peer.all_reduce(x)
        import torch.distributed as dist

        t0 = time.perf_counter()
        dist.all_reduce(x, group=self.group)
        if self.stats is not None:
            self.stats.sync_wait_s += time.perf_counter() - t0
        return x

    def all_reduce_add_rmsnorm(self, x: torch.Tensor, residual: torch.Tensor, norm) -> tuple[torch.Tensor, torch.Tensor]:
        """(residual + all_reduce(x), norm(residual + all_reduce(x))): one fused pass over the peers'
        partial sums where the peer protocol takes x in one shot, else the plain sequence."""
        if (self.size > 1 and self.peer is not None and self.peer.fits(x)
                and x.numel() * x.element_size() <= self.peer.two_shot_bytes):
            return self.peer.all_reduce_add_rmsnorm(x, residual, norm.weight.to(x.dtype), norm.eps)
        return norm.add_and_norm(self.all_reduce(x), residual)
