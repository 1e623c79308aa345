"""`DWDPExecutor`: routed experts for one DWDP rank. No collective, no barrier in forward.

Prefetch schedule (all-remote mode, the paper's): MoE layer m uses slot m % 2. The slots of the
first two MoE layers are filled before the step needs them (at the end of the previous step, or at
begin_step); when layer m's MoE has consumed slot s, the pull of the next layer that uses slot s
(m+2, wrapping to the next step's first layers) is issued on the copy engine after that consume
event. The compute side only ever waits for its *own* pulls; peers never wait for anything.

Routed-only mode (small decode batches): after the router, pull just the remote experts it picked
that the slot does not already hold, then compute. Less traffic, but the pull is exposed.

A dead peer (membership) is dropped from every later pull plan; experts it alone stored become
unreachable and the forward raises `PeerError` (the engine fails its in-flight requests).

CUDA graphs (all-remote mode, CUDA IPC, bf16), with `DWDP_GRAPH_WRAP=1` and four or more MoE
layers (opt-in: this path has not run on a GPU yet): the pulls of the first two MoE layers wrap
around between steps (dwdp/graph_prefetch.py): the graph sets a
"consumed" flag after the last MoE layer of each parity, the host launches one small pull graph per
slot on the copy stream right after each replay, and the next step's first MoE layers wait on its
"pulled" flag (stream memory operations, captured in both graphs). Layers m >= 2 are pulled inside
the graph as usual (m+2 after m consumed). So in steady state no pull waits at the start of a
step; the graph module says why a change of the batch bucket between steps is safe. Otherwise a
captured step is self-contained instead: its begin_step pulls the first two MoE layers (every remote
row, whatever the host thinks the slots hold) and nothing wraps into the next step. Either way the
host's view of the slots is rebuilt after a replay (`after_replay`), a pull still in flight from an
eager step is joined before a replay (`before_replay`), and the graph epoch is the set of dead peers:
a change drops the captured graphs (failover runs eagerly).
"""
from __future__ import annotations

import json
import logging
import os

import torch

from dynamo_dwdp.config.dwdp import DwdpSettings
from dynamo_dwdp.dwdp.cuda_ipc import CudaCopyEngine, _CudaEvent
from dynamo_dwdp.dwdp.graph_prefetch import WrappedPrefetch, wrap_points
from dynamo_dwdp.dwdp.placement import Placement, Pull
from dynamo_dwdp.dwdp.transport import make_transport
from dynamo_dwdp.dwdp.weight_buffer import PrefetchSlot
from dynamo_dwdp.errors import PeerError
from dynamo_dwdp.model.moe_executor import MoEExecutor
from dynamo_dwdp.model.experts import ExpertBank, routed_experts
from dynamo_dwdp.model.kernels.moe_gemm import SharedExperts, routed_experts_fused

log = logging.getLogger(__name__)


