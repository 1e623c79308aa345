"""`GroupContext`: one rank's view of its group — rendezvous store, liveness, and (DEP/TP only) a
torch.distributed process group. DWDP and DP never create a process group: nothing in their
forward can wait for a peer.
"""
from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass, field

import torch

from dynamo_dwdp.errors import UserError
from dynamo_dwdp.group.events import GroupEvents
from dynamo_dwdp.group.membership import Membership
from dynamo_dwdp.group.rendezvous import GroupStore, open_group_store
from dynamo_dwdp.strategies import STRATEGIES, get_strategy

log = logging.getLogger(__name__)



@dataclass
class GroupSpec:
    strategy: str = "single"
    size: int = 1
    rank: int = 0
    name: str = "local"
    rendezvous: str | None = None            # tcp://HOST:PORT | file:///PATH | etcd://HOST:PORT
    setup_timeout: float = 300.0             # waiting for peers at start-up
    liveness_timeout: float = 5.0            # heartbeat silence before a peer is declared down
    collective_timeout: float = 60.0         # DEP/TP: a collective that waits longer raises
    collectives: str = "auto"                # DEP/TP: auto | library | peer (collectives/build.py)
    generation: str = field(default_factory=lambda: os.environ.get("DWDP_GROUP_GENERATION", ""))
    """Rendezvous namespace of this incarnation of the group (set per (re)start by the rank supervisor)."""

    def validate(self) -> "GroupSpec":
        strategy = get_strategy(self.strategy)
        if self.size < 1 or not 0 <= self.rank < self.size:
            raise UserError(f"group rank {self.rank} is not in [0, {self.size})")
        if strategy.max_ranks is not None and self.size > strategy.max_ranks:
            groups = "/".join(s.name for s in STRATEGIES.values() if s.max_ranks is None)
            raise UserError(f"strategy {self.strategy!r} runs one rank; use {groups} for a group")
        if self.size < strategy.min_ranks:
            raise UserError(f"strategy {self.strategy!r} needs a group of >= {strategy.min_ranks} ranks "
                            f"(got {self.size})")
        if self.size > 1 and not self.rendezvous:
            raise UserError(f"a group of {self.size} ranks needs --rendezvous (tcp://HOST:PORT or etcd://HOST:PORT)")
        return self


