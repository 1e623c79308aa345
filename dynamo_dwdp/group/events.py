"""Group events over NATS (etcd + NATS mode): `rank_up`, `weights_ready`, `rank_down`.

Subject: `dwdp.group.<group>`; payload JSON {"event", "rank", "reason"?}. A `rank_down` about a peer
marks it down in `Membership` at once, so survivors stop pulling from it when the event arrives
rather than when its lease expires. Publishers: the rank itself (up/ready/clean shutdown) and the
rank supervisor (`python -m dynamo_dwdp.group`) when a rank process exits unexpectedly.
NATS going away is not fatal: events are lost meanwhile (liveness still works through the store's
heartbeats or etcd leases), publishing logs a warning, and the client reconnects for as long as it
takes, so events flow again once NATS is back.
"""
from __future__ import annotations

import asyncio
import json
import logging
import threading

log = logging.getLogger(__name__)


def subject(group: str) -> str:
    return f"dwdp.group.{group}"


class GroupEvents:
    def __init__(self, url: str, group: str, rank: int, membership=None):
        self.url, self.group, self.rank, self.membership = url, group, rank, membership
        self.received: list[dict] = []
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"nats-{group}-{rank}", daemon=True)
        self._nc = None

    def start(self) -> "GroupEvents":
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._connect(), self._loop).result(timeout=10)
        return self

    async def _connect(self):
        import nats

        self._nc = await nats.connect(self.url, name=f"dwdp-{self.group}-{self.rank}", max_reconnect_attempts=-1,
                                      reconnect_time_wait=1)
        await self._nc.subscribe(subject(self.group), cb=self._on_msg)

    async def _on_msg(self, msg):
        try:
            event = json.loads(msg.data.decode())
        except ValueError:
            return
        self.received.append(event)
        if event.get("event") == "rank_down" and self.membership is not None:
            self.membership.mark_down(int(event["rank"]), f"NATS rank_down event ({event.get('reason', '?')})")

    def publish(self, event: str, rank: int | None = None, **extra) -> None:
        payload = json.dumps({"event": event, "rank": self.rank if rank is None else rank, **extra}).encode()

        async def _pub():
            await self._nc.publish(subject(self.group), payload)
            await self._nc.flush(timeout=2)

        try:
            asyncio.run_coroutine_threadsafe(_pub(), self._loop).result(timeout=3)
        except Exception as exc:
            log.warning("group %s: could not publish %s on NATS: %s", self.group, event, exc)

    def stop(self) -> None:
        async def _close():
            if self._nc is not None:
                await self._nc.drain()

        try:
            asyncio.run_coroutine_threadsafe(_close(), self._loop).result(timeout=5)
        except Exception:
            pass
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)


def publish_once(url: str, group: str, event: str, rank: int, **extra) -> None:
    """Fire one event from a process that is not a group member (the rank supervisor)."""
    async def _go():
        import nats

        nc = await nats.connect(url, max_reconnect_attempts=1, connect_timeout=2)
        await nc.publish(subject(group), json.dumps({"event": event, "rank": rank, **extra}).encode())
        await nc.flush(timeout=2)
        await nc.close()

    try:
        asyncio.run(_go())
    except Exception as exc:
        log.warning("could not publish %s for group %s rank %d: %s", event, group, rank, exc)