class DWDPExecutor(MoEExecutor):
    strategy = "dwdp"

    def __init__(self, cfg, device, dtype, *, group, placement: Placement, settings: DwdpSettings = DwdpSettings()):
        super().__init__(cfg, device, dtype)
        self.group = group                       # GroupContext: rank, size, name, store, membership
        self.placement = placement
        self.rank = group.rank
        self.local = placement.local_range(self.rank)
        self.settings = settings                 # DwdpSettings: routed_only, contention_opt (slice_bytes), transport
        self.transport = make_transport(settings.transport, group.name, self.rank, device)
        self.copy = self.transport.copy_engine()
        self.moe_layers = cfg.moe_layers
        self.moe_index = {layer: i for i, layer in enumerate(self.moe_layers)}
        self.local_banks: dict[int, ExpertBank] = {}
        self.peer_banks: dict[int, dict[int, ExpertBank]] = {}     # layer -> peer -> its shard
        self.slots: list[PrefetchSlot] = []
        self.capturing = False
        self._captured_pulls: list[tuple[int, int]] = []      # (peer, bytes) pulled by one captured step
        self.graph_wrap = os.environ.get("DWDP_GRAPH_WRAP", "0") == "1"     # opt-in: run on a GPU on a toy model only
        self.wrap = None                                       # WrappedPrefetch, made at the first capture

    # ------------------------------------------------------------------ loading
    def experts_to_load(self, layer):
        return self.local

    def load_expert(self, layer, expert, gate, up, down):
        bank = self.local_banks.get(layer)
        if bank is None:
            I, H, L = self.cfg.moe_intermediate_size, self.cfg.hidden_size, len(self.local)
            w13 = self.transport.allocate(f"L{layer}.w13", (L, 2 * I, H), self.dtype)
            w2 = self.transport.allocate(f"L{layer}.w2", (L, H, I), self.dtype)
            bank = self.local_banks[layer] = ExpertBank(self.local.start, w13, w2)
        self._store(bank, expert, gate, up, down)

    def finalize(self):
        """Export this rank's shards, publish readiness, open every peer's shards. Set-up only."""
        store = self.group.store
        handles = {str(layer): {"w13": self.transport.export(f"L{layer}.w13", b.w13),
                                "w2": self.transport.export(f"L{layer}.w2", b.w2)}
                   for layer, b in self.local_banks.items()}
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        store.set(f"dwdp/handles/{self.rank}", json.dumps(handles))
        store.set(f"dwdp/placement/{self.rank}", json.dumps(vars(self.placement)))
        for peer in range(self.placement.group_size):
            if peer == self.rank:
                continue
            theirs = json.loads(store.get(f"dwdp/placement/{peer}"))
            if theirs != vars(self.placement):
                raise PeerError(f"dwdp group {self.group.name}: rank {peer} uses placement {theirs}, "
                                f"rank {self.rank} uses {vars(self.placement)}")
            peer_handles = json.loads(store.get(f"dwdp/handles/{peer}"))
            first = self.placement.local_range(peer).start
            for layer in self.moe_layers:
                h = peer_handles[str(layer)]
                self.peer_banks.setdefault(layer, {})[peer] = ExpertBank(
                    first, self.transport.open(h["w13"]), self.transport.open(h["w2"]))
        I, H = self.cfg.moe_intermediate_size, self.cfg.hidden_size
        if self.placement.group_size > 1:
            self.slots = [PrefetchSlot(self.cfg.n_routed_experts, self.local, H, I, self.device, self.dtype)
                          for _ in range(min(2, len(self.moe_layers)))]
        self.group.mark_ready("weights")
        log.info("dwdp rank %d/%d: local experts %d-%d, %d remote per layer (%.1f MiB), slots %.1f MiB, %s",
                 self.rank, self.placement.group_size, self.local.start, self.local.stop - 1,
                 self.cfg.n_routed_experts - len(self.local), self._layer_remote_bytes() / 2**20,
                 sum(s.nbytes for s in self.slots) / 2**20, self.transport.kind)

    def _layer_remote_bytes(self) -> int:
        I, H = self.cfg.moe_intermediate_size, self.cfg.hidden_size
        per_expert = 3 * I * H * torch.empty(0, dtype=self.dtype).element_size()
        return (self.cfg.n_routed_experts - len(self.local)) * per_expert

    # ------------------------------------------------------------------ pulls
    def _plan(self, experts: list[int] | None) -> list[Pull]:
        dead = self.group.dead()
        try:
            return self.placement.pulls(self.rank, experts, dead)
        except LookupError as exc:
            reasons = "; ".join(f"rank {r}: {self.group.down_reason(r)}" for r in sorted(dead))
            raise PeerError(f"dwdp group {self.group.name}: experts {exc} have no live owner ({reasons})") from None

    def _copies(self, slot: PrefetchSlot, layer: int, plan: list[Pull]) -> tuple[list, list[int]]:
        copies, rows = [], []
        banks = self.peer_banks[layer]
        for pull in plan:
            src = banks[pull.peer]
            r0 = slot.row(pull.first)
            for i in range(pull.count):                     # one expert = one (w13, w2) pair
                copies.append((slot.w13[r0 + i], src.w13[pull.peer_row + i]))
                copies.append((slot.w2[r0 + i], src.w2[pull.peer_row + i]))
                rows.append(r0 + i)
        if self.settings.contention_opt and len({p.peer for p in plan}) > 1:
            copies = _interleave_by_peer(copies, plan, self.settings.slice_bytes)
        return copies, rows

    def _issue(self, slot: PrefetchSlot, layer: int, experts: list[int] | None = None) -> None:
        plan = [p for p in self._plan(experts)
                if any(slot.row_layer[slot.row(p.first + i)] != layer for i in range(p.count))]
        if not plan:
            return
        copies, rows = self._copies(slot, layer, plan)
        after = self.copy.record_compute()
        slot.pending = self.copy.submit(copies, after)
        slot.pending_layer, slot.pending_rows = layer, rows
        slot.pending_peers = {p.peer for p in plan}
        for row in rows:
            slot.row_layer[row] = -1                         # invalid until the pull lands
        per_expert = (slot.w13[0].numel() + slot.w2[0].numel()) * slot.w13.element_size()
        if self.capturing:
            self._captured_pulls += [(p.peer, p.count * per_expert) for p in plan]
        for p in plan:
            self.stats.bytes_pulled[p.peer] += p.count * per_expert

    def _wait(self, slot: PrefetchSlot) -> None:
        if slot.pending is None:
            return
        try:
            self.stats.prefetch_wait_s += self.copy.wait(slot.pending)
        except Exception as exc:
            slot.pending = None
            raise PeerError(f"dwdp group {self.group.name}: weight pull failed ({exc})") from None
        dead = slot.pending_peers & self.group.dead()
        layer, rows = slot.pending_layer, slot.pending_rows
        slot.pending = None
        if dead:                  # the source died during the pull: data may be invalid, re-pull
            return
        for row in rows:
            slot.row_layer[row] = layer

    def _ensure(self, slot: PrefetchSlot, layer: int, experts: list[int] | None = None) -> None:
        """Make `layer`'s remote experts (or just `experts`) valid in `slot`, waiting as needed.
        A pull whose source died meanwhile leaves its rows invalid and is re-planned (failover)."""
        for _ in range(3):
            if slot.pending is not None:
                self._wait(slot)
            self._issue(slot, layer, experts)               # only what is not valid yet
            if slot.pending is None:
                return
            self._wait(slot)
        raise PeerError(f"dwdp group {self.group.name}: could not pull layer {layer}'s experts after 3 tries")

    # ------------------------------------------------------------------ CUDA graphs
    @property
    def graph_safe(self) -> bool:
        return (self.device.type == "cuda" and self.dtype == torch.bfloat16 and not self.settings.routed_only
                and isinstance(self.copy, CudaCopyEngine) and hasattr(torch, "_grouped_mm"))

    def graph_epoch(self) -> object:
        return self.group.dead()

    def _forget_slots(self) -> None:
        for slot in self.slots:
            slot.pending = None
            slot.row_layer = [-1] * len(slot.row_layer)

    def _wrapping(self) -> bool:
        """Ring-wrapped prefetch across captured steps (see the module docstring)."""
        # four or more MoE layers: each slot then serves two or more layers per step, so the last use
        # of each slot (where "consumed" is set) comes after its first (where "pulled" is awaited)
        return (self.graph_wrap and self.graph_safe and len(self.slots) == 2
                and wrap_points(len(self.moe_layers)) is not None)

    def _first_layer_pull(self, s: int) -> tuple[list, list[int], list[tuple[int, int]]]:
        slot, layer = self.slots[s], self.moe_layers[s]
        plan = self._plan(None)
        copies, rows = self._copies(slot, layer, plan)
        per_expert = (slot.w13[0].numel() + slot.w2[0].numel()) * slot.w13.element_size()
        return copies, rows, [(p.peer, p.count * per_expert) for p in plan]

    def prepare_capture(self) -> None:
        self.quiesce()                           # pulls of the warm-up steps: done, nothing in flight
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self._forget_slots()
        if self._wrapping():
            if self.wrap is None:
                self.wrap = WrappedPrefetch(self.copy, self.device, 2)
            if self.wrap.epoch != self.graph_epoch() or not self.wrap.ready():
                self.wrap.drop()
                for s in range(2):
                    copies, _, nbytes = self._first_layer_pull(s)
                    self.wrap.capture(s, copies, nbytes)
                self.wrap.epoch = self.graph_epoch()
            self.wrap.primed = False
        self._captured_pulls = []
        self.capturing = self.copy.capturing = True

    def end_capture(self) -> None:
        self.capturing = self.copy.capturing = False
        self._forget_slots()                     # events recorded in the capture are not real events

    def before_replay(self) -> None:
        if self._wrapping() and self.wrap.primed:       # the wrapped pulls of the last replay: the graph
            self._forget_slots()                        # waits on their flags itself (no join here)
            return
        for slot in self.slots:                  # an eager step's wrap-around pull may still be running
            if slot.pending is not None:         # (CUDA: the compute stream waits for it, the host does not)
                self.copy.wait(slot.pending)
        self._forget_slots()
        if self._wrapping() and not self.wrap.primed:   # after an eager step or a capture: pull the first
            self.wrap.prime(range(2))                    # layers now (exposed once, then wrapped)
            self._count_wrap_bytes()

    def after_replay(self) -> None:
        self._forget_slots()
        for peer, nbytes in self._captured_pulls:
            self.stats.bytes_pulled[peer] += nbytes
        if self._wrapping():
            self.wrap.launch(range(2))           # next step's first layers, behind this step's last use
            self._count_wrap_bytes()
            self.wrap.primed = True
            for s, slot in enumerate(self.slots):   # host view: the first layers are on their way
                slot.pending = _CudaEvent(self.wrap.done[s])
                slot.pending_layer = self.moe_layers[s]
                slot.pending_rows = list(range(len(slot.row_layer)))
                slot.pending_peers = {p for p, _ in self.wrap.bytes[s]}

    def _count_wrap_bytes(self) -> None:
        for s in range(2):
            for peer, nbytes in self.wrap.bytes[s]:
                self.stats.bytes_pulled[peer] += nbytes

    # ------------------------------------------------------------------ step
    def begin_step(self):
        collect = getattr(self.copy, "collect_stall_seconds", None)
        if collect is not None and not self.capturing:   # GPU: stalls timed with CUDA events, a step late
            self.stats.prefetch_wait_s += collect()
        if self.wrap is not None and not self.capturing:
            self.wrap.primed = False             # an eager step reuses the slots for its own layers
        if self.capturing and self._wrapping():
            return                               # the first layers arrive through the wrapped pulls
        if self.slots and not self.settings.routed_only:
            for s, slot in enumerate(self.slots):
                if slot.pending is None and any(r != self.moe_layers[s] for r in slot.row_layer):
                    self._issue(slot, self.moe_layers[s])

    @property
    def folds_shared(self) -> bool:
        """bf16 banks (DWDP holds no FP8-resident banks): the shared experts join the launches of the bank that
        ends at the last expert (`moe_gemm.routed_experts_fused(shared=)`), as in the single-GPU engine."""
        return self.dtype == torch.bfloat16

    def forward(self, layer, x, topk_ids, topk_weights):
        return self._forward(layer, x, topk_ids, topk_weights, None)

    def forward_folded(self, layer, x, topk_ids, topk_weights, shared: SharedExperts):
        return self._forward(layer, x, topk_ids, topk_weights, shared)

    def _experts(self, x, topk_ids, topk_weights, banks: list[ExpertBank], shared: SharedExperts | None):
        if shared is None:
            return routed_experts(x, topk_ids, topk_weights, banks)
        return routed_experts_fused(x, topk_ids, topk_weights, banks, shared=shared)

    def _forward(self, layer, x, topk_ids, topk_weights, shared: SharedExperts | None):
        """One MoE layer's routed experts (and, with `shared`, the folded shared experts, whose always-on ids
        follow the routed ones in topk_ids and are never pulled)."""
        if not self.slots:                                   # group of one: everything is local
            return self._experts(x, topk_ids, topk_weights, [self.local_banks[layer]], shared)
        routed_ids = topk_ids if shared is None else topk_ids[:, :topk_ids.shape[1] - shared.count]
        m = self.moe_index[layer]
        slot = self.slots[m % 2]
        wrapped = self.capturing and self._wrapping()
        if wrapped:
            waits, releases = wrap_points(len(self.moe_layers))
        if wrapped and m in waits:                           # pulled between the steps (graph_prefetch)
            self.wrap.wait_pulled(waits[m], torch.cuda.current_stream(self.device))
        else:
            self._ensure(slot, layer, torch.unique(routed_ids).tolist() if self.settings.routed_only else None)
        out = self._experts(x, topk_ids, topk_weights, [self.local_banks[layer], *slot.banks], shared)
        if not self.settings.routed_only:
            nxt = m + 2 if m + 2 < len(self.moe_layers) else m % 2   # wrap: next step's first layer of this parity
            if wrapped and m in releases:
                self.wrap.consumed(releases[m], torch.cuda.current_stream(self.device))
            elif self.moe_layers[nxt] != layer and not (self.capturing and nxt < m):   # self-contained graph
                self._issue(slot, self.moe_layers[nxt])
        return out

    def quiesce(self):
        """Wait for this rank's pulls in flight (before it leaves the group)."""
        for slot in self.slots:
            if slot.pending is not None:
                try:
                    self.copy.wait(slot.pending)
                except Exception:
                    pass
                slot.pending = None

    def close(self):
        self.quiesce()
        if self.wrap is not None and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)        # no pull graph still writing a slot
        self.transport.close()


def _interleave_by_peer(copies: list, plan: list[Pull], slice_bytes: int) -> list:
    """contention_opt: cut each expert copy into slices of ~slice_bytes and interleave the peers
    round-robin, so that several ranks pulling at once do not all queue on the same source."""
    per_peer: dict[int, list] = {}
    i = 0
    for pull in plan:
        for _ in range(pull.count * 2):
            dst, src = copies[i]
            i += 1
            flat_d, flat_s = dst.reshape(-1), src.reshape(-1)
            step = max(1, slice_bytes // max(1, dst.element_size()))
            for off in range(0, flat_d.numel(), step):
                per_peer.setdefault(pull.peer, []).append((flat_d[off:off + step], flat_s[off:off + step]))
    out = []
    queues = list(per_peer.values())
    while any(queues):
        for q in queues:
            if q:
                out.append(q.pop(0))
    return out