class GroupContext:
    def __init__(self, spec: GroupSpec, store: GroupStore | None, membership: Membership | None,
                 process_group=None, events=None):
        self.spec = spec
        self.store = store
        self.membership = membership
        self.process_group = process_group
        self.events = events
        self.recoveries = 0                  # times the group became whole again after a peer was down
        self.last_recovery_s: float | None = None
        if membership is not None:
            membership.on_change(self._on_membership)

    def _on_membership(self, epoch: int, rank: int, up: bool, seconds_down: float | None) -> None:
        if up and not self.membership.dead:
            self.recoveries += 1
            self.last_recovery_s = seconds_down
            log.warning("group %s: whole again (membership epoch %d); recovery took %.1fs", self.name, epoch,
                        seconds_down or 0.0)

    @property
    def epoch(self) -> int:
        """Membership epoch: grows by one per peer going down or coming back (0: never changed)."""
        return self.membership.epoch if self.membership else 0

    @property
    def heals_in_place(self) -> bool:
        """DWDP/DP ranks share no process group: once every peer is back, serving resumes in this
        process. DEP/TP ranks must re-form their process group: the rank supervisor restarts the group."""
        return not get_strategy(self.spec.strategy).collectives

    @property
    def rank(self) -> int:
        return self.spec.rank

    @property
    def size(self) -> int:
        return self.spec.size

    @property
    def name(self) -> str:
        return self.spec.name

    @classmethod
    def join(cls, spec: GroupSpec, device: torch.device | None = None, nats_url: str | None = None) -> "GroupContext":
        spec.validate()
        if spec.size == 1:
            return cls(spec, None, None)
        store = open_group_store(spec.rendezvous, spec.name, spec.rank, spec.size, spec.setup_timeout,
                                 generation=spec.generation)
        store.set(f"joined/{spec.rank}", spec.strategy)
        for r in range(spec.size):
            theirs = store.get(f"joined/{r}", spec.setup_timeout)
            if theirs != spec.strategy:
                raise UserError(f"group {spec.name}: rank {r} runs strategy {theirs!r}, this rank {spec.strategy!r}")
        pg = None
        if get_strategy(spec.strategy).collectives:
            import torch.distributed as dist

            # NCCL needs one GPU per rank; ranks sharing a GPU fall back to gloo (the peer-memory
            # collectives, collectives/build.py, carry the decode steps either way)
            shared = device is not None and device.type == "cuda" and torch.cuda.device_count() < spec.size
            backend = "nccl" if device is not None and device.type == "cuda" and not shared else "gloo"
            dist.init_process_group(backend, store=store.torch_store(), rank=spec.rank, world_size=spec.size,
                                    timeout=datetime.timedelta(seconds=spec.collective_timeout),
                                    **({"device_id": device} if backend == "nccl" else {}))
            pg = dist.group.WORLD
        membership = Membership(store, timeout=spec.liveness_timeout).start()
        events = None
        if nats_url:
            events = GroupEvents(nats_url, spec.name, spec.rank, membership).start()
            events.publish("rank_up")
        log.info("group %s: rank %d/%d joined (%s%s)", spec.name, spec.rank, spec.size, spec.strategy,
                 f", {pg}" if pg else "")
        return cls(spec, store, membership, pg, events)

    # ------------------------------------------------------------------ liveness
    def dead(self) -> frozenset[int]:
        return self.membership.dead if self.membership else frozenset()

    def down_reason(self, rank: int) -> str:
        return (self.membership.reason(rank) if self.membership else None) or "unknown"

    def mark_ready(self, what: str) -> None:
        if self.store is not None:
            self.store.set(f"ready/{what}/{self.rank}", "1")
        if self.events is not None:
            self.events.publish(f"{what}_ready")

    def close(self, drain_timeout: float = 30.0) -> None:
        """Leave the group in order (set-up/tear-down only, never inside a forward): wait until every
        live peer is done too (a rank's shard must outlive its readers), stop liveness, then let rank 0
        — the store host — go last."""
        if self.store is not None and self.size > 1:
            self._leave(drain_timeout)
        if self.events is not None:
            try:
                self.events.publish("rank_down", reason="shutdown")
            finally:
                self.events.stop()
        if self.process_group is not None:
            import torch.distributed as dist

            try:
                dist.destroy_process_group()
            except Exception:
                pass
        if self.store is not None:
            self.store.close()

    def _leave(self, timeout: float) -> None:
        import time

        known_dead: set[int] = set()    # kept after liveness stops: a dead peer never writes 'left'

        def wait_keys(prefix: str, ranks: list[int], limit: float) -> None:
            deadline = time.monotonic() + limit
            for r in ranks:
                while r not in self.dead() and r not in known_dead and not self.store.check(f"{prefix}/{r}"):
                    if time.monotonic() > deadline:
                        log.warning("group %s: rank %d did not reach '%s' within %.0fs", self.name, r, prefix, limit)
                        return
                    time.sleep(0.05)

        peers = [r for r in range(self.size) if r != self.rank]
        try:
            self.store.set(f"finished/{self.rank}", "1")
            wait_keys("finished", peers, timeout)
            known_dead.update(self.dead())
            if self.membership is not None:
                self.membership.stop()
                self.membership = None
            if self.rank != 0:
                self.store.set(f"left/{self.rank}", "1")
            else:
                wait_keys("left", peers, 10.0)
        except Exception as exc:  # the store host is gone: nothing left to coordinate
            log.info("group %s: leaving without the store (%s)", self.name, exc)
        finally:
            if self.membership is not None:
                self.membership.stop()
                self.membership = None
