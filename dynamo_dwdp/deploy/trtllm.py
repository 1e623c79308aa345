"""Engine YAML (`--extra-engine-args`) for pools with `engine: trtllm`, and its field whitelist.

`tensorrt_llm` is never imported: the YAML is plain data, and every key we may emit is listed in
`ALLOWED_FIELDS` with where it comes from, so a typo or a field TensorRT-LLM does not have fails at
render time (and in tests), not on the cluster.

Per strategy (pool ranks = N):

| strategy | tensor_parallel_size | moe_expert_parallel_size | enable_attention_dp | extra |
|---|---|---|---|---|
| single | 1 | 1 | false | |
| tp | N | 1 | false | |
| dep | N | N | true | moe_config.backend (WIDEEP for DEP decode) |
| dwdp (prefill only) | 1 | 1 | true | dwdp_config {dwdp_size N, num_groups 1, num_experts_per_worker L, num_prefetch_experts P, contention_opt}; CUTEDSL; no overlap scheduler |

A DWDP group of N ranks runs as N single-GPU `dynamo.trtllm` context servers in ONE pod
(`dwdp_group_script`): each rank is pinned to one GPU and finds its peers through the
`TRTLLM_DWDP_RANK` / `TRTLLM_DWDP_MASTER_ADDR` / `TRTLLM_DWDP_MASTER_PORT` rendezvous (the env names of
NVIDIA/srt-slurm `srtctl/backends/trtllm.py`, which launches DWDP the same way: every rank its own
worker, private HOME and autotuner cache per rank). `num_groups` is 1 because each pod's group is
self-contained; the pool scales by adding pods (groups), not by growing one MPI world.
"""
from __future__ import annotations

import math
import shlex
from dataclasses import dataclass
from typing import Any

from dynamo_dwdp.config.graph import Pool
from dynamo_dwdp.config.settings import Settings, TrtllmRole
from dynamo_dwdp.errors import ConfigError

_REPRO = "NVIDIA/TensorRT-LLM: examples/dwdp/reproduce.py (build_worker_config: ctx_cfg / gen_cfg)"
_WIDE_EP = "ai-dynamo/dynamo: recipes/deepseek-r1/trtllm/disagg/wide_ep/gb200/deploy.yaml (prefill/decode ConfigMaps)"
_MULTINODE = "ai-dynamo/dynamo: examples/backends/trtllm/deploy/disagg-multinode.yaml (prefill.yaml/decode.yaml)"
_LLM_ARGS = "NVIDIA/TensorRT-LLM: tensorrt_llm/llmapi/llm_args.py"
_DWDP = (f"{_LLM_ARGS} (DwdpConfig, PR #12136); {_REPRO} (ctx_cfg['dwdp_config']); "
         "unit test of tensorrt_llm/_torch/pyexecutor/dwdp.py (DwdpConfig(dwdp_size, num_groups, "
         "num_experts_per_worker, num_prefetch_experts))")


@dataclass(frozen=True)
class AllowedField:
    """One LLM-API key the renderer may write: its YAML types, allowed values, and source."""

    types: tuple[type, ...]
    source: str
    choices: tuple[Any, ...] = ()
    nullable: bool = False


