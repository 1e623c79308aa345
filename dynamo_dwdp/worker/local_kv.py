"""Prefill -> decode KV hand-off when both workers share a host (`kv_transfer.backend: local`).

The same contract as `kv_transfer.NixlKvTransfer` (describe / pull / poll_done / decline / forget /
num_held / hold timeout), so `worker/backend.py` uses either one:

- Prefill side: the KV pool is exported once at start. On GPU its CUDA IPC handle (the pool stays
  where the model runner allocated it: CUDA graphs keep its address); on CPU the pool is moved once
  into a shared file under /dev/shm (`torch.from_file(shared=True)`, as the DWDP shm transport does)
  and the runner's tensor is re-pointed at it (`set_`; on CPU the model gets the pool per step, there
  are no captured addresses). A finished prefill's held blocks are described as {peer, port, pool
  handle, block bytes, block ids, layout, notif key}; the blocks stay held until the decode says
  `done` or `decline`, or `hold_timeout` passes (`poll_done`, on the engine thread).
- Decode side: open the peer's pool once per peer (cached), reserve local blocks (block tables may
  differ), copy remote block run -> local block run, one async copy per run where both sides are
  consecutive (GPU: raw cudaMemcpyAsync on a copy stream, waited on through an event polled from
  the event loop; CPU: a thread), then tell the prefill `done`. Its reply says whether the blocks
  were still held at that moment; only then is the copy good (a hold that expired before may have
  had its blocks reused), otherwise the request fails.

The channel is a TCP connection to 127.0.0.1 (one per decode/peer pair, request/reply lines): the
prefill can acknowledge each `done` (so the decode knows its copy was made from held blocks), a
dead prefill shows at once as a refused or reset connection, it needs nothing beyond the standard
library, and it binds loopback only like every other listener of a local launch. Dynamo's event
plane has no reply; a Unix socket would need a path shared between the two processes.

No data loss: every failure raises `KvTransferError` (the caller fails the request and frees its
reserved blocks and sends `decline`); a decode that died is covered by `hold_timeout`.
"""
from __future__ import annotations

import asyncio
import os
import socket
import socketserver
import threading
import time
import uuid

import torch

from dynamo_dwdp.cuda_peer_memory import CudaIpcMemory, copy_async
from dynamo_dwdp.worker.kv_transfer import KvTransferError, _layout, remote_block_ids

HOST = "127.0.0.1"
REPLY_TIMEOUT = 10.0


def _shm_root() -> str:
    return os.environ.get("DWDP_SHM_DIR") or ("/dev/shm" if os.path.isdir("/dev/shm") else "/tmp")


def _remove_orphans(folder: str) -> None:
    """Unlink pool files of prefill workers that died without closing (named ...-<pid>.bin)."""
    for name in os.listdir(folder):
        pid = name.rsplit("-", 1)[-1].removesuffix(".bin")
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            try:
                os.unlink(os.path.join(folder, name))
            except OSError:
                pass
        except OSError:
            pass


def block_runs(remote: list[int], local: list[int]) -> list[tuple[int, int, int]]:
    """(remote start, local start, length) runs where both id lists advance by one together."""
    runs: list[tuple[int, int, int]] = []
    for r, l in zip(remote, local):
        if runs and runs[-1][0] + runs[-1][2] == r and runs[-1][1] + runs[-1][2] == l:
            runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((r, l, 1))
    return runs


class _Holds:
    """Prefill side: notif -> (request id, deadline), shared by the channel's threads and the engine thread."""

    def __init__(self, hold_timeout: float):
        self.hold_timeout = hold_timeout
        self._lock = threading.Lock()
        self._held: dict[str, tuple[str, float]] = {}
        self._released: list[str] = []

    def add(self, notif: str, rid: str) -> None:
        with self._lock:
            self._held[notif] = (rid, time.monotonic() + self.hold_timeout)

    def check(self, notif: str) -> bool:
        with self._lock:
            return notif in self._held

    def release(self, notif: str) -> bool:
        """`done`/`decline`: True if the blocks were still held (they are freed at the next poll)."""
        with self._lock:
            entry = self._held.pop(notif, None)
            if entry is not None:
                self._released.append(entry[0])
            return entry is not None

    def poll(self) -> tuple[list[str], list[str]]:
        now = time.monotonic()
        with self._lock:
            done, self._released = self._released, []
            expired = [rid for n, (rid, dl) in self._held.items() if now > dl]
            self._held = {n: e for n, e in self._held.items() if now <= e[1]}
        return done, expired

    def forget(self, rid: str) -> None:
        with self._lock:
            self._held = {n: e for n, e in self._held.items() if e[0] != rid}

    def __len__(self) -> int:
        """Requests whose blocks the engine has not freed yet: held, or released and not yet polled."""
        with self._lock:
            return len(self._held) + len(self._released)


