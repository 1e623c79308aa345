"""`CudaIpcPeerMemory`: the peer-memory protocol (`collectives/protocol.PeerCollectives`) on GPUs of one host.

- Arenas: one device allocation per rank, exported once at start-up as a CUDA IPC handle (torch's own
  reduction, the same as the DWDP weight transport) and mapped by every peer: ranks on different
  GPUs read each other over NVLink/PCIe peer access, two ranks sharing one GPU through the same
  mechanism.
- Flags: `wait` and `signal` are CUDA stream memory operations (cuStreamWaitValue32 /
  cuStreamWriteValue32 on the current stream): the host never blocks, no SM spins, and a CUDA graph
  captures them, so a captured decode step replays its collectives with no host involvement. The
  write carries the driver's memory fence, ordering the rank's earlier writes before the flag.
  `signals="triton"` uses one-thread Triton kernels instead (acquire/release atomics at system
  scope), for drivers without stream memory operations.
- Data: copies into a peer's arena are raw cudaMemcpyAsync on the current stream (captured also
  between GPUs, unlike torch's peer `copy_`); the reductions are one Triton kernel that reads every
  rank's copy through its pointer (fixed rank order, fp32 accumulation), optionally fused with the
  residual add and the RMSNorm (hand-written because the inputs live in other processes' memory,
  which no library op takes).

A stream wait cannot time out: a peer that dies mid-collective leaves this rank's stream waiting.
The group's liveness (membership) is what notices, and the process is then restarted.
"""
from __future__ import annotations

import functools

import torch

from dynamo_dwdp.cuda_peer_memory import CudaIpcMemory, copy_async, cudart, libcuda_memops
from dynamo_dwdp.collectives.protocol import EMPTY, N_CHANNELS, ArenaLayout, PeerMemory, _store_get, exchange_ready

CU_STREAM_WAIT_VALUE_EQ = 0x1
CU_STREAM_WRITE_VALUE_DEFAULT = 0x0


