"""`dynamo-dwdp k8s render`: component shapes, group pods, GPUs, probes, drain, versions, autoscaling."""
from __future__ import annotations

import shlex
from pathlib import Path

import pytest
import yaml

from dynamo_dwdp.config import load_graph, load_settings
from dynamo_dwdp.deploy.autoscale import render_hpas
from dynamo_dwdp.deploy.dgd import render_graph
from dynamo_dwdp.deploy.validate import KIND, validate_documents
from dynamo_dwdp.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
NATIVE_GRAPHS = ["agg.yaml", "disagg_dwdp_decode.yaml", "disagg_dwdp_prefill.yaml", "disagg_dep.yaml",
                 "disagg_tp.yaml"]
COMPONENT_TYPE = {"agg": "worker", "prefill": "prefill", "decode": "decode"}


def _flag(argv, flag):
    return argv[argv.index(flag) + 1]


def _render(graph_file, config, **kw):
    graph = load_graph(str(ROOT / "graphs" / graph_file))
    settings = load_settings([str(ROOT / "configs" / config)])
    return graph, settings, render_graph(graph, settings, **kw)


@pytest.mark.parametrize("graph_file", NATIVE_GRAPHS)
@pytest.mark.parametrize("config,gpus_per_rank,device", [("h200-v2lite.yaml", 1, "cuda"), ("tiny-cpu.yaml", 0, "cpu")])
def test_native_graph_shape(graph_file, config, gpus_per_rank, device):
    raw = yaml.safe_load((ROOT / "graphs" / graph_file).read_text())
    _, _, docs = _render(graph_file, config)
    assert validate_documents(docs) == []
    dgd = docs[-1]
    assert (dgd["apiVersion"], dgd["kind"], dgd["metadata"]["name"]) == ("nvidia.com/v1beta1", KIND, raw["name"])
    comps = dgd["spec"]["components"]
    assert [c["name"] for c in comps] == ["frontend"] + [p["name"] for p in raw["pools"]]
    front = comps[0]
    assert front["type"] == "frontend" and "scalingAdapter" not in front
    fargv = front["podTemplate"]["spec"]["containers"][0]["command"] + front["podTemplate"]["spec"]["containers"][0]["args"]
    assert fargv[:3] == ["python3", "-m", "dynamo.frontend"]
    assert _flag(fargv, "--discovery-backend") == "kubernetes"
    assert _flag(fargv, "--router-mode") == raw["frontend"]["router_mode"]
    assert {"name": "DYN_DISCOVERY_BACKEND", "value": "kubernetes"} in dgd["spec"]["env"]
    for comp, rp in zip(comps[1:], raw["pools"]):
        ranks = rp.get("ranks", 1)
        assert comp["type"] == COMPONENT_TYPE[rp["role"]]
        assert comp["replicas"] == rp.get("replicas", 1)  # replicas = groups
        assert comp["scalingAdapter"] == {}
        assert comp["runtimeVersionOverride"] == "1.6.1"  # our image's tag is not Dynamo's version
        pod = comp["podTemplate"]["spec"]
        mains = [c for c in pod["containers"] if c["name"] == "main"]
        assert len(mains) == 1
        main = mains[0]
        argv = main["command"] + main["args"]
        gpus = int(main.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))
        assert gpus == ranks * gpus_per_rank  # one pod = one group
        if ranks > 1:
            assert argv[:6] == ["python3", "-m", "dynamo_dwdp.group", "--ranks", str(ranks), "--"]
            worker = argv[6:]
            assert "--group-rank" not in worker
        else:
            worker = argv
            assert _flag(worker, "--group-rank") == "0"
        assert worker[:3] == ["python3", "-m", "dynamo_dwdp"]
        assert _flag(worker, "--group-size") == str(ranks)
        assert _flag(worker, "--strategy") == rp["strategy"]
        assert _flag(worker, "--disaggregation-mode") == rp["role"]
        assert _flag(worker, "--component") == rp["name"]
        assert _flag(worker, "--namespace") == raw["name"]  # Dynamo namespace = graph name in k8s
        assert _flag(worker, "--device") == device
        assert _flag(worker, "--group-name") == f"{raw['name']}-{rp['name']}-g$(POD_NAME)"
        env = {e["name"]: e for e in main["env"]}
        assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"  # expands $(POD_NAME)
        port = int(env["DYN_SYSTEM_PORT"]["value"])
        assert main["startupProbe"]["httpGet"] == {"path": "/live", "port": port}
        assert main["livenessProbe"]["httpGet"] == {"path": "/live", "port": port}
        assert main["readinessProbe"]["httpGet"] == {"path": "/health", "port": port}
        assert "UCX_NET_DEVICES" not in env or env["UCX_NET_DEVICES"]["value"] != "lo"


