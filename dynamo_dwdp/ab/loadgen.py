"""Our own asyncio OpenAI client: streaming completions / chat completions over aiohttp.

Per request it measures, on the client's monotonic clock (`time.perf_counter`):
  - TTFT: send -> first chunk that carries generated text (chat's role-only preamble does not count);
    this includes every queue on the way (frontend, router, prefill, KV transfer);
  - the arrival time of every content chunk (-> inter-chunk gaps = ITL samples);
  - end-to-end latency: send -> `data: [DONE]`;
  - prompt/output tokens from the final usage chunk (`stream_options.include_usage`), never by
    counting chunks (the frontend may merge several tokens into one chunk).
A request fails (with a one-line `error`) on: a non-200 status, an `error` object in the stream, a
dropped connection or a stream that ends without `[DONE]`, a missing usage chunk, or its own timeout.

Bounds: exactly `len(requests)` requests are sent, each limited to `request_timeout_s`, the whole
point to `point_timeout_s` (then in-flight requests are cancelled and unsent ones recorded as not
sent). Requests go only to `<base_url>/v1/...`; redirects are not followed and proxies from the
environment are ignored.

Exact lengths: Dynamo 1.6.1's frontend accepts `ignore_eos` and `min_tokens` as *top-level* request
fields (they reach the engine as `stop_conditions.ignore_eos` / `min_tokens`, with `eos_token_ids`
emptied); `nvext.ignore_eos` is rejected with 400 (`unknown field ignore_eos` in nvext). A token-id
list as `prompt` of /v1/completions reaches the engine unchanged (no BOS added), so ISL is exact.
"""
from __future__ import annotations

import asyncio
import json
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence
from urllib.parse import urlsplit

import aiohttp
import numpy as np

from dynamo_dwdp.ab.workload import Request, stream_rng
from dynamo_dwdp.errors import UserError

ERROR_TEXT_LIMIT = 300


@dataclass
class RequestRecord:
    """What one request did. Times are seconds; `start_s`/`end_s` are relative to the point's start."""

    index: int
    target_isl: int
    target_osl: int
    ok: bool = False
    sent: bool = False
    start_s: float | None = None
    end_s: float | None = None
    ttft_s: float | None = None
    prompt_tokens: int | None = None
    output_tokens: int | None = None
    status: int | None = None
    error: str | None = None
    finish_reason: str | None = None
    chunk_times_s: list[float] = field(default_factory=list)  # content-chunk arrivals, relative to start_s

    @property
    def e2e_s(self) -> float | None:
        if self.start_s is None or self.end_s is None:
            return None
        return self.end_s - self.start_s

    @property
    def tpot_s(self) -> float | None:
        """(e2e - TTFT) / (output tokens - 1): aiperf's per-request inter-token latency."""
        if not self.ok or self.ttft_s is None or self.e2e_s is None or not self.output_tokens \
                or self.output_tokens < 2:
            return None
        decode = self.e2e_s - self.ttft_s
        if decode < 1e-9:  # every token arrived with the first chunk (float noise below 1 ns)
            decode = 0.0
        return decode / (self.output_tokens - 1)

    @property
    def itl_gaps_s(self) -> list[float]:
        """Gaps between consecutive content chunks."""
        t = self.chunk_times_s
        return [b - a for a, b in zip(t, t[1:])]

    def compact(self) -> dict:
        """A JSON-able row without the chunk-time list (kept small in result files)."""
        d = asdict(self)
        d.pop("chunk_times_s")
        d["n_chunks"] = len(self.chunk_times_s)
        gaps = self.itl_gaps_s
        d["itl_mean_s"] = (sum(gaps) / len(gaps)) if gaps else None
        d["tpot_s"] = self.tpot_s
        return d


@dataclass
class PointRun:
    """All records of one point (ordered by request index) and the measured window."""

    records: list[RequestRecord]
    wall_start: float  # time.time() when the point began
    duration_s: float  # first send -> last completion (0 when nothing was sent)
    timed_out: bool = False


def check_base_url(base_url: str) -> str:
    """`http(s)://host[:port]` without a trailing slash; anything else is a UserError."""
    parts = urlsplit(base_url)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
        raise UserError(f"base URL {base_url!r} is not http(s)://host[:port] (allowed: e.g. http://127.0.0.1:8000)")
    return base_url.rstrip("/")


