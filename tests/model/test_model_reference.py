"""The engine's DeepSeek-V3 against transformers' `DeepseekV3ForCausalLM` (fp32, random weights).

Reference: transformers builds the model, saves it (per-expert layout, or its fused layout), and its
own forward / `generate` give the expected logits and tokens. The engine reads only the saved files.
Each config varies routing (n_group/topk_group incl. n_group=1, 8/12/16 experts, top-k), attention
(q_lora_rank null -> q_proj path, kv_lora_rank), dense layers (0/1/2), shared experts (0/1/2),
norm_topk_prob, routed_scaling_factor and RoPE (default, YaRN with mscale, non-interleaved).
"""
from __future__ import annotations

import pytest
import torch

from tests.conftest import LogitRecorder, hf_greedy, hf_logits, make_engine, prompts_for, rel_err
from dynamo_dwdp.engine.sampling import SamplingParams
from dynamo_dwdp.model.batch import ForwardBatch

# transformers builds a zero-width shared-expert MLP when n_shared_experts=0
pytestmark = pytest.mark.filterwarnings("ignore:Initializing zero-element tensors is a no-op")

TOL = 1e-4

CONFIGS = {
    # 4 groups of 4, keep 2 groups, top-4, q_lora, 1 dense + 2 MoE layers, 1 shared expert
    "grouped16": dict(),
    # n_group=1, 8 experts top-2, q_proj path (q_lora_rank null), 2 dense layers, no shared expert,
    # unnormalised weights, scaling 1.0, non-interleaved rope
    "flat8_qproj": dict(n_routed_experts=8, num_experts_per_tok=2, n_group=1, topk_group=1, q_lora_rank=None,
                        kv_lora_rank=24, num_hidden_layers=4, first_k_dense_replace=2, n_shared_experts=0,
                        norm_topk_prob=False, routed_scaling_factor=1.0, rope_interleave=False),
    # 12 experts in 3 groups, keep 2, top-3, 2 shared experts, YaRN (mscale != mscale_all_dim)
    "yarn12": dict(n_routed_experts=12, num_experts_per_tok=3, n_group=3, topk_group=2, n_shared_experts=2,
                   q_lora_rank=16, kv_lora_rank=12, routed_scaling_factor=1.7, max_position_embeddings=256,
                   rope_parameters={"rope_type": "yarn", "rope_theta": 5000.0, "factor": 4.0,
                                    "original_max_position_embeddings": 64, "beta_fast": 32, "beta_slow": 1,
                                    "mscale": 0.707, "mscale_all_dim": 1.0}),
    # every layer MoE (first_k_dense_replace=0), 2 groups keep 1, top-3, unnormalised, scaling 2.0
    "allmoe8": dict(n_routed_experts=8, num_experts_per_tok=3, n_group=2, topk_group=1, first_k_dense_replace=0,
                    norm_topk_prob=False, routed_scaling_factor=2.0, q_lora_rank=16),
}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def model_case(request, checkpoints):
    name = request.param
    model_dir, hf = checkpoints(f"ref-{name}", seed=100 + sorted(CONFIGS).index(name), **CONFIGS[name])
    return name, model_dir, hf


