"""Random DeepSeek-V3 checkpoints in the official Hugging Face layout, written tensor by tensor.

Contracts
---------
* Names and shapes: exactly what `DeepseekV3ForCausalLM(cfg).save_pretrained()` writes (per-expert
  `mlp.experts.{e}.{gate,up,down}_proj.weight`, `mlp.gate.e_score_correction_bias` always float32).
* Deterministic: the value of every element is a pure function of (seed, tensor name, element index,
  dtype). The same preset + seed + dtype gives byte-identical files on any machine, and each tensor
  can be generated alone, in any order, on any device (`iter_random_tensors(..., device="cuda")`
  gives bit-for-bit the tensors that `write_checkpoint` stores).
* `weight_format="fp8"`: the official DeepSeek-V3 FP8 layout (model/fp8.py): every projection of
  attention, dense MLPs, shared and routed experts is stored as float8_e4m3fn with a float32
  `<name>.weight_scale_inv` per 128x128 block (the quantized float32 values of the same seed);
  embeddings, norms, the router, the correction bias and lm_head stay in `dtype` (bf16 by default), and
  config.json gets `quantization_config`. V2 configs (`model_type: deepseek_v2`) have no correction bias.
* Streaming: only one tensor (plus a small work buffer) is in memory at a time; above
  `max_shard_bytes` (4 GiB) the weights go to `model-0000k-of-0000n.safetensors` shards with a
  `model.safetensors.index.json`, as official checkpoints do. config.json is written last, so an
  interrupted run leaves a directory that no loader mistakes for a model.

Random numbers
--------------
Each tensor gets a 64-bit key from sha256(seed, name). Element i is
`h = mix32(mix32(i + k0) ^ k1)` (two rounds of a 32-bit xor-shift/multiply avalanche mix, computed
in int64 with no overflow), and its top 24 bits become an odd integer `m` in (-2^24, 2^24), i.e. a
uniform value `m / 2^24` in (-1, 1) with mean exactly 0. Every step is integer arithmetic or one
correctly rounded float32 operation, so CPU and GPU give identical bits (no log/cos, whose last bit
differs between libm, SLEEF and CUDA). torch's own generators were not used on purpose: CPU and CUDA
generators give different streams, torch's CPU normal_ uses different transcendental code paths per
CPU type, and its mt19937 seed is truncated to 32 bits.

Initialisation (all uniform with the stated standard deviation, i.e. half-width std*sqrt(3))
---------------------------------------------------------------------------------------------
Chosen so that a random model is numerically well-behaved for exactness tests:
* `model.embed_tokens.weight`: std 1 (the residual stream starts at O(1)).
* every projection `[out, in]` (attention, dense MLP, experts, shared experts, router `mlp.gate`):
  std 1/sqrt(in), so each matmul maps O(1) inputs to O(1) outputs; attention scores are O(1)
  (q·k over qk_head_dim terms times qk_head_dim^-0.5), neither uniform nor one-hot.
* RMSNorm weights: 1 + noise of std 0.05 (not exactly 1, so a loader that skips them is caught).
* `mlp.gate.e_score_correction_bias`: std 0.1 (float32), comparable to the spread of the sigmoid
  router scores, so the noaux_tc bias really changes which experts are selected.
* `lm_head.weight`: std 2/sqrt(H): logits have std ~2, so the top-1/top-2 gap is ~0.5 for a
  1k vocabulary and greedy argmax ties (or flips from rounding noise) are rare.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dynamo_dwdp.errors import UserError
from dynamo_dwdp.model.fp8 import DEFAULT_BLOCK, FP8_DTYPE, quantize_block_fp8, scale_shape
from dynamo_dwdp.synthetic.tokenizer import write_tokenizer_files
from dynamo_dwdp.synthetic.presets import BOS_TOKEN_ID, DTYPES, EOS_TOKEN_ID, WEIGHT_FORMATS, get_preset, validate_config

DEFAULT_MAX_SHARD_BYTES = 4 * 2**30
LOGIT_STD = 2.0
NORM_NOISE_STD = 0.05
BIAS_STD = 0.1
_KEY_DOMAIN = b"dynamo-dwdp/make-model/v1\0"
_MASK32 = 0xFFFFFFFF
_ST_DTYPE = {torch.float32: "F32", torch.bfloat16: "BF16", FP8_DTYPE: "F8_E4M3"}
FP8_QUANTIZATION_CONFIG = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                           "weight_block_size": list(DEFAULT_BLOCK)}
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"

# ----------------------------------------------------------------------------------------------
# Tensor list


@dataclass(frozen=True)
class TensorSpec:
    """One checkpoint tensor: name, shape, and how it is initialised."""

    name: str
    shape: tuple[int, ...]
    kind: str                    # "embed" | "linear" | "norm" | "bias" | "lm_head"
    always_fp32: bool = False

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def std(self) -> float:
        if self.kind == "embed":
            return 1.0
        if self.kind == "linear":
            return 1.0 / math.sqrt(self.shape[1])
        if self.kind == "lm_head":
            return LOGIT_STD / math.sqrt(self.shape[1])
        if self.kind == "norm":
            return NORM_NOISE_STD
        if self.kind == "bias":
            return BIAS_STD
        raise AssertionError(self.kind)

    def offset(self) -> float:
        return 1.0 if self.kind == "norm" else 0.0

    def dtype_for(self, dtype: torch.dtype) -> torch.dtype:
        return torch.float32 if self.always_fp32 else dtype

    @property
    def fp8_quantized(self) -> bool:
        """Stored as FP8 blocks in an fp8 checkpoint: every projection except the router, as published."""
        return self.kind == "linear" and not self.name.endswith("mlp.gate.weight")

    def stored(self, dtype: torch.dtype, fp8: bool) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
        """(name, shape, dtype) of what is written for this tensor: itself, and its scales under fp8."""
        if fp8 and self.fp8_quantized:
            return [(self.name, self.shape, FP8_DTYPE),
                    (self.name + "_scale_inv", scale_shape(self.shape), torch.float32)]
        return [(self.name, self.shape, self.dtype_for(dtype))]

    def stored_bytes(self, dtype: torch.dtype, fp8: bool) -> int:
        return sum(math.prod(shape) * dt.itemsize for _, shape, dt in self.stored(dtype, fp8))


def _get(cfg: Any, key: str, default: Any = None) -> Any:
    if isinstance(cfg, Mapping):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


def tensor_specs(cfg: Any) -> list[TensorSpec]:
    """All tensors of a config.json dict (or an object with the same attributes), in model order."""
    H = int(_get(cfg, "hidden_size"))
    V = int(_get(cfg, "vocab_size"))
    heads = int(_get(cfg, "num_attention_heads"))
    q_lora = _get(cfg, "q_lora_rank")
    kv_lora = int(_get(cfg, "kv_lora_rank"))
    nope, rope, v = (int(_get(cfg, k)) for k in ("qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"))
    inter, moe_inter = int(_get(cfg, "intermediate_size")), int(_get(cfg, "moe_intermediate_size"))
    experts, shared = int(_get(cfg, "n_routed_experts")), int(_get(cfg, "n_shared_experts", 0) or 0)
    first_dense = int(_get(cfg, "first_k_dense_replace", 0) or 0)
    layers = int(_get(cfg, "num_hidden_layers"))
    if int(_get(cfg, "moe_layer_freq", 1) or 1) != 1:
        raise UserError("moe_layer_freq must be 1 (every layer after first_k_dense_replace is MoE)")
    if _get(cfg, "tie_word_embeddings", False):
        raise UserError("tie_word_embeddings must be false for DeepSeek-V3 checkpoints")
    v2 = _get(cfg, "model_type") == "deepseek_v2"
    correction_bias = (_get(cfg, "topk_method") or ("greedy" if v2 else "noaux_tc")) == "noaux_tc"

    specs = [TensorSpec("model.embed_tokens.weight", (V, H), "embed")]

    def lin(name: str, out_f: int, in_f: int) -> None:
        specs.append(TensorSpec(name, (out_f, in_f), "linear"))

    def mlp(prefix: str, width: int) -> None:
        lin(f"{prefix}.gate_proj.weight", width, H)
        lin(f"{prefix}.up_proj.weight", width, H)
        lin(f"{prefix}.down_proj.weight", H, width)

    for i in range(layers):
        p = f"model.layers.{i}"
        specs.append(TensorSpec(f"{p}.input_layernorm.weight", (H,), "norm"))
        if q_lora is None:
            lin(f"{p}.self_attn.q_proj.weight", heads * (nope + rope), H)
        else:
            q_lora = int(q_lora)
            lin(f"{p}.self_attn.q_a_proj.weight", q_lora, H)
            specs.append(TensorSpec(f"{p}.self_attn.q_a_layernorm.weight", (q_lora,), "norm"))
            lin(f"{p}.self_attn.q_b_proj.weight", heads * (nope + rope), q_lora)
        lin(f"{p}.self_attn.kv_a_proj_with_mqa.weight", kv_lora + rope, H)
        specs.append(TensorSpec(f"{p}.self_attn.kv_a_layernorm.weight", (kv_lora,), "norm"))
        lin(f"{p}.self_attn.kv_b_proj.weight", heads * (nope + v), kv_lora)
        lin(f"{p}.self_attn.o_proj.weight", H, heads * v)
        specs.append(TensorSpec(f"{p}.post_attention_layernorm.weight", (H,), "norm"))
        if i < first_dense:
            mlp(f"{p}.mlp", inter)
        else:
            lin(f"{p}.mlp.gate.weight", experts, H)
            if correction_bias:
                specs.append(TensorSpec(f"{p}.mlp.gate.e_score_correction_bias", (experts,), "bias",
                                        always_fp32=True))
            for e in range(experts):
                mlp(f"{p}.mlp.experts.{e}", moe_inter)
            if shared:
                mlp(f"{p}.mlp.shared_experts", moe_inter * shared)
    specs.append(TensorSpec("model.norm.weight", (H,), "norm"))
    specs.append(TensorSpec("lm_head.weight", (V, H), "lm_head"))
    return specs


def param_count(cfg: Any) -> int:
    return sum(s.numel for s in tensor_specs(cfg))


def checkpoint_bytes(cfg: Any, dtype: Any) -> int:
    """Bytes of tensor data (without safetensors headers) for `dtype`."""
    td = resolve_dtype(dtype)
    return sum(s.numel * s.dtype_for(td).itemsize for s in tensor_specs(cfg))


def resolve_dtype(dtype: Any) -> torch.dtype:
    """"fp32"/"bf16"/"float32"/"bfloat16"/torch.float32/torch.bfloat16 -> torch dtype."""
    if isinstance(dtype, torch.dtype) and dtype in _ST_DTYPE:
        return dtype
    if isinstance(dtype, str):
        name = DTYPES.get(dtype, dtype)
        if name == "float32":
            return torch.float32
        if name == "bfloat16":
            return torch.bfloat16
    raise UserError(f"unsupported dtype {dtype!r}; choose one of: fp32, bf16")


# ----------------------------------------------------------------------------------------------
# Deterministic random values


def tensor_key(seed: int, name: str) -> tuple[int, int]:
    """Two 32-bit keys for tensor `name` under `seed` (from sha256; independent of write order)."""
    if not -(2**63) <= int(seed) < 2**63:
        raise UserError(f"--seed must fit in 64 bits, got {seed}")
    digest = hashlib.sha256(_KEY_DOMAIN + struct.pack("<q", int(seed)) + name.encode("utf-8")).digest()
    return int.from_bytes(digest[0:4], "little"), int.from_bytes(digest[4:8], "little")


def _mul32(x: torch.Tensor, c: int, tmp: torch.Tensor) -> None:
    """x = (x * c) mod 2^32 in place, for 0 <= x < 2^32, without int64 overflow (c split in 16-bit halves)."""
    torch.mul(x, c >> 16, out=tmp)
    tmp.bitwise_and_(0xFFFF).mul_(65536)
    x.mul_(c & 0xFFFF).add_(tmp).bitwise_and_(_MASK32)


def _xorshift(x: torch.Tensor, s: int, tmp: torch.Tensor) -> None:
    torch.bitwise_right_shift(x, s, out=tmp)
    x.bitwise_xor_(tmp)


def _mix32(x: torch.Tensor, tmp: torch.Tensor) -> None:
    """A bijective 32-bit avalanche mix (xor-shift / odd-multiply rounds), in place."""
    _xorshift(x, 16, tmp)
    _mul32(x, 0x85EBCA6B, tmp)
    _xorshift(x, 13, tmp)
    _mul32(x, 0xC2B2AE35, tmp)
    _xorshift(x, 16, tmp)


def random_tensor(spec: TensorSpec, seed: int, dtype: Any = torch.float32, device: Any = "cpu") -> torch.Tensor:
    """The tensor `spec` of the model with `seed`, in `dtype` (float32 for always-fp32 tensors), on `device`."""
    out_dtype = spec.dtype_for(resolve_dtype(dtype))
    device = torch.device(device)
    n = spec.numel
    if n >= 2**32:
        raise UserError(f"tensor {spec.name} has {n} elements; at most 2^32 are supported")
    k0, k1 = tensor_key(seed, spec.name)
    out = torch.empty(n, dtype=out_dtype, device=device)
    chunk = min(n, 1 << (24 if device.type != "cpu" else 18))
    x = torch.empty(chunk, dtype=torch.int64, device=device)
    tmp = torch.empty(chunk, dtype=torch.int64, device=device)
    vals = torch.empty(chunk, dtype=torch.float32, device=device)
    # scale: m (odd int, |m| < 2^24) * scale is uniform with the wanted std; both rounded to float32 once.
    scale = float(torch.tensor(spec.std() * math.sqrt(3.0) / 2**24, dtype=torch.float32))  # exactly a float32
    offset = spec.offset()
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        xs, ts, vs = x[:m], tmp[:m], vals[:m]
        torch.arange(start, start + m, dtype=torch.int64, device=device, out=xs)
        xs.add_(k0).bitwise_and_(_MASK32)
        _mix32(xs, ts)
        xs.bitwise_xor_(k1)
        _mix32(xs, ts)
        xs.bitwise_right_shift_(8).mul_(2).add_(1 - (1 << 24))      # odd integers in (-2^24, 2^24)
        vs.copy_(xs)                                                # exact: |m| < 2^24
        vs.mul_(scale)                                              # one correctly rounded fp32 multiply
        if offset:
            vs.add_(offset)
        out[start:start + m].copy_(vs)                              # round-to-nearest-even to bf16
    return out.view(spec.shape)


def iter_random_tensors(
    cfg: Any,
    seed: int,
    dtype: Any = torch.float32,
    device: Any = "cpu",
    only: Callable[[str], bool] | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) for every checkpoint tensor of `cfg` (a config.json dict, a preset name, or
    an object with the config attributes), in model order, one at a time, built directly on `device`.

    The values are bit-identical to what `write_checkpoint(..., seed, dtype)` stores, whatever the
    device. `only(name)` restricts the output (e.g. to one rank's experts) without generating the rest.
    """
    if isinstance(cfg, str):
        cfg = get_preset(cfg).config()
    for spec in tensor_specs(cfg):
        if only is None or only(spec.name):
            yield spec.name, random_tensor(spec, seed, dtype, device)


