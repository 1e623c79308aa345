"""Ring-wrapped prefetch across captured DWDP decode steps (mechanism; CUDA only).

Opt-in (`DWDP_GRAPH_WRAP=1`) until it has run on a GPU: `scripts/gpu_check.py` compares it with the
eager and the self-contained captured steps. It needs four or more MoE layers, so that each slot
serves two or more layers per step.

Without it a captured step is self-contained: it pulls its first two MoE layers at its start, and
that pull is exposed (nothing to overlap with but the dense layers before the first MoE layer). With
it, the pulls of the first two MoE layers of step k+1 run between step k's graph and step k+1's:

  decode graph (any batch bucket)                  pull graph of slot s (one per slot, batch-free)
  ... last MoE layer using slot s, then CONSUMED[s] := 1 --> wait CONSUMED[s] == 1, CONSUMED[s] := 0
  ... rest of the step                                     pull every remote row of MoE layer s
  next decode graph: before MoE layer s wait PULLED[s] <-- PULLED[s] := 1
  == 1, PULLED[s] := 0

The flags are two int32 words per slot in device memory, written and waited on with CUDA stream
memory operations (cuStreamWriteValue32 / cuStreamWaitValue32, captured into both graphs), and only
ever set to constants, so the same graphs replay any number of times and the ordering does not
depend on when the host launched what. The host launches the pull graphs on the copy stream right
after launching a decode graph (`after_replay`), never blocking: the copy engine starts as soon as
the decode graph has consumed the slot, and runs beside the rest of that step and the start of the
next.

Why a batch-bucket change between steps is safe: what a slot holds after a pull graph does not
depend on the batch (all-remote mode pulls every remote row of the layer), and every decode graph
of every bucket sets and waits on the same flags at the same MoE layers; whatever bucket step k+1
uses, its first MoE layers wait for the pull that step k's graph released. An eager step in between
uses the slots for its own layers (waiting on the pull through an ordinary event); the next replay
re-primes the slots first (`prime`: PULLED := 0 and CONSUMED := 1 on the compute stream, then the
pull graphs). A change of the graph epoch (a dead peer, hence a new pull plan) drops the pull graphs
with the decode graphs.
"""
from __future__ import annotations

import torch

from dynamo_dwdp.cuda_peer_memory import libcuda_memops

CU_STREAM_WAIT_VALUE_EQ = 0x1


def wrap_points(n_moe_layers: int) -> tuple[dict[int, int], dict[int, int]] | None:
    """Where a captured step waits for its wrapped pulls and where it releases the slots:
    ({MoE index: slot} awaited before use, {MoE index: slot} released after use), or None when the
    wrap does not apply. Slot s serves MoE indices s, s+2, ...; it is awaited before its first use
    and released after its last, which must be a different, later layer (each slot serves two or
    more layers per step: four or more MoE layers)."""
    if n_moe_layers < 4:
        return None
    waits = {s: s for s in (0, 1)}
    releases = {max(m for m in range(n_moe_layers) if m % 2 == s): s for s in (0, 1)}
    return waits, releases


class WrappedPrefetch:
    """The flags and pull graphs of the ring-wrapped prefetch for one DWDP executor."""

    def __init__(self, copy_engine, device: torch.device, slots: int):
        self._mem = libcuda_memops()
        self.copy = copy_engine
        self.device = device
        self.flags = torch.zeros(2 * slots, dtype=torch.int32, device=device)   # CONSUMED[s], PULLED[s]
        self.graphs: list[torch.cuda.CUDAGraph | None] = [None] * slots
        self.bytes: list[list[tuple[int, int]]] = [[] for _ in range(slots)]
        self.done: list[torch.cuda.Event | None] = [None] * slots   # host-side: the last launched pull
        self.epoch: object = None
        self.primed = False                 # the last launched pulls fill the slots with the first layers

    # flag words
    def _addr(self, idx: int) -> int:
        return self.flags.data_ptr() + 4 * idx

    def _wait(self, stream: torch.cuda.Stream, idx: int, value: int) -> None:
        rc = self._mem["cuStreamWaitValue32"](stream.cuda_stream, self._addr(idx), value, CU_STREAM_WAIT_VALUE_EQ)
        if rc != 0:
            raise RuntimeError(f"cuStreamWaitValue32 failed with CUDA error {rc}")

    def _write(self, stream: torch.cuda.Stream, idx: int, value: int) -> None:
        rc = self._mem["cuStreamWriteValue32"](stream.cuda_stream, self._addr(idx), value, 0)
        if rc != 0:
            raise RuntimeError(f"cuStreamWriteValue32 failed with CUDA error {rc}")

    def consumed(self, slot: int, stream: torch.cuda.Stream) -> None:
        """In the decode graph, after the step's last use of `slot`."""
        self._write(stream, 2 * slot, 1)

    def wait_pulled(self, slot: int, stream: torch.cuda.Stream) -> None:
        """In the decode graph, before the step's first use of `slot`."""
        self._wait(stream, 2 * slot + 1, 1)
        self._write(stream, 2 * slot + 1, 0)

    # pull graphs
    def ready(self) -> bool:
        return all(g is not None for g in self.graphs)

    def capture(self, slot: int, copies: list, pulled_bytes: list[tuple[int, int]]) -> None:
        """Capture slot `slot`'s pull graph on the copy stream."""
        stream = self.copy.stream
        stream.wait_stream(torch.cuda.current_stream(self.device))
        g = torch.cuda.CUDAGraph()
        was = self.copy.capturing
        self.copy.capturing = True
        try:
            with torch.cuda.graph(g, stream=stream):
                self._wait(stream, 2 * slot, 1)
                self._write(stream, 2 * slot, 0)
                self.copy.submit(copies, None)
                self._write(stream, 2 * slot + 1, 1)
        finally:
            self.copy.capturing = was
        torch.cuda.current_stream(self.device).wait_stream(stream)
        self.graphs[slot] = g
        self.bytes[slot] = pulled_bytes

    def launch(self, slots) -> None:
        """Replay the pull graphs of `slots` on the copy stream (the host does not block)."""
        with torch.cuda.stream(self.copy.stream):
            for s in slots:
                self.graphs[s].replay()
                ev = torch.cuda.Event()
                ev.record(self.copy.stream)
                self.done[s] = ev

    def prime(self, slots) -> None:
        """Outside any graph, after the slots' earlier pulls were joined: release them now and pull."""
        compute = torch.cuda.current_stream(self.device)
        for s in slots:
            self._write(compute, 2 * s + 1, 0)
            self._write(compute, 2 * s, 1)
        self.launch(slots)
        self.primed = True

    def drop(self) -> None:
        self.graphs = [None] * len(self.graphs)
        self.primed = False
