"""Example HorizontalPodAutoscalers: one per pool, each scaling that pool's DGDSA on its own.

Every pool component carries `scalingAdapter: {}`, so the operator creates a
DynamoGraphDeploymentScalingAdapter named `<dgd>-<component>` (nvidia.com/v1beta1) that owns the
component's `replicas` and exposes the Scale subresource. The HPA below targets it with a *Pods*
metric: the per-pod average of `dwdp_queue_to_compute_ratio` (queued work over compute capacity, which
the workers export on their system port; a Prometheus Adapter rule must expose it under the custom
metrics API, taking the max over the ranks of a pod).

A group pool scales by WHOLE GROUPS: replicas = groups, one pod of `ranks` GPUs each, so every step
adds or removes `ranks` GPUs (a DWDP group cannot grow by one rank: the expert partition is fixed).
"""
from __future__ import annotations

from typing import Any

from dynamo_dwdp.config.graph import Graph
from dynamo_dwdp.config.settings import Settings
from dynamo_dwdp.deploy.validate import API_VERSION


def adapter_name(graph: Graph, pool_name: str) -> str:
    """The DGDSA the operator creates for a component: `<dgd>-<component, lowercased>`."""
    return f"{graph.name}-{pool_name.lower()}"


def render_hpas(graph: Graph, settings: Settings, *, namespace: str | None = None) -> list[dict]:
    """One autoscaling/v2 HPA per pool (empty when `k8s.autoscale.enabled` is false)."""
    auto = settings.k8s.autoscale
    if not auto.enabled:
        return []
    docs: list[dict[str, Any]] = []
    for pool in graph.pools:
        name = adapter_name(graph, pool.name)
        docs.append({
            "apiVersion": "autoscaling/v2",
            "kind": "HorizontalPodAutoscaler",
            "metadata": {"name": name, "namespace": namespace or settings.k8s.namespace,
                         "labels": {"app.kubernetes.io/part-of": "dynamo-dwdp", "dynamo-dwdp/graph": graph.name,
                                    "dynamo-dwdp/pool": pool.name},
                         "annotations": {"dynamo-dwdp/scales": f"whole groups of {pool.ranks} rank(s) "
                                                               f"({pool.strategy}); replicas = groups"}},
            "spec": {
                "scaleTargetRef": {"apiVersion": API_VERSION, "kind": "DynamoGraphDeploymentScalingAdapter",
                                   "name": name},
                "minReplicas": max(auto.min_replicas, 1),
                "maxReplicas": max(auto.max_replicas, auto.min_replicas),
                "metrics": [{"type": "Pods", "pods": {
                    "metric": {"name": auto.metric},
                    "target": {"type": "AverageValue", "averageValue": auto.target}}}],
                "behavior": {
                    "scaleUp": {"stabilizationWindowSeconds": 60,
                                "policies": [{"type": "Pods", "value": 1, "periodSeconds": 120}]},
                    "scaleDown": {"stabilizationWindowSeconds": 600,
                                  "policies": [{"type": "Pods", "value": 1, "periodSeconds": 300}]},
                },
            },
        })
    return docs
