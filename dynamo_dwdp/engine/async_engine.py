"""`AsyncEngine`: serve a `RankEngine` from asyncio. The engine lives on one dedicated thread (it is
not thread-safe); asyncio code talks to it through a command queue and per-request output queues.

Loop: apply queued commands -> one iteration (DEP: agree with peers first) -> deliver outputs.
Idle: wait for a command (DEP ranks re-check with their peers every `idle_poll` seconds, since a
peer's request makes every rank step). A failing step (dead peer, broken collective) fails every
in-flight request with that error and marks the engine `broken`: new requests fail fast and the
worker reports unhealthy, instead of hanging.

Streaming: a request's first output goes to its stream at once; after it, outputs are held until
they carry `engine.stream_interval` new tokens (vLLM's and TensorRT-LLM's `stream_interval`), or the
request finishes or fails, whichever comes first. Fewer chunks cost the serving process (Dynamo's
per-chunk work, and the GIL the engine thread shares with it) less per step.

Broken is not forever. A group that heals in place (DWDP/DP: no process group) leaves the broken
state as soon as no peer is down any more (a paused peer came back; membership.py); the failed
requests stay failed, new ones are served. A DEP/TP rank cannot re-form its process group in place:
`on_broken` callbacks run once (the worker stops its process) and the rank supervisor restarts the
whole group under a new rendezvous generation.
"""
from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import threading
import time
from typing import Any, AsyncIterator, Callable

from dynamo_dwdp.engine.sampling import SamplingParams
from dynamo_dwdp.engine.sequence import RequestOutput
from dynamo_dwdp.errors import PeerError, UserError

log = logging.getLogger(__name__)


class EngineBroken(RuntimeError):
    pass