class _Channel(socketserver.ThreadingTCPServer):
    """Prefill side: lines `hold|done|decline <notif>` in, `held|gone` out."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, holds: _Holds):
        self.holds = holds
        self.conns: set[socket.socket] = set()
        super().__init__((HOST, 0), _ChannelHandler)

    def close(self) -> None:
        """Stop listening and drop every open connection (a decode sees what a dead prefill looks like)."""
        self.shutdown()
        self.server_close()
        for conn in list(self.conns):
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class _ChannelHandler(socketserver.StreamRequestHandler):
    def setup(self) -> None:
        super().setup()
        self.server.conns.add(self.request)

    def finish(self) -> None:
        self.server.conns.discard(self.request)
        super().finish()

    def handle(self) -> None:
        holds: _Holds = self.server.holds
        for raw in self.rfile:
            verb, _, notif = raw.decode(errors="replace").strip().partition(" ")
            if verb == "hold":
                ok = holds.check(notif)
            elif verb in ("done", "decline"):
                ok = holds.release(notif)
            else:
                self.wfile.write(b"error unknown verb\n")
                continue
            self.wfile.write(b"held\n" if ok else b"gone\n")


class _Peer:
    """Decode side: one prefill worker's opened pool and its channel connection."""

    def __init__(self, pool: torch.Tensor | None, port: int):
        self.pool, self.port = pool, port
        self.lock = threading.Lock()
        self.sock: socket.socket | None = None
        self.rfile = None

    def ask(self, verb: str, notif: str) -> str:
        """One request/reply on the channel (blocking; connects on first use). Raises OSError."""
        with self.lock:
            if self.sock is None:
                self.sock = socket.create_connection((HOST, self.port), timeout=REPLY_TIMEOUT)
                self.rfile = self.sock.makefile("rb")
            try:
                self.sock.sendall(f"{verb} {notif}\n".encode())
                line = self.rfile.readline()
            except OSError:
                self.close()
                raise
            if not line:
                self.close()
                raise ConnectionError("the prefill worker closed the connection")
            return line.decode(errors="replace").strip()

    def close(self) -> None:
        if self.sock is not None:
            try:
                self.sock.close()
            except OSError:
                pass
        self.sock, self.rfile = None, None


