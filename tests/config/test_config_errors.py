"""Each kind of bad input gives ONE line naming the file, the dotted path and the allowed values."""
from __future__ import annotations

from pathlib import Path

import pytest

from dynamo_dwdp.config import check_compatible, load_graph, load_settings
from dynamo_dwdp.errors import ConfigError, UserError

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs/tiny-cpu.yaml")

GOOD_GRAPH = """\
name: g
frontend: {router_mode: round-robin, migration_limit: 0}
pools:
  - {name: prefill, role: prefill, strategy: single, ranks: 1, replicas: 1}
  - {name: decode, role: decode, strategy: dwdp, ranks: 2, replicas: 1}
"""

# (id, graph text, dotted path expected in the message, fragments expected in the message)
BAD_GRAPHS = [
    ("bad-strategy", GOOD_GRAPH.replace("strategy: dwdp", "strategy: dwdpp"),
     "pools[1].strategy", ["'dwdpp' is not one of single, dp, dwdp, dep, tp"]),
    ("bad-role", GOOD_GRAPH.replace("role: decode", "role: decoder"),
     "pools[1].role", ["agg, prefill, decode"]),
    ("unknown-pool-key", GOOD_GRAPH.replace("replicas: 1}\n  - {name: decode", "replica: 1}\n  - {name: decode"),
     "pools[0].replica", ["unknown key 'replica'", "did you mean 'replicas'", "allowed: name, role, strategy"]),
    ("unknown-top-key", GOOD_GRAPH + "pool_count: 2\n", "pool_count", ["unknown key", "allowed: name, description"]),
    ("dwdp-one-rank", GOOD_GRAPH.replace("strategy: dwdp, ranks: 2", "strategy: dwdp, ranks: 1"),
     "pools[1].ranks", ["minimum 2 for strategy dwdp", ">= 2"]),
    ("tp-one-rank", GOOD_GRAPH.replace("strategy: dwdp, ranks: 2", "strategy: tp, ranks: 1"),
     "pools[1].ranks", ["minimum 2 for strategy tp"]),
    ("dep-one-rank", GOOD_GRAPH.replace("strategy: dwdp, ranks: 2", "strategy: dep, ranks: 1"),
     "pools[1].ranks", ["minimum 2 for strategy dep"]),
    ("single-two-ranks", GOOD_GRAPH.replace("strategy: single, ranks: 1", "strategy: single, ranks: 2"),
     "pools[0].ranks", ["allowed: 1"]),
    ("ranks-not-int", GOOD_GRAPH.replace("ranks: 2", "ranks: two"),
     "pools[1].ranks", ["expected an integer", "'two'"]),
    ("ranks-bool", GOOD_GRAPH.replace("ranks: 2", "ranks: true"), "pools[1].ranks", ["expected an integer"]),
    ("replicas-zero", GOOD_GRAPH.replace("ranks: 2, replicas: 1", "ranks: 2, replicas: 0"),
     "pools[1].replicas", ["out of range", "1..1024"]),
    ("decode-without-prefill", "name: g\npools:\n  - {name: decode, role: decode, strategy: dwdp, ranks: 2}\n",
     "pools[0].role", ["decode pool needs a prefill pool"]),
    ("prefill-without-decode", "name: g\npools:\n  - {name: p, role: prefill, strategy: single}\n",
     "pools[0].role", ["prefill pool needs a decode pool"]),
    ("agg-plus-decode", "name: g\npools:\n  - {name: w, role: agg, strategy: single}\n"
                        "  - {name: d, role: decode, strategy: single}\n",
     "pools[0].role", ["exactly one pool, role agg"]),
    ("pool-name-not-dns", GOOD_GRAPH.replace("name: decode", "name: Decode_Pool"),
     "pools[1].name", ["'Decode_Pool' is not a DNS label"]),
    ("graph-name-not-dns", GOOD_GRAPH.replace("name: g\n", "name: my graph\n"),
     "name", ["is not a DNS label"]),
    ("duplicate-pool-names", GOOD_GRAPH.replace("name: decode", "name: prefill"),
     "pools[1].name", ["already the name of pools[0]"]),
    ("trtllm-agg", "name: g\npools:\n  - {name: w, role: agg, strategy: single, engine: trtllm}\n",
     "pools[0].engine", ["only for roles prefill and decode"]),
    ("trtllm-dwdp-decode", GOOD_GRAPH.replace("replicas: 1}\n", "replicas: 1, engine: trtllm}\n"),
     "pools[1].strategy", ["prefill (context) feature"]),
    ("mixed-engines", GOOD_GRAPH.replace("strategy: single, ranks: 1, replicas: 1}",
                                         "strategy: single, ranks: 1, replicas: 1, engine: trtllm}"),
     "pools[1].engine", ["must use the same engine"]),
    ("bad-router-mode", GOOD_GRAPH.replace("round-robin", "kv-aware"),
     "frontend.router_mode", ["round-robin, random, kv, least-loaded"]),
    ("bad-override-section", GOOD_GRAPH.replace("replicas: 1}\n", "replicas: 1, overrides: {infra: {}}}\n", 1),
     "pools[0].overrides.infra", ["allowed: engine, dwdp, trtllm"]),
    ("bad-override-key", GOOD_GRAPH.replace("ranks: 2, replicas: 1}", "ranks: 2, replicas: 1, "
                                            "overrides: {dwdp: {transprt: shm}}}"),
     "pools[1].overrides.dwdp.transprt", ["did you mean 'transport'", "allowed: experts_per_rank"]),
    ("bad-override-value", GOOD_GRAPH.replace("ranks: 2, replicas: 1}", "ranks: 2, replicas: 1, "
                                              "overrides: {dwdp: {transport: nvlink}}}"),
     "pools[1].overrides.dwdp.transport", ["'nvlink' is not one of auto, shm, cuda_ipc"]),
    ("missing-pools", "name: g\n", "pools", ["missing required key"]),
    ("pools-not-list", "name: g\npools: {a: 1}\n", "pools", ["expected a list"]),
    ("not-a-mapping", "- a\n- b\n", "top level", ["expected a mapping"]),
]


