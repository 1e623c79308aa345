"""`dynamo-dwdp make-model`: random DeepSeek-V3 checkpoints + offline tokenizer.

References used here, none of them our own code: transformers' DeepseekV3ForCausalLM (loading, its own
save_pretrained tensor list, parameter count on the meta device), the safetensors reader, transformers'
AutoTokenizer/Jinja2 chat templates, and hand-written expectations of the DeepSeek prompt format.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dynamo_dwdp.synthetic.checkpoint import (
    iter_random_tensors,
    param_count,
    random_tensor,
    tensor_specs,
    write_checkpoint,
)
from dynamo_dwdp.synthetic.presets import PRESETS, preset_config

REPO = Path(__file__).resolve().parents[2]
SPECIALS = ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>", "<｜User｜>", "<｜Assistant｜>"]


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "dynamo_dwdp.cli", "make-model", *args], cwd=REPO,
                          env=full_env, capture_output=True, text=True, timeout=300)


def _hashes(d: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())}


def _safetensors_dict(d: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _hf_saved_layout(cfg_dir: Path, tmp: Path, dtype: torch.dtype) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Name -> (shape, dtype) of what transformers itself saves for the config in `cfg_dir`.

    For bf16 the model goes through transformers' own bf16 load path (which keeps
    e_score_correction_bias in float32, `_keep_in_fp32_modules_strict`) before it is saved.
    """
    from transformers import AutoConfig, DeepseekV3ForCausalLM

    cfg = AutoConfig.from_pretrained(cfg_dir)
    torch.manual_seed(0)
    DeepseekV3ForCausalLM(cfg).save_pretrained(tmp / "fp32")
    if dtype != torch.float32:
        DeepseekV3ForCausalLM.from_pretrained(tmp / "fp32", dtype=dtype).save_pretrained(tmp / "lowp")
        tmp = tmp / "lowp"
    else:
        tmp = tmp / "fp32"
    return {k: (tuple(v.shape), v.dtype) for k, v in _safetensors_dict(tmp).items()}


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory) -> tuple[Path, Path]:
    """The tiny preset written twice by the CLI, with different hash seeds and thread counts."""
    a = tmp_path_factory.mktemp("tiny_a") / "model"
    b = tmp_path_factory.mktemp("tiny_b") / "model"
    ra = _cli(str(a), "--preset", "tiny", "--seed", "5", env={"PYTHONHASHSEED": "0", "RAYON_NUM_THREADS": "2"})
    rb = _cli(str(b), "--preset", "tiny", "--seed", "5", "--quiet",
              env={"PYTHONHASHSEED": "12345", "RAYON_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"})
    assert ra.returncode == 0, ra.stderr
    assert rb.returncode == 0, rb.stderr
    assert "parameters" in ra.stdout and rb.stdout == ""
    return a, b


# ---------------------------------------------------------------------------------------- determinism


def test_same_seed_gives_byte_identical_files(tiny_runs):
    a, b = tiny_runs
    ha, hb = _hashes(a), _hashes(b)
    assert set(ha) == {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                       "tokenizer_config.json"}
    assert ha == hb


def test_different_seed_changes_weights_only(tiny_runs, tmp_path):
    a, _ = tiny_runs
    summary = write_checkpoint(tmp_path / "s6", "tiny", seed=6, quiet=True)
    ha, h6 = _hashes(a), _hashes(summary.out_dir)
    assert ha["model.safetensors"] != h6["model.safetensors"]
    assert {k: v for k, v in ha.items() if k != "model.safetensors"} == \
        {k: v for k, v in h6.items() if k != "model.safetensors"}
    w5, w6 = _safetensors_dict(a), _safetensors_dict(summary.out_dir)
    # independent streams: no tensor is (nearly) the same under the two seeds
    for name in ("model.embed_tokens.weight", "model.layers.2.mlp.experts.3.up_proj.weight", "lm_head.weight"):
        assert abs(torch.corrcoef(torch.stack([w5[name].flatten(), w6[name].flatten()]))[0, 1]) < 0.1


