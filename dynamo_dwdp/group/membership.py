"""Liveness of a group's ranks: a dead peer turns into a clear error, never a hang, and a peer that
comes back (it was paused, starved or cut off, not restarted) rejoins.

Each rank runs one daemon thread that (a) proves it is alive and (b) watches its peers:
- tcp/file store: a per-rank counter `alive/<rank>` bumped every `interval`; a peer whose counter
  has not moved for `timeout` seconds (local monotonic clock) is declared down; if the store itself
  is unreachable, rank 0 (its host) is declared down. A down peer whose counter moves again is up.
- etcd: a key `members/<rank>` bound to a lease with TTL = timeout, kept alive by the thread; a peer
  whose key vanished (lease expired or revoked on exit) is declared down, and up again when its key
  reappears (a rank whose own lease expired while it was paused grants a new one and re-puts it).
Events from elsewhere (NATS `rank_down`, see group_events.py) call `mark_down` and act at once; such a
rank (it exited or is leaving) is never taken back in place: only a peer this thread itself declared
down (silence, lease expiry, unreachable store) can come back.

Invariants: `dead` is the set of peers now down; `epoch` counts membership changes (it starts at 0
and grows by one per rank going down or coming back), so a reader that cached anything derived from
the live set (a pull plan, a broken engine) compares epochs to know it must recompute. Listeners
(`on_change`) run on the membership thread, or on the caller's for `mark_down`/`mark_up`; they must
be quick and must not raise. A whole-process restart is not a rejoin: the rank supervisor restarts
the whole group under a new rendezvous generation (see dynamo_dwdp/group/supervisor.py).
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable

from dynamo_dwdp.group.rendezvous import EtcdGroupStore, GroupStore

log = logging.getLogger(__name__)


class Membership:
    def __init__(self, store: GroupStore, timeout: float = 5.0, interval: float = 0.25):
        self.timeout, self.interval = timeout, interval
        self._origin = store
        try:
            self.store = store.clone(op_timeout=max(1.0, timeout))     # a stalled store op times out
        except Exception:                  # a slow connect: the heartbeat thread connects again
            self.store = None
        self.rank, self.size, self.group = store.rank, store.size, store.group
        self._dead: dict[int, str] = {}
        self._healable: set[int] = set()          # declared down by our own liveness check
        self._down_since: dict[int, float] = {}
        self._epoch = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lease = None
        self.listeners: list[Callable[[int, int, bool, float | None], None]] = []
        """Called as fn(epoch, rank, up, seconds_down) after every change (seconds_down: on up only)."""

    # ------------------------------------------------------------------ API
    @property
    def dead(self) -> frozenset[int]:
        with self._lock:
            return frozenset(self._dead)

    @property
    def epoch(self) -> int:
        return self._epoch

    def reason(self, rank: int) -> str | None:
        return self._dead.get(rank)

    def on_change(self, fn: Callable[[int, int, bool, float | None], None]) -> None:
        self.listeners.append(fn)

    def mark_down(self, rank: int, reason: str, healable: bool = False) -> None:
        """Declare `rank` down. `healable`: by this rank's own liveness check, so it may come back."""
        if rank == self.rank:
            return
        with self._lock:
            if rank in self._dead:
                return
            self._dead[rank] = reason
            if healable:
                self._healable.add(rank)
            self._down_since[rank] = time.monotonic()
            self._epoch += 1
            epoch = self._epoch
        log.error("group %s: rank %d is down (%s); membership epoch %d", self.group, rank, reason, epoch)
        self._notify(epoch, rank, False, None)

    def mark_up(self, rank: int, how: str) -> None:
        with self._lock:
            if rank not in self._dead or rank not in self._healable:
                return
            del self._dead[rank]
            self._healable.discard(rank)
            seconds = time.monotonic() - self._down_since.pop(rank)
            self._epoch += 1
            epoch = self._epoch
        log.warning("group %s: rank %d is back (%s) after %.1fs down; membership epoch %d", self.group, rank,
                    how, seconds, epoch)
        self._notify(epoch, rank, True, seconds)

    def _notify(self, epoch: int, rank: int, up: bool, seconds: float | None) -> None:
        for fn in list(self.listeners):
            try:
                fn(epoch, rank, up, seconds)
            except Exception:                      # a listener must never stop liveness
                log.exception("membership listener failed")

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
        if isinstance(self._origin, EtcdGroupStore):
            self._run_etcd(self.store or self._origin.clone())
        else:
            self._run_counter()

    def _run_counter(self) -> None:
        count = 0
        seen: dict[int, tuple[str | None, float]] = {}
        start = time.monotonic()
        store_down = False
        while not self._stop.is_set():
            count += 1
            try:
                if self.store is None:      # after a failed op: a fresh connection (no half-read reply)
                    self.store = self._origin.clone(op_timeout=max(1.0, self.timeout))
                self.store.set(f"alive/{self.rank}", str(count))
                now = time.monotonic()
                for peer in range(self.size):
                    if peer == self.rank:
                        continue
                    value = self.store.get(f"alive/{peer}", 0) if self.store.check(f"alive/{peer}") else None
                    last_value, since = seen.get(peer, (None, start))
                    if value != last_value:
                        seen[peer] = (value, now)
                        if peer in self._dead and not (store_down and peer == 0):
                            self.mark_up(peer, "heartbeat resumed")
                    elif peer not in self._dead and now - since > (
                            self.timeout if last_value is not None else max(self.timeout, 60.0)):
                        what = "never started" if value is None else "stopped heartbeating"
                        self.mark_down(peer, f"{what} for {self.timeout:.1f}s", healable=True)
                if store_down:
                    store_down = False
                    self.mark_up(0, "rendezvous store reachable again")
            except Exception as exc:  # the store host (rank 0) died or is paused
                self._drop_store()
                if self.rank != 0 and not store_down:
                    store_down = True
                    self.mark_down(0, f"rendezvous store unreachable ({type(exc).__name__})", healable=True)
            self._stop.wait(self.interval)

    def _drop_store(self) -> None:
        store, self.store = self.store, None
        if store is not None:
            try:
                store.close()
            except Exception:
                pass

    def _run_etcd(self, store: EtcdGroupStore) -> None:
        ttl = max(2, int(round(self.timeout)))
        key = f"{store.prefix}members/{self.rank}"
        joined: set[int] = set()
        start = time.monotonic()
        while not self._stop.is_set():
            try:
                if self._lease is None or self._lease_expired():
                    # first join, or this rank was paused (or cut off) past its TTL: join again
                    self._lease = store.client.lease(ttl)
                    store.client.put(key, "up", lease=self._lease)
                present = set()
                for _value, meta in store.client.get_prefix(f"{store.prefix}members/"):
                    present.add(int(meta.key.decode().rsplit("/", 1)[1]))
                for peer in range(self.size):
                    if peer == self.rank:
                        continue
                    if peer in present:
                        joined.add(peer)
                        if peer in self._dead:
                            self.mark_up(peer, "etcd membership key is back")
                    elif peer in self._dead:
                        continue
                    elif peer in joined:
                        self.mark_down(peer, "etcd membership lease expired or revoked", healable=True)
                    elif time.monotonic() - start > max(self.timeout, 60.0):
                        self.mark_down(peer, "never joined the group", healable=True)
            except Exception as exc:
                log.warning("group %s: etcd liveness check failed: %s", self.group, exc)
            self._stop.wait(self.interval)

    def _lease_expired(self) -> bool:
        """Refresh this rank's lease; True when etcd no longer knows it (TTL ran out)."""
        replies = list(self._lease.refresh())
        return any(getattr(r, "TTL", 1) <= 0 for r in replies)
