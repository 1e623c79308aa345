"""A broken manifest fails with a message naming the field path; `dynamo-dwdp k8s validate` exit codes."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from dynamo_dwdp.config import load_graph, load_settings
from dynamo_dwdp.deploy.autoscale import render_hpas
from dynamo_dwdp.deploy.dgd import render_graph
from dynamo_dwdp.deploy.tree import dump_yaml
from dynamo_dwdp.deploy.validate import KIND, is_semver_tag, validate_documents

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests/fixtures/k8s"


def _docs(graph="disagg_dwdp_decode.yaml", config="h200-v2lite.yaml"):
    graph = load_graph(str(ROOT / "graphs" / graph))
    settings = load_settings([str(ROOT / "configs" / config)])
    return render_graph(graph, settings) + render_hpas(graph, settings)


def _dgd(docs):
    return next(d for d in docs if d.get("kind") == KIND)


def _main(d, i):
    return _dgd(d)["spec"]["components"][i]["podTemplate"]["spec"]["containers"][0]


def _comp(d, i):
    return _dgd(d)["spec"]["components"][i]


# component 0 = frontend, 1 = prefill (single), 2 = decode (dwdp group of 2 ranks, 2 GPUs)
BROKEN = [
    ("typo-container-field", lambda d: _main(d, 2).update(resourcess=_main(d, 2).pop("resources")),
     "spec.components[2].podTemplate.spec.containers[0].resourcess: unknown field (did you mean 'resources'?"),
    ("typo-component-field", lambda d: _comp(d, 1).update(replica=1),
     "spec.components[1].replica: unknown field (did you mean 'replicas'?"),
    ("typo-spec-field", lambda d: _dgd(d)["spec"].update(component=[]),
     "spec.component: unknown field (did you mean 'components'?"),
    ("scaling-adapter-not-empty", lambda d: _comp(d, 2).update(scalingAdapter={"enabled": True}),
     "spec.components[2].scalingAdapter.enabled: unknown field"),
    ("bad-type", lambda d: _comp(d, 2).update(type="dwdp-decode"),
     "spec.components[2].type: 'dwdp-decode' is not one of frontend, worker, prefill, decode, planner, epp"),
    ("replicas-string", lambda d: _comp(d, 2).update(replicas="2"), "spec.components[2].replicas: expected integer"),
    ("metadata-typo", lambda d: _dgd(d)["metadata"].update(label={}), "metadata.label: unknown field"),
    ("no-main-container", lambda d: _main(d, 2).update(name="worker"),
     "spec.components[2].podTemplate.spec.containers: no container named 'main'"),
    ("wrong-gpu-count", lambda d: _main(d, 2)["resources"]["limits"].update({"nvidia.com/gpu": "1"}),
     "spec.components[2].podTemplate.spec.containers[0].resources.limits.nvidia.com/gpu: 1 GPU(s) x 1 node(s) but "
     "the group has 2 rank(s)"),
    ("gpu-missing", lambda d: _main(d, 1).pop("resources"),
     "spec.components[1].podTemplate.spec.containers[0].resources.limits.nvidia.com/gpu: 0 GPU(s)"),
    ("group-size-mismatch", lambda d: _main(d, 2)["args"].__setitem__(1, "3"),
     "spec.components[2].podTemplate.spec.containers[0].args: --group-size 2 but the pod runs 3 rank(s)"),
    ("no-runtime-override-non-semver", lambda d: _comp(d, 2).pop("runtimeVersionOverride"),
     "spec.components[2].runtimeVersionOverride: required because the main image tag 'dev' is not a semantic"),
    ("no-scaling-adapter", lambda d: _comp(d, 1).pop("scalingAdapter"), "spec.components[1].scalingAdapter: missing"),
    ("uppercase-name", lambda d: _comp(d, 2).update(name="Decode"),
     "spec.components[2].name: 'Decode' is not a DNS label"),
    ("duplicate-names", lambda d: _comp(d, 2).update(name="prefill"),
     "spec.components[2]: duplicate name 'prefill'"),
    ("probe-wrong-port", lambda d: _main(d, 2)["readinessProbe"]["httpGet"].update(port=8080),
     "spec.components[2].podTemplate.spec.containers[0].readinessProbe.httpGet.port: 8080 but DYN_SYSTEM_PORT is 9090"),
    ("prefill-drains-less", lambda d: _comp(d, 1)["podTemplate"]["spec"].update(terminationGracePeriodSeconds=10),
     "spec.components[1].podTemplate.spec.terminationGracePeriodSeconds: 10 is shorter than decode's"),
    ("no-frontend", lambda d: _dgd(d)["spec"]["components"].pop(0), "spec.components: no component of type frontend"),
    ("wrong-api-version", lambda d: _dgd(d).update(apiVersion="nvidia.com/v1alpha1"),
     "apiVersion: 'nvidia.com/v1alpha1' is the wrong version (allowed: nvidia.com/v1beta1)"),
    ("hpa-wrong-target", lambda d: d[-1]["spec"]["scaleTargetRef"].update(name="disagg-dwdp-decode-decoder"),
     "HorizontalPodAutoscaler/disagg-dwdp-decode-decode: spec.scaleTargetRef.name: 'disagg-dwdp-decode-decoder' is "
     "no component's DGDSA"),
    ("hpa-targets-deployment", lambda d: d[-1]["spec"]["scaleTargetRef"].update(kind="Deployment"),
     "spec.scaleTargetRef.kind: 'Deployment'"),
]


@pytest.mark.parametrize("case", BROKEN, ids=[c[0] for c in BROKEN])
def test_broken_manifest_names_the_field(case):
    _id, mutate, expected = case
    docs = copy.deepcopy(_docs())
    assert validate_documents(docs) == []
    mutate(docs)
    problems = validate_documents(docs)
    assert any(expected in p for p in problems), problems


def test_trtllm_configmap_must_hold_the_engine_file():
    docs = copy.deepcopy(_docs("trtllm_gb200_dwdp_prefill.yaml", "trtllm-gb200-dsr1.yaml"))
    assert validate_documents(docs) == []
    cm = next(d for d in docs if d["kind"] == "ConfigMap")
    cm["data"]["decoder.yaml"] = cm["data"].pop("decode.yaml")
    problems = validate_documents(docs)
    assert any("spec.components[2]: engine file /config/decode.yaml is not a key of ConfigMap" in p for p in problems)


def test_trtllm_gpu_count_uses_annotations_and_nodes():
    docs = copy.deepcopy(_docs("trtllm_gb200_dwdp_prefill.yaml", "trtllm-gb200-dsr1.yaml"))
    _comp(docs, 2)["multinode"]["nodeCount"] = 3  # 3 x 4 GPUs for a DEP8 group
    problems = validate_documents(docs)
    assert any("spec.components[2].podTemplate.spec.containers[0].resources.limits.nvidia.com/gpu: 4 GPU(s) x 3 node(s)"
               in p and "expected 8" in p for p in problems), problems


@pytest.mark.parametrize("image,semver", [
    ("nvcr.io/nvidia/ai-dynamo/tensorrtllm-runtime:1.6.1", True), ("reg:5000/x/y:v0.8.1", True),
    ("my-registry/tensorrtllm-runtime:my-tag", False), ("x/y:0.8.1.post2", False), ("x/y", False),
    ("x/y@sha256:" + "a" * 64, False), ("localhost:5000/y", False),
])
def test_image_tag_rule(image, semver):
    assert is_semver_tag(image) is semver


def _write(tmp_path, docs, name="m.yaml"):
    p = tmp_path / name
    p.write_text(dump_yaml(docs))
    return p


def test_cli_validate_ok_and_errors(tmp_path, capsys):
    from dynamo_dwdp.cli import main

    good = _write(tmp_path, _docs(), "good.yaml")
    assert main(["k8s", "validate", str(good)]) == 0
    assert f"OK {good}" in capsys.readouterr().out
    docs = copy.deepcopy(_docs())
    _main(docs, 2)["resources"]["limits"]["nvidia.com/gpu"] = "3"
    bad = _write(tmp_path, docs, "bad.yaml")
    assert main(["k8s", "validate", str(good), str(bad)]) == 1
    out = capsys.readouterr().out
    assert f"OK {good}" in out and f"{bad}: DynamoGraphDeployment/disagg-dwdp-decode: spec.components[2]" in out
    assert main(["k8s", "validate", str(FIXTURES / "typo_field.yaml")]) == 1
    assert "containers[0].imagePullPolicyy: unknown field" in capsys.readouterr().out
    assert main(["k8s", "validate", "--schema-only", str(FIXTURES / "v1alpha1.yaml")]) == 1
    assert "wrong version" in capsys.readouterr().out


def test_cli_validate_missing_file(capsys):
    from dynamo_dwdp.cli import main

    assert main(["k8s", "validate", "nope.yaml"]) == 2
    assert "error: nope.yaml: file not found" in capsys.readouterr().err


def test_fixture_files_are_yaml():
    for p in FIXTURES.glob("*.yaml"):
        assert list(yaml.safe_load_all(p.read_text()))
