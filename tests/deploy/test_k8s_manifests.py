"""Everything under k8s/ is fresh and valid: CRD v1beta1 schema (strict) + semantic checks.

Also: kustomize outputs (when kubectl is on PATH) validate and equal the direct renders, the vendored
schema is the upstream one, an independent validator (jsonschema, strict) agrees, and the upstream
examples pass the schema layer (v1alpha1 ones are rejected as the wrong version).
"""
from __future__ import annotations

import copy
import functools
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from dynamo_dwdp.config import load_graph, load_settings
from dynamo_dwdp.deploy import tree
from dynamo_dwdp.deploy.dgd import render_graph
from dynamo_dwdp.deploy.validate import KIND, load_documents, load_schema, schema_problems, validate_documents

ROOT = Path(__file__).resolve().parents[2]
# Upstream Dynamo CRD + example manifests, when provided: DWDP_UPSTREAM_K8S=<dir with crds/ and examples/>
SHARED = Path(os.environ["DWDP_UPSTREAM_K8S"]) if os.environ.get("DWDP_UPSTREAM_K8S") else None
K8S_FILES = sorted((ROOT / "k8s").rglob("*.yaml"))
KUBECTL = shutil.which("kubectl")


def test_k8s_tree_is_not_stale():
    """Re-render in memory and compare with the files on disk (run `dynamo-dwdp k8s render-all`)."""
    assert tree.stale_files(ROOT) == []


def test_tree_has_every_graph():
    loaded = [load_graph(str(p)) for p in (ROOT / "graphs").glob("*.yaml")]
    graphs = {g.name for g in loaded}
    assert {p.parent.name for p in (ROOT / "k8s/base").glob("*/dgd.yaml")} == graphs
    natives = {g.name for g in loaded if g.engine == "native"}
    assert {p.parent.name for p in (ROOT / "k8s/overlays/h200").glob("*/kustomization.yaml")} == natives
    assert {p.stem for p in (ROOT / "k8s/autoscale").glob("*.yaml")} == graphs


