"""Render a serving graph + settings into a DynamoGraphDeployment (nvidia.com/v1beta1).

One component per pool plus the `frontend`. The command line of every container comes from
`dynamo_dwdp.launch.command_lines` (the same functions the local launcher uses). A group of a
dwdp/dep/tp (or dp) pool must share one NVLink domain, so it is ONE pod with `ranks x gpus_per_rank`
GPUs running `python -m dynamo_dwdp.group --ranks N -- <worker>` (each rank its own Dynamo worker),
and the component's `replicas` is the number of groups: scaling a pool adds or removes whole groups.

Pod contract (native pools):
- container `main`; `DYN_SYSTEM_PORT` = rank 0's system port (rank r uses +r); probes: startup and
  liveness on `/live`, readiness on `/health` of that port;
- `--discovery-backend kubernetes` on the frontend and `DYN_DISCOVERY_BACKEND=kubernetes` for all;
- the ranks of a group meet at `tcp://127.0.0.1:29500` (pod-local); the group name is
  `<graph>-<pool>-g$(POD_NAME)` (Kubernetes expands `$(POD_NAME)` from the downward API);
- `terminationGracePeriodSeconds` per role (`k8s.drain_s`), prefill the longest;
- `UCX_NET_DEVICES=lo` (a one-machine setting) is dropped: prefill and decode pods talk over the pod network;
- `runtimeVersionOverride` = `k8s.runtime_version` on this project's image (its tag is not Dynamo's
  version) and on any image whose tag is not a semantic version; `scalingAdapter: {}` on every pool.
"""
from __future__ import annotations

import math
import posixpath
import shlex
from typing import Any

import yaml

from dynamo_dwdp.config.graph import Graph, Pool, check_compatible
from dynamo_dwdp.config.settings import Settings
from dynamo_dwdp.deploy import trtllm
from dynamo_dwdp.deploy.validate import ANNOTATION, API_VERSION, KIND, is_semver_tag
from dynamo_dwdp.errors import ConfigError
from dynamo_dwdp.launch import command_lines

NATIVE_RENDEZVOUS = "tcp://127.0.0.1:29500"
"""Where the ranks of a native group meet (rank 0 hosts the store; all ranks are in one pod)."""
GROUP_INDEX = "$(POD_NAME)"
"""Group index in k8s: the pod name (unique per group; expanded by Kubernetes from the env)."""
ENGINE_CONFIG_DIR = "/config"
MODEL_VOLUME = "model"
ENGINE_VOLUME = "engine-config"
PYTHON = "python3"


def container_model_path(settings: Settings) -> str:
    """The model directory inside the pods: `k8s.model_path`, else `<mount_path>/<basename(model.path)>`."""
    if settings.k8s.model_path:
        return settings.k8s.model_path
    return posixpath.join(settings.k8s.model_volume.mount_path, posixpath.basename(settings.model.path.rstrip("/")))


def engine_configmap_name(graph: Graph) -> str:
    return f"{graph.name}-engine"


def _k8s_settings(graph: Graph, settings: Settings, image: str | None, namespace: str | None) -> Settings:
    changes: dict[str, Any] = {
        "infra.namespace": settings.k8s.dynamo_namespace or graph.name,
        # loopback-only UCX (a one-machine setting) cannot reach another pod: let UCX pick the pod network
        "kv_transfer.ucx_net_devices": (None if settings.kv_transfer.ucx_net_devices == "lo"
                                        else settings.kv_transfer.ucx_net_devices),
        # pods of a graph may land on different nodes: the same-host KV path cannot reach across them
        "kv_transfer.backend": "nixl" if settings.kv_transfer.backend == "local" else settings.kv_transfer.backend,
        "model.path": container_model_path(settings),
        "model.served_name": settings.model.name,
    }
    if image:
        changes["k8s.image"] = image
    if namespace:
        changes["k8s.namespace"] = namespace
    return settings.replace(**changes)