@pytest.mark.parametrize("graph_file", ["disagg_dwdp_decode.yaml", "disagg_dwdp_prefill.yaml"])
def test_prefill_drains_longer_than_decode(graph_file):
    _, settings, docs = _render(graph_file, "h200-v2lite.yaml")
    comps = {c["type"]: c for c in docs[-1]["spec"]["components"]}
    grace = {t: c["podTemplate"]["spec"]["terminationGracePeriodSeconds"] for t, c in comps.items()}
    assert grace["prefill"] > grace["decode"] >= grace["frontend"]


def test_model_comes_from_the_pvc_or_an_init_container():
    _, _, docs = _render("disagg_dwdp_decode.yaml", "h200-v2lite.yaml")
    comp = docs[-1]["spec"]["components"][2]
    pod = comp["podTemplate"]["spec"]
    assert pod["volumes"][0]["persistentVolumeClaim"]["claimName"] == "model-cache"
    init = pod["initContainers"][0]
    script = init["args"][0]
    assert script.startswith("test -f /models/v2-lite-shape/config.json || exec ")
    make = shlex.split(script.split("exec ", 1)[1])
    assert make[:5] == ["python3", "-m", "dynamo_dwdp.cli", "make-model", "/models/v2-lite-shape"]
    assert _flag(make, "--preset") == "v2-lite-shape" and _flag(make, "--dtype") == "bf16"
    worker = pod["containers"][0]["args"]
    assert _flag(worker, "--model-path") == "/models/v2-lite-shape"
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H200"}


def test_image_namespace_and_version_override():
    _, _, docs = _render("disagg_dep.yaml", "h200-v2lite.yaml", image="reg.example/dwdp:1.2.3", namespace="inference")
    dgd = docs[-1]
    assert dgd["metadata"]["namespace"] == "inference"
    for comp in dgd["spec"]["components"]:
        assert comp["podTemplate"]["spec"]["containers"][0]["image"] == "reg.example/dwdp:1.2.3"
        assert comp["runtimeVersionOverride"] == "1.6.1"


@pytest.mark.parametrize("image,override", [("nvcr.io/nvidia/ai-dynamo/tensorrtllm-runtime:1.6.1", False),
                                            ("myreg/trtllm:latest", True)])
def test_trtllm_image_gets_an_override_only_without_a_semver_tag(image, override):
    graph = load_graph(str(ROOT / "graphs/trtllm_gb200_dwdp_prefill.yaml"))
    settings = load_settings([str(ROOT / "configs/trtllm-gb200-dsr1.yaml")], {"trtllm.image": image})
    docs = render_graph(graph, settings)
    assert validate_documents(docs) == []
    for comp in docs[-1]["spec"]["components"]:
        assert ("runtimeVersionOverride" in comp) is override


def test_trtllm_pools_pods_and_gpus():
    graph, settings, docs = _render("trtllm_gb200_dwdp_prefill.yaml", "trtllm-gb200-dsr1.yaml")
    comps = {c["name"]: c for c in docs[-1]["spec"]["components"]}
    per_node = settings.k8s.gpus_per_node
    pre, dec = graph.pool("prefill"), graph.pool("decode")
    pmain = comps["prefill"]["podTemplate"]["spec"]["containers"][0]
    assert pmain["command"] == ["/bin/bash", "-c"]
    assert pmain["args"][0].count("python3 -m dynamo.trtllm") == pre.ranks  # one context server per rank
    assert int(pmain["resources"]["limits"]["nvidia.com/gpu"]) == pre.ranks
    assert comps["prefill"]["replicas"] == pre.replicas and "multinode" not in comps["prefill"]
    dmain = comps["decode"]["podTemplate"]["spec"]["containers"][0]
    nodes = comps["decode"]["multinode"]["nodeCount"]
    assert nodes * int(dmain["resources"]["limits"]["nvidia.com/gpu"]) == dec.ranks
    assert int(dmain["resources"]["limits"]["nvidia.com/gpu"]) <= per_node


