"""The worker's flags (`python -m dynamo_dwdp`), declared once.

The launcher and the Kubernetes renderer build every worker's argv from `WORKER_FLAGS`
(`launch/command_lines.py`); the worker's argparse is generated from the same table
(`worker/args.py`). A flag whose value is a setting (`settings:engine.block_size`) takes its type,
default, allowed values and help from that settings field (`config/engine.py`, `config/dwdp.py`),
so a new engine or DWDP setting is added in one place: its field, plus one line here.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from typing import Any, Iterable

from dynamo_dwdp.config import schema
from dynamo_dwdp.config.graph import ROLES
from dynamo_dwdp.config.settings import KV_BACKENDS, Settings
from dynamo_dwdp.strategies import NAMES as STRATEGY_NAMES

_FROM_SETTINGS = object()


@dataclass(frozen=True)
class WorkerFlag:
    """One flag of the native worker.

    `source` is where the launcher takes the value from: `settings:<dotted.key>` (the pool's effective
    settings), `pool:<attribute>`, or `call:<name>` (an argument of `worker_argv`: model_path,
    group_name, rank, rendezvous, kv_transfer); `env:<VAR>` flags are never emitted (the worker reads
    their default from that variable). `kind`: `value` (always `--flag VALUE`), `optional` (left out
    when the value is null), `switch` (bare `--flag` when true). `only` restricts a flag to pools of
    one strategy. `type`, `default`, `choices`, `required` and `doc` describe the flag to argparse;
    for `settings:` flags they default to the settings field's own.
    """

    flag: str
    source: str
    kind: str = "value"
    only: str | None = None
    doc: str = ""
    type: Any = _FROM_SETTINGS
    default: Any = _FROM_SETTINGS
    choices: Any = _FROM_SETTINGS
    required: bool = False
    env: str | None = None          # read the default from this variable when set (at parser build time)

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")

    @property
    def settings_key(self) -> str | None:
        """`engine.block_size` for a `settings:` flag, else None."""
        kind, _, key = self.source.partition(":")
        return key if kind == "settings" else None

    def argparse_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of `ArgumentParser.add_argument` for this flag."""
        tp, default, choices, doc = None, None, (), self.doc
        if self.settings_key:
            tp, spec, default = _settings_field(self.settings_key)
            choices, doc = spec.choices, self.doc or spec.doc
        if self.type is not _FROM_SETTINGS:
            tp = self.type
        if self.default is not _FROM_SETTINGS:
            default = self.default
        env = self.env or (self.source[4:] if self.source.startswith("env:") else None)
        if env and os.environ.get(env):
            default = (tp or str)(os.environ[env])
        if self.choices is not _FROM_SETTINGS:
            choices = self.choices
        if self.kind == "switch":
            return {"action": "store_true", "help": doc or None}
        out: dict[str, Any] = {"default": default, "help": doc or None}
        if self.required:
            out = {"required": True, "help": doc or None}
        if tp not in (None, str):
            out["type"] = tp
        if choices:
            out["choices"] = list(choices)
        return out


def _settings_field(dotted: str) -> tuple[Any, schema.Spec, Any]:
    """(python type, Spec, default) of a settings field such as `engine.block_size`."""
    cls: Any = Settings
    *sections, name = dotted.split(".")
    for section in sections:
        cls = schema.fields_of(cls)[section][0]
    tp, spec, field = schema.fields_of(cls)[name]
    tp, _nullable = schema._split_optional(tp)
    default = field.default_factory() if callable(field.default_factory) else field.default
    return tp, spec, default