# ----------------------------------------------------------------------------------------------
# safetensors, streamed


def _safetensors_header(entries: list[tuple[str, tuple[int, ...], torch.dtype]]) -> bytes:
    """Header (length prefix + JSON padded with spaces to 8 bytes) for tensors stored in `entries` order."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape, dtype in entries:
        nbytes = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": _ST_DTYPE[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-(8 + len(blob)) % 8)
    return struct.pack("<Q", len(blob)) + blob


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    t = t.detach().contiguous().cpu()
    if sys.byteorder != "little":
        raise RuntimeError("safetensors files are little-endian; big-endian hosts are not supported")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())   # 1-D, so len() == nbytes


def _write_safetensors(path: Path, specs: list[TensorSpec], seed: int, dtype: torch.dtype, device: Any,
                       progress: Any, fp8: bool = False) -> None:
    entries = [e for s in specs for e in s.stored(dtype, fp8)]
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "wb") as f:
        f.write(_safetensors_header(entries))
        for spec in specs:
            if fp8 and spec.fp8_quantized:
                parts = quantize_block_fp8(random_tensor(spec, seed, torch.float32, device))
            else:
                parts = (random_tensor(spec, seed, dtype, device),)
            for t in parts:
                data = _tensor_bytes(t)
                f.write(data)
                if progress is not None:
                    progress.update(data.nbytes)
            del parts, t, data
    os.replace(tmp, path)


def plan_shards(specs: list[TensorSpec], dtype: torch.dtype, max_shard_bytes: int,
                fp8: bool = False) -> list[list[TensorSpec]]:
    """Split `specs` (in order) into consecutive shards of at most `max_shard_bytes` (a bigger tensor gets its own)."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for s in specs:
        nbytes = s.stored_bytes(dtype, fp8)
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(s)
        size += nbytes
    return shards


