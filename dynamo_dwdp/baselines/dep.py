"""DEP baseline: attention data-parallel + expert-parallel all-to-all (one sync per MoE layer).

Rank r owns the contiguous experts [bounds[r], bounds[r+1]) (near-even split). Per MoE layer:
  1. all_to_all of per-destination pair counts            (sync)
  2. all_to_all dispatch of (hidden, expert id, weight) for every (token, k) pair to its owner, in
     the model's 16-bit dtype when the expert ids fit it exactly (bf16: E <= 256, fp16: E <= 2048;
     the weights are rounded to it, as the expert kernels round them anyway), else fp32
  3. owners compute weight * expert(hidden)
  4. all_to_all combine back (same dtype); index_add in fp32 into the token rows
With `collectives: peer` (on CUDA by default) steps of up to `max_num_seqs` tokens go through the
peer-memory protocol instead (collectives/protocol.py: each pair written straight into its owner's
fixed-capacity slot, completion by flags, no host sync, capturable): before every step the ranks
agree on the host, once, on the step's largest token count (`agree_step`), whose batch bucket sizes
every slot and every rank's decode graph (`graph_batch`). A step over the largest bucket runs the
library path above on every rank (the same decision everywhere): nothing overflows, nothing drops.
Every rank must run every MoE layer of every step, even with no tokens: the engine loop agrees on
"anyone has work" once per step (`StepCoordinator`) and idle ranks run empty forwards. The time
inside collectives is the sync wait the product removes.
"""
from __future__ import annotations

import time

import torch
import torch.distributed as dist

from dynamo_dwdp.engine.cuda_graphs import batch_bucket
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
        self.peer = None                         # PeerCollectives (factory), or None: library only
        self.max_batch = 0                       # the largest batch bucket the peer slots hold
        self.step_tokens: int | None = None      # the group's largest token count this step (agree_step)
        self.warming = False
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
        host = out.is_cuda and dist.get_backend(self.group.process_group) == "gloo"   # ranks share a GPU
        dev_out, out, inp = (out, out.cpu(), inp.cpu()) if host else (None, out, inp)
        try:
            dist.all_to_all_single(out, inp, out_splits, in_splits, group=self.group.process_group)
            if host:
                out = dev_out.copy_(out)
        except Exception as exc:
            raise PeerError(f"dep group {self.group.name}: all-to-all failed ({_first_line(exc)}); "
                            f"{_dead_ranks(self.group)}") from None
        finally:
            self.stats.sync_wait_s += time.perf_counter() - t0
        return out

    # ------------------------------------------------------------------ peer-memory path
    @property
    def graph_safe(self) -> bool:
        return (self.peer is not None and self.device.type == "cuda" and self.dtype == torch.bfloat16
                and hasattr(torch, "_grouped_mm"))

    def agree_step(self, tokens: int) -> None:
        if self.peer is None:
            return
        flag = torch.tensor([tokens], dtype=torch.int64,
                            device=self.device if self.device.type == "cuda" else "cpu")
        t0 = time.perf_counter()
        try:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group.process_group)
        except Exception as exc:
            raise PeerError(f"dep group {self.group.name}: batch agreement failed ({_first_line(exc)}); "
                            f"{_dead_ranks(self.group)}") from None
        self.stats.sync_wait_s += time.perf_counter() - t0
        self.step_tokens = int(flag.item())

    def graph_batch(self, batch_size: int) -> int:
        return max(batch_size, self.step_tokens or 0) if self.peer is not None else batch_size

    def begin_warmup(self) -> None:
        self.warming = True

    def end_warmup(self) -> None:
        self.warming = False

    def _step_bucket(self) -> int | None:
        if self.peer is None or self.step_tokens is None:
            return None
        return batch_bucket(max(1, self.step_tokens), self.max_batch)

    def _forward_peer(self, layer, x, topk_ids, topk_weights, bucket):
        if self.warming:                 # a capture's warm-up: peers are not exchanging; shapes only
            return torch.zeros_like(x)
        per_rank = max(b - a for a, b in zip(self.bounds, self.bounds[1:]))
        rows = self.peer.dep_rows(bucket, topk_ids.shape[1], per_rank)
        wire = self.wire_dtype(x.dtype)
        rx, r_ids, r_w, state = self.peer.dispatch(x, topk_ids, topk_weights, self.owner,
                                                   self.cfg.n_routed_experts, rows, wire)
        y = routed_experts(rx, r_ids, r_w, [self.banks[layer]]) if layer in self.banks else torch.zeros_like(rx)
        return self.peer.combine(y, state)

    def close(self):
        if self.peer is not None:
            self.peer.close()

    def forward(self, layer, x, topk_ids, topk_weights):
        bucket = self._step_bucket()
        if bucket is not None:
            return self._forward_peer(layer, x, topk_ids, topk_weights, bucket)
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