WORKER_FLAGS: tuple[WorkerFlag, ...] = (
    WorkerFlag("--model-path", "call:model_path", required=True, doc="model directory (settings model.path)"),
    WorkerFlag("--served-model-name", "call:served_model_name", default=None,
               doc="model name clients send (default: the model directory's name)"),
    WorkerFlag("--disaggregation-mode", "pool:role", default="agg", choices=ROLES, doc="agg | prefill | decode"),
    WorkerFlag("--strategy", "pool:strategy", default="single", choices=STRATEGY_NAMES,
               doc="how the group splits the model (dynamo_dwdp/strategies.py)"),
    WorkerFlag("--group-size", "pool:ranks", type=int, default=1, doc="ranks in this group"),
    WorkerFlag("--group-rank", "call:rank", kind="optional", type=int, default=None,
               doc="this rank (default: $DWDP_GROUP_RANK or 0; left out for dynamo_dwdp.group)"),
    WorkerFlag("--group-name", "call:group_name", default="g0", doc="<graph>-<pool>-g<index>"),
    WorkerFlag("--rendezvous", "call:rendezvous", default=None,
               doc="tcp://HOST:PORT | etcd://HOST:PORT | file:///PATH"),
    WorkerFlag("--namespace", "settings:infra.namespace", default="dynamo", env="DYN_NAMESPACE",
               doc="Dynamo namespace (default: $DYN_NAMESPACE or dynamo)"),
    WorkerFlag("--component", "pool:name", default=None,
               doc="Dynamo component (= pool name; default: backend, or prefill)"),
    WorkerFlag("--block-size", "settings:engine.block_size"),
    WorkerFlag("--num-kv-blocks", "settings:engine.num_kv_blocks"),
    WorkerFlag("--max-num-seqs", "settings:engine.max_num_seqs"),
    WorkerFlag("--max-num-batched-tokens", "settings:engine.max_num_batched_tokens"),
    WorkerFlag("--max-model-len", "settings:engine.max_model_len", kind="optional"),
    WorkerFlag("--device", "settings:engine.device"),
    WorkerFlag("--dtype", "settings:engine.dtype"),
    WorkerFlag("--dwdp-experts-per-rank", "settings:dwdp.experts_per_rank", kind="optional", only="dwdp"),
    WorkerFlag("--dwdp-prefetch-per-peer", "settings:dwdp.prefetch_per_peer", kind="optional", only="dwdp"),
    WorkerFlag("--dwdp-contention-opt", "settings:dwdp.contention_opt", kind="switch", only="dwdp"),
    WorkerFlag("--dwdp-routed-only", "settings:dwdp.routed_only", kind="switch", only="dwdp"),
    WorkerFlag("--dwdp-transport", "settings:dwdp.transport", only="dwdp"),
    WorkerFlag("--kv-transfer", "call:kv_transfer", default="nixl", choices=KV_BACKENDS,
               doc="nixl | local (same host: CUDA IPC / shared memory) | none (always none for an agg pool)"),
    WorkerFlag("--cuda-graphs", "settings:engine.cuda_graphs", kind="switch"),
    WorkerFlag("--separate-prefill-steps", "settings:engine.separate_prefill_steps", kind="switch"),
    WorkerFlag("--async-scheduling", "settings:engine.async_scheduling", kind="switch"),
    WorkerFlag("--stream-interval", "settings:engine.stream_interval"),
    WorkerFlag("--weight-format", "settings:engine.weight_format"),
)
"""Every flag the launcher emits, in argv order (the worker's argparse is generated from these)."""

WORKER_ENV_FLAGS: tuple[WorkerFlag, ...] = (
    WorkerFlag("--kv-hold-timeout", "env:DWDP_KV_HOLD_TIMEOUT", type=float,
               default=60.0,
               doc="prefill: seconds to keep a request's KV blocks for the decode read "
                   "(default: $DWDP_KV_HOLD_TIMEOUT or 60)"),
    WorkerFlag("--liveness-timeout", "env:DWDP_LIVENESS_TIMEOUT", type=float,
               default=5.0,
               doc="seconds of heartbeat silence before a group peer is declared down "
                   "(default: $DWDP_LIVENESS_TIMEOUT or 5)"),
    WorkerFlag("--collectives", "env:DWDP_COLLECTIVES", default="auto", choices=("auto", "library", "peer"),
               doc="dep/tp: peer = the peer-memory collectives (CUDA IPC; shared memory on CPU), capturable; "
                   "library = gloo/NCCL only; auto = peer on CUDA (default: $DWDP_COLLECTIVES or auto)"),
)
"""Worker flags the launcher never emits: their defaults come from the environment it sets."""

for _f in WORKER_FLAGS:
    if _f.only is not None and _f.only not in STRATEGY_NAMES:
        raise RuntimeError(f"worker flag {_f.flag}: only={_f.only!r} is not a strategy")


def add_setting_flags(parser: argparse.ArgumentParser, flags: Iterable[str]) -> None:
    """Add the named worker flags to another command's parser (`generate`): same type, default and help."""
    by_flag = {f.flag: f for f in WORKER_FLAGS}
    for name in flags:
        parser.add_argument(name, **by_flag[name].argparse_kwargs())


def section_values(args: argparse.Namespace, section: str) -> dict[str, Any]:
    """The parsed values of the `settings:<section>.*` flags present in `args`, by settings field name:
    `EngineSettings(**section_values(args, "engine"))`."""
    prefix = section + "."
    return {f.settings_key[len(prefix):]: getattr(args, f.dest) for f in WORKER_FLAGS
            if f.settings_key and f.settings_key.startswith(prefix) and hasattr(args, f.dest)}
