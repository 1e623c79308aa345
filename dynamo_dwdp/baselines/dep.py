"""DEP baseline: attention data-parallel + expert-parallel all-to-all (one sync per MoE layer).

Rank r owns the contiguous experts [bounds[r], bounds[r+1]) (near-even split). Per MoE layer:
  1. all_to_all of per-destination pair counts            (sync)
  2. all_to_all dispatch of (hidden, expert id, weight) for every (token, k) pair to its owner, in
     the model's 16-bit dtype when the expert ids fit it exactly (bf16: E <= 256, fp16: E <= 2048;
     the weights are rounded to it, as the expert kernels round them anyway), else fp32
  3. owners compute weight * expert(hidden)
  4. all_to_all combine back (same dtype); index_add in fp32 into the token rows
Every rank must run every MoE layer of every step, even with no tokens: the engine loop agrees on
"anyone has work" once per step (`StepCoordinator`) and idle ranks run empty forwards. The time
inside collectives is the sync wait the product removes.
"""
from __future__ import annotations

import time

import torch
import torch.distributed as dist

from dynamo_dwdp.errors import PeerError
from dynamo_dwdp.model.moe_executor import MoEExecutor
from dynamo_dwdp.model.experts import ExpertBank, routed_experts


def even_bounds(num_experts: int, size: int) -> list[int]:
    base, extra = divmod(num_experts, size)
    bounds = [0]
    for r in range(size):
        bounds.append(bounds[-1] + base + (1 if r < extra else 0))
    return bounds


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _dead_ranks(group) -> str:
    """Name the dead peer(s) after a failed collective. A peer's socket usually breaks before its
    heartbeat goes stale, so wait (at most the liveness timeout) for membership to say who died."""
    deadline = time.monotonic() + group.spec.liveness_timeout + 1.0
    while not group.dead() and time.monotonic() < deadline:
        time.sleep(0.05)
    dead = sorted(group.dead())
    if not dead:
        return "no peer is known to be down"
    return "dead: " + ", ".join(f"rank {r} ({group.down_reason(r)})" for r in dead)


class DEPExecutor(MoEExecutor):
    strategy = "dep"

    def __init__(self, cfg, device, dtype, *, group):
        super().__init__(cfg, device, dtype)
        self.group = group
        self.rank, self.size = group.rank, group.size
        self.bounds = even_bounds(cfg.n_routed_experts, self.size)
        self.owner = torch.bucketize(torch.arange(cfg.n_routed_experts), torch.tensor(self.bounds[1:]), right=True).to(device)
        self.banks: dict[int, ExpertBank] = {}
        self.dispatch_bytes = 0                  # bytes this rank sent in dispatch all-to-alls (its T*k pairs)
        self.combine_bytes = 0                   # bytes it sent back in combine all-to-alls (the pairs it received)

    def wire_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """The all-to-all payload dtype: the model's 16-bit dtype if every expert id is exact in it."""
        exact = {torch.bfloat16: 256, torch.float16: 2048}.get(dtype, 0)
        return dtype if self.cfg.n_routed_experts <= exact else torch.float32

    def experts_to_load(self, layer):
        return range(self.bounds[self.rank], self.bounds[self.rank + 1])

    def load_expert(self, layer, expert, gate, up, down):
        bank = self.banks.get(layer)
        if bank is None:
            lo, hi = self.bounds[self.rank], self.bounds[self.rank + 1]
            bank = self.banks[layer] = self._new_bank(lo, hi - lo)
        self._store(bank, expert, gate, up, down)

    def _a2a(self, out, inp, out_splits=None, in_splits=None):
        t0 = time.perf_counter()
        try:
            dist.all_to_all_single(out, inp, out_splits, in_splits, group=self.group.process_group)
        except Exception as exc:
            raise PeerError(f"dep group {self.group.name}: all-to-all failed ({_first_line(exc)}); "
                            f"{_dead_ranks(self.group)}") from None
        finally:
            self.stats.sync_wait_s += time.perf_counter() - t0
        return out

    def forward(self, layer, x, topk_ids, topk_weights):
        T, k = topk_ids.shape
        H = x.shape[1]
        flat_ids = topk_ids.reshape(-1)
        dest = self.owner[flat_ids]
        order = torch.argsort(dest, stable=True)
        send_counts = torch.bincount(dest, minlength=self.size)
        recv_counts = torch.empty_like(send_counts)
        self._a2a(recv_counts, send_counts)
        sc, rc = send_counts.tolist(), recv_counts.tolist()
        tokens = order // k
        wire = self.wire_dtype(x.dtype)
        payload = torch.empty(len(order), H + 2, device=x.device, dtype=wire)
        payload[:, :H] = x[tokens]
        payload[:, H] = flat_ids[order]
        payload[:, H + 1] = topk_weights.reshape(-1)[order]
        received = payload.new_empty(sum(rc), H + 2)
        self._a2a(received, payload, rc, sc)
        rx = received[:, :H].to(x.dtype)
        r_ids = received[:, H].float().round().long().unsqueeze(1)
        r_w = received[:, H + 1].float().unsqueeze(1)
        y = routed_experts(rx, r_ids, r_w, [self.banks[layer]]) if layer in self.banks else torch.zeros_like(rx)
        back = payload.new_empty(len(order), H)
        self._a2a(back, y.to(wire).contiguous(), sc, rc)
        self.dispatch_bytes += payload.numel() * payload.element_size()
        self.combine_bytes += y.shape[0] * H * payload.element_size()
        out = torch.zeros(T, H, device=x.device, dtype=torch.float32)
        out.index_add_(0, tokens, back.float())
        return out.to(x.dtype)


class StepCoordinator:
    """DEP lock-step: every rank learns whether any rank has work, once per engine iteration."""

    def __init__(self, group, stats, device: torch.device | None = None):
        self.group, self.stats = group, stats
        self.device = device if device is not None and device.type == "cuda" else torch.device("cpu")  # NCCL: on GPU

    def any_work(self, local: bool) -> bool:
        flag = torch.tensor([1 if local else 0], dtype=torch.int32, device=self.device)
        t0 = time.perf_counter()
        try:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group.process_group)
        except Exception as exc:
            raise PeerError(f"dep group {self.group.name}: step agreement failed ({_first_line(exc)}); "
                            f"{_dead_ranks(self.group)}") from None
        any_work = bool(flag.item())
        if any_work:              # an agreement that starts a step is part of that step (idle polls are not)
            dt = time.perf_counter() - t0
            self.stats.sync_wait_s += dt
            self.stats.step_seconds += dt
        return any_work