class LocalKvTransfer:
    """Same-host KV hand-off; `export=True` on a prefill worker (module docstring)."""

    kind = "local"                      # the `kv` value of the descriptors it writes and reads

    def __init__(self, kv_pool: torch.Tensor, name: str | None = None, hold_timeout: float = 60.0,
                 export: bool = False):
        self.pool = kv_pool
        self.name = name or f"dwdp-kv-{uuid.uuid4().hex[:12]}"
        self.block_bytes = kv_pool[0].numel() * kv_pool.element_size()
        self.num_blocks = kv_pool.shape[0]
        self.hold_timeout = hold_timeout
        self._holds = _Holds(hold_timeout)
        self._peers: dict[str, _Peer] = {}
        self._ipc = CudaIpcMemory(kv_pool.device) if kv_pool.is_cuda else None
        self._stream = torch.cuda.Stream(kv_pool.device) if kv_pool.is_cuda else None
        self._shm_path: str | None = None
        self._handle: dict | None = None
        self._channel: _Channel | None = None
        if export:
            self._handle = self._export()
            self._channel = _Channel(self._holds)
            threading.Thread(target=self._channel.serve_forever, name="local-kv-channel", daemon=True).start()

    def _export(self) -> dict:
        pool = self.pool
        if pool.is_cuda:
            return self._ipc.export(pool)
        folder = os.path.join(_shm_root(), "dynamo-dwdp-kv")
        os.makedirs(folder, exist_ok=True)
        _remove_orphans(folder)
        self._shm_path = os.path.join(folder, f"{self.name}-{os.getpid()}.bin")
        nbytes = pool.numel() * pool.element_size()
        shared = torch.from_file(self._shm_path, shared=True, size=nbytes, dtype=torch.uint8)
        shared = shared.view(pool.dtype).view(pool.shape)
        shared.copy_(pool)
        pool.set_(shared)                   # the runner's tensor object now lives in the shared file
        return {"kind": "shm", "path": self._shm_path, "shape": list(pool.shape), "dtype": str(pool.dtype)}

    # ------------------------------------------------------------------ prefill side
    def describe(self, request_id: str, block_ids: list[int], num_tokens: int) -> dict:
        if self._channel is None:
            raise KvTransferError("this worker does not export its KV pool (not a prefill worker)")
        notif = f"{request_id}:{uuid.uuid4().hex[:8]}"
        self._holds.add(notif, request_id)
        return {"kv": "local", "peer": f"{self.name}-{os.getpid()}", "port": self._channel.server_address[1],
                "pool": self._handle, "pool_blocks": self.num_blocks, "block_bytes": self.block_bytes,
                "block_ids": list(block_ids), "num_tokens": num_tokens, "notif": notif, "layout": _layout(self.pool)}

    @property
    def num_held(self) -> int:
        return len(self._holds)

    def poll_done(self) -> tuple[list[str], list[str]]:
        """(request ids the decode side has copied or declined, request ids whose hold timed out)."""
        return self._holds.poll()

    def forget(self, request_id: str) -> None:
        self._holds.forget(request_id)

    # ------------------------------------------------------------------ decode side
    def _peer(self, params: dict) -> _Peer:
        """The channel to the prefill worker that wrote `params` (its pool is opened by `_open`)."""
        key = str(params.get("peer"))
        if key not in self._peers:
            try:
                port = int(params["port"])
            except (KeyError, TypeError, ValueError):
                raise KvTransferError(f"local KV descriptor without a valid port: {params.get('port')!r}") from None
            self._peers[key] = _Peer(None, port)
        return self._peers[key]

    def _open(self, peer: _Peer, params: dict) -> torch.Tensor:
        """The prefill's pool, opened once per peer (CUDA IPC handle, or the shared file on CPU)."""
        if peer.pool is None:
            handle = params.get("pool") or {}
            try:
                if self.pool.is_cuda:
                    peer.pool = self._ipc.open(handle)
                else:
                    if handle.get("kind") != "shm":
                        raise ValueError(f"a {handle.get('kind')!r} pool handle on a CPU decode worker")
                    shape = [int(x) for x in handle["shape"]]
                    nbytes = shape[0] * int(params["block_bytes"])
                    peer.pool = torch.from_file(handle["path"], shared=True, size=nbytes, dtype=torch.uint8) \
                        .view(self.pool.dtype).view(shape)
            except Exception as exc:
                raise KvTransferError(f"cannot open the KV pool of prefill worker {params.get('peer')}: {exc} "
                                      "(kv_transfer.backend local needs both workers on one host and device "
                                      "kind)") from None
        return peer.pool

    def _ask(self, peer: _Peer, verb: str, params: dict) -> str:
        try:
            return peer.ask(verb, params["notif"])
        except OSError as exc:
            self._peers.pop(str(params.get("peer")), None)
            raise KvTransferError(f"prefill worker {params.get('peer')} unreachable on 127.0.0.1:{peer.port} "
                                  f"({exc}); is it still running?") from None

    def decline(self, params: dict) -> None:
        """The request will not copy its blocks: tell the prefill to free them now (best effort)."""
        try:
            self._ask(self._peer(params), "decline", params)
        except KvTransferError:
            pass

    async def pull(self, params: dict, local_blocks: list[int], timeout: float = 30.0) -> int:
        """Copy the described remote blocks into `local_blocks`, then `done`; returns bytes moved."""
        if params.get("kv") != "local":
            raise KvTransferError(f"prefill result carries no local KV descriptor (kv={params.get('kv')!r}; "
                                  "prefill and decode need the same kv_transfer.backend)")
        remote_blocks = remote_block_ids(params, self.pool, local_blocks)
        if int(params.get("block_bytes", -1)) != self.block_bytes:
            raise KvTransferError(f"KV layout mismatch: prefill blocks of {params.get('block_bytes')} B vs decode "
                                  f"{self.block_bytes} B (prefill and decode pools need the same model, block size "
                                  "and dtype)")
        n_remote = int(params["pool_blocks"])
        if any(not 0 <= b < n_remote for b in remote_blocks):
            raise KvTransferError(f"remote block ids out of range 0..{n_remote - 1}: {remote_blocks}")
        peer = self._peer(params)
        if await asyncio.to_thread(self._ask, peer, "hold", params) != "held":
            raise KvTransferError(f"prefill worker {params.get('peer')} no longer holds the blocks of "
                                  f"{params.get('notif')} (hold timeout {self.hold_timeout:.0f}s passed?)")
        remote = self._open(peer, params)
        runs = block_runs(remote_blocks, local_blocks)
        deadline = time.monotonic() + timeout
        if self.pool.is_cuda:
            with torch.cuda.device(self.pool.device):
                for r, l, n in runs:
                    copy_async(self.pool[l:l + n], remote[r:r + n], self._stream)
                done = torch.cuda.Event()
                done.record(self._stream)
            delay = 0.0002
            while not done.query():
                if time.monotonic() > deadline:
                    raise KvTransferError(f"KV copy from {params.get('peer')} did not finish in {timeout:.0f}s")
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.005)
        else:
            def copy() -> None:
                for r, l, n in runs:
                    self.pool[l:l + n].copy_(remote[r:r + n])
            await asyncio.to_thread(copy)
        if await asyncio.to_thread(self._ask, peer, "done", params) != "held":
            raise KvTransferError(f"prefill worker {params.get('peer')} had freed the blocks of {params.get('notif')} "
                                  "before the copy finished (hold timeout): the copy is not valid")
        return len(local_blocks) * self.block_bytes

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None
        for peer in self._peers.values():
            peer.close()
        self._peers.clear()
        if self._ipc is not None:
            self._ipc.close()
        if self._shm_path is not None:
            try:
                os.unlink(self._shm_path)
            except OSError:
                pass
            self._shm_path = None
