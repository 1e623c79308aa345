"""Settings files (`configs/*.yaml`): the model, the engine, DWDP, KV transfer, local infra and k8s.

`load_settings([a.yaml, b.yaml], overrides)` merges the files in order (later wins; mappings merge
key by key, lists replace) and then `overrides` (a nested dict, or dotted keys such as
`{"engine.block_size": 32}`), then validates the result. Each file is first checked on its own, so an
unknown key or a bad value names the file it is in; cross-field problems found after the merge name
the file that last set the offending key.

One file per section where the runtime reads the section too: `config/engine.py` (EngineSettings,
passed whole to the engine) and `config/dwdp.py` (DwdpSettings, passed whole to the DWDP executor).

A graph pool may override the `engine`, `dwdp` and `trtllm` sections for itself
(`pools[i].overrides`); `settings.for_pool(pool)` returns the effective settings of that pool.
Every field below is documented in place; `schema.document(Settings)` prints the full reference.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import yaml

from dynamo_dwdp.config import schema
from dynamo_dwdp.config.schema import (DNS_LABEL, DNS_LABEL_TEXT, QUANTITY, QUANTITY_TEXT, SEMVER, SEMVER_TEXT,
                                       REQUIRED, internal, spec)
from dynamo_dwdp.config.dwdp import DwdpSettings
from dynamo_dwdp.config.engine import DTYPES, EngineSettings
from dynamo_dwdp.errors import ConfigError

if TYPE_CHECKING:
    from dynamo_dwdp.config.graph import Pool

MODEL_PRESETS = ("tiny", "small", "v2-lite-shape", "deepseek-v2-lite", "deepseek-v3")
"""Presets of `dynamo-dwdp make-model` (dynamo_dwdp/synthetic/presets.py); checked against it in tests."""

POOL_OVERRIDE_SECTIONS = ("engine", "dwdp", "trtllm")
"""Sections a graph pool may override for itself (`pools[i].overrides`)."""


# ---------------------------------------------------------------------------------------- model


@dataclass(frozen=True, kw_only=True)
class ModelMake:
    """How the launcher (or the k8s init container) creates the model when `model.path` is missing."""

    preset: str = spec("tiny", doc="make-model preset", choices=MODEL_PRESETS)
    seed: int = spec(0, doc="RNG seed of the random weights (same seed => identical checkpoint everywhere)",
                     min=0, max=2**31 - 1)
    dtype: str = spec("float32", doc="dtype the checkpoint is written in", choices=DTYPES)


@dataclass(frozen=True, kw_only=True)
class ModelSettings:
    """The checkpoint every pool serves."""

    path: str = spec(REQUIRED, doc="model directory (config.json + safetensors + tokenizer); relative "
                                   "paths are relative to the working directory")
    served_name: str | None = spec(None, doc="name clients put in `model`; null = the directory's name")
    make: ModelMake | None = spec(None, doc="create the model with make-model when `path` is missing; "
                                            "null = the model must exist")

    def _problems(self) -> Iterator[tuple[str, str]]:
        if not self.path.strip():
            yield "path", "must not be empty (allowed: a directory path)"
        if self.served_name is not None and not self.served_name.strip():
            yield "served_name", "must not be empty (allowed: a model name, or null)"

    @property
    def name(self) -> str:
        """The served model name (`served_name`, else the directory's base name)."""
        return self.served_name or Path(self.path.rstrip("/")).name


# ---------------------------------------------------------------------------------- kv_transfer


KV_BACKENDS = ("nixl", "local", "none")
"""`kv_transfer.backend` values; the worker's `--kv-transfer` takes the same."""


@dataclass(frozen=True, kw_only=True)
class KvTransferSettings:
    """How decode ranks read the prompt's KV blocks from the prefill rank."""

    backend: str = spec("nixl", doc="nixl = NIXL (UCX) reads, any hosts; local = prefill and decode on one host "
                                    "(CUDA IPC on GPU, shared memory on CPU; k8s renders nixl); none = no transfer "
                                    "(agg graphs)", choices=KV_BACKENDS)
    ucx_tls: str | None = spec(None, doc="UCX_TLS for NIXL, e.g. 'tcp,sm,self' on CPU; null = UCX's choice")
    ucx_net_devices: str | None = spec(None, doc="UCX_NET_DEVICES, e.g. 'lo' to keep UCX on loopback; "
                                                 "null = UCX's choice")


# ---------------------------------------------------------------------------------------- infra


@dataclass(frozen=True, kw_only=True)
class InfraSettings:
    """Local launch (`dynamo-dwdp serve`): discovery, ports, logs."""

    mode: str = spec("embedded", doc="embedded = file discovery, no services; etcd = start etcd + NATS",
                     choices=("embedded", "etcd"))
    host: str = spec("127.0.0.1", doc="address every local listener binds")
    http_port: int = spec(0, doc="frontend HTTP port; 0 = a free port", min=0, max=65535)
    namespace: str = spec("dwdp", doc="Dynamo namespace of the graph", pattern=DNS_LABEL,
                          pattern_text=DNS_LABEL_TEXT)
    log_dir: str = spec("runs/logs", doc="one log file per process goes here")
    health_timeout_s: float = spec(120.0, doc="seconds to wait for every worker to report healthy", min=1)


@dataclass(frozen=True, kw_only=True)
class FrontendSettings:
    """Extras for the stock `python -m dynamo.frontend`."""

    extra_args: list[str] = spec([], doc="appended verbatim to the frontend command line")


# ------------------------------------------------------------------------------------------ k8s


@dataclass(frozen=True, kw_only=True)
class K8sModelVolume:
    """Where pods find the model."""

    claim: str | None = spec(None, doc="PersistentVolumeClaim holding the model; null = an emptyDir per pod "
                                       "(filled by the make-model init container)", pattern=DNS_LABEL,
                             pattern_text=DNS_LABEL_TEXT)
    mount_path: str = spec("/models", doc="mount path of the volume in every container")


@dataclass(frozen=True, kw_only=True)
class K8sDrain:
    """terminationGracePeriodSeconds per component role (sized for a graceful drain)."""

    frontend: int = spec(30, doc="frontend", min=1)
    agg: int = spec(60, doc="aggregated workers: finish in-flight requests", min=1)
    decode: int = spec(60, doc="decode workers: finish in-flight requests", min=1)
    prefill: int = spec(180, doc="prefill workers: also wait for decode peers to finish reading KV", min=1)


@dataclass(frozen=True, kw_only=True)
class K8sAutoscale:
    """The example HorizontalPodAutoscaler emitted per pool (targets the pool's DGDSA)."""

    enabled: bool = spec(True, doc="emit k8s/autoscale/<graph>.yaml")
    metric: str = spec("dwdp_queue_to_compute_ratio", doc="per-pod Prometheus metric the HPA averages")
    target: str = spec("1", doc="target average value of the metric (a quantity)", pattern=QUANTITY,
                       pattern_text=QUANTITY_TEXT)
    min_replicas: int = spec(1, doc="fewest groups (pods) per pool", min=1)
    max_replicas: int = spec(4, doc="most groups (pods) per pool", min=1)

    def _problems(self) -> Iterator[tuple[str, str]]:
        if self.max_replicas < self.min_replicas:
            yield "max_replicas", f"{self.max_replicas} is below min_replicas {self.min_replicas}"


@dataclass(frozen=True, kw_only=True)
class K8sSettings:
    """`dynamo-dwdp k8s render`: the DynamoGraphDeployment."""

    image: str = spec("ghcr.io/your-org/dynamo-dwdp:dev", doc="image of the frontend and native worker pods")
    image_pull_secret: str | None = spec(None, doc="imagePullSecrets entry; null = none", pattern=DNS_LABEL,
                                         pattern_text=DNS_LABEL_TEXT)
    namespace: str = spec("dynamo", doc="Kubernetes namespace", pattern=DNS_LABEL, pattern_text=DNS_LABEL_TEXT)
    dynamo_namespace: str | None = spec(None, doc="Dynamo namespace of the graph in the cluster; null = "
                                                  "the graph's name", pattern=DNS_LABEL, pattern_text=DNS_LABEL_TEXT)
    runtime_version: str = spec("1.6.1", doc="Dynamo runtime version in the image (runtimeVersionOverride)",
                                pattern=SEMVER, pattern_text=SEMVER_TEXT)
    gpus_per_rank: int | None = spec(None, doc="GPUs each rank process uses; null = 1 for engine.device cuda, "
                                               "0 for cpu", min=0, max=8)
    gpus_per_node: int = spec(8, doc="GPUs of one node; a group that needs more spans nodes (multinode)",
                              min=1, max=64)
    system_port: int = spec(9090, doc="DYN_SYSTEM_PORT of rank 0 (rank r uses +r); probes hit /live and "
                                      "/health here (Dynamo parses it as i16: <= 32767)", min=1024, max=32767)
    http_port: int = spec(8000, doc="frontend HTTP port", min=1, max=65535)
    model_volume: K8sModelVolume = spec(factory=K8sModelVolume, doc="where pods find the model")
    model_path: str | None = spec(None, doc="model directory inside the pods; null = "
                                            "<mount_path>/<basename of model.path>")
    shared_memory_size: str | None = spec(None, doc="/dev/shm size (sharedMemorySize); null = operator "
                                                    "default (8Gi)", pattern=QUANTITY, pattern_text=QUANTITY_TEXT)
    startup_timeout_s: int = spec(600, doc="startupProbe budget for loading the model", min=10)
    drain_s: K8sDrain = spec(factory=K8sDrain, doc="terminationGracePeriodSeconds per role")
    node_selector: dict[str, str] = spec({}, doc="nodeSelector of worker pods")
    env: dict[str, str] = spec({}, doc="extra environment of every component (spec.env)")
    hf_token_secret: str | None = spec(None, doc="Secret exposed to workers via envFrom (HF_TOKEN); null = none",
                                       pattern=DNS_LABEL, pattern_text=DNS_LABEL_TEXT)
    autoscale: K8sAutoscale = spec(factory=K8sAutoscale, doc="example HPA per pool")


# --------------------------------------------------------------------------------------- trtllm

MOE_BACKENDS = ("CUTLASS", "CUTEDSL", "WIDEEP", "TRTLLM", "DEEPGEMM", "TRITON")
CACHE_TRANSCEIVER_BACKENDS = ("DEFAULT", "UCX", "NIXL", "MPI")


@dataclass(frozen=True, kw_only=True)
class TrtllmRole:
    """TensorRT-LLM engine knobs of one role (rendered into the engine YAML; see deploy/trtllm.py)."""

    max_batch_size: int = spec(8, doc="max_batch_size", min=1)
    max_num_tokens: int = spec(8192, doc="max_num_tokens (tokens per iteration)", min=1)
    max_seq_len: int = spec(9216, doc="max_seq_len", min=1)
    moe_backend: str = spec("CUTLASS", doc="moe_config.backend (DWDP needs CUTEDSL; DEP uses WIDEEP)",
                            choices=MOE_BACKENDS)
    kv_cache_dtype: str | None = spec("fp8", doc="kv_cache_config.dtype; null = auto", choices=("fp8", "auto"))
    free_gpu_memory_fraction: float = spec(0.8, doc="kv_cache_config.free_gpu_memory_fraction", min=0.01, max=1)
    disable_overlap_scheduler: bool = spec(False, doc="disable_overlap_scheduler (always true for prefill)")
    cuda_graph_batch_sizes: list[int] | None = spec(None, doc="cuda_graph_config.batch_sizes; null = "
                                                              "cuda_graph_config: null", min=1)
    cache_transceiver_backend: str = spec("UCX", doc="cache_transceiver_config.backend",
                                          choices=CACHE_TRANSCEIVER_BACKENDS)
    max_tokens_in_buffer: int | None = spec(None, doc="cache_transceiver_config.max_tokens_in_buffer; "
                                                      "null = max_seq_len rounded up to 64", min=1)
    stream_interval: int | None = spec(None, doc="stream_interval; null = TensorRT-LLM's default", min=1)
    mtp_layers: int = spec(0, doc="MTP speculative layers (speculative_config); 0 = off", min=0, max=4)
    eplb_slots: int = spec(0, doc="EPLB slots (moe_config.load_balancer.num_slots); 0 = off. Not with DWDP",
                           min=0)
    extra: dict[str, Any] = spec({}, doc="further LLM-API keys merged into the engine YAML (checked against "
                                         "deploy/trtllm.py ALLOWED_FIELDS)")


@dataclass(frozen=True, kw_only=True)
class TrtllmSettings:
    """Pools with `engine: trtllm` (real clusters only: rendered by `dynamo-dwdp k8s render`)."""

    image: str = spec("nvcr.io/nvidia/ai-dynamo/tensorrtllm-runtime:1.6.1",
                      doc="image of trtllm pools and of the frontend of an all-trtllm graph")
    prefill: TrtllmRole = spec(factory=TrtllmRole, doc="engine knobs of prefill (context) pools")
    decode: TrtllmRole = spec(factory=TrtllmRole, doc="engine knobs of decode (generation) pools")
    env: dict[str, str] = spec({}, doc="extra environment of trtllm worker containers")
    rendezvous_port: int = spec(29600, doc="TRTLLM_DWDP_MASTER_PORT of a DWDP group (rank 0 in the pod)",
                                min=1024, max=65535)


# ------------------------------------------------------------------------------------- settings


@dataclass(frozen=True, kw_only=True)
class Settings:
    """Everything that is not topology: see the section classes above for each key."""

    model: ModelSettings = spec(REQUIRED, doc="the checkpoint")
    engine: EngineSettings = spec(factory=EngineSettings, doc="the native engine")
    dwdp: DwdpSettings = spec(factory=DwdpSettings, doc="DWDP knobs")
    kv_transfer: KvTransferSettings = spec(factory=KvTransferSettings, doc="prefill -> decode KV transfer")
    infra: InfraSettings = spec(factory=InfraSettings, doc="local launch")
    frontend: FrontendSettings = spec(factory=FrontendSettings, doc="frontend extras")
    k8s: K8sSettings = spec(factory=K8sSettings, doc="Kubernetes rendering")
    trtllm: TrtllmSettings = spec(factory=TrtllmSettings, doc="TensorRT-LLM pools")
    sources: tuple[str, ...] = internal(())

    def _problems(self) -> Iterator[tuple[str, str]]:
        if self.dwdp.transport == "cuda_ipc" and self.engine.device != "cuda":
            yield "dwdp.transport", "cuda_ipc needs engine.device cuda (allowed on cpu: auto, shm)"
        if self.engine.device == "cpu" and self.k8s.gpus_per_rank:
            yield "k8s.gpus_per_rank", (f"{self.k8s.gpus_per_rank} GPUs for a cpu engine "
                                        "(allowed with engine.device cpu: 0 or null)")
        if self.engine.device == "cuda" and self.k8s.gpus_per_rank == 0:
            yield "k8s.gpus_per_rank", "0 GPUs for a cuda engine (allowed with engine.device cuda: >= 1 or null)"

    @property
    def gpus_per_rank(self) -> int:
        """GPUs per rank process in k8s: `k8s.gpus_per_rank`, else 1 on cuda and 0 on cpu."""
        if self.k8s.gpus_per_rank is not None:
            return self.k8s.gpus_per_rank
        return 1 if self.engine.device == "cuda" else 0

    # -- derived views

    def to_dict(self) -> dict:
        return schema.to_dict(self)

    def replace(self, **dotted: Any) -> "Settings":
        """A copy with dotted keys replaced, re-validated, e.g. `replace(**{"model.path": "/models/x"})`.

        Mapping values merge into the existing mapping (like a later settings file); they do not clear it.
        """
        data = schema.deep_merge(self.to_dict(), _expand_dotted(dotted))
        return _build(data, lambda _p: "replace()", self.sources)

    def for_pool(self, pool: "Pool") -> "Settings":
        """The effective settings of one pool: its `overrides` merged on top, re-validated."""
        if not pool.overrides:
            return self
        data = schema.deep_merge(self.to_dict(), pool.overrides)
        label = f"{pool.source or 'graph'} (pools[{pool.index}].overrides)"
        return _build(data, lambda _p: label, self.sources)


def _expand_dotted(flat: dict[str, Any]) -> dict:
    """`{"a.b": 1, "c": {"d": 2}}` -> `{"a": {"b": 1}, "c": {"d": 2}}`."""
    out: dict = {}
    for key, value in flat.items():
        parts = str(key).split(".")
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"overrides: {key}: '{part}' is set to a value and also used as a section")
        last = parts[-1]
        if isinstance(value, dict) and isinstance(node.get(last), dict):
            node[last] = schema.deep_merge(node[last], value)
        else:
            node[last] = value
    return out