def build_body(req: Request, model: str, endpoint: str, ignore_eos: bool) -> dict:
    """The OpenAI request body for one request (streaming, with a usage chunk)."""
    body: dict = {"model": model, "max_tokens": int(req.osl), "stream": True,
                  "stream_options": {"include_usage": True}}
    if endpoint == "completions":
        body["prompt"] = req.prompt
    else:
        text = req.prompt if isinstance(req.prompt, str) else " ".join(map(str, req.prompt))
        body["messages"] = [{"role": "user", "content": text}]
    if ignore_eos:
        body["ignore_eos"] = True
        body["min_tokens"] = int(req.osl)
    return body


def _content_of(choice: dict) -> str:
    if "text" in choice:
        return choice.get("text") or ""
    delta = choice.get("delta") or {}
    return (delta.get("content") or "") + (delta.get("reasoning_content") or "")


def _short(text: str) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= ERROR_TEXT_LIMIT else text[:ERROR_TEXT_LIMIT - 3] + "..."


async def _stream_one(session: aiohttp.ClientSession, url: str, body: dict, rec: RequestRecord,
                      t_point: float) -> None:
    """Send one request and fill `rec` in place (the caller handles timeouts/cancellation)."""
    t0 = time.perf_counter()
    rec.sent = True
    rec.start_s = t0 - t_point
    try:
        async with session.post(url, json=body, allow_redirects=False) as resp:
            rec.status = resp.status
            if resp.status != 200:
                text = await resp.content.read(2048)
                msg = text.decode("utf-8", "replace")
                try:
                    parsed = json.loads(msg)
                    msg = parsed.get("message") or parsed.get("error", {}).get("message") or msg
                except (ValueError, AttributeError):
                    pass
                rec.error = _short(f"http {resp.status}: {msg}")
                return
            done = False
            event = None
            async for raw in resp.content:
                line = raw.decode("utf-8", "replace").strip()
                if not line:
                    event = None
                    continue
                if line.startswith("event:"):
                    event = line[6:].strip()
                    continue
                if not line.startswith("data:"):
                    continue
                payload = line[5:].strip()
                if payload == "[DONE]":
                    done = True
                    break
                now = time.perf_counter()
                try:
                    chunk = json.loads(payload)
                except ValueError:
                    rec.error = _short(f"bad stream chunk: {payload}")
                    return
                if event == "error" or (isinstance(chunk, dict) and chunk.get("error")):
                    err = chunk.get("error", chunk) if isinstance(chunk, dict) else chunk
                    rec.error = _short(f"stream error: {err.get('message', err) if isinstance(err, dict) else err}")
                    return
                for choice in chunk.get("choices") or ():
                    if choice.get("finish_reason"):
                        rec.finish_reason = choice["finish_reason"]
                    if _content_of(choice):
                        if rec.ttft_s is None:
                            rec.ttft_s = now - t0
                        rec.chunk_times_s.append(now - t0)
                usage = chunk.get("usage")
                if usage:
                    rec.prompt_tokens = usage.get("prompt_tokens")
                    rec.output_tokens = usage.get("completion_tokens")
            rec.end_s = time.perf_counter() - t_point
            if not done:
                rec.error = "connection: stream ended before [DONE]"
            elif rec.output_tokens is None:
                rec.error = "no usage chunk (stream_options.include_usage ignored?)"
            elif rec.output_tokens > 0 and rec.ttft_s is None:
                rec.error = "no content chunk although usage reports output tokens"
            elif rec.output_tokens == 0 and rec.target_osl > 0:
                rec.error = f"empty response: 0 output tokens (finish_reason {rec.finish_reason})"
            else:
                rec.ok = True
    except aiohttp.ClientPayloadError as e:
        rec.error = _short(f"connection: {e}")
    except aiohttp.ClientError as e:  # connection refused/reset, server disconnected
        rec.error = _short(f"connection: {e.__class__.__name__}: {e}")
    except ValueError as e:  # e.g. an over-long SSE line
        rec.error = _short(f"stream: {e}")
    finally:
        if rec.end_s is None:
            rec.end_s = time.perf_counter() - t_point


async def _one_bounded(session, url, body, rec, t_point, timeout_s) -> None:
    try:
        await asyncio.wait_for(_stream_one(session, url, body, rec, t_point), timeout_s)
    except asyncio.TimeoutError:
        rec.ok = False
        rec.error = f"timeout after {timeout_s:g} s"
        rec.end_s = time.perf_counter() - t_point


def arrival_offsets(n: int, rate: float, arrival: str, seed: int, stream: str) -> list[float]:
    """Send times (s from the point's start) of n open-loop requests: Poisson or evenly spaced."""
    if n <= 0:
        return []
    if arrival == "constant":
        return [i / rate for i in range(n)]
    gaps = stream_rng(seed, f"arrivals-{stream}").exponential(1.0 / rate, size=n - 1)
    return [0.0, *np.cumsum(gaps).tolist()]