def _http_probe(path: str, port: int, *, period: int = 10, failures: int = 3, delay: int | None = None) -> dict:
    probe: dict[str, Any] = {"httpGet": {"path": path, "port": port}, "periodSeconds": period,
                             "timeoutSeconds": 5, "failureThreshold": failures}
    if delay is not None:
        probe["initialDelaySeconds"] = delay
    return probe


def _probes(port: int, startup_timeout_s: int) -> dict:
    return {
        "startupProbe": _http_probe("/live", port, failures=max(1, math.ceil(startup_timeout_s / 10))),
        "livenessProbe": _http_probe("/live", port, failures=6),
        "readinessProbe": _http_probe("/health", port, failures=3),
    }


def _model_volume(settings: Settings) -> tuple[dict, dict]:
    vol = settings.k8s.model_volume
    volume: dict[str, Any] = {"name": MODEL_VOLUME}
    if vol.claim:
        volume["persistentVolumeClaim"] = {"claimName": vol.claim}
    else:
        volume["emptyDir"] = {}
    return volume, {"name": MODEL_VOLUME, "mountPath": vol.mount_path}


def _make_model_init(settings: Settings, image: str) -> dict:
    """Init container: create the model with make-model unless config.json is there (same seed everywhere).

    `--force` lets a restarted init container overwrite its own partial directory.
    """
    path = settings.model.path
    argv = command_lines.make_model_argv(settings, path=path, python=PYTHON, force=True)
    script = f"test -f {shlex.quote(path)}/config.json || exec {shlex.join(argv)}"
    _, mount = _model_volume(settings)
    return {"name": "make-model", "image": image, "command": ["/bin/sh", "-c"], "args": [script],
            "volumeMounts": [mount]}


def _runtime_override(image: str, settings: Settings, *, own_image: bool) -> dict:
    if own_image or not is_semver_tag(image):
        return {"runtimeVersionOverride": settings.k8s.runtime_version}
    return {}


def _pod_spec_common(settings: Settings, grace: int, *, workers: bool) -> dict:
    spec: dict[str, Any] = {"terminationGracePeriodSeconds": grace}
    if workers and settings.k8s.node_selector:
        spec["nodeSelector"] = dict(sorted(settings.k8s.node_selector.items()))
    if settings.k8s.image_pull_secret:
        spec["imagePullSecrets"] = [{"name": settings.k8s.image_pull_secret}]
    return spec


def _env_list(env: dict[str, str]) -> list[dict]:
    return [{"name": k, "value": str(v)} for k, v in env.items()]


def frontend_component(graph: Graph, s: Settings) -> dict:
    image = s.trtllm.image if graph.engine == "trtllm" else s.k8s.image
    argv = command_lines.frontend_argv(graph, s, s.k8s.http_port, discovery="kubernetes", python=PYTHON)
    volume, mount = _model_volume(s)
    container: dict[str, Any] = {
        "name": "main", "image": image, "command": argv[:3], "args": argv[3:],
        "env": _env_list({"HF_HUB_OFFLINE": "1"}),
        "readinessProbe": _http_probe("/health", s.k8s.http_port),
        "livenessProbe": _http_probe("/live", s.k8s.http_port, failures=6),
        "volumeMounts": [mount],
    }
    pod = _pod_spec_common(s, s.k8s.drain_s.frontend, workers=False)
    if graph.engine == "native" and s.model.make is not None:
        pod["initContainers"] = [_make_model_init(s, image)]
    pod.update({"containers": [container], "volumes": [volume]})
    comp: dict[str, Any] = {"name": "frontend", "type": "frontend", "replicas": 1}
    comp.update(_runtime_override(image, s, own_image=graph.engine == "native"))
    comp["podTemplate"] = {"spec": pod}
    return comp


def _annotations(pool: Pool, gpus_per_rank: int) -> dict:
    return {f"{ANNOTATION}role": pool.role, f"{ANNOTATION}strategy": pool.strategy,
            f"{ANNOTATION}ranks": str(pool.ranks), f"{ANNOTATION}engine": pool.engine,
            f"{ANNOTATION}gpus-per-rank": str(gpus_per_rank)}


