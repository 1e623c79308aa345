"""launch/command_lines.py: the argv of every process parses with the documented flag lists.

The worker spec below is written from the documented interface (not from WORKER_FLAGS), so renaming,
adding or dropping a flag in command_lines.py breaks this test; the frontend argv is parsed with the real
`dynamo.frontend` parser.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest
import yaml

from dynamo_dwdp.config import load_graph, load_settings
from dynamo_dwdp.launch import command_lines

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs/tiny-cpu.yaml")
H200 = str(ROOT / "configs/h200-v2lite.yaml")


def worker_spec() -> argparse.ArgumentParser:
    """The documented worker flags, exactly (python -m dynamo_dwdp ...)."""
    p = argparse.ArgumentParser(prog="dynamo_dwdp", exit_on_error=False, allow_abbrev=False)
    p.add_argument("--model-path", required=True)
    p.add_argument("--served-model-name", required=True)
    p.add_argument("--disaggregation-mode", required=True, choices=["agg", "prefill", "decode"])
    p.add_argument("--strategy", required=True, choices=["single", "dp", "dwdp", "dep", "tp"])
    p.add_argument("--group-size", required=True, type=int)
    p.add_argument("--group-rank", type=int)
    p.add_argument("--group-name", required=True)
    p.add_argument("--rendezvous", required=True)
    p.add_argument("--namespace", required=True)
    p.add_argument("--component", required=True)
    p.add_argument("--block-size", required=True, type=int)
    p.add_argument("--num-kv-blocks", required=True, type=int)
    p.add_argument("--max-num-seqs", required=True, type=int)
    p.add_argument("--max-num-batched-tokens", required=True, type=int)
    p.add_argument("--max-model-len", required=True, type=int)
    p.add_argument("--device", required=True, choices=["cpu", "cuda"])
    p.add_argument("--dtype", required=True, choices=["float32", "bfloat16"])
    p.add_argument("--dwdp-experts-per-rank", type=int)
    p.add_argument("--dwdp-prefetch-per-peer", type=int)
    p.add_argument("--dwdp-contention-opt", action="store_true")
    p.add_argument("--dwdp-routed-only", action="store_true")
    p.add_argument("--dwdp-transport", choices=["auto", "shm", "cuda_ipc"])
    p.add_argument("--kv-transfer", required=True, choices=["nixl", "local", "none"])
    p.add_argument("--cuda-graphs", action="store_true")
    p.add_argument("--separate-prefill-steps", action="store_true")
    p.add_argument("--async-scheduling", action="store_true")
    p.add_argument("--stream-interval", type=int)
    p.add_argument("--weight-format", required=True, choices=["native", "fp8-block", "fp8-block-a8"])
    return p


def parse_worker(argv: list[str]) -> argparse.Namespace:
    assert argv[1:3] == ["-m", "dynamo_dwdp"], argv[:3]
    return worker_spec().parse_args(argv[3:])


def test_flag_table_is_the_documented_list():
    documented = {a.option_strings[0] for a in worker_spec()._actions if a.option_strings and a.dest != "help"}
    assert {f.flag for f in command_lines.WORKER_FLAGS} == documented
    assert len({f.flag for f in command_lines.WORKER_FLAGS}) == len(command_lines.WORKER_FLAGS)


@pytest.mark.parametrize("graph_file", ["disagg_dwdp_decode.yaml", "disagg_dwdp_prefill.yaml", "agg.yaml",
                                        "disagg_dep.yaml", "disagg_tp.yaml"])
@pytest.mark.parametrize("config", [TINY, H200], ids=["tiny-cpu", "h200"])
def test_worker_argv_parses_and_carries_the_settings(graph_file, config):
    graph = load_graph(str(ROOT / "graphs" / graph_file))
    settings = load_settings([config])
    raw = yaml.safe_load(Path(config).read_text())
    raw_graph = yaml.safe_load((ROOT / "graphs" / graph_file).read_text())
    for pool, rp in zip(graph.pools, raw_graph["pools"]):
        for rank in range(rp.get("ranks", 1)):
            argv = command_lines.worker_argv(graph, pool, settings, group_index=3, rank=rank,
                                        rendezvous="tcp://127.0.0.1:29555", python="/x/python")
            assert argv[0] == "/x/python"
            a = parse_worker(argv)
            assert a.model_path == raw["model"]["path"] and a.served_model_name == raw["model"]["served_name"]
            assert a.disaggregation_mode == rp["role"] and a.strategy == rp["strategy"]
            assert a.group_size == rp.get("ranks", 1) and a.group_rank == rank
            assert a.group_name == f"{raw_graph['name']}-{rp['name']}-g3"
            assert a.rendezvous == "tcp://127.0.0.1:29555"
            assert a.namespace == raw["infra"]["namespace"] and a.component == rp["name"]
            eng = raw["engine"]
            assert (a.block_size, a.num_kv_blocks, a.max_num_seqs, a.max_num_batched_tokens, a.max_model_len) == (
                eng["block_size"], eng["num_kv_blocks"], eng["max_num_seqs"], eng["max_num_batched_tokens"],
                eng["max_model_len"])
            assert (a.device, a.dtype, a.cuda_graphs) == (eng["device"], eng["dtype"], eng["cuda_graphs"])
            assert a.separate_prefill_steps == eng["separate_prefill_steps"]
            assert a.async_scheduling == eng["async_scheduling"]
            assert a.stream_interval == eng["stream_interval"]
            assert a.kv_transfer == ("none" if rp["role"] == "agg" else raw["kv_transfer"]["backend"])
            if rp["strategy"] == "dwdp":
                assert a.dwdp_transport == raw["dwdp"]["transport"]
                assert a.dwdp_contention_opt == raw["dwdp"]["contention_opt"]
            else:
                assert a.dwdp_transport is None and not a.dwdp_contention_opt


def test_dwdp_flags_follow_settings_and_pool_overrides(tmp_path):
    g = tmp_path / "g.yaml"
    g.write_text("name: g\npools:\n  - {name: p, role: prefill, strategy: single}\n"
                 "  - {name: d, role: decode, strategy: dwdp, ranks: 2, overrides: "
                 "{dwdp: {experts_per_rank: 10, prefetch_per_peer: 6, routed_only: true, transport: shm}}}\n")
    graph = load_graph(str(g))
    settings = load_settings([TINY])
    a = parse_worker(command_lines.worker_argv(graph, graph.pool("d"), settings, group_index=0, rank=1, rendezvous="file:///tmp/r"))
    assert (a.dwdp_experts_per_rank, a.dwdp_prefetch_per_peer, a.dwdp_routed_only, a.dwdp_transport) == (10, 6, True, "shm")
    b = parse_worker(command_lines.worker_argv(graph, graph.pool("p"), settings, group_index=0, rank=0, rendezvous="file:///tmp/r"))
    assert b.dwdp_experts_per_rank is None and not b.dwdp_routed_only


def test_worker_argv_without_rank_and_group_argv():
    graph = load_graph(str(ROOT / "graphs/disagg_dwdp_decode.yaml"))
    settings = load_settings([TINY])
    pool = graph.pool("decode")
    inner = command_lines.worker_argv(graph, pool, settings, group_index=0, rank=None, rendezvous="tcp://h:1",
                                 python="python3")
    assert "--group-rank" not in inner
    argv = command_lines.group_argv(pool.ranks, inner, python="python3")
    assert argv[:6] == ["python3", "-m", "dynamo_dwdp.group", "--ranks", "2", "--"]
    assert argv[6:] == inner
    # what the supervisor does: append --group-rank r; the result is a valid worker command for each rank
    for r in range(pool.ranks):
        assert parse_worker(argv[6:] + ["--group-rank", str(r)]).group_rank == r
    with pytest.raises(ValueError):
        command_lines.group_argv(2, inner + ["--group-rank", "0"])
    with pytest.raises(ValueError):
        command_lines.worker_argv(graph, pool, settings, group_index=0, rank=2, rendezvous="tcp://h:1")


def test_default_python_is_this_interpreter():
    graph = load_graph(str(ROOT / "graphs/agg.yaml"))
    argv = command_lines.worker_argv(graph, graph.pools[0], load_settings([TINY]), group_index=0, rank=0,
                                rendezvous="tcp://h:1")
    assert argv[0] == sys.executable


@pytest.mark.parametrize("mode,backend", [("embedded", "file"), ("etcd", "etcd")])
def test_frontend_argv_parses_with_the_real_frontend_parser(mode, backend, tmp_path):
    from dynamo.frontend.frontend_args import FrontendArgGroup

    g = tmp_path / "g.yaml"
    g.write_text("name: g\nfrontend: {router_mode: least-loaded, migration_limit: 3}\n"
                 "pools: [{name: w, role: agg, strategy: single}]\n")
    graph = load_graph(str(g))
    settings = load_settings([TINY], {"infra.mode": mode, "frontend.extra_args": ["--kv-cache-block-size", "16"]})
    argv = command_lines.frontend_argv(graph, settings, 18080, python="py")
    assert argv[:3] == ["py", "-m", "dynamo.frontend"]
    parser = argparse.ArgumentParser()
    FrontendArgGroup().add_arguments(parser)
    a = parser.parse_args(argv[3:])
    assert (a.http_port, a.router_mode, a.migration_limit) == (18080, "least-loaded", 3)
    assert (a.discovery_backend, a.namespace) == (backend, "dwdp")
    k8s = parser.parse_args(command_lines.frontend_argv(graph, settings, 8000, discovery="kubernetes")[3:])
    assert k8s.discovery_backend == "kubernetes"


def test_frontend_migration_limit_left_out_when_zero():
    graph = load_graph(str(ROOT / "graphs/agg.yaml"))
    assert "--migration-limit" not in command_lines.frontend_argv(graph, load_settings([TINY]), 1)


def trtllm_spec() -> argparse.ArgumentParser:
    """dynamo.trtllm 1.6.1 flags we use (dynamo/trtllm/backend_args.py + runtime_args.py; the module itself
    cannot be imported without tensorrt_llm)."""
    p = argparse.ArgumentParser(exit_on_error=False, allow_abbrev=False)
    p.add_argument("--model", "--model-path", dest="model", required=True)
    p.add_argument("--served-model-name", required=True)
    p.add_argument("--disaggregation-mode", required=True, choices=["agg", "pd", "prefill", "decode", "encode"])
    p.add_argument("--extra-engine-args", required=True)
    p.add_argument("--namespace")
    return p


def test_trtllm_argv():
    graph = load_graph(str(ROOT / "graphs/trtllm_gb200_dwdp_prefill.yaml"))
    settings = load_settings([str(ROOT / "configs/trtllm-gb200-dsr1.yaml")])
    for pool in graph.pools:
        argv = command_lines.trtllm_argv(pool, settings, namespace="ns")
        assert argv[:3] == ["python3", "-m", "dynamo.trtllm"]
        a = trtllm_spec().parse_args(argv[3:])
        assert a.model == "/model-cache/deepseek-r1-fp4" and a.served_model_name == "deepseek-ai/DeepSeek-R1"
        assert a.disaggregation_mode == pool.role and a.extra_engine_args == f"/config/{pool.name}.yaml"
        assert a.namespace == "ns"
    with pytest.raises(ValueError):
        native = load_graph(str(ROOT / "graphs/agg.yaml"))
        command_lines.trtllm_argv(native.pools[0], settings)


def test_make_model_argv_and_worker_env():
    settings = load_settings([TINY])
    argv = command_lines.make_model_argv(settings, python="py")
    assert argv == ["py", "-m", "dynamo_dwdp.cli", "make-model", "models/tiny", "--preset", "tiny", "--seed", "0",
                    "--dtype", "fp32"]
    env = command_lines.worker_env(settings)
    assert env == {"OMP_NUM_THREADS": "1", "DWDP_TORCH_THREADS": "1", "UCX_TLS": "tcp,sm,self",
                   "UCX_NET_DEVICES": "lo"}
    assert command_lines.make_model_argv(settings, path="/m", python="py", force=True)[4:] == [
        "/m", "--preset", "tiny", "--seed", "0", "--dtype", "fp32", "--force"]
    with pytest.raises(ValueError):
        command_lines.make_model_argv(load_settings([str(ROOT / "configs/trtllm-gb200-dsr1.yaml")]))


def test_make_model_argv_parses_with_the_real_make_model_parser():
    import dynamo_dwdp.commands.make_model as mod   # our own module: an ImportError must fail, not skip
    parser = argparse.ArgumentParser()
    mod.register(parser.add_subparsers(dest="cmd"))
    for config in (TINY, H200):
        argv = command_lines.make_model_argv(load_settings([config]), force=True)
        a = parser.parse_args(argv[3:])
        make = yaml.safe_load(Path(config).read_text())["model"]["make"]
        assert (a.preset, a.seed, a.dtype, a.force) == (make["preset"], make["seed"],
                                                        {"float32": "fp32", "bfloat16": "bf16"}[make["dtype"]], True)


@pytest.mark.parametrize("graph_file", ["disagg_dwdp_decode.yaml", "disagg_dwdp_prefill.yaml", "agg.yaml"])
def test_worker_argv_parses_with_the_real_worker_parser(graph_file):
    import dynamo_dwdp.worker.args as args_mod
    parser = args_mod.build_parser()
    graph = load_graph(str(ROOT / "graphs" / graph_file))
    for config in (TINY, H200):
        settings = load_settings([config])
        for pool in graph.pools:
            argv = command_lines.worker_argv(graph, pool, settings, group_index=0, rank=pool.ranks - 1,
                                        rendezvous="tcp://127.0.0.1:29500")
            ours = parse_worker(argv)
            theirs = parser.parse_args(argv[3:])
            for key, value in vars(ours).items():
                if value is not None and value is not False:  # flags left out keep the worker's defaults
                    assert getattr(theirs, key) == value, key