def _all_position_logits(engine, prompt: list[int]) -> torch.Tensor:
    """One prefill through the paged cache, asking for the logits of every prompt position."""
    runner = engine.runner
    bs = runner.config.block_size
    table = list(range(-(-len(prompt) // bs)))
    batch = ForwardBatch.build([prompt], [0], [table], bs, [True])
    batch.logits_indices = torch.arange(len(prompt))
    return runner.model(batch, runner.kv_pool)


def _assert_prefill_and_greedy_match_hf(model_dir, hf, prompt: list[int]) -> None:
    """Every prefill position's logits within TOL of HF, and 6 greedy tokens identical to HF's."""
    engine = make_engine(model_dir, max_num_batched_tokens=64)
    assert rel_err(_all_position_logits(engine, prompt), hf_logits(hf, prompt)) < TOL
    engine2 = make_engine(model_dir, max_num_batched_tokens=64)
    toks = engine2.generate([prompt], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))[0]
    assert toks == hf_greedy(hf, prompt, 6)


def test_prefill_logits_every_position_match_hf(model_case):
    name, model_dir, hf = model_case
    engine = make_engine(model_dir)
    prompt = prompts_for(hf.config.vocab_size, [13], seed=1)[0]
    ours = _all_position_logits(engine, prompt)
    ref = hf_logits(hf, prompt)
    assert rel_err(ours, ref) < TOL, name


def test_decode_logits_and_greedy_tokens_match_hf(model_case):
    """Greedy generation: tokens identical to HF generate; the logits of the prefill step and of
    every decode step agree with HF's logits at the same positions."""
    name, model_dir, hf = model_case
    engine = make_engine(model_dir, block_size=4, max_num_batched_tokens=64)
    n = 8
    for i, prompt in enumerate(prompts_for(hf.config.vocab_size, [6, 11], seed=2)):
        rec = LogitRecorder(engine)
        params = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
        engine.add_request(f"r{i}", prompt, params)
        tokens = []
        while engine.has_unfinished():
            for out in engine.step():
                tokens.extend(out.new_token_ids)
        assert tokens == hf_greedy(hf, prompt, n), name
        full = hf_logits(hf, prompt + tokens)
        assert len(rec.steps) == n                      # 1 prefill step + 7 decode steps
        for step, got in enumerate(rec.steps):
            ref = full[len(prompt) - 1 + step]
            assert rel_err(got[0], ref) < TOL, (name, step)


def test_yarn_config_is_really_yarn(checkpoints):
    """Guards the YaRN case above: the engine's config sees yarn with mscale, and its softmax scale
    differs from the plain qk_head_dim**-0.5 (otherwise the YaRN comparison would test nothing)."""
    from dynamo_dwdp.model.config import load_model_config

    model_dir, hf = checkpoints("ref-yarn12", seed=100 + sorted(CONFIGS).index("yarn12"), **CONFIGS["yarn12"])
    cfg = load_model_config(str(model_dir))
    assert cfg.rope.kind == "yarn" and cfg.rope.factor == 4.0
    assert abs(cfg.softmax_scale - cfg.qk_head_dim ** -0.5) > 1e-3
    assert abs(cfg.softmax_scale - hf.model.layers[0].self_attn.scaling) < 1e-9


def test_make_model_tiny_checkpoint_matches_hf(tmp_path_factory):
    """`dynamo-dwdp make-model --preset tiny` (write_checkpoint) loads in transformers with no
    missing/unexpected keys, and the engine agrees with transformers on it."""
    from transformers import DeepseekV3ForCausalLM

    from dynamo_dwdp.synthetic.checkpoint import write_checkpoint

    out = tmp_path_factory.mktemp("tiny") / "tiny"
    write_checkpoint(out, "tiny", seed=3, quiet=True, with_tokenizer=False)
    hf, info = DeepseekV3ForCausalLM.from_pretrained(str(out), dtype=torch.float32, output_loading_info=True)
    hf.eval()
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    _assert_prefill_and_greedy_match_hf(out, hf, prompts_for(hf.config.vocab_size, [10], seed=4)[0])


def test_fused_expert_layout_loads_and_matches_hf(checkpoints):
    """transformers' fused layout (`save_pretrained(..., save_original_format=False)`:
    experts.gate_up_proj [E, 2I, H], experts.down_proj [E, H, I])."""
    from safetensors import safe_open

    model_dir, hf = checkpoints("ref-fused", seed=7, fused=True)
    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert "model.layers.1.mlp.experts.gate_up_proj" in names
    assert not any(".experts.0." in n for n in names)
    _assert_prefill_and_greedy_match_hf(model_dir, hf, prompts_for(hf.config.vocab_size, [9], seed=5)[0])


@pytest.mark.parametrize("backend", ["sdpa", "reference"])
def test_prefill_attention_backends_match_hf(model_case, backend):
    """Both prefill attention paths (fused SDPA expand-then-attend, and the absorbed reference) give
    HF's logits at every position of a one-shot prefill, and of a prefill chunked into 5-token
    pieces over a 4-token-block cache (chunks after the first attend to cached tokens: bottom-right
    causal)."""
    name, model_dir, hf = model_case
    prompt = prompts_for(hf.config.vocab_size, [17], seed=5)[0]
    ref = hf_logits(hf, prompt)
    engine = make_engine(model_dir, attention_backend=backend)
    assert rel_err(_all_position_logits(engine, prompt), ref) < TOL, name
    runner = make_engine(model_dir, attention_backend=backend).runner
    bs = runner.config.block_size
    table = [7, 2, 9, 4, 11]                             # scattered blocks: the table is really used
    got = []
    for start in range(0, len(prompt), 5):
        chunk = prompt[start:start + 5]
        batch = ForwardBatch.build([chunk], [start], [table], bs, [True])
        batch.logits_indices = torch.arange(len(chunk))
        got.append(runner.model(batch, runner.kv_pool))
    assert rel_err(torch.cat(got), ref) < TOL, name
