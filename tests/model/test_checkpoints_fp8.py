"""Official DeepSeek-V3 FP8 block checkpoints, the per-rank streaming load, and refused configs.

The FP8 checkpoint is written here, independently of `make-model` and of model/fp8.py: a transformers
DeepseekV3 model's projection weights are quantized block by block (128x128, amax/448 scales, partial
edge blocks: no dimension below is a multiple of 128), stored as float8_e4m3fn + float32
`weight_scale_inv` in two shards with an index, plus one multi-token-prediction layer. The reference
is transformers on the dequantized weights.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess

import pytest
import torch

from tests.conftest import BASE, PY, REPO, build_hf_model, group_engine_config, hf_greedy, hf_logits, make_engine, \
    prompts_for, rel_err
from dynamo_dwdp.engine.sampling import SamplingParams
from dynamo_dwdp.errors import CheckpointError

V = 384
TOL = 1e-4
PARAMS = dict(max_tokens=6, temperature=0, ignore_eos=True)
# hidden 160, q_lora 136, kv_lora 144, dense 200, experts 72: partial blocks on both sides everywhere
FP8_CFG = dict(hidden_size=160, num_attention_heads=2, num_key_value_heads=2, q_lora_rank=136, kv_lora_rank=144,
               qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16, intermediate_size=200,
               moe_intermediate_size=72, n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1,
               num_hidden_layers=3, first_k_dense_replace=1)
_QUANTIZED = ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj",
              "gate_proj", "up_proj", "down_proj")
FP8_QCONFIG = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]}


def _quantize_by_blocks(w: torch.Tensor, b: int = 128) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(e4m3, scale_inv, dequantized) of a 2-D weight, one 128x128 block at a time."""
    rows, cols = w.shape
    q = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    scale = torch.empty(math.ceil(rows / b), math.ceil(cols / b), dtype=torch.float32)
    deq = torch.empty(rows, cols, dtype=torch.float32)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            blk = w[i * b:(i + 1) * b, j * b:(j + 1) * b].float()
            amax = float(blk.abs().max())
            s = torch.tensor(amax / 448.0 if amax > 0 else 1.0, dtype=torch.float32)
            qb = (blk / s).clamp(-448, 448).to(torch.float8_e4m3fn)
            q[i * b:(i + 1) * b, j * b:(j + 1) * b] = qb
            scale[i, j] = s
            deq[i * b:(i + 1) * b, j * b:(j + 1) * b] = qb.float() * s
    return q, scale, deq


def _is_quantized(name: str, t: torch.Tensor) -> bool:
    return t.dim() == 2 and name.endswith(".weight") and name.rsplit(".", 2)[-2] in _QUANTIZED


@pytest.fixture(scope="module")
def fp8_case(tmp_path_factory):
    """(fp8 model dir, transformers model on the dequantized weights, dequantized tensors)."""
    from safetensors.torch import load_file, save_file
    from transformers import DeepseekV3ForCausalLM

    root = tmp_path_factory.mktemp("fp8")
    src = root / "src"
    build_hf_model(seed=31, **FP8_CFG).save_pretrained(src)
    tensors = load_file(str(src / "model.safetensors"))
    fp8, deq = {}, {}
    for name, t in tensors.items():
        if _is_quantized(name, t):
            q, s, d = _quantize_by_blocks(t)
            fp8[name], fp8[name + "_scale_inv"], deq[name] = q, s, d
        else:
            fp8[name] = deq[name] = t
    # the reference: transformers loading the dequantized weights
    ref = root / "dequantized"
    ref.mkdir()
    shutil.copy(src / "config.json", ref / "config.json")
    save_file(deq, str(ref / "model.safetensors"), metadata={"format": "pt"})
    hf = DeepseekV3ForCausalLM.from_pretrained(str(ref), dtype=torch.float32).eval()
    # the FP8 checkpoint: two shards + index, an MTP layer (model.layers.3.*), the published config fields
    out = root / "fp8"
    out.mkdir()
    L = FP8_CFG["num_hidden_layers"]
    mtp = {f"model.layers.{L}.enorm.weight": torch.ones(160), f"model.layers.{L}.hnorm.weight": torch.ones(160)}
    q, s, _ = _quantize_by_blocks(torch.randn(160, 320))
    mtp[f"model.layers.{L}.eh_proj.weight"], mtp[f"model.layers.{L}.eh_proj.weight_scale_inv"] = q, s
    for n, t in tensors.items():                          # the MTP layer repeats a decoder layer
        if n.startswith("model.layers.1."):
            mtp[n.replace("model.layers.1.", f"model.layers.{L}.")] = fp8[n]
            if n + "_scale_inv" in fp8:
                mtp[n.replace("model.layers.1.", f"model.layers.{L}.") + "_scale_inv"] = fp8[n + "_scale_inv"]
    names = sorted({**fp8, **mtp})
    half = len(names) // 2
    weight_map = {}
    for k, part in enumerate((names[:half], names[half:]), 1):
        fname = f"model-{k:05d}-of-00002.safetensors"
        save_file({n: {**fp8, **mtp}[n].contiguous() for n in part}, str(out / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in part})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(quantization_config=FP8_QCONFIG, num_nextn_predict_layers=1, torch_dtype="bfloat16",
               topk_method="noaux_tc", scoring_func="sigmoid")
    (out / "config.json").write_text(json.dumps(cfg))
    return out, hf, deq, tensors