def _one_line(e: BaseException) -> str:
    msg = str(e)
    assert "\n" not in msg, msg
    return msg


@pytest.mark.parametrize("case", BAD_GRAPHS, ids=[c[0] for c in BAD_GRAPHS])
def test_bad_graph_gives_one_line_naming_file_path_and_allowed(tmp_path, case):
    _id, text, path, fragments = case
    f = tmp_path / "graph.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_graph(str(f))
    msg = _one_line(e.value)
    assert msg.startswith(f"{f}: {path}: "), msg
    for frag in fragments:
        assert frag in msg, msg
    assert isinstance(e.value, UserError)


# (id, settings text (merged after tiny-cpu.yaml), dotted path, fragments)
BAD_SETTINGS = [
    ("typo-key", "engine: {blok_size: 16}\n", "engine.blok_size",
     ["unknown key 'blok_size'", "did you mean 'block_size'", "allowed: device, dtype, block_size"]),
    ("unknown-section", "engin: {block_size: 16}\n", "engin", ["did you mean 'engine'"]),
    ("bad-device", "engine: {device: gpu}\n", "engine.device", ["'gpu' is not one of cpu, cuda"]),
    ("bad-dtype", "engine: {dtype: fp16}\n", "engine.dtype", ["float32, bfloat16"]),
    ("block-not-pow2", "engine: {block_size: 24}\n", "engine.block_size", ["not a power of two"]),
    ("block-too-big", "engine: {block_size: 4096}\n", "engine.block_size", ["out of range", "1..1024"]),
    ("negative-blocks", "engine: {num_kv_blocks: -1}\n", "engine.num_kv_blocks", ["out of range", ">= 1"]),
    ("blocks-string", "engine: {num_kv_blocks: lots}\n", "engine.num_kv_blocks", ["expected an integer"]),
    ("cuda-graphs-on-cpu", "engine: {cuda_graphs: true}\n", "engine.cuda_graphs", ["needs engine.device cuda"]),
    ("model-len-too-long", "engine: {max_model_len: 100000}\n", "engine.max_model_len",
     ["does not fit in the KV pool", "<= 4096"]),
    ("L-without-P", "dwdp: {experts_per_rank: 8}\n", "dwdp.experts_per_rank",
     ["set without prefetch_per_peer", "both integers, or both null"]),
    ("P-without-L", "dwdp: {prefetch_per_peer: 8}\n", "dwdp.prefetch_per_peer", ["set without experts_per_rank"]),
    ("P-above-L", "dwdp: {experts_per_rank: 4, prefetch_per_peer: 8}\n", "dwdp.prefetch_per_peer",
     ["<= experts_per_rank = 4"]),
    ("bad-transport", "dwdp: {transport: rdma}\n", "dwdp.transport", ["auto, shm, cuda_ipc"]),
    ("ipc-on-cpu", "dwdp: {transport: cuda_ipc}\n", "dwdp.transport", ["needs engine.device cuda"]),
    ("bool-as-string", "dwdp: {contention_opt: 'yes'}\n", "dwdp.contention_opt", ["expected true or false"]),
    ("bad-kv-backend", "kv_transfer: {backend: ucx}\n", "kv_transfer.backend", ["nixl, local, none"]),
    ("bad-infra-mode", "infra: {mode: k8s}\n", "infra.mode", ["embedded, etcd"]),
    ("port-range", "infra: {http_port: 70000}\n", "infra.http_port", ["0..65535"]),
    ("namespace-not-dns", "infra: {namespace: My_NS}\n", "infra.namespace", ["not a DNS label"]),
    ("bad-preset", "model: {make: {preset: huge}}\n", "model.make.preset", ["tiny, small, v2-lite-shape"]),
    ("gpus-on-cpu", "k8s: {gpus_per_rank: 1}\n", "k8s.gpus_per_rank", ["cpu engine"]),
    ("bad-runtime-version", "k8s: {runtime_version: latest}\n", "k8s.runtime_version", ["MAJOR.MINOR.PATCH"]),
    ("bad-shm-quantity", "k8s: {shared_memory_size: lots}\n", "k8s.shared_memory_size", ["Kubernetes quantity"]),
    ("system-port-i16", "k8s: {system_port: 40000}\n", "k8s.system_port", ["1024..32767"]),
    ("bad-moe-backend", "trtllm: {prefill: {moe_backend: CUTE}}\n", "trtllm.prefill.moe_backend",
     ["CUTLASS, CUTEDSL, WIDEEP"]),
    ("env-not-strings", "k8s: {env: {A: [1]}}\n", "k8s.env.A", ["expected a string"]),
    ("section-not-mapping", "engine: 16\n", "engine", ["expected a mapping"]),
]