async def run_load(base_url: str, model: str, requests: Sequence[Request], *, endpoint: str = "completions",
                   concurrency: int | None = None, request_rate: float | None = None, arrival: str = "poisson",
                   seed: int = 0, stream: str = "", ignore_eos: bool = True, request_timeout_s: float = 120.0,
                   point_timeout_s: float = 1800.0,
                   on_done: Callable[[RequestRecord], None] | None = None) -> PointRun:
    """Drive `requests` at one load point and return every record.

    Closed loop (`concurrency`): that many workers each send their next request when the last one
    finished. Open loop (`request_rate`): request i is sent at its arrival offset; `concurrency`
    then caps the requests in flight (the wait for a slot is not part of TTFT).
    """
    base = check_base_url(base_url)
    if endpoint not in ("completions", "chat"):
        raise UserError(f"endpoint {endpoint!r} not allowed (allowed: completions, chat)")
    if concurrency is None and request_rate is None:
        raise UserError("run_load needs concurrency or request_rate")
    url = f"{base}/v1/completions" if endpoint == "completions" else f"{base}/v1/chat/completions"
    records = [RequestRecord(index=r.index, target_isl=r.isl, target_osl=r.osl) for r in requests]
    bodies = [build_body(r, model, endpoint, ignore_eos) for r in requests]
    limit = max(1, concurrency or len(requests) or 1)
    connector = aiohttp.TCPConnector(limit=limit, force_close=False)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=min(30.0, request_timeout_s))
    wall_start = time.time()
    t_point = time.perf_counter()
    timed_out = False

    def finish(rec: RequestRecord) -> None:
        if on_done is not None:
            on_done(rec)

    async with aiohttp.ClientSession(connector=connector, timeout=timeout, trust_env=False,
                                     auto_decompress=True) as session:
        async def send(i: int) -> None:
            await _one_bounded(session, url, bodies[i], records[i], t_point, request_timeout_s)
            finish(records[i])

        if request_rate is None:
            queue = iter(range(len(requests)))

            async def worker() -> None:
                for i in queue:
                    await send(i)

            main = asyncio.gather(*(worker() for _ in range(min(limit, max(1, len(requests))))))
        else:
            offsets = arrival_offsets(len(requests), request_rate, arrival, seed, stream)
            slots = asyncio.Semaphore(concurrency) if concurrency else None

            async def one_open(i: int) -> None:
                if slots is None:
                    await send(i)
                else:
                    async with slots:
                        await send(i)

            async def scheduler() -> None:
                tasks = []
                for i, off in enumerate(offsets):
                    delay = t_point + off - time.perf_counter()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    tasks.append(asyncio.ensure_future(one_open(i)))
                try:
                    await asyncio.gather(*tasks)
                finally:
                    for t in tasks:
                        t.cancel()

            main = asyncio.ensure_future(scheduler())
        try:
            await asyncio.wait_for(main, point_timeout_s)
        except asyncio.TimeoutError:
            timed_out = True
    now = time.perf_counter() - t_point
    for rec in records:
        if not rec.sent:
            rec.error = f"not sent: point timeout after {point_timeout_s:g} s"
        elif rec.error is None and not rec.ok:
            rec.error = f"cancelled: point timeout after {point_timeout_s:g} s"
            rec.end_s = rec.end_s if rec.end_s is not None else now
    sent = [r for r in records if r.sent and r.start_s is not None]
    duration = (max(r.end_s for r in sent) - min(r.start_s for r in sent)) if sent else 0.0
    return PointRun(records=records, wall_start=wall_start, duration_s=duration, timed_out=timed_out)


async def wait_for_model(base_url: str, model: str, timeout_s: float = 60.0) -> None:
    """Poll `GET /v1/models` until `model` is listed (the frontend learns of workers asynchronously)."""
    base = check_base_url(base_url)
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    async with aiohttp.ClientSession(trust_env=False, timeout=aiohttp.ClientTimeout(total=5)) as session:
        while True:
            try:
                async with session.get(f"{base}/v1/models", allow_redirects=False) as resp:
                    if resp.status == 200:
                        data = await resp.json(content_type=None)
                        names = [m.get("id") for m in (data or {}).get("data", [])]
                        if model in names:
                            return
                        last = f"models listed: {names}"
                    else:
                        last = f"http {resp.status}"
            except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as e:
                last = f"{e.__class__.__name__}"
            if time.monotonic() > deadline:
                raise UserError(f"{base}/v1/models did not list model {model!r} within {timeout_s:g} s ({last})")
            await asyncio.sleep(0.2)
