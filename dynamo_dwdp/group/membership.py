"""Liveness of a group's ranks, so that a dead peer turns into a clear error, never a hang.

Each rank runs one daemon thread that (a) proves it is alive and (b) watches its peers:
- tcp/file store: a per-rank counter `alive/<rank>` bumped every `interval`; a peer whose counter
  has not moved for `timeout` seconds (local monotonic clock) is declared down; if the store itself
  is unreachable, rank 0 (its host) is declared down;
- etcd: a key `members/<rank>` bound to a lease with TTL = timeout, kept alive by the thread; a peer
  whose key vanished (lease expired or revoked on exit) is declared down.
Events from elsewhere (NATS `rank_down`, see group_events.py) call `mark_down` and act at once.
A rank is declared down at most once; readers poll `dead` (the DWDP executor does, per pull plan).
"""
from __future__ import annotations

import logging
import threading
import time

from dynamo_dwdp.group.rendezvous import EtcdGroupStore, GroupStore

log = logging.getLogger(__name__)


class Membership:
    def __init__(self, store: GroupStore, timeout: float = 5.0, interval: float = 0.25):
        self.store = store.clone()
        self.rank, self.size, self.group = store.rank, store.size, store.group
        self.timeout, self.interval = timeout, interval
        self._dead: dict[int, str] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lease = None

    # ------------------------------------------------------------------ API
    @property
    def dead(self) -> frozenset[int]:
        with self._lock:
            return frozenset(self._dead)

    def reason(self, rank: int) -> str | None:
        return self._dead.get(rank)

    def mark_down(self, rank: int, reason: str) -> None:
        if rank == self.rank:
            return
        with self._lock:
            if rank in self._dead:
                return
            self._dead[rank] = reason
        log.error("group %s: rank %d is down (%s)", self.group, rank, reason)

    def start(self) -> "Membership":
        if self.size > 1:
            self._thread = threading.Thread(target=self._run, name=f"membership-{self.group}-{self.rank}",
                                            daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
        if self._lease is not None:
            try:
                self._lease.revoke()
            except Exception:
                pass

    # ------------------------------------------------------------------ loop
    def _run(self) -> None:
        if isinstance(self.store, EtcdGroupStore):
            self._run_etcd(self.store)
        else:
            self._run_counter()

    def _run_counter(self) -> None:
        count = 0
        seen: dict[int, tuple[str | None, float]] = {}
        start = time.monotonic()
        while not self._stop.is_set():
            count += 1
            now = time.monotonic()
            try:
                self.store.set(f"alive/{self.rank}", str(count))
                for peer in range(self.size):
                    if peer == self.rank or peer in self._dead:
                        continue
                    value = self.store._store.get(f"alive/{peer}").decode() if self.store.check(
                        f"alive/{peer}") else None
                    last_value, since = seen.get(peer, (None, start))
                    if value != last_value:
                        seen[peer] = (value, now)
                    elif now - since > (self.timeout if last_value is not None else max(self.timeout, 60.0)):
                        what = "never started" if value is None else "stopped heartbeating"
                        self.mark_down(peer, f"{what} for {self.timeout:.1f}s")
            except Exception as exc:  # the store host (rank 0) died
                if self.rank != 0:
                    self.mark_down(0, f"rendezvous store unreachable ({type(exc).__name__})")
            self._stop.wait(self.interval)

    def _run_etcd(self, store: EtcdGroupStore) -> None:
        ttl = max(2, int(round(self.timeout)))
        self._lease = store.client.lease(ttl)
        store.client.put(f"{store.prefix}members/{self.rank}", "up", lease=self._lease)
        joined: set[int] = set()
        start = time.monotonic()
        while not self._stop.is_set():
            try:
                self._lease.refresh()
                present = set()
                for _value, meta in store.client.get_prefix(f"{store.prefix}members/"):
                    present.add(int(meta.key.decode().rsplit("/", 1)[1]))
                for peer in range(self.size):
                    if peer == self.rank or peer in self._dead:
                        continue
                    if peer in present:
                        joined.add(peer)
                    elif peer in joined:
                        self.mark_down(peer, "etcd membership lease expired or revoked")
                    elif time.monotonic() - start > max(self.timeout, 60.0):
                        self.mark_down(peer, "never joined the group")
            except Exception as exc:
                log.warning("group %s: etcd liveness check failed: %s", self.group, exc)
            self._stop.wait(self.interval)
