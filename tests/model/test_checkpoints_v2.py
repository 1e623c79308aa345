"""DeepSeek-V2-family checkpoints (`model_type: deepseek_v2`, softmax routers `greedy` and
`group_limited_greedy`, no correction bias) against transformers' `DeepseekV2ForCausalLM` (fp32).

transformers builds and saves each model (the published per-expert layout, config.json with
`topk_method`); the engine reads only the saved files. Greedy tokens must be identical to
transformers' own `generate`, single-process and on every multi-rank strategy.
"""
from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import STRATEGY_CFG, group_engine_config, hf_greedy, hf_logits, make_engine, prompts_for, randomize, \
    rel_err
from dynamo_dwdp.engine.sampling import SamplingParams

TOL = 1e-4
V = 384

# V2 keyword arguments from the strategy shape (heads and widths divisible by 2 and 3, 16 experts).
_V2_BASE = {k: v for k, v in STRATEGY_CFG.items() if k not in ("num_mtp_layers", "n_group", "topk_group",
                                                                  "norm_topk_prob")}
CONFIGS = {
    # DeepSeek-V2-Lite-like: plain top-k, no q-LoRA (q_proj), scaling 1.0
    "greedy": dict(topk_method="greedy", q_lora_rank=None, routed_scaling_factor=1.0),
    "greedy-qlora": dict(topk_method="greedy", q_lora_rank=24, routed_scaling_factor=1.5),
    # DeepSeek-V2-like: 4 groups of 4, keep the 2 with the best max score, top-4
    "glg-qlora": dict(topk_method="group_limited_greedy", n_group=4, topk_group=2, q_lora_rank=24,
                      routed_scaling_factor=2.0),
    "glg": dict(topk_method="group_limited_greedy", n_group=4, topk_group=1, num_experts_per_tok=3,
                q_lora_rank=None, routed_scaling_factor=16.0),
}
# Multi-rank matrix: one greedy and one group-limited config (with and without q-LoRA between them).
GROUP_RUNS = [(c, s, n) for c in ("greedy", "glg-qlora") for s, n in (("dwdp", 2), ("dwdp", 3), ("dep", 2),
                                                                       ("tp", 2))]
PARAMS = dict(max_tokens=5, temperature=0, ignore_eos=True)

_cache: dict[str, tuple] = {}


def v2_checkpoint(root, name: str):
    """(model_dir, transformers model) for CONFIGS[name], written once per session."""
    if name not in _cache:
        from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

        cfg = DeepseekV2Config(**{**_V2_BASE, "norm_topk_prob": False, **CONFIGS[name]})
        torch.manual_seed(0)
        model = DeepseekV2ForCausalLM(cfg).eval().float()
        randomize(model, seed=200 + sorted(CONFIGS).index(name))
        out = root / f"v2-{name}"
        model.save_pretrained(out)
        _cache[name] = (out, model)
    return _cache[name]


@pytest.fixture(scope="session")
def v2_root(tmp_path_factory):
    return tmp_path_factory.mktemp("v2")


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_v2_single_process_matches_transformers(v2_root, name):
    model_dir, hf = v2_checkpoint(v2_root, name)
    saved = json.loads((model_dir / "config.json").read_text())
    assert saved["model_type"] == "deepseek_v2" and saved["topk_method"] == CONFIGS[name]["topk_method"]
    assert not any("e_score_correction_bias" in k for k in hf.state_dict())
    prompt = prompts_for(V, [11], seed=7)[0]
    engine = make_engine(model_dir, max_num_batched_tokens=64)
    toks = engine.generate([prompt], SamplingParams(**PARAMS))[0]
    assert toks == hf_greedy(hf, prompt, PARAMS["max_tokens"]), name
    # and the logits of the whole sequence agree (a loose router bug could still pick the same tokens)
    from tests.model.test_model_reference import _all_position_logits

    full = prompt + toks
    assert rel_err(_all_position_logits(make_engine(model_dir, max_num_batched_tokens=64), full),
                   hf_logits(hf, full)) < TOL


