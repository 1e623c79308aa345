"""`ShmPeerMemory`: the CPU twin of the CUDA IPC arenas (shared memory), so that CI runs the
peer-memory protocol (`collectives/protocol.PeerCollectives`: channels, flags, capacity) with real processes.

Each rank creates one shared file (its arena, under $DWDP_SHM_DIR or /dev/shm, mapped with
`torch.from_file(shared=True)`, like the DWDP shm transport), publishes its path through the
group's key/value store, and maps every peer's arena: set-up only. `wait` spins on the host
(yielding the CPU) and raises `PeerError` naming the peer after `timeout` seconds, so a dead peer is
an error, never a hang. Stores are plain CPU stores through torch, which x86-64's ordering keeps in
program order (the data before the flag); `signal` is a store, `wait` a load loop.
"""
from __future__ import annotations

import os
import time

import torch

from dynamo_dwdp.errors import PeerError
from dynamo_dwdp.collectives.protocol import EMPTY, N_CHANNELS, ArenaLayout, PeerMemory, _store_get, exchange_ready


def _shm_root() -> str:
    return os.environ.get("DWDP_SHM_DIR") or ("/dev/shm" if os.path.isdir("/dev/shm") else "/tmp")


class ShmPeerMemory(PeerMemory):
    def __init__(self, store, prefix: str, rank: int, size: int, layout: ArenaLayout, *, timeout: float = 30.0):
        self.rank, self.size, self.layout, self.timeout = rank, size, layout, timeout
        self.device = torch.device("cpu")
        folder = os.path.join(_shm_root(), "dynamo-dwdp-peer", prefix.replace("/", "_"))
        os.makedirs(folder, exist_ok=True)
        self.path = os.path.join(folder, f"rank{rank}.bin")
        if os.path.exists(self.path):
            os.unlink(self.path)
        own = torch.from_file(self.path, shared=True, size=layout.total_bytes, dtype=torch.uint8)
        own.zero_()
        flags = own[:layout.flag_count * 4].view(torch.int32)
        for c in range(N_CHANNELS):
            for q in range(size):
                flags[layout.flag_index(c, EMPTY, q)] = 1
        store.set(f"{prefix}/shm/{rank}", self.path)
        self.arenas, self.flags = [], []
        for r in range(size):
            if r == rank:
                arena = own
            else:
                path = _store_get(store, f"{prefix}/shm/{r}", timeout)
                arena = torch.from_file(path, shared=True, size=layout.total_bytes, dtype=torch.uint8)
            self.arenas.append(arena)
            self.flags.append(arena[:layout.flag_count * 4].view(torch.int32))
        exchange_ready(store, prefix, rank, size, timeout)

    def wait(self, index: int, value: int, who: str) -> None:
        flag = self.flags[self.rank]
        if int(flag[index]) == value:
            return
        deadline = time.monotonic() + self.timeout
        spins = 0
        while int(flag[index]) != value:
            spins += 1
            if spins > 64:
                time.sleep(20e-6)
                if time.monotonic() > deadline:
                    raise PeerError(f"peer memory: rank {self.rank} waited {self.timeout:g}s for {who}")

    def signal(self, owner: int, index: int, value: int) -> None:
        self.flags[owner][index] = value

    def close(self) -> None:
        self.arenas, self.flags = [], []
        try:                     # peers keep their mapping; the file goes with the owner
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        try:
            os.rmdir(os.path.dirname(self.path))
        except OSError:
            pass
