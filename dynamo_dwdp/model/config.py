"""`ModelConfig`: the DeepSeek-family hyper-parameters we need, read from a checkpoint's config.json.

Accepts both the official DeepSeek format (`rope_theta` + `rope_scaling`) and the transformers-5
format (`rope_parameters`), for `model_type` deepseek_v3 (V3, R1, V3.1: `noaux_tc` sigmoid router) and
deepseek_v2 (V2, V2-Lite: `greedy` / `group_limited_greedy` softmax routers), with bf16/fp32 weights or
the official FP8 block format (`quantization_config: {quant_method: fp8, ...}`).

Every field the engine does not implement is refused with a one-line `CheckpointError` naming the file,
the field and its value: a config is never silently read as a different model.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

from dynamo_dwdp.errors import CheckpointError

_REQUIRED_INT = (
    "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
    "num_attention_heads", "n_routed_experts", "num_experts_per_tok", "kv_lora_rank",
    "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
)


@dataclass(frozen=True)
class RopeConfig:
    theta: float = 10000.0
    kind: str = "default"                 # "default" | "yarn"
    factor: float = 1.0
    original_max_position: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True
    interleave: bool = True


# (model_type -> topk_method -> scoring_func) the engine implements; the first method is the default.
ROUTERS: dict[str, dict[str, str]] = {
    "deepseek_v3": {"noaux_tc": "sigmoid"},
    "deepseek_v2": {"greedy": "softmax", "group_limited_greedy": "softmax"},
}
# config.json `torch_dtype` values the engine reads (FP8 checkpoints say bfloat16 here, as published).
CHECKPOINT_DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class QuantConfig:
    """`quantization_config` of an FP8 block-quantized checkpoint (the only method the engine reads)."""

    method: str = "fp8"
    fmt: str = "e4m3"
    block: tuple[int, int] = (128, 128)
    activation_scheme: str = "dynamic"


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    moe_intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    n_routed_experts: int
    num_experts_per_tok: int
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    q_lora_rank: int | None = None
    first_k_dense_replace: int = 0
    n_shared_experts: int = 0
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 4096
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    tie_word_embeddings: bool = False
    rope: RopeConfig = field(default_factory=RopeConfig)
    torch_dtype: str = "float32"
    model_type: str = "deepseek_v3"
    topk_method: str = "noaux_tc"          # noaux_tc | greedy | group_limited_greedy (see ROUTERS)
    scoring_func: str = "sigmoid"          # sigmoid (noaux_tc) | softmax (V2 methods)
    num_key_value_heads: int | None = None
    moe_layer_freq: int = 1
    num_nextn_predict_layers: int = 0      # multi-token-prediction layers stored after the last layer
    quant: QuantConfig | None = None       # None: plain float weights

    @property
    def uses_correction_bias(self) -> bool:
        """Only V3's noaux_tc router has `mlp.gate.e_score_correction_bias` in the checkpoint."""
        return self.topk_method == "noaux_tc"

    @property
    def weight_format(self) -> str:
        """How the checkpoint stores its weights: "fp8" (128x128-block e4m3), else "bf16" / "fp16" / "fp32"."""
        if self.quant is not None:
            return self.quant.method
        return {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}[self.torch_dtype]

    @property
    def mtp_layers(self) -> range:
        """Indices of the multi-token-prediction layers on disk (the server skips them)."""
        return range(self.num_hidden_layers, self.num_hidden_layers + self.num_nextn_predict_layers)

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def kv_cache_dim(self) -> int:
        """Elements cached per token per layer: the MLA latent plus the rotated shared key."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    def is_moe_layer(self, layer: int) -> bool:
        return layer >= self.first_k_dense_replace

    @property
    def moe_layers(self) -> list[int]:
        return [i for i in range(self.num_hidden_layers) if self.is_moe_layer(i)]

    @property
    def softmax_scale(self) -> float:
        """qk_head_dim^-0.5, times mscale(factor, mscale_all_dim)^2 under YaRN (as DeepSeek does)."""
        scale = self.qk_head_dim ** -0.5
        if self.rope.kind != "default" and self.rope.mscale_all_dim:
            m = _yarn_mscale(self.rope.factor, self.rope.mscale_all_dim)
            scale *= m * m
        return scale


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _rope_from(raw: dict[str, Any], where: str) -> RopeConfig:
    try:
        return _rope_from_unchecked(raw, where)
    except (TypeError, ValueError, ZeroDivisionError) as exc:
        raise CheckpointError(f"{where}: invalid rope parameters "
                              f"{raw.get('rope_parameters') or raw.get('rope_scaling')!r} ({exc})") from None


def _rope_from_unchecked(raw: dict[str, Any], where: str) -> RopeConfig:
    params = raw.get("rope_parameters")
    scaling = raw.get("rope_scaling")
    theta = raw.get("rope_theta")
    src: dict[str, Any] = {}
    if isinstance(params, dict):
        src = dict(params)
        theta = src.get("rope_theta", theta)
    elif isinstance(scaling, dict):
        src = dict(scaling)
    elif scaling is not None:
        raise CheckpointError(f"{where}: rope_scaling must be an object or null, got {scaling!r}")
    kind = src.get("rope_type", src.get("type", "default")) or "default"
    if kind not in ("default", "yarn"):
        raise CheckpointError(f"{where}: rope type {kind!r} is not supported (default, yarn)")
    interleave = bool(raw.get("rope_interleave", True))
    if kind == "default":
        return RopeConfig(theta=float(theta or 10000.0), interleave=interleave)
    factor = src.get("factor")
    orig = src.get("original_max_position_embeddings")
    if factor is None and orig is None:
        raise CheckpointError(f"{where}: yarn rope needs 'factor' or 'original_max_position_embeddings'")
    max_pos = int(raw.get("max_position_embeddings", 4096))
    if orig is None:
        orig = max_pos / float(factor)
    if factor is None:
        factor = max_pos / float(orig)
    return RopeConfig(
        theta=float(theta or 10000.0), kind="yarn", factor=float(factor), original_max_position=int(orig),
        beta_fast=float(src.get("beta_fast") or 32), beta_slow=float(src.get("beta_slow") or 1),
        mscale=src.get("mscale"), mscale_all_dim=src.get("mscale_all_dim"),
        attention_factor=src.get("attention_factor"), truncate=bool(src.get("truncate", True)),
        interleave=interleave,
    )


def _number(raw: dict[str, Any], key: str, default, kind: type, where: str):
    """Optional numeric field: absent/null -> default; anything but a (whole, for int) number -> one-line error."""
    v = raw.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and not float(v).is_integer()):
        what = "an integer" if kind is int else "a number"
        raise CheckpointError(f"{where}: field '{key}' must be {what}, got {v!r}")
    return kind(v)


def config_from_dict(raw: dict[str, Any], where: str = "config.json") -> ModelConfig:
    if not isinstance(raw, dict):
        raise CheckpointError(f"{where}: expected a JSON object")
    arch = raw.get("model_type")
    if arch is None:
        arch = "deepseek_v3"
    if arch not in ROUTERS:
        raise CheckpointError(f"{where}: model_type {arch!r} is not supported "
                              f"(supported: {', '.join(ROUTERS)})")
    vals: dict[str, Any] = {}
    for key in _REQUIRED_INT:
        v = raw.get(key)
        if v is None:
            raise CheckpointError(f"{where}: missing field '{key}'")
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise CheckpointError(f"{where}: field '{key}' must be a positive integer, got {v!r}")
        vals[key] = v
    q_lora = raw.get("q_lora_rank")
    if q_lora is not None and (not isinstance(q_lora, int) or q_lora <= 0):
        raise CheckpointError(f"{where}: field 'q_lora_rank' must be a positive integer or null, got {q_lora!r}")
    eos = raw.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
    if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in eos_ids):
        raise CheckpointError(f"{where}: field 'eos_token_id' must be a token id or a list of them, got {eos!r}")
    topk_method, scoring_func, norm_topk_prob = _router_from(raw, arch, where)
    n_group = _number(raw, "n_group", 1, int, where)
    topk_group = _number(raw, "topk_group", 1, int, where)
    if topk_method == "greedy":            # plain top-k: groups play no part (transformers and DeepSeek agree)
        n_group = topk_group = 1
    _refuse_unsupported(raw, where)
    kv_heads = raw.get("num_key_value_heads")
    cfg = ModelConfig(
        **vals,
        q_lora_rank=q_lora,
        first_k_dense_replace=_number(raw, "first_k_dense_replace", 0, int, where),
        n_shared_experts=_number(raw, "n_shared_experts", 0, int, where),
        n_group=n_group,
        topk_group=topk_group,
        norm_topk_prob=norm_topk_prob,
        routed_scaling_factor=_number(raw, "routed_scaling_factor", 1.0, float, where),
        rms_norm_eps=_number(raw, "rms_norm_eps", 1e-6, float, where),
        max_position_embeddings=_number(raw, "max_position_embeddings", 4096, int, where),
        bos_token_id=raw.get("bos_token_id"),
        eos_token_ids=eos_ids,
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        rope=_rope_from(raw, where),
        torch_dtype=_checkpoint_dtype(raw, where),
        model_type=arch,
        topk_method=topk_method,
        scoring_func=scoring_func,
        num_key_value_heads=kv_heads if isinstance(kv_heads, int) and not isinstance(kv_heads, bool) else None,
        moe_layer_freq=_number(raw, "moe_layer_freq", 1, int, where),
        num_nextn_predict_layers=_number(raw, "num_nextn_predict_layers", 0, int, where),
        quant=_quant_from(raw, where),
    )
    _check(cfg, where)
    return cfg


def _router_from(raw: dict[str, Any], arch: str, where: str) -> tuple[str, str, bool]:
    """(topk_method, scoring_func, norm_topk_prob) of a config; anything not implemented is refused."""
    methods = ROUTERS[arch]
    method = raw.get("topk_method") or next(iter(methods))
    if method not in methods:
        raise CheckpointError(f"{where}: field 'topk_method' = {method!r} is not supported for model_type {arch!r} "
                              f"(supported: {', '.join(methods)})")
    scoring = raw.get("scoring_func") or methods[method]
    if scoring != methods[method]:
        raise CheckpointError(f"{where}: field 'scoring_func' = {scoring!r} is not supported with topk_method "
                              f"{method!r} (supported: {methods[method]!r})")
    norm = raw.get("norm_topk_prob", arch == "deepseek_v3")
    if not isinstance(norm, bool):
        raise CheckpointError(f"{where}: field 'norm_topk_prob' must be true or false, got {norm!r}")
    if arch == "deepseek_v2" and norm:
        # transformers' DeepseekV2 ignores the flag (weights x routed_scaling_factor); DeepSeek's published
        # V2 modeling code renormalises and then drops routed_scaling_factor. They disagree: refuse.
        raise CheckpointError(f"{where}: field 'norm_topk_prob' = true is not supported for model_type "
                              f"'deepseek_v2' (transformers ignores it, DeepSeek's modeling code renormalises "
                              f"without routed_scaling_factor; published V2 configs set false)")
    return method, scoring, norm


def _refuse_unsupported(raw: dict[str, Any], where: str) -> None:
    """Architecture switches that would change the model if ignored."""
    act = raw.get("hidden_act", "silu")
    if act != "silu":
        raise CheckpointError(f"{where}: field 'hidden_act' = {act!r} is not supported (supported: 'silu')")
    for key in ("attention_bias", "mlp_bias"):
        if raw.get(key):
            raise CheckpointError(f"{where}: field '{key}' = true is not supported (DeepSeek projections have no bias)")
    freq = raw.get("moe_layer_freq", 1)
    if freq not in (None, 1):
        raise CheckpointError(f"{where}: field 'moe_layer_freq' = {freq!r} is not supported (supported: 1, "
                              "every layer after first_k_dense_replace is MoE)")
    heads, kv_heads = raw.get("num_attention_heads"), raw.get("num_key_value_heads")
    if kv_heads is not None and kv_heads != heads:
        raise CheckpointError(f"{where}: field 'num_key_value_heads' = {kv_heads!r} must equal num_attention_heads "
                              f"({heads!r}) in multi-head latent attention")


def _checkpoint_dtype(raw: dict[str, Any], where: str) -> str:
    key = "torch_dtype" if raw.get("torch_dtype") is not None else "dtype"
    name = raw.get(key) or "float32"
    if name not in CHECKPOINT_DTYPES:
        raise CheckpointError(f"{where}: field '{key}' = {name!r} is not supported "
                              f"(supported: {', '.join(CHECKPOINT_DTYPES)}; FP8 comes with quantization_config)")
    return str(name)


def _quant_from(raw: dict[str, Any], where: str) -> QuantConfig | None:
    q = raw.get("quantization_config")
    if q is None:
        return None
    if not isinstance(q, dict):
        raise CheckpointError(f"{where}: field 'quantization_config' must be an object, got {q!r}")
    method = q.get("quant_method")
    if method != "fp8":
        raise CheckpointError(f"{where}: field 'quantization_config.quant_method' = {method!r} is not supported "
                              "(supported: 'fp8' with 128x128 weight blocks)")
    fmt = q.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise CheckpointError(f"{where}: field 'quantization_config.fmt' = {fmt!r} is not supported "
                              "(supported: 'e4m3')")
    block = q.get("weight_block_size")
    if (not isinstance(block, list) or len(block) != 2
            or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)):
        raise CheckpointError(f"{where}: field 'quantization_config.weight_block_size' = {block!r} is not supported "
                              "(expected two positive integers, e.g. [128, 128]; per-tensor FP8 is not read)")
    scheme = q.get("activation_scheme", "dynamic")
    if scheme != "dynamic":
        raise CheckpointError(f"{where}: field 'quantization_config.activation_scheme' = {scheme!r} is not "
                              "supported (supported: 'dynamic')")
    return QuantConfig(method=method, fmt=fmt, block=(block[0], block[1]), activation_scheme=scheme)


def _check(cfg: ModelConfig, where: str) -> None:
    e, g = cfg.n_routed_experts, cfg.n_group
    if g < 1:
        raise CheckpointError(f"{where}: n_group={g} must be >= 1")
    if cfg.n_shared_experts < 0:
        raise CheckpointError(f"{where}: n_shared_experts={cfg.n_shared_experts} must be >= 0")
    if e % g:
        raise CheckpointError(f"{where}: n_routed_experts={e} is not divisible by n_group={g}")
    if e // g < 2 and g > 1 and cfg.topk_method == "noaux_tc":      # groups are scored by their top-2
        raise CheckpointError(f"{where}: each expert group needs >= 2 experts (n_routed_experts/n_group={e // g})")
    if not 1 <= cfg.topk_group <= g:
        raise CheckpointError(f"{where}: topk_group={cfg.topk_group} must be in [1, n_group={g}]")
    if cfg.num_experts_per_tok > (e // g) * cfg.topk_group:
        raise CheckpointError(f"{where}: num_experts_per_tok={cfg.num_experts_per_tok} exceeds the experts "
                              f"in topk_group groups ({(e // g) * cfg.topk_group})")
    if cfg.qk_rope_head_dim % 2:
        raise CheckpointError(f"{where}: qk_rope_head_dim={cfg.qk_rope_head_dim} must be even")
    if not 0 <= cfg.first_k_dense_replace <= cfg.num_hidden_layers:
        raise CheckpointError(f"{where}: first_k_dense_replace={cfg.first_k_dense_replace} out of range")


def load_model_config(model_dir: str) -> ModelConfig:
    path = os.path.join(model_dir, "config.json")
    if not os.path.isdir(model_dir):
        raise CheckpointError(f"model directory {model_dir!r} does not exist")
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: missing (a model directory needs config.json)")
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None
    cfg = config_from_dict(raw, where=path)
    gen = os.path.join(model_dir, "generation_config.json")
    if os.path.isfile(gen) and not cfg.eos_token_ids:
        try:
            with open(gen, encoding="utf-8") as f:
                eos = json.load(f).get("eos_token_id")
            ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
            cfg = ModelConfig(**{**cfg.__dict__, "eos_token_ids": ids})
        except (json.JSONDecodeError, ValueError):
            pass
    return cfg
