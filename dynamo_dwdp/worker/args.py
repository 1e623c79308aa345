"""Worker flags. The launcher and the k8s renderer build them from `launch/command_lines.py`
(WORKER_FLAGS); a test checks that every flag built there parses here.

Runtime wiring comes from Dynamo's usual environment: DYN_DISCOVERY_BACKEND (default file),
DYN_REQUEST_PLANE (tcp), DYN_EVENT_PLANE (zmq for file/mem discovery, nats otherwise), NATS_SERVER
(enables DWDP group events), DYN_SYSTEM_PORT (health/metrics).
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

from dynamo_dwdp.engine.config import EngineConfig
from dynamo_dwdp.rank.build import DWDPOptions
from dynamo_dwdp.group.context import STRATEGIES, GroupSpec

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
    engine: EngineConfig
    dwdp: DWDPOptions
    kv_transfer: str
    namespace: str
    component: str
    discovery_backend: str
    request_plane: str
    event_plane: str | None
    nats_url: str | None
    kv_hold_timeout: float


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dynamo_dwdp", description="dynamo-dwdp worker: one rank of one pool.",
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-path", required=True)
    p.add_argument("--served-model-name", default=None)
    p.add_argument("--disaggregation-mode", default="agg", choices=["agg", "prefill", "decode"])
    p.add_argument("--strategy", default="single", choices=list(STRATEGIES))
    p.add_argument("--group-size", type=int, default=1)
    p.add_argument("--group-rank", type=int, default=None, help="default: $DWDP_GROUP_RANK or 0")
    p.add_argument("--group-name", default="g0")
    p.add_argument("--rendezvous", default=None, help="tcp://HOST:PORT | etcd://HOST:PORT | file:///PATH")
    p.add_argument("--namespace", default=os.environ.get("DYN_NAMESPACE", "dynamo"))
    p.add_argument("--component", default=None, help="Dynamo component (default: backend, or prefill)")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--num-kv-blocks", type=int, default=512)
    p.add_argument("--max-num-seqs", type=int, default=32)
    p.add_argument("--max-num-batched-tokens", type=int, default=512)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--dwdp-experts-per-rank", type=int, default=None)
    p.add_argument("--dwdp-prefetch-per-peer", type=int, default=None)
    p.add_argument("--dwdp-contention-opt", action="store_true")
    p.add_argument("--dwdp-routed-only", action="store_true")
    p.add_argument("--dwdp-transport", default="auto", choices=["auto", "shm", "cuda_ipc"])
    p.add_argument("--kv-transfer", default="nixl", choices=["nixl", "none"])
    p.add_argument("--kv-hold-timeout", type=float, default=float(os.environ.get("DWDP_KV_HOLD_TIMEOUT", 60.0)),
                   help="prefill: seconds to keep a request's KV blocks for the decode read "
                        "(default: $DWDP_KV_HOLD_TIMEOUT or 60)")
    p.add_argument("--cuda-graphs", action="store_true")
    p.add_argument("--liveness-timeout", type=float, default=float(os.environ.get("DWDP_LIVENESS_TIMEOUT", 5.0)))
    return p


def parse_worker_args(argv: list[str] | None = None) -> WorkerArgs:
    a = build_parser().parse_args(argv)
    rank = a.group_rank if a.group_rank is not None else int(os.environ.get("DWDP_GROUP_RANK", "0"))
    discovery = os.environ.get("DYN_DISCOVERY_BACKEND", "file")
    event_plane = os.environ.get("DYN_EVENT_PLANE") or ("zmq" if discovery in ("file", "mem") else "nats")
    group = GroupSpec(strategy=a.strategy, size=a.group_size, rank=rank, name=a.group_name, rendezvous=a.rendezvous,
                      liveness_timeout=a.liveness_timeout).validate()
    engine = EngineConfig(block_size=a.block_size, num_kv_blocks=a.num_kv_blocks, max_num_seqs=a.max_num_seqs,
                          max_num_batched_tokens=a.max_num_batched_tokens, max_model_len=a.max_model_len,
                          device=a.device, dtype=a.dtype, cuda_graphs=a.cuda_graphs).validate()
    dwdp = DWDPOptions(a.dwdp_experts_per_rank, a.dwdp_prefetch_per_peer, a.dwdp_contention_opt,
                       a.dwdp_routed_only, a.dwdp_transport)
    component = a.component or ("prefill" if a.disaggregation_mode == "prefill" else "backend")
    return WorkerArgs(
        model_path=a.model_path, served_model_name=a.served_model_name or os.path.basename(a.model_path.rstrip("/")),
        mode=a.disaggregation_mode, group=group, engine=engine, dwdp=dwdp, kv_transfer=a.kv_transfer,
        namespace=a.namespace, component=component, discovery_backend=discovery,
        request_plane=os.environ.get("DYN_REQUEST_PLANE", "tcp"), event_plane=event_plane,
        nats_url=os.environ.get("NATS_SERVER") if discovery == "etcd" else None, kv_hold_timeout=a.kv_hold_timeout,
    )