def _grace(pool: Pool, s: Settings) -> int:
    return getattr(s.k8s.drain_s, pool.role)


def native_component(graph: Graph, pool: Pool, s: Settings) -> dict:
    eff = s.for_pool(pool)
    gpr = eff.gpus_per_rank
    gpus = pool.ranks * gpr
    if gpus > eff.k8s.gpus_per_node:
        raise ConfigError(f"{graph.source or graph.name}: pools[{pool.index}] ({pool.name}): a group of {pool.ranks} "
                          f"ranks needs {gpus} GPUs but k8s.gpus_per_node is {eff.k8s.gpus_per_node}; the ranks of a "
                          "group must share one NVLink domain (lower ranks, or see k8s/overlays/mnnvl/README.md)")
    if pool.ranks == 1:
        argv = command_lines.worker_argv(graph, pool, s, group_index=GROUP_INDEX, rank=0, rendezvous=NATIVE_RENDEZVOUS,
                                    python=PYTHON)
    else:
        inner = command_lines.worker_argv(graph, pool, s, group_index=GROUP_INDEX, rank=None,
                                     rendezvous=NATIVE_RENDEZVOUS, python=PYTHON)
        argv = command_lines.group_argv(pool.ranks, inner, python=PYTHON)
    image = eff.k8s.image
    volume, mount = _model_volume(eff)
    env = [{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}]
    env += _env_list({"DYN_SYSTEM_PORT": str(eff.k8s.system_port), "HF_HUB_OFFLINE": "1",
                      **command_lines.worker_env(eff)})
    container: dict[str, Any] = {"name": "main", "image": image, "command": argv[:3], "args": argv[3:], "env": env}
    if eff.k8s.hf_token_secret:
        container["envFrom"] = [{"secretRef": {"name": eff.k8s.hf_token_secret}}]
    if gpus:
        container["resources"] = {"limits": {"nvidia.com/gpu": str(gpus)}}
    container.update(_probes(eff.k8s.system_port, eff.k8s.startup_timeout_s))
    container["volumeMounts"] = [mount]
    pod = _pod_spec_common(eff, _grace(pool, eff), workers=True)
    if eff.model.make is not None:
        pod["initContainers"] = [_make_model_init(eff, image)]
    pod.update({"containers": [container], "volumes": [volume]})
    comp: dict[str, Any] = {"name": pool.name, "type": pool.component_type, "replicas": pool.replicas,
                            "scalingAdapter": {}}
    comp.update(_runtime_override(image, eff, own_image=True))
    if eff.k8s.shared_memory_size:
        comp["sharedMemorySize"] = eff.k8s.shared_memory_size
    comp["podTemplate"] = {"metadata": {"annotations": _annotations(pool, gpr)}, "spec": pod}
    return comp


