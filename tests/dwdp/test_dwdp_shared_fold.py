"""DWDP with the shared experts folded into the routed call (small batches, `MoEBlock.folded_shared`), on CPU:
two ranks (shared-memory transport), the Triton kernels under the interpreter with the fused decode path forced
on (the router in its torch form: not under test). One decode step folded (the shared experts join the launches of the bank that ends at the last expert, next
to the local shard and the pulled peers' banks) against the same step with the separate shared MLP (the torch
paths): logits within bf16 rounding, and every MoE layer took the folded call."""
from __future__ import annotations

import pytest
import torch

from tests.conftest import group_engine_config, prompts_for
from dynamo_dwdp.rank.local_group import run_local_group

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("private_shm_dir")]


def fold_rank(rank_engine, prompts):
    from types import SimpleNamespace

    import torch.nn.functional as F

    from dynamo_dwdp.model import moe
    from tests.dwdp.decode_step import prefilled_decode
    from tests.model import interpreter_numerics

    interpreter_numerics.install()                 # the interpreter's bf16 arithmetic as the GPU's

    runner = rank_engine.runner
    ex = runner.executor
    blocks = [m for m in runner.model.modules() if isinstance(m, moe.MoEBlock)]
    for b in blocks:
        b.shared_experts.fuse_gate_up()            # done at load on CUDA
    step = prefilled_decode(runner, prompts)

    def decode():
        return step().float()

    for b in blocks:
        b.fold_max_tokens = 0
    separate = decode()
    calls = []
    inner = ex.forward_folded

    def folded_call(layer, x, ids, w, shared):
        calls.append((layer, ids.shape[1]))
        return inner(layer, x, ids, w, shared)

    ex.forward_folded = folded_call

    def torch_router(x, weight, bias, skew, top_k, n_group, topk_group, norm, scaling, always_on=0):
        """The router is not under test: its torch form (the Triton one needs the CUDA load's weight split),
        with the always-on columns as the kernel writes them."""
        ids, w = moe.route_noaux_tc(F.linear(x.float(), weight.float()), runner.model_config, bias, skew)
        extra = torch.arange(ex.cfg.n_routed_experts, ex.cfg.n_routed_experts + always_on)
        return (torch.cat([ids, extra.expand(ids.shape[0], always_on)], 1),
                torch.cat([w, w.new_ones(w.shape[0], always_on)], 1))

    moe.fused_router = SimpleNamespace(noaux_tc_route=torch_router)
    moe.fused_decode_path = lambda x: True
    for b in blocks:
        b.fold_max_tokens = 16
    folded = decode()
    rel = ((folded - separate).norm() / separate.norm()).item()
    return {"rel": rel, "calls": calls, "moe_layers": [b.layer_idx for b in blocks],
            "top_k": runner.model_config.num_experts_per_tok, "shared": runner.model_config.n_shared_experts,
            "remote_banks": [len(s.banks) for s in ex.slots], "same_argmax": bool(torch.equal(
                folded.argmax(-1), separate.argmax(-1)))}


def test_dwdp_decode_folded_matches_separate(strategy_ckpt, monkeypatch):
    model_dir, hf = strategy_ckpt
    monkeypatch.setenv("TRITON_INTERPRET", "1")    # the spawned ranks import Triton with it set
    pytest.importorskip("triton")
    prompts = prompts_for(hf.config.vocab_size, [5, 9], seed=71)
    res = run_local_group(str(model_dir), group_engine_config(dtype="bfloat16"), "dwdp", 2, fold_rank,
                          [prompts] * 2, timeout=300)
    for r in res:
        assert r.error is None, r.error
        v = r.value
        assert sum(v["remote_banks"]) >= 2                   # peers' experts are pulled into banks of their own
        assert [layer for layer, _ in v["calls"]] == v["moe_layers"]
        assert all(k == v["top_k"] + v["shared"] for _, k in v["calls"]), v
        assert v["rel"] < 3e-2, v["rel"]