def test_fp8_fixture_is_really_quantized(fp8_case):
    """Guards the comparisons: weights changed by quantization, partial blocks present, FP8 on disk."""
    from safetensors import safe_open

    out, _, deq, orig = fp8_case
    name = "model.layers.1.self_attn.kv_a_proj_with_mqa.weight"        # [160, 160]: 2x2 blocks, 3 partial
    assert deq[name].shape == (160, 160) and not torch.equal(deq[name], orig[name])
    with safe_open(str(out / json.loads((out / "model.safetensors.index.json").read_text())["weight_map"][name]),
                   "pt") as f:
        assert f.get_tensor(name).dtype == torch.float8_e4m3fn
        assert f.get_tensor(name + "_scale_inv").shape == (2, 2)


def test_fp8_engine_matches_transformers_on_dequantized_weights(fp8_case, caplog):
    out, hf, deq, _ = fp8_case
    with caplog.at_level("INFO", logger="dynamo_dwdp.model.loader"):
        engine = make_engine(out, max_num_batched_tokens=64)
    runner = engine.runner
    # exact dequantization: the engine holds the very values transformers runs on
    layer1 = runner.model.model.layers[1]
    for name, got in (("model.layers.1.self_attn.kv_a_proj_with_mqa.weight", layer1.self_attn.kv_a_proj_with_mqa.weight),
                      ("model.layers.0.mlp.down_proj.weight", runner.model.model.layers[0].mlp.down_proj.weight)):
        assert torch.equal(got, deq[name]), name
    bank = runner.executor.banks[1]
    assert torch.equal(bank.w13[5, :72], deq["model.layers.1.mlp.experts.5.gate_proj.weight"])
    assert torch.equal(bank.w2[5], deq["model.layers.1.mlp.experts.5.down_proj.weight"])
    # the MTP layer: skipped with one log line, none of its tensors read
    mtp_lines = [r for r in caplog.records if "multi-token-prediction" in r.getMessage()]
    assert len(mtp_lines) == 1 and "model.layers.3" in mtp_lines[0].getMessage()
    assert not any(n.startswith("model.layers.3.") for n in runner.load_report.tensors)
    # the progress callback counts bytes, ending at exactly what was read
    from dynamo_dwdp.model.loader import load_weights

    calls = []
    report = load_weights(runner.model, str(out), progress=lambda done, total: calls.append((done, total)),
                          progress_bar=False)
    assert calls[-1] == (report.bytes_read, report.bytes_read) and calls == sorted(calls)
    for prompt in prompts_for(V, [7, 12], seed=3):
        toks = engine.generate([prompt], SamplingParams(**PARAMS))[0]
        assert toks == hf_greedy(hf, prompt, PARAMS["max_tokens"])
    from tests.model.test_model_reference import _all_position_logits

    prompt = prompts_for(V, [15], seed=4)[0]
    assert rel_err(_all_position_logits(make_engine(out, max_num_batched_tokens=64), prompt),
                   hf_logits(hf, prompt)) < TOL


@pytest.mark.parametrize("rows,cols", [((0, 100), None), ((100, 200), None), ((50, 140), None), ((128, 200), None),
                                       (None, (0, 80)), (None, (80, 160)), ((3, 131), (7, 150))])
