"""A fake OpenAI-compatible frontend for the `ab` tests (plus a few checks of the fake itself).

`FakeFrontend` runs an aiohttp app on 127.0.0.1 (free port) in a background thread:
  - POST /v1/completions and /v1/chat/completions stream SSE chunks: headers at once, the first
    token after `first_delay_s`, then one token per chunk every `chunk_delay_s`, a final chunk with
    finish_reason, a usage chunk ({prompt_tokens, completion_tokens}) and `data: [DONE]`. Like Dynamo
    1.6.1 it rejects `nvext.ignore_eos` with 400 and honours top-level `ignore_eos`/`min_tokens`
    (without ignore_eos it stops after `eos_after` tokens when that is set).
  - Prompts steer failures: a prompt containing BAD -> 400; DROP -> the connection is cut after two
    chunks; HANG -> no byte after the headers until the server stops; NOUSAGE -> no usage chunk;
    EMPTY -> a 200 stream with no content and usage completion_tokens 0 (what Dynamo sends for a
    prompt the engine rejects after the headers).
  - `fail_status` answers every generation request with that HTTP status; `refuse_after` = n cuts the
    connection of every request after the first n (a frontend that died).
  - `slowdown_per_inflight` stretches every delay with the number of requests in flight (a server
    that slows down under load, so TPS/user falls as concurrency rises).
  - GET /v1/models lists the model; GET /metrics/<pool>/<rank>[?strategy=..&role=..] serves `dwdp_*` counters that grow
    with the tokens served (see `metrics_text`).
It counts requests, remembers the bodies and tracks the most requests in flight at once.
"""
from __future__ import annotations

import asyncio
import json
import threading
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web


@dataclass
class FakeState:
    requests: int = 0
    inflight: int = 0
    max_inflight: int = 0
    bodies: list = field(default_factory=list)
    tokens_served: int = 0
    prompt_tokens: int = 0


