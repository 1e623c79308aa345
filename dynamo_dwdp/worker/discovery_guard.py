"""Keep a stalled worker discoverable under Dynamo's file discovery backend (embedded infra).

Why this exists: with `DYN_DISCOVERY_BACKEND=file`, a worker's registration is a set of files under
`DYN_FILE_KV` (`v1/instances/...%2F<worker id>`, `v1/mdc/...`) whose mtime Dynamo's keep-alive
refreshes; a file older than its TTL is reaped by the other processes. A worker paused (SIGSTOP,
swap storm, CPU starvation) past that TTL loses its files, and Dynamo 1.6.1's keep-alive only
refreshes files that exist ("keep_alive failed opening owned file"): the worker would stay out of
discovery for good while its process is healthy. This guard re-writes the files the worker had
registered, with their original content, but only after it has seen this process stall: its own
loop noticed a gap of more than `stall_s` (so a file that vanishes because Dynamo unregistered it at
shutdown is never brought back). etcd discovery needs no guard: Dynamo's own lease handling applies.
"""
from __future__ import annotations

import logging
import os
import threading
import time

log = logging.getLogger(__name__)


class DiscoveryGuard:
    def __init__(self, root: str, worker_id: int, interval: float = 0.5, stall_s: float = 3.0,
                 window_s: float = 30.0):
        self.root, self.suffix = root, f"%2F{worker_id:x}"
        self.interval, self.stall_s, self.window_s = interval, stall_s, window_s
        self.saved: dict[str, bytes] = {}           # path -> content, as registered
        self.restored = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="discovery-guard", daemon=True)

    @classmethod
    def for_env(cls, worker_id: int) -> "DiscoveryGuard | None":
        root = os.environ.get("DYN_FILE_KV")
        if os.environ.get("DYN_DISCOVERY_BACKEND") != "file" or not root:
            return None
        return cls(root, worker_id)

    def start(self) -> "DiscoveryGuard":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)

    def _mine(self) -> dict[str, bytes]:
        out = {}
        for dirpath, _dirs, files in os.walk(self.root):
            for name in files:
                if name.endswith(self.suffix):
                    path = os.path.join(dirpath, name)
                    try:
                        with open(path, "rb") as f:
                            out[path] = f.read()
                    except OSError:
                        pass
        return out

    def _run(self) -> None:
        last = time.monotonic()
        stalled_until = 0.0
        while not self._stop.wait(self.interval):
            now = time.monotonic()
            if now - last > self.stall_s:
                stalled_until = now + self.window_s
                log.warning("this worker stalled for %.1fs: watching its discovery registration", now - last - self.interval)
            last = now
            if now < stalled_until:
                self._restore()
            else:
                mine = self._mine()
                if mine:
                    self.saved.update(mine)

    def _restore(self) -> None:
        for path, content in self.saved.items():
            if self._stop.is_set() or os.path.exists(path):
                continue
            tmp = os.path.join(os.path.dirname(self.root), f".restore-{os.getpid()}")   # outside the watched tree
            try:
                with open(tmp, "wb") as f:
                    f.write(content)
                os.replace(tmp, path)
            except OSError as exc:
                log.warning("could not restore discovery entry %s: %s", path, exc)
                continue
            self.restored += 1
            log.warning("discovery entry %s had expired while this worker stalled: registered again",
                        os.path.basename(path))
