"""Bad inputs give ONE clear error line: `dynamo-dwdp generate` prints `error: ...` on stderr, exits
with 2, no traceback; the library raises UserError subclasses with the same message."""
from __future__ import annotations

import json
import shutil

import pytest
from safetensors.torch import load_file, save_file

from tests.conftest import cli, make_engine, prompts_for
from dynamo_dwdp.engine.sampling import SamplingParams
from dynamo_dwdp.errors import CheckpointError, RequestError


@pytest.fixture(scope="module")
def ckpt(checkpoints):
    model_dir, _ = checkpoints("engine", seed=21)
    return model_dir


def _variant(src, dst, edit=None, config=None):
    """Copy checkpoint `src` to `dst`, applying edit(tensors) and/or config(dict) on the way."""
    dst.mkdir()
    for f in src.iterdir():
        if f.suffix != ".safetensors" and f.name != "config.json":
            shutil.copy(f, dst / f.name)
    tensors = load_file(str(src / "model.safetensors"))
    if edit:
        edit(tensors)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    if config:
        config(cfg)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def _one_error_line(proc, *needles):
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert proc.stdout == ""
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: "), lines[0]
    assert "Traceback" not in proc.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def _generate(model_dir, *extra):
    return cli("generate", "--model", str(model_dir), *extra, "--max-tokens", "2")


@pytest.mark.slow
def test_cli_missing_config(tmp_path, ckpt):
    d = tmp_path / "m"
    d.mkdir()
    shutil.copy(ckpt / "model.safetensors", d / "model.safetensors")
    _one_error_line(_generate(d, "--token-ids", "5,6"), "config.json", "missing")
    _one_error_line(_generate(tmp_path / "nope", "--token-ids", "5,6"), "does not exist")


@pytest.mark.slow
def test_cli_garbled_config(tmp_path, ckpt):
    d = _variant(ckpt, tmp_path / "m")
    (d / "config.json").write_text('{"vocab_size": 384, "hidden_size": ')
    _one_error_line(_generate(d, "--token-ids", "5,6"), "config.json", "not valid JSON")
    cfg = json.loads((ckpt / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "rms_norm_eps": "tiny"}))
    _one_error_line(_generate(d, "--token-ids", "5,6"), "config.json", "'rms_norm_eps'", "'tiny'")
    (d / "config.json").write_text("[1, 2]")
    _one_error_line(_generate(d, "--token-ids", "5,6"), "config.json", "JSON object")


@pytest.mark.slow
def test_cli_wrong_shaped_tensor(tmp_path, ckpt):
    name = "model.layers.1.self_attn.kv_b_proj.weight"
    expected = list(load_file(str(ckpt / "model.safetensors"))[name].shape)

    def edit(t):
        t[name] = t[name][:, :-1].contiguous()

    d = _variant(ckpt, tmp_path / "m", edit=edit)
    _one_error_line(_generate(d, "--token-ids", "5,6"), name, str(expected))


@pytest.mark.slow
def test_cli_missing_tensor(tmp_path, ckpt):
    d = _variant(ckpt, tmp_path / "m", edit=lambda t: t.pop("model.layers.2.mlp.experts.3.up_proj.weight"))
    _one_error_line(_generate(d, "--token-ids", "5,6"), "model.layers.2.mlp.experts.3.up_proj.weight", "missing")


@pytest.mark.slow
def test_cli_prompt_longer_than_context(tmp_path, ckpt):
    d = _variant(ckpt, tmp_path / "m", config=lambda c: c.update(max_position_embeddings=24))
    ids = ",".join(str(5 + i) for i in range(24))
    _one_error_line(_generate(d, "--token-ids", ids), "24 tokens", "context length is 24")


@pytest.mark.slow
def test_cli_bad_token_ids(ckpt):
    _one_error_line(_generate(ckpt, "--token-ids", "5,x,7"), "--token-ids", "'5,x,7'")
    _one_error_line(_generate(ckpt, "--token-ids", "5,100000"), "100000", "vocabulary")


# ------------------------------------------------------------------ the same errors in-process
def test_loader_names_tensor_and_expected_shape(tmp_path, checkpoints):
    """Wrong shapes in the fused expert layout and per-expert layout are both named."""
    fused, _ = checkpoints("ref-fused", seed=7, fused=True)
    name = "model.layers.2.mlp.experts.down_proj"

    def edit(t):
        t[name] = t[name][:, :, :-2].contiguous()

    d = _variant(fused, tmp_path / "fused", edit=edit)
    with pytest.raises(CheckpointError, match=rf"'{name}'.*expected \[16, 32, 16\]"):
        make_engine(d)


def test_config_errors_are_one_line(tmp_path, ckpt):
    def bad(**fields):
        return _variant(ckpt, tmp_path / f"c{len(list(tmp_path.iterdir()))}", config=lambda c: c.update(fields))

    cases = [
        (dict(n_group=3), "n_routed_experts=16 is not divisible by n_group=3"),
        (dict(num_experts_per_tok=0), "num_experts_per_tok"),
        (dict(model_type="llama"), "model_type"),
        (dict(rope_parameters={"rope_type": "linear", "factor": 2.0}), "rope type 'linear'"),
        # wrong types in optional fields: named, never a traceback
        (dict(routed_scaling_factor="fast"), "field 'routed_scaling_factor' must be a number, got 'fast'"),
        (dict(first_k_dense_replace=1.5), "field 'first_k_dense_replace' must be an integer"),
        (dict(n_group=0), "n_group=0 must be >= 1"),
        (dict(eos_token_id="</s>"), "field 'eos_token_id'"),
        (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": "big"}),
         "invalid rope parameters"),
    ]
    for fields, msg in cases:
        with pytest.raises(CheckpointError, match=msg) as ei:
            make_engine(bad(**fields))
        assert "\n" not in str(ei.value) and "config.json" in str(ei.value)


def test_request_errors(ckpt):
    eng = make_engine(ckpt)
    ok = SamplingParams(max_tokens=2)
    with pytest.raises(RequestError, match="empty"):
        eng.add_request("a", [], ok)
    with pytest.raises(RequestError, match="outside the vocabulary"):
        eng.add_request("a", [1, 384], ok)
    with pytest.raises(RequestError, match="top_p"):
        eng.add_request("a", [1, 2], SamplingParams(top_p=0.0))
    with pytest.raises(RequestError, match="min_tokens"):
        eng.add_request("a", [1, 2], SamplingParams(max_tokens=2, min_tokens=3))
    with pytest.raises(RequestError, match="stop_token_ids"):
        eng.add_request("a", [1, 2], SamplingParams(stop_token_ids=(999,)))
    eng.add_request("a", prompts_for(384, [3])[0], ok)
    with pytest.raises(RequestError, match="already in use"):
        eng.add_request("a", [1, 2], ok)
    small = make_engine(ckpt, num_kv_blocks=2, block_size=4)
    with pytest.raises(RequestError, match="KV cache holds only 8"):
        small.add_request("b", list(range(3, 12)), ok)
    assert not small.has_unfinished() and small.blocks.num_free == 2