class AsyncEngine:
    def __init__(self, rank_engine, idle_poll: float = 0.01):
        self.re = rank_engine
        self.engine = rank_engine.engine
        self.idle_poll = idle_poll if rank_engine.coordinator is not None else 0.2
        self.broken: str | None = None
        self.broken_since: float | None = None
        self.on_broken: list[Callable[[str], None]] = []
        self.on_recovered: list[Callable[[float], None]] = []
        self._cmds: collections.deque = collections.deque()
        self._wake = threading.Event()
        self._stop = False
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self.stream_interval = rank_engine.runner.config.stream_interval
        self._held: dict[str, RequestOutput] = {}         # engine thread: outputs short of stream_interval
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self.on_step: list[Callable[[], None]] = []

    def start(self) -> "AsyncEngine":
        self._thread.start()
        return self

    # ------------------------------------------------------------------ engine thread
    def _run(self) -> None:
        import torch

        with torch.inference_mode():
            while not self._stop:
                self._apply_commands()
                if self.broken is not None:
                    if not self._try_recover():
                        for cb in self.on_step:          # metrics keep refreshing while broken
                            _safe(cb)
                        self._wake.wait(0.2)
                        self._wake.clear()
                        continue
                t0, cpu0 = time.perf_counter(), time.thread_time()
                try:
                    ran, outs = self.re.step()
                except Exception as exc:  # a peer died, a collective failed: fail everything, clearly
                    msg = str(exc) if isinstance(exc, (PeerError, UserError)) else f"{type(exc).__name__}: {exc}"
                    log.error("engine step failed: %s", msg)
                    self.broken, self.broken_since = msg, time.monotonic()
                    outs = self.engine.fail_all(msg)
                    ran = False
                    self._deliver(outs)
                    outs = []
                    for cb in self.on_broken:
                        _safe(cb, msg)
                self._deliver(outs)
                for cb in self.on_step:
                    cb()
                if ran:
                    stats = self.re.stats
                    stats.loop_seconds += time.perf_counter() - t0
                    stats.loop_cpu_seconds += time.thread_time() - cpu0
                if outs:
                    time.sleep(0)        # let the asyncio thread forward these tokens now, not in a burst
                if not ran:
                    self._wake.wait(self.idle_poll)
                    self._wake.clear()

    def _try_recover(self) -> bool:
        """Broken, on the engine thread: leave that state when the group is whole again (DWDP/DP)."""
        group = getattr(self.re, "group", None)
        if group is None or not group.heals_in_place or group.dead():
            return False
        seconds = time.monotonic() - (self.broken_since or time.monotonic())
        log.warning("engine serving again: the group is whole (membership epoch %d), %.1fs after it broke (%s)",
                    group.epoch, seconds, self.broken)
        self.broken, self.broken_since = None, None
        for cb in self.on_recovered:
            _safe(cb, seconds)
        return True

    def _apply_commands(self) -> None:
        while self._cmds:
            fn, fut, loop = self._cmds.popleft()
            try:
                result = fn(self.engine)
            except BaseException as exc:
                if fut is not None:
                    loop.call_soon_threadsafe(_set_exception, fut, exc)
                continue
            if fut is not None:
                loop.call_soon_threadsafe(_set_result, fut, result)

    def _abort(self, engine, request_id: str) -> None:
        self._held.pop(request_id, None)
        engine.abort(request_id)

    def _deliver(self, outs: list[RequestOutput]) -> None:
        """Hand a step's outputs to their streams: one wake-up per event loop per step (not one per
        output: each `call_soon_threadsafe` takes a lock and writes to the loop's self-pipe)."""
        batches: dict[asyncio.AbstractEventLoop, list] = {}
        for out in outs:
            held = self._held.pop(out.request_id, None)
            if held is not None:
                out = _merge(held, out)
            entry = self._streams.get(out.request_id)
            if out.finished:
                self._streams.pop(out.request_id, None)
            elif (entry is not None and out.error is None and len(out.new_token_ids) < self.stream_interval
                  and out.num_output_tokens > len(out.new_token_ids)):    # not the first tokens: wait for more
                self._held[out.request_id] = out
                continue
            if entry is not None:
                loop, q = entry
                batches.setdefault(loop, []).append((q, out))
        for loop, items in batches.items():
            loop.call_soon_threadsafe(_put_all, items)

    # ------------------------------------------------------------------ asyncio side
    async def call(self, fn: Callable[[Any], Any]) -> Any:
        """Run fn(engine) on the engine thread; return its result (or raise its exception)."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._cmds.append((fn, fut, loop))
        self._wake.set()
        return await fut

    def post(self, fn: Callable[[Any], Any]) -> None:
        """Fire-and-forget variant of `call`."""
        self._cmds.append((fn, None, None))
        self._wake.set()

    async def generate(self, request_id: str, prompt_ids: list[int] | None, params: SamplingParams | None,
                       hold_kv: bool = False, prefilled: bool = False,
                       cached_tokens: int = 0) -> AsyncIterator[RequestOutput]:
        """Stream a request's outputs. With prefilled=True the request was `reserve`d and its KV
        filled by a transfer; it starts decoding at once. Outputs that queued up while the consumer
        was busy come as one (their tokens concatenated, in order; the last one's state)."""
        if self.broken is not None:
            raise EngineBroken(self.broken)
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = (loop, q)

        def add(engine):
            if prefilled:
                engine.add_prefilled(request_id, cached_tokens)
            else:
                engine.add_request(request_id, prompt_ids, params, hold_kv=hold_kv)
            engine.requests[request_id].arrival = time.monotonic()

        try:
            await self.call(add)
        except BaseException:
            self._streams.pop(request_id, None)
            raise
        try:
            pending: RequestOutput | None = None
            while True:
                out: RequestOutput = pending or await q.get()
                pending = None
                while not out.finished and not q.empty():     # the consumer fell behind: one chunk
                    nxt = q.get_nowait()                     # for everything queued, not one per token
                    if nxt.error is not None:                # an error stays its own output
                        pending = nxt
                        break
                    out = _merge(out, nxt)
                yield out
                if out.finished:
                    return
        finally:
            if request_id in self._streams:          # the consumer went away early: abort
                self._streams.pop(request_id, None)
                self.post(lambda engine: self._abort(engine, request_id))

    def abort(self, request_id: str) -> None:
        """Cancel a request; its stream ends with a `cancelled` output (nothing waits forever)."""
        entry = self._streams.pop(request_id, None)
        self.post(lambda engine: self._abort(engine, request_id))
        if entry is not None:
            loop, q = entry
            loop.call_soon_threadsafe(q.put_nowait, RequestOutput(request_id, [], True, "cancelled", 0, 0, 0, 0))

    def stop(self) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=30)


def _safe(fn, *args) -> None:
    try:
        fn(*args)
    except Exception:                  # a callback must never kill the engine thread
        log.exception("engine callback failed")


def _merge(a: RequestOutput, b: RequestOutput) -> RequestOutput:
    """a then b (b is later) as one output: all new tokens, b's state and counts."""
    return dataclasses.replace(b, new_token_ids=a.new_token_ids + b.new_token_ids)


def _put_all(items: list[tuple[asyncio.Queue, RequestOutput]]) -> None:
    for q, out in items:
        q.put_nowait(out)


def _set_result(fut: asyncio.Future, value) -> None:
    if not fut.done():
        fut.set_result(value)


def _set_exception(fut: asyncio.Future, exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)
