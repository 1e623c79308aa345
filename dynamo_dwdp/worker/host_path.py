"""The worker's request path for `dynamo-dwdp bench host`: without a Dynamo runtime (`worker_stream`),
and Dynamo's request plane alone (`dynamo_chunk_seconds`).

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
    for i in range(request["n"]):
        yield {"token_ids": [i], "index": 0}


def dynamo_chunk_seconds(streams: int, chunks: int) -> float:
    """Seconds that `streams` x `chunks` one-token chunks add to a wave of `streams` streams through
    Dynamo's runtime (an echo endpoint served and called in this process: in-memory discovery, TCP
    request plane): a wave of chunks + 1 less a wave of 1, so the per-stream set-up is left out."""
    from dynamo._core import DistributedRuntime  # local import: Dynamo's runtime only where measured

    async def main() -> float:
        runtime = DistributedRuntime(asyncio.get_running_loop(), "mem", "tcp")
        endpoint = runtime.endpoint("hostbench.echo.generate")
        serving = asyncio.ensure_future(endpoint.serve_endpoint(_echo))
        try:
            client = await endpoint.client()
            await client.wait_for_instances()

            async def one(n: int) -> int:
                return sum([1 async for _ in await client.round_robin({"n": n})])

            async def wave(n: int) -> float:
                t0 = time.perf_counter()
                got = await asyncio.gather(*(one(n) for _ in range(streams)))
                if sum(got) != streams * n:
                    raise RuntimeError(f"echo streams returned {sum(got)} chunks, expected {streams * n}")
                return time.perf_counter() - t0

            await wave(2)                                   # connections up
            return max(0.0, await wave(chunks + 1) - await wave(1))    # less the per-stream set-up
        finally:
            runtime.shutdown()
            serving.cancel()

    return asyncio.run(main())