def _build(data: dict, where: schema.Where, sources: tuple[str, ...]) -> Settings:
    settings = schema.build(Settings, data, where=where)
    object.__setattr__(settings, "sources", tuple(sources))
    return settings


def read_yaml(path: str | os.PathLike) -> Any:
    """Parse one YAML file; a missing file or a syntax error is a one-line ConfigError."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except (IsADirectoryError, PermissionError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read ({e.__class__.__name__})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else "top level"
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path}: {where}: YAML syntax error: {problem}") from None
    return {} if data is None else data


def load_settings(paths: list[str], overrides: dict | None = None) -> Settings:
    """Merge settings files in order (later wins, mappings merge deeply) plus `overrides`; validate."""
    if not paths:
        raise ConfigError("settings: no config file given (allowed: one or more configs/*.yaml)")
    merged: dict = {}
    provenance: dict[str, str] = {}
    layers = [(str(p), read_yaml(p)) for p in paths]
    if overrides:
        layers.append(("overrides", _expand_dotted(overrides)))
    for label, data in layers:
        schema.check_partial(Settings, data, where=label)
        merged = schema.deep_merge(merged, data)
        for leaf in schema.leaf_paths(data):
            provenance[leaf] = label
    labels = [label for label, _ in layers]

    def where(path: str) -> str:
        if path in provenance:
            return provenance[path]
        below = [provenance[p] for p in provenance if p.startswith(path + ".")]
        if below:
            return below[-1]
        parts = path.split(".")
        for i in range(len(parts) - 1, 0, -1):
            prefix = ".".join(parts[:i])
            if prefix in provenance:
                return provenance[prefix]
        return ", ".join(labels)

    return _build(merged, where, tuple(str(p) for p in paths))