@functools.cache
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def wait_flag(ptr, value):
        v = tl.atomic_add(ptr, 0, sem="acquire", scope="sys")
        while v != value:
            v = tl.atomic_add(ptr, 0, sem="acquire", scope="sys")

    @triton.jit
    def set_flag(ptr, value):
        tl.atomic_xchg(ptr, value, sem="release", scope="sys")

    @triton.jit
    def reduce_flat(out, p0, p1, p2, p3, p4, p5, p6, p7, n, N: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = offs < n
        acc = tl.load(p0 + offs, mask=m, other=0.0).to(tl.float32)
        if N > 1:
            acc += tl.load(p1 + offs, mask=m, other=0.0).to(tl.float32)
        if N > 2:
            acc += tl.load(p2 + offs, mask=m, other=0.0).to(tl.float32)
        if N > 3:
            acc += tl.load(p3 + offs, mask=m, other=0.0).to(tl.float32)
        if N > 4:
            acc += tl.load(p4 + offs, mask=m, other=0.0).to(tl.float32)
        if N > 5:
            acc += tl.load(p5 + offs, mask=m, other=0.0).to(tl.float32)
        if N > 6:
            acc += tl.load(p6 + offs, mask=m, other=0.0).to(tl.float32)
        if N > 7:
            acc += tl.load(p7 + offs, mask=m, other=0.0).to(tl.float32)
        tl.store(out + offs, acc.to(out.dtype.element_ty), mask=m)

    @triton.jit
    def reduce_add_norm(out, norm_out, res, w, p0, p1, p2, p3, p4, p5, p6, p7, cols, eps,
                        N: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        c = tl.arange(0, BLOCK)
        m = c < cols
        offs = row * cols + c
        acc = tl.load(p0 + offs, mask=m, other=0.0).to(tl.float32)
        if N > 1:
            acc += tl.load(p1 + offs, mask=m, other=0.0).to(tl.float32)
        if N > 2:
            acc += tl.load(p2 + offs, mask=m, other=0.0).to(tl.float32)
        if N > 3:
            acc += tl.load(p3 + offs, mask=m, other=0.0).to(tl.float32)
        if N > 4:
            acc += tl.load(p4 + offs, mask=m, other=0.0).to(tl.float32)
        if N > 5:
            acc += tl.load(p5 + offs, mask=m, other=0.0).to(tl.float32)
        if N > 6:
            acc += tl.load(p6 + offs, mask=m, other=0.0).to(tl.float32)
        if N > 7:
            acc += tl.load(p7 + offs, mask=m, other=0.0).to(tl.float32)
        dt = out.dtype.element_ty
        h = acc.to(dt).to(tl.float32) + tl.load(res + offs, mask=m, other=0.0).to(tl.float32)
        h = h.to(dt)
        tl.store(out + offs, h, mask=m)
        hf = h.to(tl.float32)
        rms = tl.rsqrt(tl.sum(hf * hf, axis=0) / cols + eps)
        y = hf * rms * tl.load(w + c, mask=m, other=0.0).to(tl.float32)
        tl.store(norm_out + offs, y.to(dt), mask=m)

    return wait_flag, set_flag, reduce_flat, reduce_add_norm


def _padded(sources: list[torch.Tensor]) -> list[torch.Tensor]:
    if len(sources) > 8:
        raise ValueError(f"the reduction kernel takes at most 8 ranks, got {len(sources)}")
    return sources + [sources[0]] * (8 - len(sources))


def triton_reduce(sources, out, residual=None, weight=None, eps=0.0, norm_out=None) -> None:
    """The GPU reduction (same contract as `collectives/protocol.reduce_reference`)."""
    import triton

    _, _, reduce_flat, reduce_add_norm = _kernels()
    N = len(sources)
    p = _padded(sources)
    if residual is None:
        n = out.numel()
        BLOCK = 1024
        reduce_flat[(triton.cdiv(n, BLOCK),)](out, *p, n, N=N, BLOCK=BLOCK)
        return
    rows, cols = out.shape
    if weight is None:
        raise ValueError("the fused reduction needs the RMSNorm weight")
    reduce_add_norm[(rows,)](out, norm_out, residual, weight, *p, cols, eps, N=N,
                             BLOCK=triton.next_power_of_2(cols))


class CudaIpcPeerMemory(PeerMemory):
    def __init__(self, store, prefix: str, rank: int, size: int, layout: ArenaLayout, device: torch.device,
                 *, signals: str = "memops", timeout: float = 300.0):
        if signals not in ("memops", "triton"):
            raise ValueError(f"signals {signals!r} is not one of memops, triton")
        self.rank, self.size, self.layout, self.device, self.signals = rank, size, layout, device, signals
        self._ipc = CudaIpcMemory(device)
        cudart()                                  # find the runtime now, not inside a graph capture
        own = self._ipc.allocate((layout.total_bytes,), torch.uint8)
        own.zero_()
        flags = own[:layout.flag_count * 4].view(torch.int32)
        for c in range(N_CHANNELS):
            flags[layout.flag_index(c, EMPTY, 0):layout.flag_index(c, EMPTY, 0) + size] = 1
        torch.cuda.synchronize(device)
        import json

        store.set(f"{prefix}/ipc/{rank}", json.dumps(self._ipc.export(own)))
        self.arenas, self.flags = [], []
        for r in range(size):
            arena = own if r == rank else self._ipc.open(json.loads(_store_get(store, f"{prefix}/ipc/{r}", timeout)))
            self.arenas.append(arena)
            self.flags.append(arena[:layout.flag_count * 4].view(torch.int32))
        self._addr = [f.data_ptr() for f in self.flags]
        if signals == "memops":
            libcuda_memops()
        exchange_ready(store, prefix, rank, size, timeout)

    def _stream(self):
        return torch.cuda.current_stream(self.device)

    def wait(self, index: int, value: int, who: str) -> None:
        if self.signals == "triton":
            _kernels()[0][(1,)](self.flags[self.rank][index:index + 1], value)
            return
        rc = libcuda_memops()["cuStreamWaitValue32"](self._stream().cuda_stream, self._addr[self.rank] + 4 * index,
                                               value, CU_STREAM_WAIT_VALUE_EQ)
        if rc != 0:
            raise RuntimeError(f"cuStreamWaitValue32 failed with CUDA error {rc} (waiting for {who})")

    def signal(self, owner: int, index: int, value: int) -> None:
        if self.signals == "triton":
            _kernels()[1][(1,)](self.flags[owner][index:index + 1], value)
            return
        rc = libcuda_memops()["cuStreamWriteValue32"](self._stream().cuda_stream, self._addr[owner] + 4 * index,
                                                value, CU_STREAM_WRITE_VALUE_DEFAULT)
        if rc != 0:
            raise RuntimeError(f"cuStreamWriteValue32 failed with CUDA error {rc}")

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        copy_async(dst, src, self._stream())

    def reduce(self, sources, out, residual=None, weight=None, eps=0.0, norm_out=None) -> None:
        triton_reduce(sources, out, residual, weight, eps, norm_out)

    def close(self) -> None:
        self.arenas, self.flags = [], []
        self._ipc.close()
