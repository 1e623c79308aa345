"""Set up a group's peer-memory collectives (policy: when, and how large), once at start-up.

`GroupSpec.collectives`: `library` = gloo/NCCL only; `peer` = the peer-memory protocol
(collectives/protocol.py) over CUDA IPC on GPUs, over shared memory on CPU; `auto` = `peer` on
CUDA, `library` on CPU. The library process group always exists as the fallback for what does not fit
the arena (prefill-sized all-reduces, DEP steps larger than the largest batch bucket).

Arena sizes come from the engine config: an all-reduce of up to `max_num_seqs` tokens of the hidden
size goes through the protocol (every decode step), and a DEP slot holds the pairs of `max_num_seqs`
tokens (top-k, at most the experts a rank owns): no decode step overflows a slot.
"""
from __future__ import annotations

import torch

from dynamo_dwdp.errors import UserError
from dynamo_dwdp.collectives.cuda_ipc import CudaIpcPeerMemory
from dynamo_dwdp.collectives.protocol import ArenaLayout, PeerCollectives
from dynamo_dwdp.collectives.shm import ShmPeerMemory

MODES = ("auto", "library", "peer")


def build_peer_collectives(group, engine_cfg, model_cfg, device: torch.device, *, dep: bool,
                           experts_per_rank: int = 0) -> PeerCollectives | None:
    spec = group.spec
    mode = getattr(spec, "collectives", "auto")
    if mode not in MODES:
        raise UserError(f"collectives {mode!r} is not one of {', '.join(MODES)}")
    if mode == "library" or (mode == "auto" and device.type != "cuda") or spec.size < 2:
        return None
    dtype = engine_cfg.torch_dtype
    item = torch.empty(0, dtype=dtype).element_size()
    H, tokens = model_cfg.hidden_size, engine_cfg.max_num_seqs
    wire = 2 if (dep and dtype in (torch.bfloat16, torch.float16) and model_cfg.n_routed_experts <= 256) else 4
    slot_rows = tokens * min(model_cfg.num_experts_per_tok, max(1, experts_per_rank)) if dep else 0
    layout = ArenaLayout(spec.size, ar_bytes=0 if dep else tokens * H * item, dep_slot_rows=slot_rows,
                         dep_hidden=H, dep_itemsize=wire)
    prefix = f"peer/{spec.name}/{spec.strategy}"
    if device.type == "cuda":
        mem = CudaIpcPeerMemory(group.store, prefix, spec.rank, spec.size, layout, device,
                                timeout=spec.setup_timeout)
    else:
        mem = ShmPeerMemory(group.store, prefix, spec.rank, spec.size, layout, timeout=spec.collective_timeout)
    return PeerCollectives(mem)
