"""TP baseline: tensor-parallel attention (heads split), dense MLPs and experts (intermediate split),
with an all-reduce after attention and after every MLP/MoE block.

Rank 0 owns the engine (scheduler, sampler, KV bookkeeping) and is the only Dynamo worker of the
group; every step it broadcasts the step's inputs and the followers run the identical forward on
their shards (`follow`). The MLA latent cache is replicated (kv_a_proj is not split), so every rank's
KV pool holds the same values; KV written from outside (a disaggregated transfer) is broadcast too.
"""
from __future__ import annotations

import logging
import time

import torch
import torch.distributed as dist

from dynamo_dwdp.engine.model_runner import ModelRunner
from dynamo_dwdp.errors import PeerError
from dynamo_dwdp.model.moe_executor import MoEExecutor
from dynamo_dwdp.model.experts import routed_experts

log = logging.getLogger(__name__)


class TPMoEExecutor(MoEExecutor):
    strategy = "tp"

    def __init__(self, cfg, device, dtype, *, tp):
        super().__init__(cfg, device, dtype)
        self.tp = tp
        self.shard_i = tp.shard(cfg.moe_intermediate_size, "moe_intermediate_size")
        self.banks = {}

    @property
    def graph_safe(self) -> bool:
        """Capturable when the all-reduces go through the peer protocol (stream flags, no host sync)
        and the experts take the sync-free grouped path (CUDA, bf16)."""
        return (self.device.type == "cuda" and self.dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm")
                and self.tp.peer is not None)

    def experts_to_load(self, layer):
        return range(self.cfg.n_routed_experts)

    @property
    def expert_rows(self) -> range:
        """This rank's slice of the intermediate dimension (the loader reads only these)."""
        return range(self.tp.rank * self.shard_i, (self.tp.rank + 1) * self.shard_i)

    def load_expert(self, layer, expert, gate, up, down):
        """gate/up/down: the full expert, or already this rank's `expert_rows` slice."""
        bank = self.banks.get(layer)
        if bank is None:
            bank = self.banks[layer] = self._new_bank(0, self.cfg.n_routed_experts, self.shard_i)
        r, n = self.expert_rows.start, self.expert_rows.stop
        if gate.shape[0] != self.shard_i:
            gate, up, down = gate[r:n], up[r:n], down[:, r:n]
        self._store(bank, expert, gate, up, down)

    def forward(self, layer, x, topk_ids, topk_weights):
        return routed_experts(x, topk_ids, topk_weights, [self.banks[layer]])   # partial: model all-reduces

    def close(self):
        if self.tp.peer is not None:
            self.tp.peer.close()


class TPModelRunner(ModelRunner):
    """ModelRunner for TP rank 0 (leader) and followers."""

    def __init__(self, *args, group, **kwargs):
        super().__init__(*args, **kwargs)
        self.group = group
        self.pending_kv: list[tuple[list[int], torch.Tensor]] = []
        self.followers_stopped = False

    def _broadcast(self, message, part_of_step: bool = False) -> object:
        """Leader sends / followers receive. On the leader a step's broadcast is sync time inside
        that step; a follower's wait for the next message is idle time and is not charged."""
        box = [message]
        t0 = time.perf_counter()
        try:
            dist.broadcast_object_list(box, src=0, group=self.group.process_group)
        except Exception as exc:
            raise PeerError(f"tp group {self.group.name}: broadcast failed ({exc})") from None
        if part_of_step:
            dt = time.perf_counter() - t0
            self.executor.stats.sync_wait_s += dt
            self.executor.stats.step_seconds += dt
        return box[0]

    def launch(self, token_chunks, start_positions, block_tables, want_logits, fed=None):
        if fed is not None:     # the followers get host tokens: a TP engine never schedules asynchronously
            raise RuntimeError("tp: device-fed tokens (async scheduling) cannot be broadcast to the followers")
        if self.group.rank == 0:
            kv, self.pending_kv = self.pending_kv, []
            self._broadcast(("step", token_chunks, start_positions, block_tables, want_logits, kv), part_of_step=True)
        return super().launch(token_chunks, start_positions, block_tables, want_logits)

    def write_kv_blocks(self, block_ids: list[int], data: torch.Tensor) -> None:
        """Leader: blocks were filled from outside; followers receive them with the next step."""
        self.pending_kv.append((list(block_ids), data.cpu()))

    def stop_followers(self) -> None:
        """Idempotent: a second "stop" would be a broadcast no follower receives (it would block)."""
        if self.group.rank == 0 and not self.followers_stopped:
            self.followers_stopped = True
            self._broadcast(("stop",))

    def follow(self) -> None:
        """Follower loop: run every step the leader runs, until it says stop."""
        while True:
            msg = self._broadcast(None)
            if msg[0] == "stop":
                return
            _, chunks, starts, tables, want, kv = msg
            for block_ids, data in kv:
                self.kv_pool[block_ids] = data.to(self.kv_pool.device)
            super().execute(chunks, starts, tables, want)
