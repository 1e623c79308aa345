"""Weight transports: exportable local shards, read-only peer views, and a copy engine.

Two implementations behind one interface:
- `ShmTransport` (CPU): a rank's shard lives in a file under /dev/shm; peers map the same file
  (zero-copy, the same pages); pulls are `copy_` calls on a dedicated copy thread.
- `CudaIpcTransport` (GPU, see cuda_ipc.py): the shard is device memory exported with a CUDA IPC
  handle; peers open it in their own process; pulls run on a dedicated copy stream.
A pull is one-sided: the owner does nothing at run time, its weights are immutable after set-up.
"""
from __future__ import annotations

import os
import queue
import shutil
import threading
import time
from abc import ABC, abstractmethod

import torch

from dynamo_dwdp.errors import UserError

_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
_DTYPES = {v: k for k, v in _DTYPE_NAMES.items()}


class CopyEvent(ABC):
    @abstractmethod
    def done(self) -> bool: ...


class CopyEngine(ABC):
    """A FIFO of copies running beside compute ("the copy stream")."""

    @abstractmethod
    def submit(self, copies: list[tuple[torch.Tensor, torch.Tensor]], after: object | None = None) -> CopyEvent:
        """Enqueue dst.copy_(src) for each pair, after the compute event `after` (if any)."""

    @abstractmethod
    def wait(self, event: CopyEvent) -> float:
        """Make the compute side wait for `event`; returns host seconds spent waiting."""

    def record_compute(self) -> object | None:
        """An event marking 'compute so far has consumed its inputs' (None on CPU: compute is synchronous)."""
        return None

    def close(self) -> None:
        pass


class WeightTransport(ABC):
    kind: str = "?"

    @abstractmethod
    def allocate(self, key: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor: ...

    @abstractmethod
    def export(self, key: str, tensor: torch.Tensor) -> dict: ...

    @abstractmethod
    def open(self, handle: dict) -> torch.Tensor: ...

    @abstractmethod
    def copy_engine(self) -> CopyEngine: ...

    def close(self) -> None:
        pass


# ---------------------------------------------------------------------------------------- CPU
class _ThreadEvent(CopyEvent):
    def __init__(self):
        self._event = threading.Event()
        self.error: BaseException | None = None

    def done(self) -> bool:
        return self._event.is_set()


class ThreadCopyEngine(CopyEngine):
    """Copies on one background thread; torch's copy_ releases the GIL, so it overlaps compute."""

    def __init__(self, name: str = "dwdp-copy"):
        self._q: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._q.get()
            if item is None:
                return
            copies, event = item
            try:
                with torch.inference_mode():
                    for dst, src in copies:
                        dst.copy_(src)
            except BaseException as exc:  # surfaced to the waiter
                event.error = exc
            event._event.set()

    def submit(self, copies, after=None):
        event = _ThreadEvent()
        self._q.put((copies, event))
        return event

    def wait(self, event):
        t0 = time.perf_counter()
        event._event.wait()
        if event.error is not None:
            raise event.error
        return time.perf_counter() - t0

    def close(self):
        self._q.put(None)
        self._thread.join(timeout=5)


class ShmTransport(WeightTransport):
    """Shards as files in /dev/shm/dynamo-dwdp/<group>/rank<r>/ mapped with torch.from_file(shared=True)."""

    kind = "shm"

    def __init__(self, group: str, rank: int, root: str | None = None):
        base = root or os.environ.get("DWDP_SHM_DIR") or ("/dev/shm" if os.path.isdir("/dev/shm") else "/tmp")
        self.dir = os.path.join(base, "dynamo-dwdp", group, f"rank{rank}")
        shutil.rmtree(self.dir, ignore_errors=True)
        os.makedirs(self.dir, exist_ok=True)
        self._engine: ThreadCopyEngine | None = None

    def _path(self, key: str) -> str:
        return os.path.join(self.dir, key.replace("/", "_") + ".bin")

    def allocate(self, key, shape, dtype):
        numel = 1
        for d in shape:
            numel *= d
        path = self._path(key)
        if os.path.exists(path):
            os.unlink(path)
        return torch.from_file(path, shared=True, size=numel, dtype=dtype).view(*shape)

    def export(self, key, tensor):
        return {"kind": "shm", "path": self._path(key), "dtype": _DTYPE_NAMES[tensor.dtype],
                "shape": list(tensor.shape)}

    def open(self, handle):
        if handle.get("kind") != "shm":
            raise ValueError(f"cannot open a {handle.get('kind')!r} handle with the shm transport")
        shape = handle["shape"]
        numel = 1
        for d in shape:
            numel *= d
        if not os.path.exists(handle["path"]):
            raise FileNotFoundError(handle["path"])
        return torch.from_file(handle["path"], shared=True, size=numel, dtype=_DTYPES[handle["dtype"]]).view(*shape)

    def copy_engine(self):
        if self._engine is None:
            self._engine = ThreadCopyEngine()
        return self._engine

    def close(self):
        if self._engine is not None:
            self._engine.close()
        shutil.rmtree(self.dir, ignore_errors=True)
        try:                                   # the group's folder goes with its last rank
            os.rmdir(os.path.dirname(self.dir))
        except OSError:
            pass


def make_transport(kind: str, group: str, rank: int, device: torch.device) -> WeightTransport:
    if kind == "auto":
        kind = "cuda_ipc" if device.type == "cuda" else "shm"
    if kind == "shm":
        return ShmTransport(group, rank)
    if kind == "cuda_ipc":
        # local import: dwdp/cuda_ipc.py subclasses this module's transport classes (import cycle)
        from dynamo_dwdp.dwdp.cuda_ipc import CudaIpcTransport

        return CudaIpcTransport(device)
    raise UserError(f"dwdp transport {kind!r} is not one of auto, shm, cuda_ipc")
