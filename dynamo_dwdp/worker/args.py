"""Worker arguments: the argparse generated from `worker/flags.py` (the same table the launcher and
the k8s renderer build the argv from), parsed into one `WorkerArgs` holding the settings objects
(`GroupSpec`, `EngineSettings`, `DwdpSettings`) that are passed whole to the rank assembly.

Runtime wiring comes from Dynamo's usual environment: DYN_DISCOVERY_BACKEND (default file),
DYN_REQUEST_PLANE (tcp), DYN_EVENT_PLANE (zmq for file/mem discovery, nats otherwise), NATS_SERVER
(enables DWDP group events), DYN_SYSTEM_PORT (health/metrics).
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

from dynamo_dwdp.config.engine import EngineSettings
from dynamo_dwdp.config.dwdp import DwdpSettings
from dynamo_dwdp.group.context import GroupSpec
from dynamo_dwdp.worker.flags import WORKER_ENV_FLAGS, WORKER_FLAGS, section_values

EPILOG = """\
examples (normally started by `dynamo-dwdp serve` or a DynamoGraphDeployment):
  python -m dynamo_dwdp --model-path models/tiny --served-model-name tiny --disaggregation-mode agg
  python -m dynamo_dwdp.group --ranks 2 -- python -m dynamo_dwdp --model-path models/tiny \\
      --served-model-name tiny --disaggregation-mode decode --strategy dwdp --group-size 2 \\
      --group-name demo-decode-g0 --rendezvous tcp://127.0.0.1:29500 --component decode
"""


@dataclass
class WorkerArgs:
    model_path: str
    served_model_name: str
    mode: str
    group: GroupSpec
    engine: EngineSettings
    dwdp: DwdpSettings
    kv_transfer: str
    namespace: str
    component: str
    discovery_backend: str
    request_plane: str
    event_plane: str | None
    nats_url: str | None
    kv_hold_timeout: float
    expert_skew: tuple[list[int], float] | None = None   # benchmark only ($DWDP_EXPERT_SKEW, set by `ab`)


def build_parser() -> argparse.ArgumentParser:
    """Generated from `worker/flags.py` (WORKER_FLAGS + WORKER_ENV_FLAGS): nothing is declared twice."""
    p = argparse.ArgumentParser(prog="python -m dynamo_dwdp", description="dynamo-dwdp worker: one rank of one pool.",
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in WORKER_FLAGS + WORKER_ENV_FLAGS:
        p.add_argument(f.flag, **f.argparse_kwargs())
    return p


def parse_worker_args(argv: list[str] | None = None) -> WorkerArgs:
    a = build_parser().parse_args(argv)
    rank = a.group_rank if a.group_rank is not None else int(os.environ.get("DWDP_GROUP_RANK", "0"))
    discovery = os.environ.get("DYN_DISCOVERY_BACKEND", "file")
    event_plane = os.environ.get("DYN_EVENT_PLANE") or ("zmq" if discovery in ("file", "mem") else "nats")
    group = GroupSpec(strategy=a.strategy, size=a.group_size, rank=rank, name=a.group_name, rendezvous=a.rendezvous,
                      liveness_timeout=a.liveness_timeout, collectives=a.collectives).validate()
    engine = EngineSettings(**section_values(a, "engine")).validate()
    dwdp = DwdpSettings(**section_values(a, "dwdp"))
    skew = os.environ.get("DWDP_EXPERT_SKEW")      # benchmark knob of the A/B harness: "e1,e2,...:bias"
    expert_skew = None
    if skew:
        hot, _, bias = skew.partition(":")
        expert_skew = ([int(e) for e in hot.split(",") if e.strip()], float(bias or 0.0))
    component = a.component or ("prefill" if a.disaggregation_mode == "prefill" else "backend")
    return WorkerArgs(
        model_path=a.model_path, served_model_name=a.served_model_name or os.path.basename(a.model_path.rstrip("/")),
        mode=a.disaggregation_mode, group=group, engine=engine, dwdp=dwdp, kv_transfer=a.kv_transfer,
        namespace=a.namespace, component=component, discovery_backend=discovery,
        request_plane=os.environ.get("DYN_REQUEST_PLANE", "tcp"), event_plane=event_plane,
        nats_url=os.environ.get("NATS_SERVER") if discovery == "etcd" else None, kv_hold_timeout=a.kv_hold_timeout,
        expert_skew=expert_skew,
    )