def test_fp8_slices_are_the_dequantized_slices(fp8_case, rows, cols):
    """A TP rank's rows/columns of an FP8 weight (block-aligned reads, then cut) equal the same slice
    of the whole dequantized weight, across block edges; only the row blocks it needs are read."""
    from dynamo_dwdp.model.config import load_model_config
    from dynamo_dwdp.model.loader import CheckpointReader, WeightSource

    out, _, deq, _ = fp8_case
    name = "model.layers.0.mlp.gate_proj.weight"                       # [200, 160]: 2x2 blocks, partial
    reader = CheckpointReader(str(out))
    try:
        src = WeightSource(reader, load_model_config(str(out)))
        got = src.read(name, rows, cols, expect=(200, 160))
        r0, r1 = rows or (0, 200)
        c0, c1 = cols or (0, 160)
        assert torch.equal(got, deq[name][r0:r1, c0:c1])
        blocks = range(r0 // 128, -(-r1 // 128))
        assert reader.report.bytes_read == sum(min(128, 200 - 128 * b) for b in blocks) * 160 \
            + len(blocks) * 2 * 4                                      # e4m3 rows + float32 scale rows
    finally:
        reader.close()


def tokens_and_reads(rank_engine, payload):
    """run_local_group target: generated tokens + the names of the tensors this rank read."""
    from dynamo_dwdp.rank.local_group import generate_rank

    toks = generate_rank(rank_engine, payload)
    return {"tokens": toks, "read": dict(rank_engine.runner.load_report.tensors)}


@pytest.mark.slow
@pytest.mark.usefixtures("private_shm_dir")
@pytest.mark.parametrize("strategy", ["dwdp", "tp"])
def test_fp8_group_ranks_read_only_what_they_hold(fp8_case, strategy):
    """x2 on the FP8 checkpoint. DWDP: each rank reads each expert tensor (and scale) of its own
    placement range once, no other expert, no MTP tensor. TP: rank 0's tokens (each rank holding
    half of every FP8 weight it slices) equal transformers'."""
    from dynamo_dwdp.dwdp.placement import Placement
    from dynamo_dwdp.rank.local_group import run_local_group

    out, hf, _, _ = fp8_case
    prompts = {r: prompts_for(V, [5 + r, 9], seed=60 + r) for r in range(2)}
    payloads = [(prompts[0 if strategy == "tp" else r], SamplingParams(**PARAMS)) for r in range(2)]
    res = run_local_group(str(out), group_engine_config(), strategy, 2, tokens_and_reads, payloads, timeout=180)
    placement = Placement.choose(FP8_CFG["n_routed_experts"], 2)
    for r in res:
        assert r.error is None, r.error
        read = r.value["read"]
        assert not any(n.startswith("model.layers.3.") for n in read)
        if strategy == "dwdp":
            assert set(read.values()) == {1}, "a tensor was read twice"
            experts = {n for n in read if ".mlp.experts." in n}
            want = {f"model.layers.{layer}.mlp.experts.{e}.{p}_proj.weight{suffix}"
                    for layer in (1, 2) for e in placement.local_range(r.rank) for p in ("gate", "up", "down")
                    for suffix in ("", "_scale_inv")}
            assert experts == want, r.rank
    for r in ([0] if strategy == "tp" else range(2)):
        for prompt, toks in zip(prompts[r], res[r].value["tokens"]):
            assert toks == hf_greedy(hf, prompt, PARAMS["max_tokens"])


# ------------------------------------------------------------------ bounded memory
_RSS_SCRIPT = r"""
import json, os, sys, torch
torch.set_num_threads(1)
from dynamo_dwdp.config.engine import EngineSettings
from dynamo_dwdp.engine.model_runner import ModelRunner
from dynamo_dwdp.model.moe_executor import LocalExecutor

class FirstExperts(LocalExecutor):
    # a rank that holds experts 0-3 of every layer (as a DWDP/DEP rank holds its share)
    def experts_to_load(self, layer):
        return range(4)
    def load_expert(self, layer, expert, gate, up, down):
        bank = self.banks.get(layer)
        if bank is None:
            bank = self.banks[layer] = self._new_bank(0, 4)
        self._store(bank, expert, gate, up, down)

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
with open("/proc/self/clear_refs", "w") as f:     # reset the peak (VmHWM) to the current RSS
    f.write("5")
import dynamo_dwdp.model.loader as loader
inner = loader.load_weights
def measured(model, model_dir, **kw):
    held = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = status("VmRSS")
    report = inner(model, model_dir, **kw)
    held += sum(b.w13.numel() * b.w13.element_size() + b.w2.numel() * b.w2.element_size()
                for b in model.executor.banks.values())
    print(json.dumps({"before": before, "peak": status("VmHWM"), "held": held, "read": report.bytes_read}))
    return report
import dynamo_dwdp.engine.model_runner as mr
mr.load_weights = measured
ModelRunner(sys.argv[1], EngineSettings(block_size=4, num_kv_blocks=4, max_num_batched_tokens=16), FirstExperts)
"""


def test_multi_shard_load_peak_rss_is_bounded(tmp_path):
    """A multi-shard, ~105 MiB checkpoint; the rank holds 4 of 64 experts. Peak RSS growth during the
    load stays under what the rank holds + 16 MiB (the largest tensor is 1 MiB), far below the
    checkpoint: a loader that mapped or read whole shards would exceed it."""
    from dynamo_dwdp.synthetic.checkpoint import write_checkpoint
    from dynamo_dwdp.synthetic.presets import preset_config

    cfg = preset_config("tiny", dtype="fp32")
    cfg.update(hidden_size=256, moe_intermediate_size=256, intermediate_size=512, n_routed_experts=64,
               num_hidden_layers=3, n_group=4, topk_group=2, vocab_size=512)
    out = tmp_path / "ckpt"
    summary = write_checkpoint(out, cfg, seed=1, quiet=True, with_tokenizer=False, max_shard_bytes=32 * 2**20)
    assert len([f for f in summary.files if f.endswith(".safetensors")]) >= 4
    proc = subprocess.run([PY, "-c", _RSS_SCRIPT, str(out)], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    m = json.loads(proc.stdout.strip().splitlines()[-1])
    growth = m["peak"] - m["before"]
    bound = m["held"] + 16 * 2**20
    assert summary.tensor_bytes > 2 * bound                    # the bound really excludes "the checkpoint"
    assert m["read"] < summary.tensor_bytes / 2                # only this rank's experts were read
    assert growth < bound, (growth / 2**20, m["held"] / 2**20)
    print(f"peak RSS growth {growth / 2**20:.1f} MiB, held {m['held'] / 2**20:.1f} MiB, "
          f"checkpoint {summary.tensor_bytes / 2**20:.1f} MiB, read {m['read'] / 2**20:.1f} MiB")


# ------------------------------------------------------------------ refused configs: one line naming the field
@pytest.mark.parametrize("fields,named", [
    (dict(topk_method="group_limited_greedy"), "'topk_method' = 'group_limited_greedy'"),
    (dict(model_type="deepseek_v2", topk_method="noaux_tc"), "'topk_method' = 'noaux_tc'"),
    (dict(scoring_func="softmax"), "'scoring_func' = 'softmax'"),
    (dict(model_type="deepseek_v2", norm_topk_prob=True), "'norm_topk_prob' = true"),
    (dict(torch_dtype="float8_e4m3fn"), "'torch_dtype' = 'float8_e4m3fn'"),
    (dict(quantization_config={"quant_method": "awq", "bits": 4}), "'quantization_config.quant_method' = 'awq'"),
    (dict(quantization_config={**FP8_QCONFIG, "fmt": "e5m2"}), "'quantization_config.fmt' = 'e5m2'"),
    (dict(quantization_config={**FP8_QCONFIG, "weight_block_size": None}), "'quantization_config.weight_block_size'"),
    (dict(quantization_config={**FP8_QCONFIG, "activation_scheme": "static"}),
     "'quantization_config.activation_scheme' = 'static'"),
    (dict(hidden_act="gelu"), "'hidden_act' = 'gelu'"),
    (dict(moe_layer_freq=2), "'moe_layer_freq' = 2"),
])
def test_unsupported_config_is_one_line_naming_the_field(fields, named):
    from dynamo_dwdp.model.config import config_from_dict

    raw = {**BASE, "model_type": "deepseek_v3", **fields}
    with pytest.raises(CheckpointError) as ei:
        config_from_dict(raw, where="config.json")
    msg = str(ei.value)
    assert named in msg and "\n" not in msg and msg.startswith("config.json: "), msg


def test_fp8_tensors_without_quantization_config_are_refused(fp8_case, tmp_path):
    out, _, _, _ = fp8_case
    bad = tmp_path / "noq"
    shutil.copytree(out, bad)
    cfg = json.loads((bad / "config.json").read_text())
    del cfg["quantization_config"]
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="no 'quantization_config'") as ei:
        make_engine(bad)
    assert "\n" not in str(ei.value)


def test_unreadable_tensor_dtype_is_named(fp8_case, tmp_path):
    """A tensor stored as a dtype the engine does not read (here int8) is refused by name."""
    from safetensors.torch import load_file, save_file

    out, _, _, _ = fp8_case
    bad = tmp_path / "int8"
    shutil.copytree(out, bad)
    index = json.loads((bad / "model.safetensors.index.json").read_text())
    name = "model.layers.1.self_attn.o_proj.weight"
    fname = bad / index["weight_map"][name]
    tensors = load_file(str(fname))
    tensors[name] = torch.zeros(tensors[name].shape, dtype=torch.int8)
    save_file(tensors, str(fname), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=rf"'{name}' has dtype I8") as ei:
        make_engine(bad)
    assert "\n" not in str(ei.value)
