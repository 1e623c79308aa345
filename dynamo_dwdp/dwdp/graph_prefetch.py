"""Ring-wrapped prefetch across captured DWDP decode steps (mechanism; CUDA only).

Without it a captured step is self-contained: it pulls its first two MoE layers at its start, and
that pull is exposed (nothing to overlap with but the dense layers before the first MoE layer). With
it, the pulls of the first two MoE layers of step k+1 run between step k's graph and step k+1's:

  decode graph (any batch bucket)              pull graph of slot s (one per slot, batch-free)
  ... MoE layer m (m = last layers of parity s) --record consumed[s]-->  wait consumed[s]
  ... rest of the step, graph ends                                       pull every remote row of
  next decode graph: MoE layer s waits pulled[s] <--record pulled[s]--   MoE layer s into slot s

Both events are CUDA events recorded and waited on as *external* event nodes inside the graphs
(cudaEventRecordWithFlags / cudaStreamWaitEvent with the external flags), so a graph waits on work
launched outside it. The host launches each pull graph on the copy stream right after launching a
decode graph (`after_replay`), never blocking: the copy engine starts as soon as the decode graph
consumed the slot and runs beside the rest of that step and the start of the next.

Why a batch-bucket change between steps is safe: what a slot holds after a pull graph does not
depend on the batch (all-remote mode pulls every remote row of the layer), every decode graph of
every bucket records the same `consumed` events at the same layers and waits on the same `pulled`
events, and the host launches graphs in step order on one stream, so the most recent record of
`pulled[s]` that a graph's wait sees is always the pull issued after the previous step, whatever its
bucket. An eager step in between uses the slots for its own layers; the next replay then re-primes
them (`prime`: record `consumed` eagerly and launch the pull graphs) before it launches. A change of
the graph epoch (a dead peer, hence a new pull plan) drops the pull graphs with the decode graphs.
"""
from __future__ import annotations

import ctypes

import torch

CUDA_EVENT_DISABLE_TIMING = 0x2
CUDA_EVENT_RECORD_EXTERNAL = 0x1
CUDA_EVENT_WAIT_EXTERNAL = 0x1


def _rt():
    from dynamo_dwdp.dwdp.cuda_ipc import _cudart

    lib = _cudart()
    if lib is None:
        raise RuntimeError("the CUDA runtime library is not loaded")
    lib.cudaEventCreateWithFlags.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_uint]
    lib.cudaEventRecordWithFlags.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint]
    lib.cudaStreamWaitEvent.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint]
    lib.cudaEventQuery.argtypes = [ctypes.c_void_p]
    lib.cudaEventDestroy.argtypes = [ctypes.c_void_p]
    return lib


class ExternalEvent:
    """A CUDA event that graphs can record and wait on as external nodes. Duck-types the parts of
    torch.cuda.Event the copy engine uses (`wait(stream)`, `query()`)."""

    def __init__(self):
        self._lib = _rt()
        h = ctypes.c_void_p()
        _check(self._lib.cudaEventCreateWithFlags(ctypes.byref(h), CUDA_EVENT_DISABLE_TIMING), "cudaEventCreate")
        self.handle = h

    def record(self, stream: torch.cuda.Stream, external: bool) -> None:
        _check(self._lib.cudaEventRecordWithFlags(self.handle, ctypes.c_void_p(stream.cuda_stream),
                                                  CUDA_EVENT_RECORD_EXTERNAL if external else 0), "cudaEventRecord")

    def wait(self, stream: torch.cuda.Stream, external: bool = False) -> None:
        _check(self._lib.cudaStreamWaitEvent(ctypes.c_void_p(stream.cuda_stream), self.handle,
                                             CUDA_EVENT_WAIT_EXTERNAL if external else 0), "cudaStreamWaitEvent")

    def query(self) -> bool:
        return self._lib.cudaEventQuery(self.handle) == 0

    def close(self) -> None:
        if self.handle:
            self._lib.cudaEventDestroy(self.handle)
            self.handle = None


def _check(rc: int, what: str) -> None:
    if rc != 0:
        raise RuntimeError(f"{what} failed with CUDA error {rc}")


class WrappedPrefetch:
    """The events and pull graphs of the ring-wrapped prefetch for one DWDP executor."""

    def __init__(self, copy_engine, device: torch.device, slots: int):
        self.copy = copy_engine
        self.device = device
        self.consumed = [ExternalEvent() for _ in range(slots)]
        self.pulled = [ExternalEvent() for _ in range(slots)]
        self.graphs: list[torch.cuda.CUDAGraph | None] = [None] * slots
        self.bytes: list[list[tuple[int, int]]] = [[] for _ in range(slots)]
        self.epoch: object = None
        self.primed = False                 # the pulled events' latest records are pulls of the first layers

    def ready(self) -> bool:
        return all(g is not None for g in self.graphs)

    def capture(self, slot: int, copies: list, pulled_bytes: list[tuple[int, int]]) -> None:
        """Capture slot `slot`'s pull graph on the copy stream: wait consumed, copies, record pulled."""
        stream = self.copy.stream
        stream.wait_stream(torch.cuda.current_stream(self.device))
        g = torch.cuda.CUDAGraph()
        was = self.copy.capturing
        self.copy.capturing = True
        try:
            with torch.cuda.graph(g, stream=stream):
                self.consumed[slot].wait(stream, external=True)
                self.copy.submit(copies, None)
                self.pulled[slot].record(stream, external=True)
        finally:
            self.copy.capturing = was
        torch.cuda.current_stream(self.device).wait_stream(stream)
        self.graphs[slot] = g
        self.bytes[slot] = pulled_bytes

    def launch(self, slots) -> None:
        """Replay the pull graphs of `slots` on the copy stream (host does not block)."""
        with torch.cuda.stream(self.copy.stream):
            for s in slots:
                self.graphs[s].replay()

    def prime(self, slots) -> None:
        """Outside any graph: mark the slots consumed now and launch their pulls (after an eager step
        or before the first replay)."""
        compute = torch.cuda.current_stream(self.device)
        for s in slots:
            self.consumed[s].record(compute, external=False)
        self.launch(slots)
        self.primed = True

    def drop(self) -> None:
        self.graphs = [None] * len(self.graphs)
        self.primed = False

    def close(self) -> None:
        self.drop()
        for e in self.consumed + self.pulled:
            e.close()
