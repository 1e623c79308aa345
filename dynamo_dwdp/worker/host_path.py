"""The worker's request path for `dynamo-dwdp bench host`: without a Dynamo runtime (`worker_stream`),
and Dynamo's request plane alone (`dynamo_chunk_seconds`), optionally beside a thread that holds the
GIL as an engine thread does (`engine_busy_ms`: Python work, then `time.sleep(0)`, over and over) under
the worker's switch interval: what the engine's Python work costs the chunks it streams.

`worker_stream(args)` wraps a running `AsyncEngine` in a `DwdpWorkerEngine` (agg role) and returns
(setup, stream): `setup(ae)` hooks the worker's after-step callback onto the engine, and
`stream(ae, rid, request, point)` is the worker's own `generate` async generator for a Dynamo request
dict, with a minimal context (an id; never stopped). Everything the worker does per chunk runs
(request translation, metrics, chunk dicts); the frontend and Dynamo's Rust bridge do not.
"""
from __future__ import annotations

import asyncio
import time

from dynamo_dwdp.worker.args import parse_worker_args
from dynamo_dwdp.worker.backend import DwdpWorkerEngine


class _Context:
    def __init__(self, rid: str):
        self._rid = rid

    def id(self) -> str:
        return self._rid

    def is_stopped(self) -> bool:
        return False


def worker_stream(model_name: str = "host-bench"):
    worker = DwdpWorkerEngine(parse_worker_args(["--model-path", model_name]))

    def setup(ae) -> None:
        worker.rank_engine, worker.ae = ae.re, ae
        ae.on_step.append(worker._after_step)

    def stream(ae, rid: str, request: dict, point):
        return worker.generate(request, _Context(rid))

    return setup, stream


async def _echo(request: dict, context):
    if request.get("cpu"):                      # the serving process's CPU seconds (all its threads)
        yield {"cpu": time.process_time()}
        return
    for i in range(request["n"]):
        yield {"token_ids": [i], "index": 0}


def _hold_the_gil(busy_s: float) -> None:
    """An engine thread's GIL use: busy_s of Python work, a hand-over (sleep 0), again, forever."""
    while True:
        t = time.perf_counter()
        n = 0
        while time.perf_counter() - t < busy_s:
            n += sum(range(50))
        time.sleep(0)


def serve_echo(engine_busy_ms: float = 0.0, switch_interval_s: float | None = None) -> None:
    """The echo endpoint in its own process (file discovery under $DYN_FILE_KV, TCP request plane);
    with engine_busy_ms > 0 a daemon thread holds the GIL like an engine thread (`_hold_the_gil`)."""
    import sys
    import threading

    from dynamo._core import DistributedRuntime  # local import: Dynamo's runtime only where measured

    if switch_interval_s is not None:
        sys.setswitchinterval(switch_interval_s)
    if engine_busy_ms > 0:
        threading.Thread(target=_hold_the_gil, args=(engine_busy_ms / 1e3,), daemon=True).start()

    async def main() -> None:
        runtime = DistributedRuntime(asyncio.get_running_loop(), "file", "tcp")
        await runtime.endpoint(ECHO_ENDPOINT).serve_endpoint(_echo)

    asyncio.run(main())


ECHO_ENDPOINT = "hostbench.echo.generate"


def echo_argv(engine_busy_ms: float = 0.0, switch_interval_s: float | None = None) -> list[str]:
    """The echo child's arguments (`python -m dynamo_dwdp.worker.host_path ...`); `parse_echo_argv` reads them."""
    return ["--serve-echo", repr(float(engine_busy_ms)), "" if switch_interval_s is None else repr(switch_interval_s)]


def parse_echo_argv(argv: list[str]) -> tuple[float, float | None]:
    busy, switch = (argv[1:3] + ["0", ""])[:2]
    return float(busy), float(switch) if switch else None


def dynamo_chunk_seconds(streams: int, chunks: int, engine_busy_ms: float = 0.0,
                         switch_interval_s: float | None = None) -> tuple[float, float]:
    """Dynamo's request plane alone: an echo endpoint in a child process (file discovery in a fresh
    folder, TCP request plane) streams `streams` x `chunks` one-token chunks to a client here.
    Returns (wall seconds, the serving process's CPU seconds) that the chunks add to a wave of
    `streams` streams: a wave of chunks + 1 less a wave of 1, so per-stream set-up is left out.
    `engine_busy_ms`, `switch_interval_s`: the serving process's engine-like thread and switch
    interval (`serve_echo`)."""
    import os
    import subprocess
    import sys
    import tempfile

    from dynamo._core import DistributedRuntime  # local import: Dynamo's runtime only where measured

    with tempfile.TemporaryDirectory(prefix="hostbench-kv-") as kv:
        env = {**os.environ, "DYN_FILE_KV": kv, "DYN_DISCOVERY_BACKEND": "file", "DYN_LOG": "error"}
        server = subprocess.Popen([sys.executable, "-m", "dynamo_dwdp.worker.host_path",
                                   *echo_argv(engine_busy_ms, switch_interval_s)], env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        old = os.environ.get("DYN_FILE_KV")
        os.environ["DYN_FILE_KV"] = kv
        try:
            return asyncio.run(_measure(DistributedRuntime, streams, chunks))
        finally:
            if old is None:
                os.environ.pop("DYN_FILE_KV", None)
            else:
                os.environ["DYN_FILE_KV"] = old
            server.terminate()
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()


async def _measure(runtime_cls, streams: int, chunks: int) -> tuple[float, float]:
    runtime = runtime_cls(asyncio.get_running_loop(), "file", "tcp")
    try:
        client = await runtime.endpoint(ECHO_ENDPOINT).client()
        await asyncio.wait_for(client.wait_for_instances(), 60)

        async def one(n: int) -> int:
            return sum([1 async for _ in await client.round_robin({"n": n})])

        async def cpu() -> float:
            return [item.data() async for item in await client.round_robin({"cpu": True})][0]["cpu"]

        async def wave(n: int) -> tuple[float, float]:
            c0, t0 = await cpu(), time.perf_counter()
            got = await asyncio.gather(*(one(n) for _ in range(streams)))
            t1 = time.perf_counter()
            if sum(got) != streams * n:
                raise RuntimeError(f"echo streams returned {sum(got)} chunks, expected {streams * n}")
            return t1 - t0, await cpu() - c0

        await wave(2)                                           # connections up
        (w_all, c_all), (w_one, c_one) = await wave(chunks + 1), await wave(1)
        return max(0.0, w_all - w_one), max(0.0, c_all - c_one)
    finally:
        runtime.shutdown()


if __name__ == "__main__":
    import sys

    if sys.argv[1:2] == ["--serve-echo"]:
        serve_echo(*parse_echo_argv(sys.argv[1:]))
