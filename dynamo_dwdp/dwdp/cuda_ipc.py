"""CUDA IPC weight transport (single host, NVLink or PCIe peer access).

- allocate: ordinary device memory on this rank's GPU;
- export: the CUDA IPC handle of the tensor's allocation (torch's own reduction: cudaIpcGetMemHandle
  + offset), pickled and base64-encoded so it can travel through the group's key/value store;
- open: the peer maps that allocation into its own process (cudaIpcOpenMemHandle with lazy peer
  access) and gets a read-only-by-convention tensor view — no copy;
- copies run on a dedicated stream (`CudaCopyEngine`): the copy of layer l+2 waits on the compute
  event recorded after layer l's MoE (write-after-read), and the compute stream waits on the copy
  event before layer l+2's MoE (read-after-write). The host never blocks.
With `timing=True` the engine brackets each compute-stream wait with CUDA events, so the exposed
stall (time the compute stream sat waiting for a pull) is measured without host syncs; it is
resolved one step later, when the events are known to be complete (not while capturing a graph).

Copies of contiguous tensors go through the CUDA runtime's own cudaMemcpyAsync (the library torch
loaded), which a CUDA graph captures also between GPUs (torch's peer `copy_` does not); other
copies use `copy_`.
"""
from __future__ import annotations


import torch

from dynamo_dwdp.cuda_peer_memory import CudaIpcMemory, copy_async, cudart
from dynamo_dwdp.dwdp.transport import CopyEngine, CopyEvent, WeightTransport


class _CudaEvent(CopyEvent):
    def __init__(self, event: torch.cuda.Event):
        self.event = event

    def done(self) -> bool:
        return self.event.query()


class CudaCopyEngine(CopyEngine):
    def __init__(self, device: torch.device, timing: bool = False):
        self.device = device
        self.stream = torch.cuda.Stream(device=device)
        self.timing = timing
        self.capturing = False                 # set by the executor while a CUDA graph is captured
        self._pairs: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        cudart()                                  # find the runtime now, not inside a graph capture

    def record_compute(self):
        ev = torch.cuda.Event()
        ev.record(torch.cuda.current_stream(self.device))
        return ev

    def submit(self, copies, after=None):
        with torch.cuda.stream(self.stream):
            if after is not None:
                self.stream.wait_event(after)
            for dst, src in copies:
                copy_async(dst, src, self.stream)
            done = torch.cuda.Event()
            done.record(self.stream)
        return _CudaEvent(done)

    def wait(self, event):
        compute = torch.cuda.current_stream(self.device)
        if self.timing and not self.capturing:
            before = torch.cuda.Event(enable_timing=True)
            after = torch.cuda.Event(enable_timing=True)
            before.record(compute)
            compute.wait_event(event.event)
            after.record(compute)
            self._pairs.append((before, after))
        else:
            compute.wait_event(event.event)
        return 0.0

    def collect_stall_seconds(self) -> float:
        """Exposed stall of completed waits since the last call (events must have completed)."""
        total = 0.0
        keep = []
        for before, after in self._pairs:
            if after.query():
                total += before.elapsed_time(after) / 1e3
            else:
                keep.append((before, after))
        self._pairs = keep
        return total


class CudaIpcTransport(WeightTransport):
    kind = "cuda_ipc"

    def __init__(self, device: torch.device, timing: bool = True):
        self.device = device
        self._memory = CudaIpcMemory(device)
        self._engine = CudaCopyEngine(device, timing)

    def allocate(self, key, shape, dtype):
        return self._memory.allocate(shape, dtype)

    def export(self, key, tensor):
        return self._memory.export(tensor)

    def open(self, handle):
        return self._memory.open(handle)

    def copy_engine(self):
        return self._engine

    def close(self):
        self._memory.close()