@pytest.mark.parametrize("path", K8S_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_file_under_k8s_validates(path):
    docs = load_documents(path)
    assert validate_documents(docs) == []


def test_every_dgd_was_checked():
    dgds = [d for p in K8S_FILES for d in load_documents(p) if isinstance(d, dict) and d.get("kind") == KIND]
    assert len(dgds) == len(list((ROOT / "graphs").glob("*.yaml")))


@functools.lru_cache(maxsize=None)
def _kustomize_cached(path: Path) -> str:
    return subprocess.run([KUBECTL, "kustomize", str(path)], capture_output=True, text=True, check=True).stdout


def _kustomize(path: Path) -> list[dict]:
    out = _kustomize_cached(path)
    return [d for d in yaml.safe_load_all(out) if d is not None]


KUSTOMIZATIONS = sorted(p.parent for p in (ROOT / "k8s").rglob("kustomization.yaml"))


@pytest.mark.skipif(KUBECTL is None, reason="kubectl not on PATH")
@pytest.mark.parametrize("path", KUSTOMIZATIONS, ids=lambda p: str(p.relative_to(ROOT)))
def test_kustomize_output_validates(path):
    docs = _kustomize(path)
    assert any(d.get("kind") == KIND for d in docs)
    assert validate_documents(docs) == []


def _graph_by_name(name: str):
    for p in (ROOT / "graphs").glob("*.yaml"):
        g = load_graph(str(p))
        if g.name == name:
            return g
    raise KeyError(name)


@pytest.mark.parametrize("overlay", tree.OVERLAYS, ids=lambda o: o.name)
def test_overlay_patch_gives_exactly_the_overlay_config_render(overlay):
    """base + our JSON6902 patch (applied here, and by kustomize when available) == direct render."""
    for d in sorted((ROOT / "k8s/overlays" / overlay.name).glob("*/kustomization.yaml")):
        graph = _graph_by_name(d.parent.name)
        base = next(x for x in load_documents(ROOT / "k8s/base" / graph.name / "dgd.yaml") if x["kind"] == KIND)
        ops = load_documents(d.parent / "dgd-patch.yaml")[0]
        want = next(x for x in render_graph(graph, load_settings([str(ROOT / overlay.config)])) if x["kind"] == KIND)
        assert tree.apply_json_patch(base, ops) == want
        if KUBECTL:
            got = [x for x in _kustomize(d.parent) if x["kind"] == KIND]
            assert got == [want]


@pytest.mark.skipif(KUBECTL is None, reason="kubectl not on PATH")
def test_mnnvl_overlay_claims_the_compute_domain_everywhere():
    docs = _kustomize(ROOT / "k8s/overlays/mnnvl")
    domain = next(d for d in docs if d["kind"] == "ComputeDomain")
    dgd = next(d for d in docs if d["kind"] == KIND)
    template = domain["spec"]["channel"]["resourceClaimTemplate"]["name"]
    nodes = 0
    for comp in dgd["spec"]["components"]:
        if comp["type"] == "frontend":
            continue
        spec = comp["podTemplate"]["spec"]
        assert spec["resourceClaims"][0]["resourceClaimTemplateName"] == template
        main = next(c for c in spec["containers"] if c["name"] == "main")
        assert main["resources"]["claims"] == [{"name": spec["resourceClaims"][0]["name"]}]
        assert "nodeSelector" in spec  # on top of gb200-trtllm placement
        nodes += comp["replicas"] * comp.get("multinode", {}).get("nodeCount", 1)
    assert domain["spec"]["numNodes"] == nodes
    assert {"name": "NCCL_MNNVL_ENABLE", "value": "1"} in dgd["spec"]["env"]


def _strip(o):
    if isinstance(o, dict):
        return {k: _strip(v) for k, v in o.items() if k != "description"}
    if isinstance(o, list):
        return [_strip(x) for x in o]
    return o


@pytest.mark.skipif(SHARED is None or not SHARED.exists(), reason="DWDP_UPSTREAM_K8S not set (upstream CRD)")
def test_vendored_schema_is_upstream_without_descriptions():
    upstream = json.loads((SHARED / "crds/dgd_v1beta1_openapiv3.json").read_text())
    assert load_schema() == _strip(upstream)


def _strict(o):
    """kubeconform-style strictness for jsonschema: close every object schema that is not explicitly open."""
    if isinstance(o, dict):
        o = {k: _strict(v) for k, v in o.items()}
        if o.get("type") == "object" and "additionalProperties" not in o and not o.get(
                "x-kubernetes-preserve-unknown-fields"):
            o["additionalProperties"] = False
        return o
    if isinstance(o, list):
        return [_strict(x) for x in o]
    return o


@pytest.fixture(scope="module")
def jsonschema_validator():
    jsonschema = pytest.importorskip("jsonschema")
    schema = _strict(load_schema())
    schema["properties"]["metadata"] = {"type": "object"}  # ObjectMeta: checked separately
    return jsonschema.Draft7Validator(schema)


def _all_dgds():
    docs = [d for p in K8S_FILES for d in load_documents(p) if isinstance(d, dict) and d.get("kind") == KIND]
    if KUBECTL:
        for k in KUSTOMIZATIONS:
            docs += [d for d in _kustomize(k) if d.get("kind") == KIND]
    return docs


def test_independent_strict_jsonschema_accepts_our_manifests(jsonschema_validator):
    for doc in _all_dgds():
        errors = [e.message for e in jsonschema_validator.iter_errors(doc)]
        assert errors == [], doc["metadata"]["name"]


@pytest.mark.parametrize("mutate", [
    lambda d: d["spec"]["components"][1]["podTemplate"]["spec"]["containers"][0].update(resourcess={}),
    lambda d: d["spec"].update(component=[]),
    lambda d: d["spec"]["components"][1].update(type="dwdp-decode"),
    lambda d: d["spec"]["components"][1].update(replicas=-1),
    lambda d: d["spec"]["components"][1].update(scalingAdapter={"enabled": True}),
    lambda d: d["spec"]["components"][1].update(runtimeVersionOverride="v1.6"),
    lambda d: d["spec"]["components"][1]["podTemplate"]["spec"]["containers"][0]["resources"]["limits"].update(
        {"nvidia.com/gpu": "two"}),
], ids=["typo-container-field", "typo-spec-field", "bad-type-enum", "negative-replicas", "closed-scaling-adapter",
        "bad-runtime-version", "bad-quantity"])
def test_both_validators_reject_schema_breakage(jsonschema_validator, mutate):
    base = next(d for d in render_graph(load_graph(str(ROOT / "graphs/disagg_dwdp_decode.yaml")),
                                        load_settings([str(ROOT / "configs/h200-v2lite.yaml")])) if d["kind"] == KIND)
    broken = copy.deepcopy(base)
    mutate(broken)
    assert list(jsonschema_validator.iter_errors(broken)), "reference validator accepted it"
    assert schema_problems(broken), "our validator accepted it"


EXAMPLES = sorted((SHARED / "examples").glob("*.yaml")) if SHARED is not None and SHARED.exists() else []


@pytest.mark.skipif(not EXAMPLES, reason="DWDP_UPSTREAM_K8S not set (upstream examples)")
@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_upstream_examples_pass_the_schema_layer(path, jsonschema_validator):
    dgds = [d for d in load_documents(path) if isinstance(d, dict) and d.get("kind") == KIND]
    assert dgds
    for doc in dgds:
        problems = schema_problems(doc)
        if doc["apiVersion"] == "nvidia.com/v1beta1":
            assert problems == []
            assert list(jsonschema_validator.iter_errors(doc)) == []
        else:
            assert doc["apiVersion"] == "nvidia.com/v1alpha1"
            assert problems == ["apiVersion: 'nvidia.com/v1alpha1' is the wrong version (allowed: nvidia.com/v1beta1)"]


def test_same_host_kv_backend_renders_nixl_for_pods():
    """`kv_transfer.backend: local` is a one-host setting: every k8s worker is rendered with NIXL, and
    the other argv is the one the nixl setting gives."""
    graph = load_graph(str(ROOT / "graphs" / "disagg_single.yaml"))
    config = str(ROOT / "configs" / "h200-v2lite.yaml")
    local = render_graph(graph, load_settings([config], {"kv_transfer.backend": "local"}))
    nixl = render_graph(graph, load_settings([config], {"kv_transfer.backend": "nixl"}))
    text = json.dumps(local)
    assert "--kv-transfer" in text and '"local"' not in text
    assert local == nixl