def test_group_wider_than_a_node_is_refused():
    graph = load_graph(str(ROOT / "graphs/disagg_tp.yaml"))
    settings = load_settings([str(ROOT / "configs/h200-v2lite.yaml")], {"k8s.gpus_per_node": 1})
    with pytest.raises(ConfigError) as e:
        render_graph(graph, settings)
    assert "pools[1] (decode)" in str(e.value) and "one NVLink domain" in str(e.value)


def test_hpa_per_pool_targets_its_scaling_adapter():
    graph = load_graph(str(ROOT / "graphs/disagg_dwdp_decode.yaml"))
    settings = load_settings([str(ROOT / "configs/h200-v2lite.yaml")])
    hpas = render_hpas(graph, settings)
    assert [h["spec"]["scaleTargetRef"] for h in hpas] == [
        {"apiVersion": "nvidia.com/v1beta1", "kind": "DynamoGraphDeploymentScalingAdapter",
         "name": f"disagg-dwdp-decode-{p.name}"} for p in graph.pools]
    for h in hpas:
        (metric,) = h["spec"]["metrics"]
        assert metric["type"] in ("Pods", "External")
        key = metric["type"].lower()
        assert metric[key]["metric"]["name"] == "dwdp_queue_to_compute_ratio"
    assert validate_documents(render_graph(graph, settings) + hpas) == []
    assert render_hpas(graph, load_settings([str(ROOT / "configs/h200-v2lite.yaml")],
                                            {"k8s.autoscale.enabled": False})) == []


def test_cli_render(tmp_path, capsys):
    from dynamo_dwdp.cli import main

    out = tmp_path / "m.yaml"
    assert main(["k8s", "render", str(ROOT / "graphs/disagg_dwdp_decode.yaml"), "-f",
                 str(ROOT / "configs/h200-v2lite.yaml"), "--image", "r/x:dev", "--namespace", "ns",
                 "--set", "k8s.autoscale.max_replicas=8", "--hpa", "-o", str(out)]) == 0
    docs = [d for d in yaml.safe_load_all(out.read_text()) if d]
    assert [d["kind"] for d in docs] == [KIND, "HorizontalPodAutoscaler", "HorizontalPodAutoscaler"]
    assert docs[1]["spec"]["maxReplicas"] == 8 and docs[0]["metadata"]["namespace"] == "ns"
    assert validate_documents(docs) == []
    assert main(["k8s", "render", str(ROOT / "graphs/agg.yaml")]) == 0  # default config: tiny-cpu
    assert "kind: DynamoGraphDeployment" in capsys.readouterr().out
    assert main(["k8s", "render", str(ROOT / "graphs/agg.yaml"), "--set", "engine.devce=cpu"]) == 2
    assert "error: overrides: engine.devce: unknown key" in capsys.readouterr().err


def test_cli_render_all_check(tmp_path, capsys):
    """--check is clean on the repo, and reports a file edited by hand."""
    import shutil

    from dynamo_dwdp.cli import main

    for sub in ("graphs", "configs", "k8s"):
        shutil.copytree(ROOT / sub, tmp_path / sub)
    assert main(["k8s", "render-all", "--root", str(tmp_path), "--check"]) == 0
    target = tmp_path / "k8s/base/agg/dgd.yaml"
    target.write_text(target.read_text().replace("replicas: 1", "replicas: 3"))
    (tmp_path / "k8s/base/agg/extra.yaml").write_text("# Generated by `dynamo-dwdp k8s render-all`: x\n")
    capsys.readouterr()
    assert main(["k8s", "render-all", "--root", str(tmp_path), "--check"]) == 1
    out = capsys.readouterr().out
    assert "stale: k8s/base/agg/dgd.yaml" in out and "stale: k8s/base/agg/extra.yaml" in out
    assert main(["k8s", "render-all", "--root", str(tmp_path)]) == 0
    assert not (tmp_path / "k8s/base/agg/extra.yaml").exists()
    assert main(["k8s", "render-all", "--root", str(tmp_path), "--check"]) == 0