def test_tensors_do_not_depend_on_order_or_device_path(tiny_runs):
    """The file holds exactly `iter_random_tensors`; each tensor is reproducible on its own, in any order."""
    a, _ = tiny_runs
    stored = _safetensors_dict(a)
    cfg = json.loads((a / "config.json").read_text())
    generated = dict(iter_random_tensors(cfg, 5, "fp32"))
    assert list(generated) == [s.name for s in tensor_specs(cfg)]
    assert set(stored) == set(generated)
    for name in stored:
        assert torch.equal(stored[name], generated[name]), name
    specs = tensor_specs(cfg)
    for spec in reversed(specs[-20:]):
        assert torch.equal(random_tensor(spec, 5, "fp32"), stored[spec.name])
    only = dict(iter_random_tensors(cfg, 5, "fp32", only=lambda n: ".experts.7." in n))
    assert len(only) == 3 * 3 and all(torch.equal(t, stored[n]) for n, t in only.items())
    # distinct tensors of equal shape are not copies of each other
    e0, e1 = stored["model.layers.1.mlp.experts.0.gate_proj.weight"], stored["model.layers.1.mlp.experts.1.gate_proj.weight"]
    assert abs(torch.corrcoef(torch.stack([e0.flatten(), e1.flatten()]))[0, 1]) < 0.2


def test_init_statistics_and_bias_changes_routing(tiny_runs):
    a, _ = tiny_runs
    w = _safetensors_dict(a)
    H = 64

    def close(x, want, rel=0.15):
        return abs(x - want) <= rel * want

    assert close(w["model.embed_tokens.weight"].std().item(), 1.0, 0.05)
    assert abs(w["model.embed_tokens.weight"].mean().item()) < 0.02
    assert close(w["model.layers.0.mlp.down_proj.weight"].std().item(), 1 / math.sqrt(128))
    assert close(w["model.layers.1.self_attn.kv_b_proj.weight"].std().item(), 1 / math.sqrt(32))
    assert close(w["lm_head.weight"].std().item(), 2 / math.sqrt(H), 0.05)
    norm = w["model.layers.3.post_attention_layernorm.weight"]
    assert abs(norm.mean().item() - 1.0) < 0.03 and 0.02 < norm.std().item() < 0.1
    bias = w["model.layers.1.mlp.gate.e_score_correction_bias"]
    assert bias.dtype == torch.float32 and 0.05 < bias.std().item() < 0.2

    # the correction bias changes the chosen experts for a good share of tokens (plain top-4, no groups)
    gate = w["model.layers.1.mlp.gate.weight"]
    h = torch.randn(512, H, generator=torch.Generator().manual_seed(0))
    scores = torch.sigmoid(h @ gate.T)
    plain = scores.topk(4, dim=-1).indices.sort(dim=-1).values
    biased = (scores + bias).topk(4, dim=-1).indices.sort(dim=-1).values
    changed = (plain != biased).any(dim=-1).float().mean().item()
    assert changed > 0.3, changed


# ---------------------------------------------------------------------------------------- transformers


