"""The exact command lines of every process of a graph, built in ONE place.

Both the local launcher (`dynamo-dwdp serve`) and the Kubernetes renderer (`dynamo-dwdp k8s render`)
call these pure functions, so a pod and a local process of the same pool always run the same argv.

| process | function | argv |
|---|---|---|
| frontend | `frontend_argv` | `python -m dynamo.frontend --http-port P --router-mode M [--migration-limit N] --discovery-backend B --namespace NS` |
| native rank | `worker_argv` | `python -m dynamo_dwdp` + the flags of `WORKER_FLAGS` |
| group of ranks in one pod | `group_argv` | `python -m dynamo_dwdp.group --ranks N -- <worker argv without --group-rank>` |
| trtllm pool | `trtllm_argv` | `python3 -m dynamo.trtllm --model ... --served-model-name ... --disaggregation-mode prefill|decode --extra-engine-args /config/<pool>.yaml` |
| model creation | `make_model_argv` | `python -m dynamo_dwdp.cli make-model DIR --preset P --seed S --dtype fp32|bf16` |

`worker_env(settings)` gives the environment every native rank needs on top (threads, UCX).
"""
from __future__ import annotations

import sys
from typing import Any, Callable

from dynamo_dwdp.config.graph import Graph, Pool
from dynamo_dwdp.config.settings import Settings
from dynamo_dwdp.worker.flags import WORKER_FLAGS, WorkerFlag

DISCOVERY_BACKENDS = {"embedded": "file", "etcd": "etcd"}
"""`infra.mode` -> `--discovery-backend` of the frontend (workers get `DYN_DISCOVERY_BACKEND`)."""

MAKE_MODEL_DTYPES = {"float32": "fp32", "bfloat16": "bf16"}
"""`model.make.dtype` -> the `--dtype` spelling of `dynamo-dwdp make-model`."""


def _python(python: str | None) -> str:
    return python or sys.executable or "python3"


