"""Group rendezvous: a key/value store the ranks of one group share at set-up time.

URLs:
  tcp://HOST:PORT    rank 0 hosts a torch TCPStore there (embedded mode; HOST must be loopback or
                     the pod's own address), the other ranks connect to it
  file:///PATH       a torch FileStore (single host, tests)
  etcd://HOST:PORT   an etcd server (the graph's `--infra etcd`): keys under /dwdp/<group>/, and
                     a lease per rank that expires when the rank dies (see membership.py); DEP/TP
                     process groups still need a torch store: rank 0 hosts a TCPStore on a free
                     loopback port and publishes its address in etcd.
The store is used before serving (handles, readiness) and for liveness; never inside a forward.

Generations: every key lives under `<group>/<generation>/` (`generation` empty: `<group>/`). The
rank supervisor starts each (re)start of a group under a new generation, so a group that re-forms
after a failure never reads a key its previous incarnation left behind (etcd keeps them).
"""
from __future__ import annotations

import datetime
import json
import os
import socket
import time
from urllib.parse import urlparse

from dynamo_dwdp.errors import PeerError, UserError


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


_LISTEN_SOCKETS: list[socket.socket] = []


def host_tcp_store(host: str, port: int, timeout: float):
    """A TCPStore server that listens on `host` only. (torch's own server binds every interface;
    handing it an already-bound socket keeps the listener on loopback / the pod address.)"""
    import torch.distributed as dist

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(512)
    store = dist.TCPStore(host, sock.getsockname()[1], None, True, datetime.timedelta(seconds=timeout),
                          wait_for_workers=False, master_listen_fd=sock.fileno())
    _LISTEN_SOCKETS.append(sock)          # the server uses the fd: keep the socket object alive
    return store


class GroupStore:
    """set/get/add over string values; `get` blocks until the key exists or `timeout` passes."""

    def __init__(self, group: str, rank: int, size: int):
        self.group, self.rank, self.size = group, rank, size

    def set(self, key: str, value: str) -> None: ...
    def get(self, key: str, timeout: float | None = None) -> str: ...
    def check(self, key: str) -> bool: ...
    def torch_store(self):
        """A c10d Store for torch.distributed.init_process_group (DEP/TP)."""
        raise NotImplementedError

    def clone(self, op_timeout: float | None = None) -> "GroupStore":
        """A second connection (for a heartbeat thread); `op_timeout` bounds each of its operations."""
        raise NotImplementedError

    def close(self) -> None:
        pass

    def wait_all(self, key_prefix: str, timeout: float) -> dict[int, str]:
        """Block until every rank has set `<key_prefix>/<rank>`; returns rank -> value."""
        return {r: self.get(f"{key_prefix}/{r}", timeout) for r in range(self.size)}


def _prefix(group: str, generation: str) -> str:
    return f"{group}/{generation}/" if generation else f"{group}/"


class TorchGroupStore(GroupStore):
    def __init__(self, group, rank, size, store, url: str, timeout: float, generation: str = ""):
        super().__init__(group, rank, size)
        import torch.distributed as dist

        self._raw = store
        self.prefix = "dwdp/" + _prefix(group, generation)
        self._store = dist.PrefixStore(self.prefix, store)
        self.url = url
        self.timeout = timeout
        self.generation = generation

    def set(self, key, value):
        try:
            self._store.set(key, value)
        except Exception as exc:  # the store host (rank 0) is gone
            raise PeerError(f"group {self.group}: rendezvous store {self.url} unreachable ({exc})") from None

    def get(self, key, timeout=None):
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            try:
                if self._store.check([key]):
                    return self._store.get(key).decode()
            except Exception as exc:
                raise PeerError(f"group {self.group}: rendezvous store {self.url} unreachable ({exc})") from None
            if time.monotonic() > deadline:
                raise PeerError(f"group {self.group}: timed out after {timeout or self.timeout:.0f}s waiting "
                                f"for '{key}' (a peer rank did not start?)")
            time.sleep(0.05)

    def check(self, key):
        try:
            return bool(self._store.check([key]))
        except Exception as exc:
            raise PeerError(f"group {self.group}: rendezvous store {self.url} unreachable ({exc})") from None

    def torch_store(self):
        import torch.distributed as dist

        return dist.PrefixStore(self.prefix + "torch/", self._raw)

    def clone(self, op_timeout=None):
        return open_group_store(self.url, self.group, self.rank, self.size, op_timeout or self.timeout, host=False,
                                generation=self.generation)