def test_transformers_loads_tiny_and_names_match_its_own_save(tiny_runs, tmp_path):
    from transformers import DeepseekV3ForCausalLM

    a, _ = tiny_runs
    model, info = DeepseekV3ForCausalLM.from_pretrained(a, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert model.config.num_hidden_layers == 4 and model.config.rope_parameters["rope_type"] == "default"

    ours = {k: (tuple(v.shape), v.dtype) for k, v in _safetensors_dict(a).items()}
    ref = _hf_saved_layout(a, tmp_path / "ref", torch.float32)
    assert set(ours) == set(ref)
    assert ours == ref

    # transformers' loaded (fused) experts hold exactly the per-expert file tensors
    stored = _safetensors_dict(a)
    experts = model.model.layers[2].mlp.experts
    assert torch.equal(experts.gate_up_proj[9][:32], stored["model.layers.2.mlp.experts.9.gate_proj.weight"])
    assert torch.equal(experts.down_proj[9], stored["model.layers.2.mlp.experts.9.down_proj.weight"])
    assert torch.equal(model.model.layers[3].mlp.gate.e_score_correction_bias,
                       stored["model.layers.3.mlp.gate.e_score_correction_bias"])

    ids = torch.arange(5, 69).remainder(1024).unsqueeze(0)
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
    logits = out.logits[0]
    assert torch.isfinite(logits).all()
    top2 = logits.topk(2, dim=-1).values
    gap = top2[:, 0] - top2[:, 1]
    assert gap.median().item() > 1e-2, gap
    assert 1.0 < logits.std().item() < 4.0
    # activations stay O(1) through the layers (residual-stream RMS)
    rms = [h.pow(2).mean().sqrt().item() for h in out.hidden_states]
    assert all(0.5 < r < 5.0 for r in rms), rms


def test_bf16_and_q_lora_null_layouts_match_transformers(tmp_path):
    """bf16 saves keep e_score_correction_bias in float32; q_lora_rank null writes self_attn.q_proj."""
    from transformers import DeepseekV3ForCausalLM

    b = write_checkpoint(tmp_path / "bf16", "tiny", seed=1, dtype="bf16", quiet=True).out_dir
    ours = {k: (tuple(v.shape), v.dtype) for k, v in _safetensors_dict(b).items()}
    # Names and shapes: what transformers itself saves. Dtypes: the official files' rule (every tensor
    # in the model dtype but e_score_correction_bias, float32) -- not transformers' save dtype, which
    # varies by release (5.24 keeps mlp.gate.weight in float32; the official V3 files store it in bf16).
    ref = _hf_saved_layout(b, tmp_path / "ref_bf16", torch.bfloat16)
    assert {k: shape for k, (shape, _) in ours.items()} == {k: shape for k, (shape, _) in ref.items()}
    for name, (_, dtype) in ours.items():
        want = torch.float32 if name.endswith("e_score_correction_bias") else torch.bfloat16
        assert dtype == want, (name, dtype)
    assert ref[next(k for k in ref if k.endswith("e_score_correction_bias"))][1] == torch.float32
    assert json.loads((b / "config.json").read_text())["torch_dtype"] == "bfloat16"

    cfg = preset_config("tiny")
    cfg.update(q_lora_rank=None, num_hidden_layers=2)
    c = write_checkpoint(tmp_path / "nolora", cfg, seed=1, quiet=True).out_dir
    ours = {k: (tuple(v.shape), v.dtype) for k, v in _safetensors_dict(c).items()}
    assert "model.layers.1.self_attn.q_proj.weight" in ours
    assert ours == _hf_saved_layout(c, tmp_path / "ref_nolora", torch.float32)
    model, info = DeepseekV3ForCausalLM.from_pretrained(c, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))


def test_sharded_checkpoint_loads_like_single_file(tiny_runs, tmp_path):
    from transformers import DeepseekV3ForCausalLM

    a, _ = tiny_runs
    s = write_checkpoint(tmp_path / "sharded", "tiny", seed=5, quiet=True, max_shard_bytes=700_000).out_dir
    shards = sorted(p.name for p in s.glob("model-*.safetensors"))
    assert len(shards) >= 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert not (s / "model.safetensors").exists()
    index = json.loads((s / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    single = _safetensors_dict(a)
    assert set(index["weight_map"]) == set(single)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in single.values())
    sharded = _safetensors_dict(s)
    assert all(torch.equal(sharded[k], single[k]) for k in single)
    model, info = DeepseekV3ForCausalLM.from_pretrained(s, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))


# ---------------------------------------------------------------------------------------- tokenizer

_TOKENIZER_PROBE = r"""
import json, sys
from transformers import AutoTokenizer
d = sys.argv[1]
tok = AutoTokenizer.from_pretrained(d)
text = "Serving MoE models: prefill → decode, 42 tokens/s. Ça marche! 你好 🙂"
ids = tok(text, add_special_tokens=False)["input_ids"]
msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "What is MoE?"}]
vocab = json.load(open(d + "/config.json"))["vocab_size"]
decoded = [tok.decode([i]) for i in range(vocab)]
print(json.dumps({
    "len": len(tok), "ids": ids, "roundtrip": tok.decode(ids),
    "specials": tok.convert_ids_to_tokens(list(range(5))),
    "bos": tok.bos_token_id, "eos": tok.eos_token_id, "pad": tok.pad_token_id,
    "chat": tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True),
    "chat_ids": tok.apply_chat_template(msgs[:2], tokenize=True, add_generation_prompt=True, return_dict=False),
    "empty_decodes": [i for i, s in enumerate(decoded) if s == ""],
    "max_len": tok.model_max_length,
}))
"""


