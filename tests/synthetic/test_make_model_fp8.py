"""model/fp8.py (the FP8 block format) and `make-model --weight-format fp8 / --like`.

References: float64 block-by-block arithmetic written here, transformers' DeepseekV3/V2ForCausalLM on
weights this test dequantizes itself, and transformers' own loading of the written files.
"""
from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from tests.conftest import hf_greedy, make_engine, prompts_for
from dynamo_dwdp.engine.sampling import SamplingParams
from dynamo_dwdp.model.fp8 import FP8_DTYPE, dequantize_block_fp8, quantize_block_fp8, scale_shape

PARAMS = dict(max_tokens=6, temperature=0, ignore_eos=True)


def _dequantize_f64(q: torch.Tensor, scale: torch.Tensor, b: int = 128) -> torch.Tensor:
    """Independent reference: every block's e4m3 values x its scale, in float64, rounded once to float32."""
    out = torch.empty(q.shape, dtype=torch.float64)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            out[i * b:(i + 1) * b, j * b:(j + 1) * b] = \
                q[i * b:(i + 1) * b, j * b:(j + 1) * b].double() * float(scale[i, j])
    return out.float()


# ------------------------------------------------------------------ the format
@pytest.mark.parametrize("shape", [(200, 300), (128, 256), (7, 129), (1, 1)])
def test_quantize_dequantize_blocks_against_float64(shape):
    g = torch.Generator().manual_seed(shape[0] * 1000 + shape[1])
    w = torch.randn(shape, generator=g) * torch.logspace(-3, 2, shape[1])     # very different column ranges
    q, s = quantize_block_fp8(w)
    assert q.dtype == FP8_DTYPE and s.dtype == torch.float32
    assert tuple(s.shape) == scale_shape(shape) == (math.ceil(shape[0] / 128), math.ceil(shape[1] / 128))
    deq = dequantize_block_fp8(q, s)
    assert torch.equal(deq, _dequantize_f64(q, s))                            # exact, partial blocks included
    for i in range(s.shape[0]):                                               # each block's max maps onto 448
        for j in range(s.shape[1]):
            blk = w[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128]
            assert float(s[i, j]) == pytest.approx(float(blk.abs().max()) / 448.0, rel=1e-6)
    # e4m3 keeps 3 mantissa bits: relative error <= 2^-4 for normals, absolute <= scale * 2^-10 below
    scale_full = s.repeat_interleave(128, 0).repeat_interleave(128, 1)[:shape[0], :shape[1]]
    assert bool(((deq - w).abs() <= w.abs() * 2**-4 + scale_full * 2**-9).all())


def test_zero_block_and_wrong_scale_shape():
    w = torch.zeros(130, 10)
    w[129, 3] = 5.0
    q, s = quantize_block_fp8(w)
    assert s[0, 0] == 1.0 and s[1, 0] == pytest.approx(5.0 / 448)              # an all-zero block gets scale 1
    assert torch.equal(dequantize_block_fp8(q, s), w)
    with pytest.raises(ValueError, match=r"weight_scale_inv has shape \(1, 1\), expected \(2, 1\)"):
        dequantize_block_fp8(q, torch.ones(1, 1))


# ------------------------------------------------------------------ make-model --weight-format fp8
def test_make_model_fp8_matches_transformers_on_dequantized_weights(tmp_path):
    """The tiny preset in FP8 (non-quantized tensors kept fp32 so the comparison is exact): the layout is
    the official one, the FP8 values are the fp32 checkpoint of the same seed quantized, and the
    engine's greedy tokens equal transformers' on weights dequantized here."""
    from safetensors.torch import load_file, save_file
    from transformers import DeepseekV3ForCausalLM

    from dynamo_dwdp.synthetic.checkpoint import write_checkpoint

    fp8 = write_checkpoint(tmp_path / "fp8", "tiny", seed=2, dtype="fp32", quiet=True, with_tokenizer=False,
                           weight_format="fp8").out_dir
    plain = write_checkpoint(tmp_path / "fp32", "tiny", seed=2, dtype="fp32", quiet=True,
                             with_tokenizer=False).out_dir
    cfg = json.loads((fp8 / "config.json").read_text())
    assert cfg["quantization_config"] == {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                          "weight_block_size": [128, 128]}
    stored, ref = load_file(str(fp8 / "model.safetensors")), load_file(str(plain / "model.safetensors"))
    deq = {}
    for name, t in stored.items():
        if name.endswith("_scale_inv"):
            continue
        if t.dtype == FP8_DTYPE:
            deq[name] = _dequantize_f64(t, stored[name + "_scale_inv"])
            err = (deq[name] - ref[name]).abs().max() / ref[name].abs().max()
            assert 0 < err < 2**-4, name                                    # the same model, quantized
        else:
            deq[name] = t
            assert torch.equal(t, ref[name]), name
    quantized = {n for n, t in stored.items() if t.dtype == FP8_DTYPE}
    assert set(deq) == set(ref)
    assert not any(k in n for n in quantized for k in ("embed_tokens", "lm_head", "norm", "mlp.gate.weight"))
    assert {n.split(".")[-2] for n in quantized} == {"q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj",
                                                      "o_proj", "gate_proj", "up_proj", "down_proj"}
    ref_dir = tmp_path / "dequantized"
    ref_dir.mkdir()
    del cfg["quantization_config"]
    (ref_dir / "config.json").write_text(json.dumps(cfg))
    save_file(deq, str(ref_dir / "model.safetensors"), metadata={"format": "pt"})
    hf = DeepseekV3ForCausalLM.from_pretrained(str(ref_dir), dtype=torch.float32).eval()
    engine = make_engine(fp8, max_num_batched_tokens=64)
    for prompt in prompts_for(cfg["vocab_size"], [8, 13], seed=9):
        assert engine.generate([prompt], SamplingParams(**PARAMS))[0] == hf_greedy(hf, prompt, PARAMS["max_tokens"])