ALLOWED_FIELDS: dict[str, AllowedField] = {
    "backend": AllowedField((str,), _MULTINODE, choices=("pytorch",)),
    "tensor_parallel_size": AllowedField((int,), f"{_LLM_ARGS} (BaseLlmArgs); {_REPRO}; {_WIDE_EP}"),
    "moe_expert_parallel_size": AllowedField((int,), f"{_LLM_ARGS} (BaseLlmArgs); {_REPRO}; {_WIDE_EP}"),
    "pipeline_parallel_size": AllowedField((int,), f"{_LLM_ARGS} (BaseLlmArgs); {_REPRO}; {_WIDE_EP}"),
    "context_parallel_size": AllowedField((int,), f"{_LLM_ARGS} (BaseLlmArgs); {_REPRO}"),
    "enable_attention_dp": AllowedField((bool,), f"{_LLM_ARGS} (BaseLlmArgs); {_REPRO}; {_WIDE_EP}"),
    "enable_lm_head_tp_in_adp": AllowedField((bool,), f"{_REPRO} (gen_cfg)"),
    "max_batch_size": AllowedField((int,), f"{_LLM_ARGS}; {_REPRO}; {_WIDE_EP}"),
    "max_num_tokens": AllowedField((int,), f"{_LLM_ARGS}; {_REPRO}; {_WIDE_EP}"),
    "max_seq_len": AllowedField((int,), f"{_LLM_ARGS}; {_REPRO}; {_WIDE_EP}"),
    "disable_overlap_scheduler": AllowedField((bool,), f"{_LLM_ARGS} (TorchLlmArgs); {_REPRO}; {_MULTINODE}"),
    "print_iter_log": AllowedField((bool,), f"{_LLM_ARGS} (TorchLlmArgs); {_REPRO}; {_WIDE_EP}"),
    "trust_remote_code": AllowedField((bool,), f"{_LLM_ARGS}; {_REPRO}; {_MULTINODE}"),
    "enable_chunked_prefill": AllowedField((bool,), f"{_LLM_ARGS}; {_MULTINODE}"),
    "stream_interval": AllowedField((int,), f"{_LLM_ARGS} (TorchLlmArgs); {_REPRO} (gen_cfg); {_WIDE_EP}"),
    "num_postprocess_workers": AllowedField((int,), f"{_LLM_ARGS}; {_REPRO} (gen_cfg)"),
    "cuda_graph_config": AllowedField((dict,), f"{_LLM_ARGS} (CudaGraphConfig); {_REPRO}; {_WIDE_EP}",
                                      nullable=True),
    "cuda_graph_config.enable_padding": AllowedField((bool,), f"{_LLM_ARGS} (BaseCudaGraphConfig.enable_padding)"),
    "cuda_graph_config.batch_sizes": AllowedField((list,), f"{_LLM_ARGS} (BaseCudaGraphConfig.batch_sizes)"),
    "kv_cache_config": AllowedField((dict,), f"{_LLM_ARGS} (KvCacheConfig); {_REPRO}; {_WIDE_EP}"),
    "kv_cache_config.enable_block_reuse": AllowedField((bool,), f"{_REPRO}; {_WIDE_EP}"),
    "kv_cache_config.dtype": AllowedField((str,), f"{_REPRO}; {_WIDE_EP}", choices=("fp8", "auto")),
    "kv_cache_config.free_gpu_memory_fraction": AllowedField((float, int), f"{_REPRO}; {_WIDE_EP}; {_MULTINODE}"),
    "cache_transceiver_config": AllowedField((dict,), f"{_LLM_ARGS} (CacheTransceiverConfig); {_REPRO}"),
    "cache_transceiver_config.backend": AllowedField((str,), f"{_REPRO} (UCX); {_WIDE_EP} (DEFAULT)",
                                                     choices=("DEFAULT", "UCX", "NIXL", "MPI")),
    "cache_transceiver_config.max_tokens_in_buffer": AllowedField((int,), f"{_REPRO}; {_WIDE_EP}"),
    "moe_config": AllowedField((dict,), f"{_LLM_ARGS} (MoeConfig); {_REPRO}; {_WIDE_EP}"),
    "moe_config.backend": AllowedField((str,), f"{_REPRO} (CUTEDSL); {_WIDE_EP} (WIDEEP)",
                                       choices=("CUTLASS", "CUTEDSL", "WIDEEP", "TRTLLM", "DEEPGEMM", "TRITON")),
    "moe_config.load_balancer": AllowedField((dict,), f"{_REPRO} (gen_cfg, eplb > 0)"),
    "moe_config.load_balancer.num_slots": AllowedField((int,), f"{_REPRO} (gen_cfg, eplb > 0)"),
    "moe_config.load_balancer.layer_updates_per_iter": AllowedField((int,), f"{_REPRO} (gen_cfg, eplb > 0)"),
    "speculative_config": AllowedField((dict,), f"{_LLM_ARGS} (MTPDecodingConfig); {_REPRO} (mtp > 0)"),
    "speculative_config.decoding_type": AllowedField((str,), f"{_REPRO} (mtp > 0)", choices=("MTP",)),
    "speculative_config.num_nextn_predict_layers": AllowedField((int,), f"{_REPRO} (mtp > 0)"),
    "dwdp_config": AllowedField((dict,), _DWDP),
    "dwdp_config.dwdp_size": AllowedField((int,), _DWDP),
    "dwdp_config.num_groups": AllowedField((int,), _DWDP),
    "dwdp_config.num_experts_per_worker": AllowedField((int,), _DWDP),
    "dwdp_config.num_prefetch_experts": AllowedField((int,), _DWDP),
    "dwdp_config.contention_opt": AllowedField((bool,), "NVIDIA/TensorRT-LLM PR #12974 (DwdpConfig.contention_opt, "
                                                        f"{_LLM_ARGS})"),
}
"""Every LLM-API key (dotted) the engine YAML may contain, with its source (repo: path)."""

