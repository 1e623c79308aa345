"""DWDP placement policy (pure): E = L + (N-1)P, contiguous overlapping ranges, lowest-rank live
owner, pull plans as merged runs, failover around dead peers. The reference is a brute force
over experts written here from the rules, not from the implementation."""
from __future__ import annotations

import itertools

import pytest

from dynamo_dwdp.dwdp.placement import Placement, Pull
from dynamo_dwdp.errors import UserError


def ref_owner(E, N, L, P, e, dead=frozenset()):
    live = [r for r in range(N) if r * P <= e < r * P + L and r not in dead]
    return min(live) if live else None


def expand(plan: list[Pull], placement: Placement) -> list[tuple[int, int, int]]:
    """(expert, peer, row in the peer's shard) for every expert a plan copies."""
    out = []
    for p in plan:
        for i in range(p.count):
            out.append((p.first + i, p.peer, p.peer_row + i))
    return out


def valid_combos(max_e=20, max_n=5):
    for E, N in itertools.product(range(2, max_e + 1), range(2, max_n + 1)):
        for P in range(1, E):
            L = E - (N - 1) * P
            if P <= L <= E:
                yield E, N, L, P


def test_default_choice_even_and_uneven():
    assert Placement.choose(16, 2) == Placement(16, 2, 8, 8)
    assert Placement.choose(12, 3) == Placement(12, 3, 4, 4)
    p = Placement.choose(16, 3)                      # uneven: the extra expert goes into an overlap
    assert (p.experts_per_rank, p.prefetch_per_peer) == (6, 5)
    assert [list(p.local_range(r)) for r in range(3)] == [list(range(0, 6)), list(range(5, 11)),
                                                          list(range(10, 16))]
    assert Placement.choose(10, 4) == Placement(10, 4, 4, 2)
    assert Placement.choose(16, 1) == Placement(16, 1, 16, 0)
    for E, N in itertools.product(range(2, 40), range(2, 8)):
        if E >= N:
            p = Placement.choose(E, N)
            assert p.experts_per_rank + (N - 1) * p.prefetch_per_peer == E
            assert 1 <= p.prefetch_per_peer <= p.experts_per_rank


@pytest.mark.parametrize("E,N,L,P,msg", [
    (16, 2, 8, 6, r"E = L \+ \(N-1\)\*P does not hold: 16 != 8 \+ 1\*6"),
    (16, 3, 6, 6, "does not hold"),
    (16, 2, 4, 12, r"P=12 > L=4"),
    (16, 2, 16, 0, r"prefetch_per_peer P=0 must be >= 1"),
    (16, 2, 20, -4, "P=-4"),
    (16, 2, 17, -1, "P=-1"),
])
def test_invalid_explicit_placements(E, N, L, P, msg):
    with pytest.raises(UserError, match=msg):
        Placement.choose(E, N, L, P)


def test_l_and_p_must_come_together():
    with pytest.raises(UserError, match="both"):
        Placement.choose(16, 2, experts_per_rank=8)
    with pytest.raises(UserError, match="both"):
        Placement.choose(16, 2, prefetch_per_peer=8)
    with pytest.raises(UserError, match=">= 1"):
        Placement.choose(16, 0)


def test_ranges_cover_every_expert_and_owner_is_lowest_rank():
    for E, N, L, P in valid_combos():
        pl = Placement.choose(E, N, L, P)
        covered = set()
        for r in range(N):
            rng = pl.local_range(r)
            assert len(rng) == L and rng.start >= 0 and rng.stop <= E
            covered.update(rng)
        assert covered == set(range(E)), (E, N, L, P)
        for e in range(E):
            assert pl.owner(e) == ref_owner(E, N, L, P, e)
            assert pl.owners(e) == [r for r in range(N) if r * P <= e < r * P + L]


def test_pull_plans_match_brute_force():
    for E, N, L, P in valid_combos(16, 4):
        pl = Placement.choose(E, N, L, P)
        for rank in range(N):
            plan = pl.pulls(rank)
            got = expand(plan, pl)
            want = [(e, ref_owner(E, N, L, P, e), e - ref_owner(E, N, L, P, e) * P)
                    for e in range(E) if not rank * P <= e < rank * P + L]
            assert got == want, (E, N, L, P, rank)
            assert all(p.peer != rank for p in plan)
            # runs are maximal: two consecutive pulls from one peer are never contiguous
            for a, b in zip(plan, plan[1:]):
                assert not (a.peer == b.peer and a.first + a.count == b.first)
            assert pl.remote_experts(rank) == [e for e, _, _ in want]
            assert pl.bytes_per_layer(rank, 10) == 10 * len(want)


def test_concrete_plans_16_experts():
    pl = Placement.choose(16, 2)
    assert pl.pulls(0) == [Pull(peer=1, first=8, count=8, peer_row=0)]
    assert pl.pulls(1) == [Pull(peer=0, first=0, count=8, peer_row=0)]
    ov = Placement.choose(16, 3, 8, 4)               # overlapping: [0,8) [4,12) [8,16)
    assert ov.pulls(0) == [Pull(1, 8, 4, 4), Pull(2, 12, 4, 4)]
    assert ov.pulls(1) == [Pull(0, 0, 4, 0), Pull(2, 12, 4, 4)]
    assert ov.pulls(2) == [Pull(0, 0, 8, 0)]


def test_routed_only_subset_plans():
    pl = Placement.choose(16, 3)                     # [0,6) [5,11) [10,16)
    assert pl.pulls(0, experts=[3, 12, 7, 7, 8, 0, 15]) == [Pull(1, 7, 2, 2), Pull(2, 12, 1, 2),
                                                             Pull(2, 15, 1, 5)]
    assert pl.pulls(0, experts=[1, 2, 5]) == []      # all local
    assert pl.pulls(1, experts=[]) == []


def test_failover_when_a_peer_is_dead():
    ov = Placement.choose(16, 3, 8, 4)               # rank 1's experts are all stored elsewhere too
    dead = frozenset({1})
    assert ov.pulls(0, dead=dead) == [Pull(2, 8, 8, 0)]
    assert ov.pulls(2, dead=dead) == [Pull(0, 0, 8, 0)]
    for e in range(16):
        assert ov.owner(e, dead) == ref_owner(16, 3, 8, 4, e, dead)
    # an expert whose every owner is dead has no plan: the error names the experts as runs
    with pytest.raises(LookupError, match=r"^0-7$"):             # 0-3 only on 0, 4-7 on 0 and 1
        ov.pulls(2, dead=frozenset({0, 1}))
    even = Placement.choose(16, 2)
    with pytest.raises(LookupError, match="8-15"):
        even.pulls(0, dead=frozenset({1}))
    with pytest.raises(LookupError, match=r"9,12-13"):
        even.pulls(0, experts=[9, 12, 13, 2], dead=frozenset({1}))
    assert ov.owner(5, frozenset({0, 1})) is None