def _lookup(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def _emit(flags: tuple[WorkerFlag, ...], value_of: Callable[[WorkerFlag], Any], strategy: str) -> list[str]:
    argv: list[str] = []
    for f in flags:
        if f.only is not None and f.only != strategy:
            continue
        value = value_of(f)
        if f.kind == "switch":
            if value:
                argv.append(f.flag)
        elif f.kind == "optional" and value is None:
            continue
        else:
            if value is None:
                raise ValueError(f"worker flag {f.flag} has no value (source {f.source})")
            argv += [f.flag, str(value)]
    return argv


def frontend_argv(graph: Graph, settings: Settings, http_port: int, *, discovery: str | None = None,
                  python: str | None = None) -> list[str]:
    """`python -m dynamo.frontend ...` for this graph.

    `discovery` is the `--discovery-backend` (kubernetes | etcd | file | mem); default from
    `settings.infra.mode` (embedded -> file, etcd -> etcd). `settings.frontend.extra_args` go last.
    """
    backend = discovery or DISCOVERY_BACKENDS[settings.infra.mode]
    argv = [_python(python), "-m", "dynamo.frontend", "--http-port", str(int(http_port)),
            "--router-mode", graph.frontend.router_mode]
    if graph.frontend.migration_limit:
        argv += ["--migration-limit", str(graph.frontend.migration_limit)]
    argv += ["--discovery-backend", backend, "--namespace", settings.infra.namespace]
    return argv + list(settings.frontend.extra_args)


def worker_argv(graph: Graph, pool: Pool, settings: Settings, *, group_index: int | str, rank: int | None,
                rendezvous: str, python: str | None = None) -> list[str]:
    """`python -m dynamo_dwdp ...` for rank `rank` of group `group_index` of a native pool.

    The pool's `overrides` are applied here (callers pass the graph-wide settings). `rank=None`
    leaves `--group-rank` out, for `group_argv` (the supervisor appends it per rank).
    `rendezvous` is where the ranks of the group meet: `tcp://HOST:PORT` (rank 0 hosts a store),
    `etcd://HOST:PORT` or `file:///path`.
    """
    if pool.engine != "native":
        raise ValueError(f"pool {pool.name!r} has engine {pool.engine!r}: use trtllm_argv")
    if rank is not None and not 0 <= rank < pool.ranks:
        raise ValueError(f"rank {rank} out of range for pool {pool.name!r} of {pool.ranks} ranks")
    eff = settings.for_pool(pool)
    call = {
        "model_path": eff.model.path,
        "served_model_name": eff.model.name,
        "group_name": pool.group_name(graph.name, group_index),
        "rank": rank,
        "rendezvous": rendezvous,
        "kv_transfer": "none" if pool.role == "agg" else eff.kv_transfer.backend,
    }

    def value_of(f: WorkerFlag) -> Any:
        kind, _, key = f.source.partition(":")
        if kind == "call":
            return call[key]
        if kind == "pool":
            return getattr(pool, key)
        return _lookup(eff, key)

    return [_python(python), "-m", "dynamo_dwdp"] + _emit(WORKER_FLAGS, value_of, pool.strategy)


def group_argv(ranks: int, worker_argv_without_rank: list[str], *, python: str | None = None) -> list[str]:
    """`python -m dynamo_dwdp.group --ranks N -- <worker argv>`: the per-pod rank supervisor.

    Contract of the supervisor (dynamo_dwdp/group/supervisor.py): it starts N copies of the worker argv after
    `--` (a full command, starting with the python executable), appending `--group-rank r`; rank r
    gets `DYN_SYSTEM_PORT = $DYN_SYSTEM_PORT + r` when that is set; SIGTERM is forwarded to every
    rank; when any rank exits the others are stopped and the whole group is started again (bounded
    back-off, new rendezvous generation); a start-up error or `--max-restarts` used up makes the
    supervisor exit non-zero, so the pod restarts as one group.
    """
    if "--group-rank" in worker_argv_without_rank:
        raise ValueError("group_argv takes the worker argv without --group-rank (worker_argv(..., rank=None))")
    if ranks < 1:
        raise ValueError(f"ranks must be >= 1, got {ranks}")
    return [_python(python), "-m", "dynamo_dwdp.group", "--ranks", str(int(ranks)), "--",
            *worker_argv_without_rank]


def trtllm_argv(pool: Pool, settings: Settings, *, namespace: str | None = None, python: str = "python3",
                config_dir: str = "/config") -> list[str]:
    """Stock `python3 -m dynamo.trtllm ...` for a trtllm pool (its engine YAML is mounted at config_dir).

    `--model` is dynamo.trtllm 1.6.1's canonical flag (`--model-path` is its obsolete alias; see
    dynamo/trtllm/backend_args.py). `namespace` adds `--namespace` (a DynamoRuntimeConfig flag).
    """
    if pool.engine != "trtllm" or pool.role not in ("prefill", "decode"):
        raise ValueError(f"pool {pool.name!r} is not a trtllm prefill/decode pool")
    model_path = settings.model.path
    argv = [python, "-m", "dynamo.trtllm", "--model", model_path, "--served-model-name", settings.model.name,
            "--disaggregation-mode", pool.role, "--extra-engine-args", f"{config_dir.rstrip('/')}/{pool.name}.yaml"]
    if namespace:
        argv += ["--namespace", namespace]
    return argv


def make_model_argv(settings: Settings, *, path: str | None = None, python: str | None = None,
                    force: bool = False) -> list[str]:
    """`python -m dynamo_dwdp.cli make-model DIR --preset P --seed S --dtype D [--force]` (needs `model.make`).

    `force` overwrites a partly written directory (e.g. an init container that was restarted).
    """
    make = settings.model.make
    if make is None:
        raise ValueError("settings.model.make is null: the model must already exist")
    argv = [_python(python), "-m", "dynamo_dwdp.cli", "make-model", path or settings.model.path,
            "--preset", make.preset, "--seed", str(make.seed), "--dtype", MAKE_MODEL_DTYPES[make.dtype]]
    return argv + ["--force"] if force else argv


def worker_env(settings: Settings, pool: Pool | None = None) -> dict[str, str]:
    """Environment of a native rank on top of Dynamo's own: CPU threads and NIXL/UCX transports."""
    if pool is not None:
        settings = settings.for_pool(pool)
    env: dict[str, str] = {}
    if settings.engine.torch_threads:
        env["OMP_NUM_THREADS"] = str(settings.engine.torch_threads)
        env["DWDP_TORCH_THREADS"] = str(settings.engine.torch_threads)  # read by dynamo_dwdp/worker/main.py
    if settings.kv_transfer.ucx_tls:
        env["UCX_TLS"] = settings.kv_transfer.ucx_tls
    if settings.kv_transfer.ucx_net_devices:
        env["UCX_NET_DEVICES"] = settings.kv_transfer.ucx_net_devices
    return env