# ----------------------------------------------------------------------------------------------
# The whole model directory

OUR_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
             INDEX_NAME, WEIGHTS_NAME, "special_tokens_map.json", "chat_template.jinja")


@dataclass
class CheckpointSummary:
    out_dir: Path
    params: int
    tensor_bytes: int
    files: dict[str, int] = field(default_factory=dict)     # file name -> size in bytes
    seconds: float = 0.0


def _is_ours(name: str) -> bool:
    return name in OUR_FILES or (name.startswith("model-") and name.endswith((".safetensors", ".safetensors.partial"))) \
        or name.endswith(".partial")


def prepare_out_dir(out_dir: Path, force: bool) -> None:
    """Create `out_dir`; refuse a non-empty one unless `force`, which removes only files this tool writes."""
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"output path {out_dir} exists and is not a directory")
    if out_dir.is_dir():
        entries = sorted(os.listdir(out_dir))
        if entries and not force:
            raise UserError(f"output directory {out_dir} is not empty ({len(entries)} entries); "
                            f"pass --force to overwrite")
        for name in entries:
            if _is_ours(name) and (out_dir / name).is_file():
                (out_dir / name).unlink()
    out_dir.mkdir(parents=True, exist_ok=True)


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _json_text(obj: Any) -> str:
    return json.dumps(obj, indent=2, ensure_ascii=False) + "\n"


