"""`dwdp.contention_opt` really slices: each expert copy is cut into slices of at most `slice_bytes`,
the peers' slices are interleaved round-robin, and the slices together copy exactly the experts
(reference: a plain copy of each pair). Expert sizes here match the test models' (a few KB), where
the default 2 MiB slice would leave every copy whole."""
from __future__ import annotations

import torch

from dynamo_dwdp.dwdp.executor import _interleave_by_peer
from dynamo_dwdp.dwdp.placement import Pull


def _copies(plan, H=16, I=8):
    g = torch.Generator().manual_seed(5)
    out, srcs = [], []
    for pull in plan:
        for _ in range(pull.count):
            for shape in ((2 * I, H), (H, I)):           # w13, w2 of one expert
                src = torch.randn(shape, generator=g)
                out.append((torch.zeros(shape), src))
                srcs.append(src)
    return out, srcs


def test_contention_opt_cuts_and_interleaves_small_experts():
    plan = [Pull(peer=1, first=4, count=2, peer_row=0), Pull(peer=2, first=8, count=3, peer_row=0)]
    copies, srcs = _copies(plan)
    slice_bytes = 64
    sliced = _interleave_by_peer(copies, plan, slice_bytes)
    expert_bytes = copies[0][1].numel() * 4
    assert expert_bytes > 4 * slice_bytes                     # the experts are bigger than a slice
    assert len(sliced) > 4 * len(copies)                       # so every copy was cut
    assert all(d.numel() * d.element_size() <= slice_bytes for d, _ in sliced)
    # round-robin: while both peers have slices left, consecutive slices come from different peers
    owner = {}
    for i, (_dst, src) in enumerate(copies):
        owner[src.untyped_storage().data_ptr()] = plan[0].peer if i < plan[0].count * 2 else plan[1].peer
    peers = [owner[s.untyped_storage().data_ptr()] for _, s in sliced]
    n1 = peers.count(1)
    assert all(peers[2 * i] != peers[2 * i + 1] for i in range(n1)), peers[: 2 * n1]
    for d, s in sliced:
        d.copy_(s)
    for (dst, _), src in zip(copies, srcs):
        assert torch.equal(dst, src)


def test_default_slice_leaves_test_sized_experts_whole():
    """The reason the strategy test sets slice_bytes: at 2 MiB nothing of a KB-sized expert is cut."""
    plan = [Pull(peer=1, first=0, count=2, peer_row=0), Pull(peer=2, first=2, count=2, peer_row=0)]
    copies, _ = _copies(plan)
    assert len(_interleave_by_peer(copies, plan, 2 << 20)) == len(copies)