def test_group_limited_greedy_really_limits_groups(v2_root):
    """Guards the comparison above: with topk_group=1, the engine's picked experts all lie in one group,
    while plain top-k on the same scores would often cross groups."""
    from dynamo_dwdp.model.config import load_model_config
    from dynamo_dwdp.model.moe import route_greedy, route_group_limited_greedy

    model_dir, _ = v2_checkpoint(v2_root, "glg")
    cfg = load_model_config(str(model_dir))
    logits = torch.randn(64, cfg.n_routed_experts, generator=torch.Generator().manual_seed(0))
    ids, _ = route_group_limited_greedy(logits, cfg, torch.zeros(cfg.n_routed_experts))
    per_group = cfg.n_routed_experts // cfg.n_group
    assert all(len(set((row // per_group).tolist())) == 1 for row in ids)
    free, _ = route_greedy(logits, cfg, torch.zeros(cfg.n_routed_experts))
    assert sum(len(set((row // per_group).tolist())) > 1 for row in free) > 32


def tokens_and_experts_read(rank_engine, payload):
    """run_local_group target: generated tokens + the expert ids this rank read, per MoE layer."""
    from dynamo_dwdp.rank.local_group import generate_rank

    toks = generate_rank(rank_engine, payload)
    read: dict[int, list[int]] = {}
    for name, times in rank_engine.runner.load_report.tensors.items():
        if ".mlp.experts." in name and name.endswith("gate_proj.weight"):
            assert times == 1, name
            parts = name.split(".")
            read.setdefault(int(parts[2]), []).append(int(parts[5]))
    return {"tokens": toks, "experts": {layer: sorted(e) for layer, e in read.items()}}


def _held_experts(strategy: str, ranks: int, rank: int, experts: int) -> list[int]:
    """The experts a rank stores, from each strategy's own placement code."""
    if strategy == "dwdp":
        from dynamo_dwdp.dwdp.placement import Placement

        return list(Placement.choose(experts, ranks).local_range(rank))
    if strategy == "dep":
        from dynamo_dwdp.baselines.dep import even_bounds

        b = even_bounds(experts, ranks)
        return list(range(b[rank], b[rank + 1]))
    return list(range(experts))                        # tp: a slice of every expert


@pytest.mark.slow
@pytest.mark.usefixtures("private_shm_dir")
@pytest.mark.parametrize("name,strategy,ranks", GROUP_RUNS, ids=[f"{c}-{s}{n}" for c, s, n in GROUP_RUNS])
def test_v2_strategies_match_transformers(v2_root, name, strategy, ranks):
    """Tokens equal transformers'; each rank read each expert it stores once and no other."""
    from dynamo_dwdp.rank.local_group import run_local_group

    model_dir, hf = v2_checkpoint(v2_root, name)
    prompts = {r: prompts_for(V, [6 + r, 13], seed=50 + r) for r in range(ranks)}
    payloads = [(prompts[0 if strategy == "tp" else r], SamplingParams(**PARAMS)) for r in range(ranks)]
    res = run_local_group(str(model_dir), group_engine_config(), strategy, ranks, tokens_and_experts_read,
                          payloads, timeout=180)
    for r in res:
        assert r.error is None, f"{strategy}{ranks} rank {r.rank}: {r.error}"
        held = _held_experts(strategy, ranks, r.rank, _V2_BASE["n_routed_experts"])
        assert r.value["experts"] == {layer: held for layer in (1, 2, 3)}, (strategy, r.rank)
    for r in ([0] if strategy == "tp" else range(ranks)):
        for prompt, toks in zip(prompts[r], res[r].value["tokens"]):
            assert toks == hf_greedy(hf, prompt, PARAMS["max_tokens"]), (name, strategy, ranks, r)