def write_checkpoint(
    out_dir: str | os.PathLike,
    preset_or_cfg: str | Mapping[str, Any],
    seed: int = 0,
    dtype: Any = None,
    *,
    num_layers: int | None = None,
    force: bool = False,
    quiet: bool = False,
    device: Any = "cpu",
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    with_tokenizer: bool = True,
    weight_format: str = "float",
) -> CheckpointSummary:
    """Write a random checkpoint + offline tokenizer into `out_dir` (see the module docstring).

    `preset_or_cfg` is a preset name (see presets.PRESETS) or an official-format config.json dict.
    `dtype` None means the preset default (or the dict's `torch_dtype`). `weight_format` "fp8" writes
    the official FP8 block layout (see the module docstring). Returns what was written.
    """
    t0 = time.perf_counter()
    if weight_format not in WEIGHT_FORMATS:
        raise UserError(f"unknown weight format {weight_format!r}; choose one of: {', '.join(WEIGHT_FORMATS)}")
    fp8 = weight_format == "fp8"
    if isinstance(preset_or_cfg, str):
        preset = get_preset(preset_or_cfg)
        dt_name = preset.default_dtype if dtype is None else _dtype_cli_name(dtype)
        cfg = preset.config(num_layers=num_layers, dtype=dt_name)
    else:
        cfg = dict(preset_or_cfg)
        if num_layers is not None:
            cfg["num_hidden_layers"] = int(num_layers)
            cfg["first_k_dense_replace"] = min(int(cfg.get("first_k_dense_replace", 0) or 0), int(num_layers))
        dt_name = _dtype_cli_name(cfg.get("torch_dtype", "float32") if dtype is None else dtype)
        cfg["torch_dtype"] = DTYPES[dt_name]
        validate_config(cfg)
    tdtype = resolve_dtype(dt_name)
    if fp8:
        cfg["quantization_config"] = dict(FP8_QUANTIZATION_CONFIG)
    if max_shard_bytes < 1:
        raise UserError(f"max shard size must be positive, got {max_shard_bytes}")

    out = Path(out_dir)
    prepare_out_dir(out, force)
    specs = tensor_specs(cfg)
    total = sum(s.stored_bytes(tdtype, fp8) for s in specs)
    shards = plan_shards(specs, tdtype, max_shard_bytes, fp8)

    progress = None
    if not quiet and sys.stderr.isatty():
        from tqdm import tqdm
        progress = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=f"writing {out.name}",
                        file=sys.stderr)
    try:
        if len(shards) == 1:
            _write_safetensors(out / WEIGHTS_NAME, shards[0], seed, tdtype, device, progress, fp8)
        else:
            weight_map: dict[str, str] = {}
            for k, shard in enumerate(shards, 1):
                fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
                _write_safetensors(out / fname, shard, seed, tdtype, device, progress, fp8)
                weight_map.update({name: fname for s in shard for name, _, _ in s.stored(tdtype, fp8)})
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            _write_text(out / INDEX_NAME, _json_text(index))
    finally:
        if progress is not None:
            progress.close()

    if with_tokenizer:
        write_tokenizer_files(out, vocab_size=int(cfg["vocab_size"]),
                              model_max_length=int(cfg["max_position_embeddings"]))
    gen = {"bos_token_id": cfg.get("bos_token_id", BOS_TOKEN_ID), "eos_token_id": cfg.get("eos_token_id", EOS_TOKEN_ID)}
    _write_text(out / "generation_config.json", _json_text(gen))
    _write_text(out / "config.json", _json_text(cfg))       # last: its presence marks a complete directory

    files = {p.name: p.stat().st_size for p in sorted(out.iterdir()) if p.is_file() and _is_ours(p.name)}
    return CheckpointSummary(out_dir=out, params=sum(s.numel for s in specs), tensor_bytes=total, files=files,
                             seconds=time.perf_counter() - t0)


def _dtype_cli_name(dtype: Any) -> str:
    td = resolve_dtype(dtype)
    return "fp32" if td == torch.float32 else "bf16"