@pytest.mark.parametrize("case", BAD_SETTINGS, ids=[c[0] for c in BAD_SETTINGS])
def test_bad_settings_name_the_file_that_set_the_value(tmp_path, case):
    _id, text, path, fragments = case
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_settings([TINY, str(f)])
    msg = _one_line(e.value)
    assert msg.startswith(f"{f}: {path}: "), msg
    for frag in fragments:
        assert frag in msg, msg


def test_error_in_first_file_names_the_first_file(tmp_path):
    a = tmp_path / "a.yaml"
    a.write_text("model: {path: m}\nengine: {devic: cpu}\n")
    b = tmp_path / "b.yaml"
    b.write_text("engine: {device: cpu}\n")
    with pytest.raises(ConfigError) as e:
        load_settings([str(a), str(b)])
    assert _one_line(e.value).startswith(f"{a}: engine.devic: unknown key 'devic'")


def test_cross_file_rule_names_the_file_that_set_the_key(tmp_path):
    """device set in one file, cuda_graphs in another: the error points at the cuda_graphs file."""
    a = tmp_path / "a.yaml"
    a.write_text("model: {path: m}\nengine: {cuda_graphs: true, device: cuda}\nk8s: {gpus_per_rank: 1}\n")
    b = tmp_path / "b.yaml"
    b.write_text("engine: {device: cpu}\nk8s: {gpus_per_rank: 0}\n")
    with pytest.raises(ConfigError) as e:
        load_settings([str(a), str(b)])
    assert _one_line(e.value).startswith(f"{a}: engine.cuda_graphs:")