DWDP_REQUIRED = ("dwdp_size", "num_groups", "num_experts_per_worker", "num_prefetch_experts", "contention_opt")


def check_engine_config(cfg: Any, path: str = "") -> list[str]:
    """Problems of an engine YAML against ALLOWED_FIELDS: `<dotted.key>: <what>` lines (empty = OK)."""
    problems: list[str] = []
    if not isinstance(cfg, dict):
        return [f"{path or 'top level'}: expected a mapping"]
    for key, value in cfg.items():
        dotted = f"{path}.{key}" if path else str(key)
        field = ALLOWED_FIELDS.get(dotted)
        if field is None:
            siblings = sorted(k.rpartition(".")[2] for k in ALLOWED_FIELDS if k.rpartition(".")[0] == path)
            problems.append(f"{dotted}: not a documented TensorRT-LLM field (allowed here: {', '.join(siblings)})")
            continue
        if value is None:
            if not field.nullable:
                problems.append(f"{dotted}: must not be null")
            continue
        if isinstance(value, bool) and bool not in field.types or not isinstance(value, field.types):
            problems.append(f"{dotted}: {value!r} has type {type(value).__name__} "
                            f"(allowed: {', '.join(t.__name__ for t in field.types)})")
            continue
        if field.choices and value not in field.choices:
            problems.append(f"{dotted}: {value!r} is not one of {', '.join(map(str, field.choices))}")
        if isinstance(value, dict):
            problems += check_engine_config(value, dotted)
    dwdp = cfg.get("dwdp_config") if not path else None
    if isinstance(dwdp, dict):
        missing = [k for k in DWDP_REQUIRED if k not in dwdp]
        if missing:
            problems.append(f"dwdp_config: missing {', '.join(missing)}")
    return problems


def _role(pool: Pool, settings: Settings) -> TrtllmRole:
    return settings.trtllm.prefill if pool.role == "prefill" else settings.trtllm.decode


