"""TensorRT-LLM pools: the engine YAML, field by field, against the documented whitelist and the published
GB200 DWDP configuration; the DWDP rank script; tensorrt_llm is never imported."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from dynamo_dwdp.config import load_graph, load_settings
from dynamo_dwdp.deploy import trtllm
from dynamo_dwdp.deploy.dgd import render_graph
from dynamo_dwdp.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
GRAPH = ROOT / "graphs/trtllm_gb200_dwdp_prefill.yaml"
CONFIG = ROOT / "configs/trtllm-gb200-dsr1.yaml"


@pytest.fixture(scope="module")
def rendered():
    docs = render_graph(load_graph(str(GRAPH)), load_settings([str(CONFIG)]))
    cm = next(d for d in docs if d["kind"] == "ConfigMap")
    return {k.removesuffix(".yaml"): yaml.safe_load(v) for k, v in cm["data"].items()}, docs


def _leaves(d, path=""):
    for k, v in d.items():
        dotted = f"{path}.{k}" if path else k
        yield dotted, v
        if isinstance(v, dict):
            yield from _leaves(v, dotted)


def test_every_field_is_in_the_documented_whitelist_with_a_source(rendered):
    engines, _ = rendered
    assert set(engines) == {"prefill", "decode"}
    for name, cfg in engines.items():
        for dotted, value in _leaves(cfg):
            assert dotted in trtllm.ALLOWED_FIELDS, f"{name}: {dotted}"
            field = trtllm.ALLOWED_FIELDS[dotted]
            assert "NVIDIA/TensorRT-LLM" in field.source or "ai-dynamo/dynamo" in field.source
            assert ": " in field.source  # repo: path
            if value is None:
                assert field.nullable, dotted
            else:
                assert isinstance(value, field.types), dotted
                if field.choices:
                    assert value in field.choices, dotted
        assert trtllm.check_engine_config(cfg) == []


def test_prefill_is_the_published_dwdp_context_config(rendered):
    """TensorRT-LLM examples/dwdp/reproduce.py ctx_cfg + blog 19: DWDP4, 64/64 of 256 experts, CUTEDSL, ..."""
    p = rendered[0]["prefill"]
    assert p["dwdp_config"] == {"dwdp_size": 4, "num_groups": 1, "num_experts_per_worker": 64,
                                "num_prefetch_experts": 64, "contention_opt": True}
    d = p["dwdp_config"]
    assert d["num_experts_per_worker"] + (d["dwdp_size"] - 1) * d["num_prefetch_experts"] == 256
    assert p["moe_config"]["backend"] == "CUTEDSL"
    assert p["disable_overlap_scheduler"] is True
    assert p["tensor_parallel_size"] == 1 and p["moe_expert_parallel_size"] == 1
    assert (p["max_batch_size"], p["max_num_tokens"]) == (4, 33000)
    assert p["cache_transceiver_config"]["backend"] == "UCX"
    assert p["cuda_graph_config"] is None
    assert "load_balancer" not in p["moe_config"]


def test_decode_is_dep(rendered):
    dec = rendered[0]["decode"]
    graph = load_graph(str(GRAPH))
    n = graph.pool("decode").ranks
    assert dec["enable_attention_dp"] is True
    assert dec["tensor_parallel_size"] == n == dec["moe_expert_parallel_size"]
    assert dec["moe_config"]["backend"] == "WIDEEP"
    assert "dwdp_config" not in dec
    assert dec["cuda_graph_config"]["batch_sizes"] == sorted(dec["cuda_graph_config"]["batch_sizes"])


def test_pods_run_stock_dynamo_trtllm_with_the_mounted_engine_file(rendered):
    _, docs = rendered
    dgd = docs[-1]
    for comp in dgd["spec"]["components"][1:]:
        main = comp["podTemplate"]["spec"]["containers"][0]
        text = " ".join(main["command"] + main["args"])
        assert "python3 -m dynamo.trtllm" in text
        assert f"--extra-engine-args /config/{comp['name']}.yaml" in text
        assert f"--disaggregation-mode {comp['name']}" in text
        assert {"name": "engine-config", "mountPath": "/config", "readOnly": True} in main["volumeMounts"]
    assert dgd["spec"]["backendFramework"] == "trtllm"


def test_tensorrt_llm_is_never_imported(rendered):
    assert "tensorrt_llm" not in sys.modules


def test_unknown_extra_field_fails_naming_it(tmp_path):
    graph = load_graph(str(GRAPH))
    settings = load_settings([str(CONFIG)], {"trtllm.decode.extra": {"moe_config": {"backnd": "WIDEEP"}}})
    with pytest.raises(ConfigError) as e:
        render_graph(graph, settings)
    msg = str(e.value)
    assert "moe_config.backnd: not a documented TensorRT-LLM field" in msg and "\n" not in msg
    assert "backend" in msg  # the allowed siblings are listed


@pytest.mark.parametrize("cfg,fragment", [
    ({"dwdp_config": {"dwdp_size": 4}}, "dwdp_config: missing num_groups"),
    ({"max_batch_size": "4"}, "max_batch_size: '4' has type str"),
    ({"enable_attention_dp": 1}, "enable_attention_dp: 1 has type int"),
    ({"moe_config": {"backend": "FOO"}}, "moe_config.backend: 'FOO' is not one of"),
    ({"kv_cache_config": None}, "kv_cache_config: must not be null"),
    ({"dwdp": {}}, "dwdp: not a documented TensorRT-LLM field"),
])
def test_check_engine_config_catches(cfg, fragment):
    assert any(fragment in p for p in trtllm.check_engine_config(cfg)), trtllm.check_engine_config(cfg)


def _script_with(tmp_path, body: str, ranks: int = 3) -> str:
    graph_file = tmp_path / "g.yaml"
    graph_file.write_text(f"name: g\npools:\n  - {{name: prefill, role: prefill, strategy: dwdp, ranks: {ranks}, "
                          "engine: trtllm}\n  - {name: decode, role: decode, strategy: single, engine: trtllm}\n")
    graph = load_graph(str(graph_file))
    settings = load_settings([str(CONFIG)], {"trtllm.rendezvous_port": 29611})
    return trtllm.dwdp_group_script(graph.pool("prefill"), settings, ["bash", "-c", body], system_port=9300)


@pytest.mark.skipif(not Path("/bin/bash").exists(), reason="needs bash")
def test_dwdp_group_script_pins_ranks_and_fails_as_a_group(tmp_path):
    out = tmp_path / "ranks.txt"
    body = (f'echo "$TRTLLM_DWDP_RANK $CUDA_VISIBLE_DEVICES $DYN_SYSTEM_PORT $TRTLLM_DWDP_MASTER_PORT $HOME" >> {out}; '
            'if [ "$TRTLLM_DWDP_RANK" = 1 ]; then sleep 0.5; exit 7; fi; exec sleep 30')
    script = _script_with(tmp_path, body)
    t0 = time.monotonic()
    proc = subprocess.run(["/bin/bash", "-c", script], capture_output=True, text=True, timeout=20,
                          env={**os.environ, "HOME": str(tmp_path)})
    assert time.monotonic() - t0 < 10  # rank 1 died -> the others were stopped, not waited for 30 s
    assert proc.returncode == 7
    lines = sorted(out.read_text().split("\n")[:-1])
    assert lines == [f"{r} {r} {9300 + r} 29611 /tmp/dwdp-rank{r}" for r in range(3)]


@pytest.mark.skipif(not Path("/bin/bash").exists(), reason="needs bash")
def test_dwdp_group_script_forwards_sigterm(tmp_path):
    marker = tmp_path / "term"
    body = f"trap 'echo $TRTLLM_DWDP_RANK >> {marker}; exit 0' TERM; sleep 30 & wait"
    proc = subprocess.Popen(["/bin/bash", "-c", _script_with(tmp_path, body, ranks=2)])
    time.sleep(0.5)
    proc.terminate()
    proc.wait(timeout=10)
    assert sorted(marker.read_text().split()) == ["0", "1"]
    assert proc.returncode != 0  # a group that stops is never "success": the pod restarts it
