"""The memory-fit check: its per-rank estimate against what a real engine holds, and its one-line
refusal with a suggestion that itself fits."""
from __future__ import annotations

import pytest
import torch

from tests.conftest import make_engine
from dynamo_dwdp.errors import UserError
from dynamo_dwdp.model.config import load_model_config
from dynamo_dwdp.model.memory_fit import check_memory_fit, rank_memory
from dynamo_dwdp.synthetic.presets import preset_config


def _held_bytes(runner) -> int:
    """Bytes of the engine's checkpoint-backed tensors (not the benchmark skew or the rope table)."""
    model = runner.model
    n = sum(p.numel() * p.element_size() for p in model.parameters())
    n += sum(b.numel() * b.element_size() for name, b in model.named_buffers()
             if not name.endswith(("selection_skew", "inv_freq")))
    n += sum(b.w13.numel() * b.w13.element_size() + b.w2.numel() * b.w2.element_size()
             for b in runner.executor.banks.values())
    return n


def test_single_estimate_equals_what_the_engine_holds(strategy_ckpt):
    model_dir, _ = strategy_ckpt
    engine = make_engine(model_dir, num_kv_blocks=32, block_size=4)
    runner = engine.runner
    est = rank_memory(runner.model_config, "single", 1, torch.float32, 32, 4)
    assert est.weights == _held_bytes(runner)
    assert est.kv_cache == runner.kv_pool.numel() * runner.kv_pool.element_size()


def test_refusal_is_one_line_and_its_suggestion_fits():
    from dynamo_dwdp.model.config import config_from_dict

    cfg = config_from_dict(preset_config("deepseek-v3", num_layers=61))
    cap = 141 * 10**9                                    # an H200's memory
    need = rank_memory(cfg, "dwdp", 4, torch.bfloat16, 4096, 64)
    assert need.total > cap
    with pytest.raises(UserError) as ei:
        check_memory_fit(cfg, "dwdp", 4, torch.bfloat16, 4096, 64, torch.device("cuda", 0), capacity=cap)
    msg = str(ei.value)
    assert "\n" not in msg and "dwdp x4" in msg and "fits with dwdp x" in msg, msg
    n = int(msg.split("fits with dwdp x")[1].split()[0])
    check_memory_fit(cfg, "dwdp", n, torch.bfloat16, 4096, 64, torch.device("cuda", 0), capacity=cap)
    with pytest.raises(UserError):
        check_memory_fit(cfg, "dwdp", n - 1, torch.bfloat16, 4096, 64, torch.device("cuda", 0), capacity=cap)
    # DEP holds fewer experts than DWDP at the same size (no prefetch slots); TP the fewest dense bytes
    assert rank_memory(cfg, "dep", 8, torch.bfloat16, 0, 64).weights < \
        rank_memory(cfg, "dwdp", 8, torch.bfloat16, 0, 64).weights


def test_kv_blocks_suggestion(strategy_ckpt):
    model_dir, _ = strategy_ckpt
    cfg = load_model_config(str(model_dir))
    need = rank_memory(cfg, "single", 1, torch.float32, 1000, 4)
    cap = need.weights + need.kv_cache // 2
    with pytest.raises(UserError, match=r"num_kv_blocks <= (\d+) at x1") as ei:
        check_memory_fit(cfg, "single", 1, torch.float32, 1000, 4, torch.device("cpu"), capacity=cap)
    blocks = int(str(ei.value).split("num_kv_blocks <= ")[1].split()[0])
    assert 499 <= blocks <= 500
    check_memory_fit(cfg, "single", 1, torch.float32, blocks, 4, torch.device("cpu"), capacity=cap)