class EtcdGroupStore(GroupStore):
    def __init__(self, group, rank, size, host: str, port: int, timeout: float, generation: str = "",
                 op_timeout: float = 5.0):
        super().__init__(group, rank, size)
        os.environ.setdefault("PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION", "python")
        import etcd3

        self.host, self.port, self.timeout, self.generation = host, port, timeout, generation
        self.client = etcd3.client(host=host, port=port, timeout=op_timeout)
        self.prefix = "/dwdp/" + _prefix(group, generation)
        self._torch_store = None

    def set(self, key, value):
        try:
            self.client.put(self.prefix + key, value)
        except Exception as exc:
            raise PeerError(f"group {self.group}: etcd {self.host}:{self.port} unreachable ({exc})") from None

    def get(self, key, timeout=None):
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            try:
                value, _ = self.client.get(self.prefix + key)
            except Exception as exc:
                raise PeerError(f"group {self.group}: etcd {self.host}:{self.port} unreachable ({exc})") from None
            if value is not None:
                return value.decode()
            if time.monotonic() > deadline:
                raise PeerError(f"group {self.group}: timed out waiting for '{key}' in etcd")
            time.sleep(0.05)

    def check(self, key):
        value, _ = self.client.get(self.prefix + key)
        return value is not None

    def torch_store(self):
        import torch.distributed as dist

        if self._torch_store is None:
            if self.rank == 0:
                store = host_tcp_store("127.0.0.1", 0, self.timeout)
                self.set("torch_store", json.dumps({"host": "127.0.0.1", "port": store.port}))
            else:
                addr = json.loads(self.get("torch_store"))
                store = dist.TCPStore(addr["host"], addr["port"], None, False,
                                      datetime.timedelta(seconds=self.timeout))
            self._torch_store = store
        return self._torch_store

    def clone(self, op_timeout=None):
        return EtcdGroupStore(self.group, self.rank, self.size, self.host, self.port, self.timeout, self.generation,
                              op_timeout=op_timeout or 5.0)

    def close(self):
        try:
            self.client.close()
        except Exception:
            pass


def open_group_store(url: str, group: str, rank: int, size: int, timeout: float = 120.0,
                     host: bool = True, generation: str = "") -> GroupStore:
    """Open the group's store. With tcp://, rank 0 hosts it (unless host=False: a client clone)."""
    import torch.distributed as dist

    u = urlparse(url)
    td = datetime.timedelta(seconds=timeout)
    if u.scheme == "tcp":
        if not u.hostname or not u.port:
            raise UserError(f"--rendezvous {url!r}: expected tcp://HOST:PORT")
        is_master = host and rank == 0
        deadline = time.monotonic() + timeout
        while True:
            try:
                store = (host_tcp_store(u.hostname, u.port, timeout) if is_master
                         else dist.TCPStore(u.hostname, u.port, None, False, td))
                break
            except (RuntimeError, TimeoutError, OSError) as exc:
                if is_master or time.monotonic() > deadline:
                    raise PeerError(f"group {group}: cannot {'host' if is_master else 'reach'} the rendezvous "
                                    f"store at {url} ({exc})") from None
                time.sleep(0.2)
        return TorchGroupStore(group, rank, size, store, url, timeout, generation)
    if u.scheme == "file":
        return TorchGroupStore(group, rank, size, dist.FileStore(u.path, -1), url, timeout, generation)
    if u.scheme == "etcd":
        if not u.hostname or not u.port:
            raise UserError(f"--rendezvous {url!r}: expected etcd://HOST:PORT")
        return EtcdGroupStore(group, rank, size, u.hostname, u.port, timeout, generation)
    raise UserError(f"--rendezvous {url!r}: scheme must be tcp://, file:// or etcd://")
