"""The decode-step kernels (fused add + RMSNorm, bf16 router logits, pair sum, chunked MLA merge)
under Triton's CPU interpreter, and the decoder layer's deferred residual add against the plain order."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conftest import run_under_triton_interpreter


def test_decode_kernels_under_the_interpreter():
    """tests/model/decode_kernel_checks.py in a fresh process, each kernel against the torch path and fp64."""
    out = run_under_triton_interpreter(Path(__file__).with_name("decode_kernel_checks.py"))
    assert out.strip().endswith("ok 4 checks"), out


def _plain_order_logits(model, batch, kv_pool):
    """The decoder stack in the textbook order (x + attn, norm, x + mlp, next layer's norm), from the
    model's own modules: the reference for the deferred, fused residual adds."""
    m = model.model
    x = m.embed_tokens(batch.input_ids)
    cos, sin = model.rope.cos_sin(batch.positions)
    for i, layer in enumerate(m.layers):
        x = x + layer.self_attn(layer.input_layernorm(x), batch, kv_pool[:, i], model.rope, cos, sin)
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return model.lm_head(m.norm(x[batch.logits_indices])).float()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_deferred_residual_adds_equal_the_plain_order(strategy_ckpt, dtype):
    """The model's forward (each MLP output added by the next layer's add + norm, the MoE's routed and
    shared outputs added there as one) bitwise equal to the plain order, prefill and decode, with a
    dense layer and shared experts (the strategy checkpoint), in fp32 and bf16."""
    from tests.conftest import make_engine
    from dynamo_dwdp.model.batch import ForwardBatch

    runner = make_engine(strategy_ckpt[0], dtype=dtype).runner
    model, bs = runner.model, runner.config.block_size
    assert any(type(layer.mlp).__name__ == "MoEBlock" and layer.mlp.shared_experts is not None
               for layer in model.model.layers)
    assert any(type(layer.mlp).__name__ == "DenseMLP" for layer in model.model.layers)
    prompts = [[5, 9, 13, 2, 7, 30], [11, 4, 8]]
    tables = [[0, 1], [2]]
    with torch.inference_mode():
        pre = ForwardBatch.build(prompts, [0, 0], tables, bs, [True, True])
        pool = runner.kv_pool.clone()
        got = model(pre, runner.kv_pool)
        want = _plain_order_logits(model, pre, pool)
        assert torch.equal(got, want)
        dec = ForwardBatch.build([[3], [6]], [6, 3], tables, bs, [True, True])
        pool = runner.kv_pool.clone()
        assert torch.equal(model(dec, runner.kv_pool), _plain_order_logits(model, dec, pool))
