"""Entry point of `python -m dynamo_dwdp`.

TP followers (rank > 0 of a tp group) run no Dynamo endpoint: they join the group, load their
shards and mirror rank 0's steps until it stops (or dies). Everyone else runs the unified backend
`Worker`, which owns registration, SIGTERM, drain and cleanup.
"""
from __future__ import annotations

import logging
import os
import sys

from dynamo_dwdp.errors import PeerError, UserError
from dynamo_dwdp.strategies import get_strategy


SWITCH_INTERVAL_S = 0.0005


def _configure() -> None:
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    threads = int(os.environ.get("DWDP_TORCH_THREADS", os.environ.get("OMP_NUM_THREADS", "1")))
    import torch

    torch.set_num_threads(max(1, threads))
    # The engine thread, the asyncio thread and Dynamo's runtime threads share the GIL: hand it over
    # often, so tokens stream as they are produced instead of in bursts (Python's default switch
    # interval is 5 ms; `dynamo-dwdp bench host --levels dynamo --engine-busy-ms 2` measures the effect).
    sys.setswitchinterval(SWITCH_INTERVAL_S)


def _run_tp_follower(args) -> int:
    from dynamo_dwdp.rank.build import build_rank_engine  # local import: torch loads after _configure() set its threads

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    re = build_rank_engine(args.model_path, args.engine, args.group, args.dwdp, args.nats_url, args.expert_skew)
    logging.getLogger(__name__).info("tp follower rank %d of %s ready", args.group.rank, args.group.name)
    try:
        re.follow()
    except PeerError as exc:
        logging.getLogger(__name__).error("tp follower: leader gone: %s", exc)
        return 1
    finally:
        re.runner.close()
        re.group.close(drain_timeout=2.0)
    return 0


def main(argv: list[str] | None = None) -> None:
    _configure()
    from dynamo_dwdp.worker.args import parse_worker_args  # local import: after _configure(), like everything below

    argv = sys.argv[1:] if argv is None else argv
    try:
        args = parse_worker_args(argv)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    if get_strategy(args.group.strategy).leader_only and args.group.rank != 0:
        sys.exit(_run_tp_follower(args))
    from dynamo.common.backend.run import run

    from dynamo_dwdp.worker.backend import DwdpWorkerEngine  # local import: TP followers never load Dynamo's backend SDK

    run(DwdpWorkerEngine, argv)
    # The Worker has drained, unregistered and run cleanup() (engine stopped, group left, KV and shards
    # freed). Interpreter finalisation after that only waits on the runtime's leftover tasks ("tasks
    # still running at interpreter exit"), seconds that every shutdown and group restart would pay.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