def test_tokenizer_loads_offline_and_covers_every_id(tiny_runs):
    a, _ = tiny_runs
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-c", _TOKENIZER_PROBE, str(a)], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["len"] == 1024 == json.loads((a / "config.json").read_text())["vocab_size"]
    assert got["specials"] == SPECIALS and (got["bos"], got["eos"], got["pad"]) == (0, 1, 2)
    assert got["roundtrip"] == "Serving MoE models: prefill → decode, 42 tokens/s. Ça marche! 你好 🙂"
    assert len(got["ids"]) < len(got["roundtrip"].encode())        # BPE merged something
    assert got["chat"] == ("<｜begin▁of▁sentence｜>Be brief.<｜User｜>Hi<｜Assistant｜>Hello.<｜end▁of▁sentence｜>"
                           "<｜User｜>What is MoE?<｜Assistant｜>")
    assert got["chat_ids"][0] == 0 and got["chat_ids"][-1] == 4 and 3 in got["chat_ids"]
    assert got["empty_decodes"] == []
    assert got["max_len"] == 2048
    gen = json.loads((a / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"]) == (0, 1)


def test_large_vocab_is_padded_with_visible_fillers():
    """Ids beyond what the corpus supports decode to visible fillers, and never come out of encoding."""
    from dynamo_dwdp.synthetic.tokenizer import build_tokenizer, corpus_text

    tok = build_tokenizer(4096)
    assert tok.get_vocab_size() == 4096
    spec = json.loads(tok.to_str())
    learned = len(spec["model"]["merges"]) + 256 + len(SPECIALS)
    assert 1024 < learned < 4096
    assert tok.decode([4095]) == " tok4095" and tok.decode([learned]) == f" tok{learned}"
    assert all(tok.decode([i], skip_special_tokens=False) for i in range(4096))
    text = corpus_text()[:20000] + " tok4095 tok3000"
    ids = tok.encode(text).ids
    assert max(ids) < learned and tok.decode(ids) == text


# ---------------------------------------------------------------------------------------- presets


def test_preset_configs_load_in_transformers_and_counts_match(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    for name, preset in PRESETS.items():
        cfg = preset_config(name)
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text(json.dumps(cfg))
        hf = AutoConfig.from_pretrained(d)
        v2 = preset.model_type == "deepseek_v2"
        assert type(hf).__name__ == ("DeepseekV2Config" if v2 else "DeepseekV3Config")
        assert hf.vocab_size == preset.vocab_size
        assert v2 or hf.num_mtp_layers == 0
        assert cfg["architectures"] == [("DeepseekV2ForCausalLM" if v2 else "DeepseekV3ForCausalLM")]
        assert cfg["topk_method"] == ("greedy" if v2 else "noaux_tc")
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(hf)
        n_params = sum(p.numel() for p in model.parameters())
        n_bias = sum(b.numel() for n, b in model.named_buffers() if n.endswith("e_score_correction_bias"))
        assert param_count(cfg) == n_params + n_bias, name

    small = AutoConfig.from_pretrained(tmp_path / "small")
    assert small.rope_parameters["rope_type"] == "yarn" and small.rope_parameters["factor"] == 4.0
    assert small.rope_parameters["original_max_position_embeddings"] == 1024
    v2 = preset_config("v2-lite-shape")
    assert v2["q_lora_rank"] is None and v2["torch_dtype"] == "bfloat16" and v2["n_group"] == 1
    assert 15.5e9 < param_count(v2) < 16e9
    four = preset_config("v2-lite-shape", num_layers=4, dtype="fp32")
    assert four["num_hidden_layers"] == 4 and four["torch_dtype"] == "float32"


# ---------------------------------------------------------------------------------------- CLI errors


def test_cli_refuses_non_empty_out_and_unknown_preset(tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    r = _cli(str(out), "--preset", "tiny")
    assert r.returncode == 2
    assert r.stderr.startswith("error: ") and "not empty" in r.stderr and "--force" in r.stderr
    assert sorted(os.listdir(out)) == ["keep.txt"]

    r = _cli(str(tmp_path / "new"), "--preset", "huge")
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "unknown preset 'huge'" in r.stderr
    assert "tiny" in r.stderr and not (tmp_path / "new").exists()

    r = _cli(str(tmp_path / "new"), "--preset", "tiny", "--dtype", "fp8")
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "fp32" in r.stderr


def test_force_overwrites_our_files_and_keeps_others(tmp_path):
    out = tmp_path / "m"
    write_checkpoint(out, "tiny", seed=0, quiet=True, max_shard_bytes=700_000)
    (out / "notes.txt").write_text("keep")
    write_checkpoint(out, "tiny", seed=0, quiet=True, force=True)
    names = sorted(os.listdir(out))
    assert "notes.txt" in names and "model.safetensors" in names
    assert not any(n.startswith("model-0") for n in names) and "model.safetensors.index.json" not in names
