"""DWDP expert placement (pure policy: no torch, no I/O).

A group of N ranks shares E routed experts per MoE layer. Rank r stores the contiguous range
[r*P, r*P + L), where E = L + (N-1)*P and P <= L (so the ranges cover every expert; adjacent ranges
overlap by L-P experts). Every other expert is pulled from a peer; when several ranks store an
expert, the lowest-rank live owner serves it. Uneven E is allowed: the default picks P = floor(E/N),
L = E - (N-1)*P, which puts the E mod N extra experts into an overlap.
"""
from __future__ import annotations

from dataclasses import dataclass

from dynamo_dwdp.errors import UserError


@dataclass(frozen=True)
class Pull:
    """Copy experts [first, first+count) of one layer from `peer` (rows first-peer_start.. of its shard)."""
    peer: int
    first: int
    count: int
    peer_row: int           # row of `first` inside the peer's local shard


@dataclass(frozen=True)
class Placement:
    num_experts: int        # E
    group_size: int         # N
    experts_per_rank: int   # L
    prefetch_per_peer: int  # P (also the stride between consecutive ranks' ranges)

    @staticmethod
    def choose(num_experts: int, group_size: int, experts_per_rank: int | None = None,
               prefetch_per_peer: int | None = None) -> "Placement":
        E, N = num_experts, group_size
        if N < 1:
            raise UserError(f"dwdp group size must be >= 1, got {N}")
        if (experts_per_rank is None) != (prefetch_per_peer is None):
            raise UserError("dwdp: set both experts_per_rank (L) and prefetch_per_peer (P), or neither")
        if experts_per_rank is None:
            P = E // N if N > 1 else 0
            L = E - (N - 1) * P
        else:
            L, P = int(experts_per_rank), int(prefetch_per_peer)
        placement = Placement(E, N, L, P)
        placement.validate()
        return placement

    def validate(self) -> None:
        E, N, L, P = self.num_experts, self.group_size, self.experts_per_rank, self.prefetch_per_peer
        if N > 1 and P < 1:
            raise UserError(f"dwdp: prefetch_per_peer P={P} must be >= 1 for a group of {N}")
        if L < 1 or L > E:
            raise UserError(f"dwdp: experts_per_rank L={L} must be in [1, {E}]")
        if L + (N - 1) * P != E:
            raise UserError(f"dwdp: E = L + (N-1)*P does not hold: {E} != {L} + {N - 1}*{P}")
        if N > 1 and P > L:
            raise UserError(f"dwdp: P={P} > L={L} leaves experts that no rank stores")

    # ------------------------------------------------------------------ queries
    def local_range(self, rank: int) -> range:
        start = rank * self.prefetch_per_peer
        return range(start, start + self.experts_per_rank)

    def owners(self, expert: int) -> list[int]:
        return [r for r in range(self.group_size) if expert in self.local_range(r)]

    def owner(self, expert: int, dead: frozenset[int] = frozenset()) -> int | None:
        """Lowest-rank live owner of `expert`, or None when every owner is dead."""
        return next((r for r in self.owners(expert) if r not in dead), None)

    def remote_experts(self, rank: int) -> list[int]:
        local = self.local_range(rank)
        return [e for e in range(self.num_experts) if e not in local]

    def pulls(self, rank: int, experts: list[int] | None = None,
              dead: frozenset[int] = frozenset()) -> list[Pull]:
        """The copy plan for `rank`: runs of consecutive experts from one peer each. `experts`
        limits the plan (routed-only mode); default = every remote expert. Raises UserError-free
        `LookupError` naming the experts with no live owner."""
        wanted = self.remote_experts(rank) if experts is None else sorted(
            e for e in set(experts) if e not in self.local_range(rank))
        plan: list[Pull] = []
        orphans = []
        for e in wanted:
            peer = self.owner(e, dead)
            if peer is None:
                orphans.append(e)
                continue
            last = plan[-1] if plan else None
            if last and last.peer == peer and last.first + last.count == e:
                plan[-1] = Pull(peer, last.first, last.count + 1, last.peer_row)
            else:
                plan.append(Pull(peer, e, 1, e - self.local_range(peer).start))
        if orphans:
            raise LookupError(_describe(orphans))
        return plan

    def bytes_per_layer(self, rank: int, bytes_per_expert: int) -> int:
        return len(self.remote_experts(rank)) * bytes_per_expert


def _describe(experts: list[int]) -> str:
    runs, start = [], experts[0]
    for a, b in zip(experts, experts[1:] + [None]):
        if b != a + 1:
            runs.append(f"{start}" if start == a else f"{start}-{a}")
            start = b
    return ",".join(runs)