def test_like_deepseek_v2_lite_layout_loads_in_transformers_and_matches(tmp_path):
    """`--like deepseek-v2-lite` writes a deepseek_v2 config (greedy softmax router, no correction bias)
    that transformers' DeepseekV2ForCausalLM loads with no missing or unexpected key; shrunk to CPU size
    here, the engine's greedy tokens equal transformers'."""
    from transformers import DeepseekV2ForCausalLM

    from dynamo_dwdp.synthetic.checkpoint import write_checkpoint
    from dynamo_dwdp.model.config import config_from_dict
    from dynamo_dwdp.synthetic.presets import preset_config

    cfg = preset_config("deepseek-v2-lite", num_layers=3, dtype="fp32")
    parsed = config_from_dict(cfg)
    assert (parsed.model_type, parsed.topk_method, parsed.scoring_func) == ("deepseek_v2", "greedy", "softmax")
    assert not parsed.uses_correction_bias and parsed.rope.kind == "yarn" and parsed.q_lora_rank is None
    cfg.update(vocab_size=320, hidden_size=64, intermediate_size=96, moe_intermediate_size=24, num_attention_heads=4,
               num_key_value_heads=4, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
               n_routed_experts=12, max_position_embeddings=4096)
    cfg["rope_scaling"]["original_max_position_embeddings"] = 512
    out = write_checkpoint(tmp_path / "v2l", cfg, seed=4, quiet=True, with_tokenizer=False).out_dir
    hf, info = DeepseekV2ForCausalLM.from_pretrained(str(out), dtype=torch.float32, output_loading_info=True)
    hf.eval()
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    engine = make_engine(out, max_num_batched_tokens=64)
    prompt = prompts_for(320, [10], seed=5)[0]
    assert engine.generate([prompt], SamplingParams(**PARAMS))[0] == hf_greedy(hf, prompt, PARAMS["max_tokens"])


def test_like_deepseek_v3_config_is_the_published_one():
    """The fields that decide the model, as in the published DeepSeek-V3 config.json."""
    from dynamo_dwdp.model.config import config_from_dict
    from dynamo_dwdp.synthetic.presets import preset_config

    cfg = preset_config("deepseek-v3", num_layers=5)
    parsed = config_from_dict(cfg)
    assert (parsed.num_hidden_layers, parsed.first_k_dense_replace, parsed.n_routed_experts) == (5, 3, 256)
    assert (parsed.n_group, parsed.topk_group, parsed.num_experts_per_tok) == (8, 4, 8)
    assert parsed.routed_scaling_factor == 2.5 and parsed.norm_topk_prob and parsed.topk_method == "noaux_tc"
    assert parsed.rope.kind == "yarn" and parsed.rope.factor == 40 and parsed.softmax_scale == \
        pytest.approx(192 ** -0.5 * (0.1 * math.log(40) + 1) ** 2)


def test_cli_like_and_weight_format(tmp_path):
    from tests.conftest import cli

    bad = cli("make-model", str(tmp_path / "x"), "--like", "deepseek-v9")
    assert bad.returncode != 0 and "--like" in bad.stderr
    both = cli("make-model", str(tmp_path / "y"), "--like", "deepseek-v3", "--preset", "tiny")
    assert both.returncode != 0 and "not allowed with" in both.stderr
    ok = cli("make-model", str(tmp_path / "t"), "--preset", "tiny", "--weight-format", "fp8", "--layers", "2", "-q")
    assert ok.returncode == 0, ok.stderr
    cfg = json.loads((tmp_path / "t" / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 2 and cfg["quantization_config"]["quant_method"] == "fp8"
    shutil.rmtree(tmp_path / "t")


@pytest.mark.parametrize("like,fixture", [("deepseek-v2-lite", "deepseek-v2-lite"), ("deepseek-v3", "deepseek-r1")])
def test_like_presets_reproduce_the_published_configs(like, fixture):
    """Every field of the published config.json (tests/fixtures) that decides the model is the same in
    the `--like` preset, and the engine's parser reads both to the same ModelConfig."""
    from tests.conftest import REPO
    from dynamo_dwdp.model.config import config_from_dict
    from dynamo_dwdp.synthetic.presets import preset_config

    published = json.loads((REPO / "tests" / "fixtures" / fixture / "config.json").read_text())
    ours = preset_config(like)
    ignored = {"bos_token_id", "eos_token_id", "num_nextn_predict_layers", "quantization_config", "auto_map",
               "aux_loss_alpha", "seq_aux", "transformers_version", "pretraining_tp", "ep_size"}
    differ = {k: (published[k], ours.get(k)) for k in published if k not in ignored and published[k] != ours.get(k)}
    assert not differ, differ
    a, b = config_from_dict(published), config_from_dict(ours)
    same = {k: v for k, v in vars(a).items() if k not in ("bos_token_id", "eos_token_ids", "quant",
                                                           "num_nextn_predict_layers")}
    assert same == {k: v for k, v in vars(b).items() if k in same}
    if fixture == "deepseek-r1":
        assert a.weight_format == "fp8" and a.quant.block == (128, 128) and list(a.mtp_layers) == [61]
    else:
        assert a.weight_format == "bf16" and not a.mtp_layers
