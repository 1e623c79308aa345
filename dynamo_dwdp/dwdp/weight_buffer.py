"""The two prefetch slots (slot = MoE layer parity) holding a layer's remote experts.

Slot layout mirrors the composite view of the paper's VMM design: for a rank whose local range is
[start, start+L), a slot holds the remote experts as two banks, `pre` = [0, start) and
`post` = [start+L, E). Together with the local shard bank the kernel sees every expert of the layer
through three banks, with no merge copy. `row_layer` records which layer each row currently holds
(-1 = nothing), so pulls are skipped when a row is already valid (e.g. a model with <= 2 MoE layers,
or routed-only mode re-using experts).
"""
from __future__ import annotations

import torch

from dynamo_dwdp.model.experts import ExpertBank


class PrefetchSlot:
    def __init__(self, num_experts: int, local: range, hidden: int, intermediate: int,
                 device: torch.device, dtype: torch.dtype):
        self.local = local
        remote = num_experts - len(local)
        self.w13 = torch.empty(remote, 2 * intermediate, hidden, device=device, dtype=dtype)
        self.w2 = torch.empty(remote, hidden, intermediate, device=device, dtype=dtype)
        pre = local.start
        self.banks = [b for b in (
            ExpertBank(0, self.w13[:pre], self.w2[:pre]),
            ExpertBank(local.stop, self.w13[pre:], self.w2[pre:]),
        ) if b.count]
        self.row_layer = [-1] * remote
        self.pending = None            # CopyEvent of the pull in flight (or done, not yet waited on)
        self.pending_layer = -1
        self.pending_rows: list[int] = []
        self.pending_peers: set[int] = set()

    def row(self, expert: int) -> int:
        """Row of a remote expert inside the slot tensors."""
        return expert if expert < self.local.start else expert - len(self.local)

    @property
    def nbytes(self) -> int:
        return self.w13.numel() * self.w13.element_size() + self.w2.numel() * self.w2.element_size()