def _deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def engine_config(pool: Pool, settings: Settings) -> dict[str, Any]:
    """The `--extra-engine-args` YAML (as data) of one trtllm pool; checked against ALLOWED_FIELDS."""
    eff = settings.for_pool(pool)
    role = _role(pool, eff)
    n = pool.ranks
    tp, ep, adp = {"single": (1, 1, False), "tp": (n, 1, False), "dep": (n, n, True),
                   "dwdp": (1, 1, True)}[pool.strategy]
    cfg: dict[str, Any] = {
        "backend": "pytorch",
        "tensor_parallel_size": tp,
        "moe_expert_parallel_size": ep,
        "pipeline_parallel_size": 1,
        "enable_attention_dp": adp,
        "max_batch_size": role.max_batch_size,
        "max_num_tokens": role.max_num_tokens,
        "max_seq_len": role.max_seq_len,
        # prefill-only workers do not support the overlap scheduler (upstream engine configs say so)
        "disable_overlap_scheduler": True if pool.role == "prefill" else role.disable_overlap_scheduler,
        "cuda_graph_config": (None if role.cuda_graph_batch_sizes is None
                              else {"enable_padding": True, "batch_sizes": sorted(role.cuda_graph_batch_sizes)}),
        "kv_cache_config": {"enable_block_reuse": False, "free_gpu_memory_fraction": role.free_gpu_memory_fraction},
        "cache_transceiver_config": {
            "backend": role.cache_transceiver_backend,
            "max_tokens_in_buffer": role.max_tokens_in_buffer or math.ceil(role.max_seq_len / 64) * 64,
        },
        "moe_config": {"backend": role.moe_backend},
        "print_iter_log": True,
        "trust_remote_code": True,
    }
    if role.kv_cache_dtype is not None:
        cfg["kv_cache_config"]["dtype"] = role.kv_cache_dtype
    if role.stream_interval is not None:
        cfg["stream_interval"] = role.stream_interval
    if role.eplb_slots:
        cfg["moe_config"]["load_balancer"] = {"num_slots": role.eplb_slots, "layer_updates_per_iter": 1}
    if role.mtp_layers:
        cfg["speculative_config"] = {"decoding_type": "MTP", "num_nextn_predict_layers": role.mtp_layers}
    if pool.strategy == "dwdp":
        cfg["dwdp_config"] = {
            "dwdp_size": n,
            "num_groups": 1,
            "num_experts_per_worker": eff.dwdp.experts_per_rank,
            "num_prefetch_experts": eff.dwdp.prefetch_per_peer,
            "contention_opt": eff.dwdp.contention_opt,
        }
    cfg = _deep_merge(cfg, role.extra)
    problems = check_engine_config(cfg)
    if problems:
        label = pool.source or "graph"
        raise ConfigError(f"{label}: pools[{pool.index}] ({pool.name}): trtllm.{pool.role}.extra / engine YAML: "
                          f"{problems[0]}")
    return cfg


def dwdp_group_script(pool: Pool, settings: Settings, worker_argv: list[str], *, system_port: int) -> str:
    """bash that runs the N single-GPU context servers of one DWDP group in one pod.

    Rank r: CUDA_VISIBLE_DEVICES=r, TRTLLM_DWDP_RANK=r, master 127.0.0.1:<rendezvous_port>,
    DYN_SYSTEM_PORT=system_port+r, private HOME / TLLM_AUTOTUNER_CACHE_PATH / HF_MODULES_CACHE. When
    any rank exits the others are stopped and the script exits non-zero (the pod restarts as a group);
    SIGTERM is forwarded to every rank so each drains.
    """
    port = settings.for_pool(pool).trtllm.rendezvous_port
    cmd = shlex.join(worker_argv)
    lines = ["set -u", "pids=()"]
    for r in range(pool.ranks):
        home = f"/tmp/dwdp-rank{r}"
        env = (f"CUDA_VISIBLE_DEVICES={r} TRTLLM_DWDP_RANK={r} TRTLLM_DWDP_MASTER_ADDR=127.0.0.1 "
               f"TRTLLM_DWDP_MASTER_PORT={port} DYN_SYSTEM_PORT={system_port + r} HOME={home} "
               f"TLLM_AUTOTUNER_CACHE_PATH={home}/autotuner HF_MODULES_CACHE={home}/hf_modules")
        lines.append(f"mkdir -p {home}")
        lines.append(f"env {env} {cmd} &")  # $! is the rank itself (env execs it), so signals reach it
        lines.append("pids+=($!)")
    lines += [
        "stopping=0",
        "trap 'stopping=1; kill -TERM \"${pids[@]}\" 2>/dev/null' TERM INT",
        "wait -n",
        "rc=$?",
        "[ \"$stopping\" -eq 0 ] && kill -TERM \"${pids[@]}\" 2>/dev/null   # a rank died: stop the rest (once)",
        "wait",
        "[ \"$rc\" -eq 0 ] && rc=1",
        "exit \"$rc\"",
    ]
    return "\n".join(lines) + "\n"
