"""The worker's request path without a Dynamo runtime (for `dynamo-dwdp bench host`).

`worker_stream(args)` wraps a running `AsyncEngine` in a `DwdpWorkerEngine` (agg role) and returns
(setup, stream): `setup(ae)` hooks the worker's after-step callback onto the engine, and
`stream(ae, rid, request, point)` is the worker's own `generate` async generator for a Dynamo request
dict, with a minimal context (an id; never stopped). Everything the worker does per chunk runs
(request translation, metrics, chunk dicts); the frontend and Dynamo's Rust bridge do not.
"""
from __future__ import annotations

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
