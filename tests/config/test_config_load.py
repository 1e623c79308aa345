"""Every shipped graph/config loads; merging, overrides and per-pool settings behave as documented."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from dynamo_dwdp.config import check_compatible, load_graph, load_settings
from dynamo_dwdp.config import schema
from dynamo_dwdp.config.settings import MODEL_PRESETS, Settings
from dynamo_dwdp.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
GRAPHS = sorted((ROOT / "graphs").glob("*.yaml"))
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def test_shipped_files_exist():
    names = {p.name for p in GRAPHS}
    assert {"agg.yaml", "disagg_dwdp_decode.yaml", "disagg_dwdp_prefill.yaml", "disagg_dep.yaml",
            "disagg_tp.yaml", "trtllm_gb200_dwdp_prefill.yaml"} <= names
    assert {"tiny-cpu.yaml", "h200-v2lite.yaml", "trtllm-gb200-dsr1.yaml"} <= {p.name for p in CONFIGS}


@pytest.mark.parametrize("path", GRAPHS, ids=lambda p: p.name)
def test_every_graph_loads_and_matches_its_yaml(path):
    raw = yaml.safe_load(path.read_text())
    graph = load_graph(str(path))
    assert graph.name == raw["name"]
    assert [p.name for p in graph.pools] == [p["name"] for p in raw["pools"]]
    for pool, rp in zip(graph.pools, raw["pools"]):
        assert (pool.role, pool.strategy) == (rp["role"], rp["strategy"])
        assert pool.ranks == rp.get("ranks", 1) and pool.replicas == rp.get("replicas", 1)
        assert pool.engine == rp.get("engine", "native")


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_loads(path):
    settings = load_settings([str(path)])
    raw = yaml.safe_load(path.read_text())
    assert settings.model.path == raw["model"]["path"]
    assert settings.sources == (str(path),)


def test_cpu_demo_graphs_fit_a_two_core_ci():
    """Native graphs run on CPU in CI: at most 4 rank processes each, and the reference topologies."""
    by_name = {load_graph(str(p)).name: load_graph(str(p)) for p in GRAPHS}
    for graph in by_name.values():
        if graph.engine == "native":
            assert sum(p.ranks * p.replicas for p in graph.pools) <= 4, graph.name
    ref = by_name["disagg-dwdp-decode"]
    assert [(p.role, p.strategy, p.ranks) for p in ref.pools] == [("prefill", "single", 1), ("decode", "dwdp", 2)]
    pub = by_name["disagg-dwdp-prefill"]
    assert [(p.role, p.strategy, p.ranks) for p in pub.pools] == [("prefill", "dwdp", 2), ("decode", "dep", 2)]
    assert [(p.role, p.strategy) for p in by_name["agg"].pools] == [("agg", "single")]
    assert [(p.strategy, p.ranks) for p in by_name["disagg-dep"].pools] == [("single", 1), ("dep", 2)]
    assert [(p.strategy, p.ranks) for p in by_name["disagg-tp"].pools] == [("single", 1), ("tp", 2)]


def test_trtllm_graph_is_the_published_shape():
    graph = load_graph(str(ROOT / "graphs/trtllm_gb200_dwdp_prefill.yaml"))
    pre, dec = graph.pool("prefill"), graph.pool("decode")
    assert (pre.engine, pre.strategy, pre.ranks) == ("trtllm", "dwdp", 4)
    assert (dec.engine, dec.strategy) == ("trtllm", "dep") and dec.ranks >= 8
    settings = load_settings([str(ROOT / "configs/trtllm-gb200-dsr1.yaml")])
    check_compatible(graph, settings)  # CUTEDSL, L/P set, no EPLB
    assert settings.dwdp.experts_per_rank + (pre.ranks - 1) * settings.dwdp.prefetch_per_peer == 256


def test_model_presets_match_make_model():
    from dynamo_dwdp.synthetic.presets import PRESETS

    assert set(MODEL_PRESETS) == set(PRESETS)
    for path in CONFIGS:
        make = load_settings([str(path)]).model.make
        if make is not None:
            assert make.preset in PRESETS


def test_native_graphs_are_compatible_with_native_configs():
    for g in GRAPHS:
        graph = load_graph(str(g))
        if graph.engine != "native":
            continue
        for c in ("tiny-cpu.yaml", "h200-v2lite.yaml"):
            check_compatible(graph, load_settings([str(ROOT / "configs" / c)]))


def test_merge_later_file_wins_and_sections_merge_deeply(tmp_path):
    a = tmp_path / "a.yaml"
    b = tmp_path / "b.yaml"
    a.write_text("model: {path: m1}\nengine: {block_size: 32, max_num_seqs: 3}\nk8s: {env: {A: '1'}}\n")
    b.write_text("engine: {max_num_seqs: 5}\nk8s: {env: {B: '2'}}\nfrontend: {extra_args: [--x]}\n")
    s = load_settings([str(a), str(b)])
    assert s.engine.block_size == 32          # kept from a (deep merge)
    assert s.engine.max_num_seqs == 5         # b wins
    assert s.k8s.env == {"A": "1", "B": "2"}  # mappings merge
    assert s.frontend.extra_args == ["--x"]
    assert s.engine.num_kv_blocks == 256      # default
    c = tmp_path / "c.yaml"
    c.write_text("frontend: {extra_args: [--y]}\n")
    assert load_settings([str(a), str(b), str(c)]).frontend.extra_args == ["--y"]  # lists replace


def test_overrides_dotted_and_nested(tmp_path):
    base = str(ROOT / "configs/tiny-cpu.yaml")
    s = load_settings([base], {"engine.block_size": 32, "dwdp": {"contention_opt": True}})
    assert s.engine.block_size == 32 and s.dwdp.contention_opt is True
    assert s.engine.max_num_seqs == load_settings([base]).engine.max_num_seqs


def test_served_name_defaults_to_directory_name(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text("model: {path: models/foo-bar/}\n")
    assert load_settings([str(p)]).model.name == "foo-bar"


def test_pool_overrides_apply_only_to_that_pool(tmp_path):
    g = tmp_path / "g.yaml"
    g.write_text(
        "name: g\npools:\n"
        "  - {name: prefill, role: prefill, strategy: single}\n"
        "  - {name: decode, role: decode, strategy: dwdp, ranks: 2,\n"
        "     overrides: {dwdp: {contention_opt: true, experts_per_rank: 8, prefetch_per_peer: 8},"
        " engine: {max_num_seqs: 2}}}\n")
    graph = load_graph(str(g))
    s = load_settings([str(ROOT / "configs/tiny-cpu.yaml")])
    dec = s.for_pool(graph.pool("decode"))
    pre = s.for_pool(graph.pool("prefill"))
    assert dec.dwdp.contention_opt and dec.dwdp.experts_per_rank == 8 and dec.engine.max_num_seqs == 2
    assert not pre.dwdp.contention_opt and pre.engine.max_num_seqs == s.engine.max_num_seqs
    assert dec.engine.block_size == s.engine.block_size


def test_pool_override_breaking_a_cross_field_rule_names_the_graph(tmp_path):
    g = tmp_path / "g.yaml"
    g.write_text("name: g\npools:\n  - {name: w, role: agg, strategy: single, overrides: {engine: {cuda_graphs: true}}}\n")
    graph = load_graph(str(g))
    with pytest.raises(ConfigError) as e:
        load_settings([str(ROOT / "configs/tiny-cpu.yaml")]).for_pool(graph.pools[0])
    msg = str(e.value)
    assert str(g) in msg and "pools[0].overrides" in msg and "engine.cuda_graphs" in msg and "\n" not in msg


def test_every_settings_field_is_documented():
    def walk(cls):
        for name, (tp, spec, _f) in schema.fields_of(cls).items():
            assert spec.doc.strip(), f"{cls.__name__}.{name} has no doc"
            base, _ = schema._split_optional(tp)
            if schema.is_section(base):
                walk(base)
    walk(Settings)
    text = schema.document(Settings)
    assert "experts_per_rank" in text and "ucx_tls" in text


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_key_has_a_comment_or_is_documented(path):
    """Shipped configs are commented; every key they use is a real field (no silently ignored keys)."""
    text = path.read_text()
    assert text.lstrip().startswith("#")
    data = yaml.safe_load(text)
    schema.check_partial(Settings, data, where=str(path))