class FakeFrontend:
    def __init__(self, model: str = "tiny", first_delay_s: float = 0.02, chunk_delay_s: float = 0.01,
                 eos_after: int | None = None, metrics_families: str = "all", step_time_per_token_s: float = 0.001,
                 fail_status: int | None = None, slowdown_per_inflight: float = 0.0,
                 refuse_after: int | None = None):
        self.model = model
        self.refuse_after = refuse_after  # cut the connection of every request after this many
        self.slowdown_per_inflight = slowdown_per_inflight  # delays x (1 + this x (requests in flight - 1))
        self.fail_status = fail_status  # answer every generation request with this HTTP status
        self.first_delay_s = first_delay_s
        self.chunk_delay_s = chunk_delay_s
        self.eos_after = eos_after
        self.metrics_families = metrics_families  # "all" | "none" | "partial"
        self.step_time_per_token_s = step_time_per_token_s
        self.state = FakeState()
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._stop: asyncio.Event | None = None
        self.port = 0

    # -- lifecycle

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "FakeFrontend":
        ready = threading.Event()

        def main() -> None:
            self._loop = asyncio.new_event_loop()
            asyncio.set_event_loop(self._loop)
            self._loop.run_until_complete(self._start())
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=main, daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("fake frontend did not start")
        return self

    def __exit__(self, *exc) -> None:
        assert self._loop is not None
        fut = asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop)
        fut.result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    async def _start(self) -> None:
        self._stop = asyncio.Event()
        app = web.Application()
        app.router.add_post("/v1/completions", self._generate)
        app.router.add_post("/v1/chat/completions", self._generate)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/metrics/{pool}/{rank}", self._metrics)
        self._runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]

    async def _shutdown(self) -> None:
        self._stop.set()
        await self._runner.cleanup()

    # -- handlers

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": self.model, "object": "model"}]})

    async def _generate(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        with self._lock:
            self.state.requests += 1
            self.state.bodies.append(body)
        if self.refuse_after is not None and self.state.requests > self.refuse_after:
            request.transport.close()  # the frontend "died": the client sees a dropped connection
            return web.Response(status=500)
        if self.fail_status is not None:
            return web.json_response({"message": "the fake is told to fail", "code": self.fail_status},
                                     status=self.fail_status)
        if "ignore_eos" in (body.get("nvext") or {}):
            return web.json_response({"message": "Failed to deserialize the JSON body into the target type: "
                                                 "unknown field `ignore_eos`", "type": "Bad Request", "code": 400},
                                     status=400)
        chat = request.path.endswith("/chat/completions")
        prompt = body["messages"][-1]["content"] if chat else body.get("prompt")
        text = prompt if isinstance(prompt, str) else ""
        if "BAD" in text:
            return web.json_response({"message": "bad request for the test", "type": "Bad Request", "code": 400},
                                     status=400)
        n_prompt = len(prompt) if isinstance(prompt, list) else len(text.split())
        max_tokens = int(body.get("max_tokens") or 16)
        n_out = 0 if "EMPTY" in text else max_tokens
        if not body.get("ignore_eos") and self.eos_after is not None:
            n_out = max(min(max_tokens, self.eos_after), int(body.get("min_tokens") or 0))
        with self._lock:
            self.state.inflight += 1
            self.state.max_inflight = max(self.state.max_inflight, self.state.inflight)
        try:
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            if "HANG" in text:
                try:
                    await asyncio.wait_for(self._stop.wait(), 30)
                except asyncio.TimeoutError:
                    pass
                return resp
            cid = f"cmpl-{self.state.requests}"
            if chat:
                await self._send(resp, {"id": cid, "choices": [{"index": 0, "delta": {"role": "assistant"},
                                                                 "finish_reason": None}]})
            for i in range(n_out):
                load = 1.0 + self.slowdown_per_inflight * (self.state.inflight - 1)
                await asyncio.sleep((self.first_delay_s if i == 0 else self.chunk_delay_s) * load)
                if "DROP" in text and i == 2:
                    request.transport.close()
                    return resp
                finish = "length" if i == n_out - 1 else None
                choice = ({"index": 0, "delta": {"content": f" w{i}"}, "finish_reason": finish} if chat else
                          {"index": 0, "text": f" w{i}", "finish_reason": finish})
                await self._send(resp, {"id": cid, "choices": [choice], "usage": None})
                with self._lock:
                    self.state.tokens_served += 1
            if "NOUSAGE" not in text:
                await self._send(resp, {"id": cid, "choices": [], "usage": {
                    "prompt_tokens": n_prompt, "completion_tokens": n_out, "total_tokens": n_prompt + n_out}})
            with self._lock:
                self.state.prompt_tokens += n_prompt
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
            return resp
        finally:
            with self._lock:
                self.state.inflight -= 1

    @staticmethod
    async def _send(resp: web.StreamResponse, obj: dict) -> None:
        await resp.write(f"data: {json.dumps(obj)}\n\n".encode())

    def metrics_text(self, pool: str, rank: str, strategy: str = "dwdp", role: str = "decode") -> str:
        """Counters that grow with the tokens served: per rank, tokens/2 generated tokens, step time
        = tokens x step_time_per_token_s split 60% compute / 30% prefetch wait / 10% sync wait,
        1000 remote bytes per generated token, one KV transfer of 2 ms per request."""
        s = self.state
        gen = s.tokens_served / 2.0
        step = gen * self.step_time_per_token_s
        lab = f'strategy="{strategy}",role="{role}",group="g0",rank="{rank}"'
        lines = ["# HELP dwdp_step_seconds_total step time", "# TYPE dwdp_step_seconds_total counter",
                 f"dwdp_step_seconds_total{{{lab}}} {step}",
                 f"dwdp_step_compute_seconds_total{{{lab}}} {0.6 * step}",
                 f"dwdp_steps_total{{{lab}}} {gen}",
                 f"dwdp_tokens_total{{{lab}}} {gen}",
                 f"dwdp_generated_tokens_total{{{lab}}} {gen}",
                 f'dwdp_queue_depth{{{lab}}} {s.inflight}',
                 "garbage line that is not prometheus"]
        if self.metrics_families == "all":
            lines += [f"dwdp_step_prefetch_wait_seconds_total{{{lab}}} {0.3 * step}",
                      f"dwdp_step_sync_wait_seconds_total{{{lab}}} {0.1 * step}",
                      f'dwdp_remote_bytes_total{{{lab},peer="1"}} {1000.0 * gen}',
                      f"dwdp_kv_transfer_seconds_sum{{{lab}}} {0.002 * s.requests}",
                      f"dwdp_kv_transfer_seconds_count{{{lab}}} {float(s.requests)}"]
        return "\n".join(lines) + "\n"

    async def _metrics(self, request: web.Request) -> web.Response:
        if self.metrics_families == "none":
            return web.Response(status=404)
        q = request.query
        return web.Response(text=self.metrics_text(request.match_info["pool"], request.match_info["rank"],
                                                   q.get("strategy", "dwdp"), q.get("role", "decode")))


# ---------------------------------------------------------------------------- checks of the fake


def test_fake_streams_sse_with_usage_and_done():
    async def go(url):
        async with aiohttp.ClientSession() as s:
            async with s.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": [1, 2, 3], "max_tokens": 3,
                                                              "stream": True, "ignore_eos": True}) as r:
                assert r.status == 200
                return [line.decode().strip() async for line in r.content if line.strip()]

    with FakeFrontend() as fe:
        lines = asyncio.run(go(fe.url))
    assert lines[-1] == "data: [DONE]"
    usage = json.loads(lines[-2][5:])["usage"]
    assert usage == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}
    assert sum(1 for ln in lines if '"text"' in ln) == 3


def test_fake_rejects_nvext_ignore_eos_like_dynamo():
    async def go(url):
        async with aiohttp.ClientSession() as s:
            async with s.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 3,
                                                              "nvext": {"ignore_eos": True}}) as r:
                return r.status

    with FakeFrontend() as fe:
        assert asyncio.run(go(fe.url)) == 400


def test_fake_metrics_grow_with_tokens():
    async def go(url):
        async with aiohttp.ClientSession() as s:
            async with s.get(f"{url}/metrics/decode/0") as r:
                return await r.text()

    with FakeFrontend() as fe:
        before = asyncio.run(go(fe.url))
        fe.state.tokens_served = 10
        after = asyncio.run(go(fe.url))
    assert "dwdp_generated_tokens_total{" in before
    assert 'dwdp_generated_tokens_total{strategy="dwdp",role="decode",group="g0",rank="0"} 5.0' in after
