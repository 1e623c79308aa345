"""CUDA IPC peer memory on one host, below both users of it: DWDP's weight transport
(`dwdp/cuda_ipc.py`) and the baselines' peer-memory collectives (`collectives/cuda_ipc.py`).

- `CudaIpcMemory`: allocate ordinary device memory, export its CUDA IPC handle (torch's own
  reduction: cudaIpcGetMemHandle + offset, pickled and base64-encoded so it travels through a
  key/value store), open a peer's handle as a tensor view (cudaIpcOpenMemHandle, no copy);
- `cudart()`: the CUDA runtime library torch itself loaded, for raw cudaMemcpyAsync (which a CUDA
  graph captures also between GPUs, unlike torch's peer `copy_`);
- `libcuda_memops()`: the driver's stream memory operations (cuStreamWaitValue32 /
  cuStreamWriteValue32), flags that a CUDA graph captures and the host never waits on.

Mechanism only, ctypes bindings with no policy; torch imports CUDA lazily, so importing this module
costs nothing on CPU.
"""
from __future__ import annotations

import base64
import ctypes
import functools
import pickle

import torch


@functools.cache
def cudart():
    """The CUDA runtime library torch itself loaded (from /proc/self/maps), or None."""
    torch.cuda.init()
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "libcudart.so" in line}
    except OSError:
        return None
    for path in sorted(paths):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        lib.cudaMemcpyAsync.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int,
                                        ctypes.c_void_p]
        lib.cudaMemcpyAsync.restype = ctypes.c_int
        return lib
    return None


CUDA_MEMCPY_DEFAULT = 4


def copy_async(dst: torch.Tensor, src: torch.Tensor, stream: torch.cuda.Stream) -> None:
    """dst <- src on `stream`: raw cudaMemcpyAsync for contiguous tensors (capturable in a CUDA graph
    also between GPUs), torch's `copy_` otherwise. The host never waits."""
    rt = cudart()
    if rt is None or not (dst.is_contiguous() and src.is_contiguous()):
        with torch.cuda.stream(stream):
            dst.copy_(src, non_blocking=True)
        return
    rc = rt.cudaMemcpyAsync(dst.data_ptr(), src.data_ptr(), dst.numel() * dst.element_size(), CUDA_MEMCPY_DEFAULT,
                            stream.cuda_stream)
    if rc != 0:
        raise RuntimeError(f"cudaMemcpyAsync failed with CUDA error {rc}")


@functools.cache
def libcuda_memops() -> dict:
    """{"cuStreamWaitValue32": fn, "cuStreamWriteValue32": fn} from the driver (the _v2 entry points
    where the driver has them)."""
    lib = ctypes.CDLL("libcuda.so.1")
    fns = {}
    for name in ("cuStreamWaitValue32", "cuStreamWriteValue32"):
        fn = getattr(lib, name + "_v2", None) or getattr(lib, name)
        fn.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_uint]
        fn.restype = ctypes.c_int
        fns[name] = fn
    return fns


class CudaIpcMemory:
    """Exported and opened allocations of one process; both kept alive until `close()`."""

    def __init__(self, device: torch.device):
        self.device = device
        self._exported: list[torch.Tensor] = []
        self._opened: list[torch.Tensor] = []

    def allocate(self, shape, dtype) -> torch.Tensor:
        return torch.empty(*shape, dtype=dtype, device=self.device)

    def export(self, tensor: torch.Tensor) -> dict:
        from torch.multiprocessing.reductions import reduce_tensor

        rebuild, args = reduce_tensor(tensor)
        self._exported.append(tensor)
        blob = base64.b64encode(pickle.dumps((rebuild, args))).decode()
        return {"kind": "cuda_ipc", "blob": blob, "shape": list(tensor.shape), "dtype": str(tensor.dtype)}

    def open(self, handle: dict) -> torch.Tensor:
        if handle.get("kind") != "cuda_ipc":
            raise ValueError(f"cannot open a {handle.get('kind')!r} handle as CUDA IPC memory")
        rebuild, args = pickle.loads(base64.b64decode(handle["blob"]))
        tensor = rebuild(*args)
        self._opened.append(tensor)
        return tensor

    def close(self) -> None:
        torch.cuda.synchronize(self.device)
        self._opened.clear()
        self._exported.clear()