def test_override_errors_are_labelled_overrides():
    with pytest.raises(ConfigError) as e:
        load_settings([TINY], {"engine.device": "tpu"})
    assert _one_line(e.value) == "overrides: engine.device: 'tpu' is not one of cpu, cuda"


def test_missing_required_model_path(tmp_path):
    f = tmp_path / "s.yaml"
    f.write_text("engine: {block_size: 16}\n")
    with pytest.raises(ConfigError) as e:
        load_settings([str(f)])
    assert _one_line(e.value).startswith(f"{f}: model: missing required key")


@pytest.mark.parametrize("text,fragment", [
    ("name: [unclosed\n", "YAML syntax error"),
    ("a: b: c\n", "YAML syntax error"),
])
def test_yaml_syntax_errors_are_one_line(tmp_path, text, fragment):
    f = tmp_path / "g.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_graph(str(f))
    msg = _one_line(e.value)
    assert msg.startswith(f"{f}: line ") and fragment in msg


def test_missing_file():
    with pytest.raises(ConfigError) as e:
        load_graph("graphs/nope.yaml")
    assert _one_line(e.value) == "graphs/nope.yaml: file not found"


def test_trtllm_dwdp_needs_cutedsl_and_L_P(tmp_path):
    graph = load_graph(str(ROOT / "graphs/trtllm_gb200_dwdp_prefill.yaml"))
    gb = str(ROOT / "configs/trtllm-gb200-dsr1.yaml")
    with pytest.raises(ConfigError) as e:
        check_compatible(graph, load_settings([gb], {"trtllm.prefill.moe_backend": "WIDEEP"}))
    assert "pools[0]" in _one_line(e.value) and "CUTEDSL" in str(e.value)
    with pytest.raises(ConfigError) as e:
        check_compatible(graph, load_settings([gb], {"dwdp": {"experts_per_rank": None, "prefetch_per_peer": None}}))
    assert "experts_per_rank" in _one_line(e.value)
    with pytest.raises(ConfigError) as e:
        check_compatible(graph, load_settings([gb], {"trtllm.prefill.eplb_slots": 288}))
    assert "EPLB" in _one_line(e.value)


def test_local_kv_needs_one_device_kind_for_prefill_and_decode(tmp_path):
    """The same-host KV path copies pool to pool: a CPU prefill and a CUDA decode cannot use it."""
    graph_file = tmp_path / "g.yaml"
    graph_file.write_text((ROOT / "graphs" / "disagg_single.yaml").read_text().replace(
        "    role: decode\n    strategy: single\n    ranks: 1\n    replicas: 1\n",
        "    role: decode\n    strategy: single\n    ranks: 1\n    replicas: 1\n"
        "    overrides: {engine: {device: cpu, cuda_graphs: false}, dwdp: {transport: auto}}\n"))
    graph = load_graph(str(graph_file))
    with pytest.raises(ConfigError, match=r"kv_transfer.backend local .* cpu, cuda") as e:
        check_compatible(graph, load_settings([str(ROOT / "configs" / "h200-v2lite.yaml")],
                                              {"kv_transfer.backend": "local", "k8s.gpus_per_rank": None}))
    assert "\n" not in str(e.value)
    check_compatible(graph, load_settings([str(ROOT / "configs" / "h200-v2lite.yaml")],
                                          {"k8s.gpus_per_rank": None}))                 # nixl: allowed