def trtllm_component(graph: Graph, pool: Pool, s: Settings) -> dict:
    eff = s.for_pool(pool)
    gpr = eff.k8s.gpus_per_rank or 1
    total = pool.ranks * gpr
    per_node = eff.k8s.gpus_per_node
    label = f"{graph.source or graph.name}: pools[{pool.index}] ({pool.name})"
    argv = command_lines.trtllm_argv(pool, eff, namespace=eff.infra.namespace, python=PYTHON,
                                config_dir=ENGINE_CONFIG_DIR)
    env = dict(eff.trtllm.env)
    nodes = 1
    if pool.strategy == "dwdp":
        if total > per_node:
            raise ConfigError(f"{label}: a DWDP group of {pool.ranks} ranks needs {total} GPUs in one pod but "
                              f"k8s.gpus_per_node is {per_node} (allowed: ranks x gpus_per_rank <= gpus_per_node)")
        command = ["/bin/bash", "-c"]
        args = [trtllm.dwdp_group_script(pool, eff, argv, system_port=eff.k8s.system_port)]
        env["DYN_SYSTEM_PORT"] = str(eff.k8s.system_port)  # rank 0's; the script sets +r per rank
    else:
        if total > per_node:
            if total % per_node:
                raise ConfigError(f"{label}: {total} GPUs do not split evenly over nodes of {per_node} GPUs")
            nodes = total // per_node
        command, args = argv[:3], argv[3:]
        env["DYN_SYSTEM_PORT"] = str(eff.k8s.system_port)
    gpus_per_pod = total // nodes
    image = eff.trtllm.image
    volume, mount = _model_volume(eff)
    container: dict[str, Any] = {"name": "main", "image": image, "command": command, "args": args,
                                 "env": _env_list(env)}
    if eff.k8s.hf_token_secret:
        container["envFrom"] = [{"secretRef": {"name": eff.k8s.hf_token_secret}}]
    container["resources"] = {"limits": {"nvidia.com/gpu": str(gpus_per_pod)}}
    container.update(_probes(eff.k8s.system_port, eff.k8s.startup_timeout_s))
    container["volumeMounts"] = [mount, {"name": ENGINE_VOLUME, "mountPath": ENGINE_CONFIG_DIR, "readOnly": True}]
    pod = _pod_spec_common(eff, _grace(pool, eff), workers=True)
    pod.update({"containers": [container],
                "volumes": [volume, {"name": ENGINE_VOLUME, "configMap": {"name": engine_configmap_name(graph)}}]})
    comp: dict[str, Any] = {"name": pool.name, "type": pool.component_type, "replicas": pool.replicas,
                            "scalingAdapter": {}}
    if nodes > 1:
        comp["multinode"] = {"nodeCount": nodes}
    comp.update(_runtime_override(image, eff, own_image=False))
    if eff.k8s.shared_memory_size:
        comp["sharedMemorySize"] = eff.k8s.shared_memory_size
    comp["podTemplate"] = {"metadata": {"annotations": _annotations(pool, gpr)}, "spec": pod}
    return comp


def render_graph(graph: Graph, settings: Settings, *, image: str | None = None,
                 namespace: str | None = None) -> list[dict]:
    """The manifests of one graph: [ConfigMap of trtllm engine YAMLs (if any), DynamoGraphDeployment]."""
    check_compatible(graph, settings)
    s = _k8s_settings(graph, settings, image, namespace)
    docs: list[dict] = []
    trt_pools = [p for p in graph.pools if p.engine == "trtllm"]
    if trt_pools:
        data = {f"{p.name}.yaml": yaml.safe_dump(trtllm.engine_config(p, s), sort_keys=False) for p in trt_pools}
        docs.append({"apiVersion": "v1", "kind": "ConfigMap",
                     "metadata": {"name": engine_configmap_name(graph), "namespace": s.k8s.namespace,
                                  "labels": _labels(graph)},
                     "data": data})
    components = [frontend_component(graph, s)]
    for pool in graph.pools:
        components.append(native_component(graph, pool, s) if pool.engine == "native"
                          else trtllm_component(graph, pool, s))
    spec: dict[str, Any] = {}
    if graph.engine == "trtllm":
        spec["backendFramework"] = "trtllm"
    spec["env"] = _env_list({"DYN_DISCOVERY_BACKEND": "kubernetes", **dict(sorted(s.k8s.env.items()))})
    spec["components"] = components
    metadata: dict[str, Any] = {"name": graph.name, "namespace": s.k8s.namespace, "labels": _labels(graph)}
    if graph.description:
        metadata["annotations"] = {f"{ANNOTATION}description": graph.description}
    docs.append({"apiVersion": API_VERSION, "kind": KIND, "metadata": metadata, "spec": spec})
    return docs


def _labels(graph: Graph) -> dict:
    return {"app.kubernetes.io/part-of": "dynamo-dwdp", f"{ANNOTATION}graph": graph.name}
