"""`ModelConfig`: the DeepSeek-V3 hyper-parameters we need, read from a checkpoint's config.json.

Accepts both the official DeepSeek-V3 format (`rope_theta` + `rope_scaling`) and the transformers-5
format (`rope_parameters`). Every problem raises `CheckpointError` naming the file and field.
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
    if arch not in (None, "deepseek_v3", "deepseek_v2"):
        raise CheckpointError(f"{where}: model_type {arch!r} is not a DeepSeek-V3 model (expected 'deepseek_v3')")
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
    cfg = ModelConfig(
        **vals,
        q_lora_rank=q_lora,
        first_k_dense_replace=_number(raw, "first_k_dense_replace", 0, int, where),
        n_shared_experts=_number(raw, "n_shared_experts", 0, int, where),
        n_group=_number(raw, "n_group", 1, int, where),
        topk_group=_number(raw, "topk_group", 1, int, where),
        norm_topk_prob=bool(raw.get("norm_topk_prob", True)),
        routed_scaling_factor=_number(raw, "routed_scaling_factor", 1.0, float, where),
        rms_norm_eps=_number(raw, "rms_norm_eps", 1e-6, float, where),
        max_position_embeddings=_number(raw, "max_position_embeddings", 4096, int, where),
        bos_token_id=raw.get("bos_token_id"),
        eos_token_ids=eos_ids,
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        rope=_rope_from(raw, where),
        torch_dtype=str(raw.get("torch_dtype") or raw.get("dtype") or "float32"),
    )
    _check(cfg, where)
    return cfg


def _check(cfg: ModelConfig, where: str) -> None:
    e, g = cfg.n_routed_experts, cfg.n_group
    if g < 1:
        raise CheckpointError(f"{where}: n_group={g} must be >= 1")
    if cfg.n_shared_experts < 0:
        raise CheckpointError(f"{where}: n_shared_experts={cfg.n_shared_experts} must be >= 0")
    if e % g:
        raise CheckpointError(f"{where}: n_routed_experts={e} is not divisible by n_group={g}")
    if e // g < 2 and g > 1:
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
