"""Model presets for `dynamo-dwdp make-model`: DeepSeek-family shapes, tiny to published.

Each preset is one `ModelPreset` instance; `PRESETS` maps its name to it and `preset_config(name)`
returns the config.json dict in the OFFICIAL DeepSeek format (`rope_theta` + `rope_scaling`,
`topk_method`, `scoring_func`, `num_nextn_predict_layers`, ...), which transformers >= 5 loads natively.

| preset             | use                         | params (all layers)                      |
|--------------------|-----------------------------|------------------------------------------|
| `tiny`             | CPU tests                   | ~0.54 M                                  |
| `small`            | CPU benchmarks              | ~19 M                                    |
| `v2-lite-shape`    | GPU benchmarks              | ~15.7 B (V2-Lite shapes, V3 router)      |
| `deepseek-v2-lite` | `--like`: the published V2-Lite config (deepseek_v2, greedy softmax router) | ~15.7 B |
| `deepseek-v3`      | `--like`: the published V3 config (deepseek_v3, noaux_tc router)            | ~671 B  |

The `--like` presets copy the published config.json fields (shapes, router, RoPE/YaRN, scaling) except
`bos/eos_token_id` (those of the offline tokenizer make-model writes) and `num_nextn_predict_layers`
(0: a random multi-token-prediction layer would only be skipped by the server). `--weight-format fp8`
adds V3's `quantization_config`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dynamo_dwdp.errors import UserError

DTYPES = {"fp32": "float32", "bf16": "bfloat16"}
"""CLI dtype spelling -> config.json `torch_dtype` spelling."""

WEIGHT_FORMATS = ("float", "fp8")
"""`make-model --weight-format`: float tensors in --dtype, or the official FP8 block layout."""

BOS_TOKEN_ID = 0
EOS_TOKEN_ID = 1
PAD_TOKEN_ID = 2


@dataclass(frozen=True)
class ModelPreset:
    """The hyper-parameters of one preset. `yarn_factor`/`yarn_original_max_position` set => YaRN RoPE."""

    name: str
    description: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    moe_intermediate_size: int
    num_hidden_layers: int
    first_k_dense_replace: int
    num_attention_heads: int
    n_routed_experts: int
    num_experts_per_tok: int
    n_shared_experts: int
    n_group: int
    topk_group: int
    routed_scaling_factor: float
    norm_topk_prob: bool
    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    max_position_embeddings: int
    default_dtype: str                     # "fp32" | "bf16"
    rope_theta: float = 10000.0
    yarn_factor: float | None = None
    yarn_original_max_position: int | None = None
    yarn_mscale: float = 1.0
    yarn_mscale_all_dim: float = 1.0
    initializer_range: float = 0.02        # informational only: make-model uses its own init (see synthetic/checkpoint.py)
    model_type: str = "deepseek_v3"        # deepseek_v3 (noaux_tc router) | deepseek_v2 (greedy / group_limited_greedy)
    topk_method: str = "noaux_tc"
    like: bool = False                     # a published model's shape (`make-model --like`)

    def config(self, *, num_layers: int | None = None, dtype: str | None = None) -> dict[str, Any]:
        """The config.json dict, optionally with fewer/more layers and another dtype."""
        layers = self.num_hidden_layers if num_layers is None else int(num_layers)
        if layers < 1:
            raise UserError(f"--num-layers must be >= 1, got {layers}")
        dtype = self.default_dtype if dtype is None else dtype
        if dtype not in DTYPES:
            raise UserError(f"unknown dtype {dtype!r}; choose one of: {', '.join(DTYPES)}")
        rope_scaling = None
        if self.yarn_factor is not None:
            rope_scaling = {
                "type": "yarn",
                "factor": self.yarn_factor,
                "original_max_position_embeddings": self.yarn_original_max_position,
                "beta_fast": 32,
                "beta_slow": 1,
                "mscale": self.yarn_mscale,
                "mscale_all_dim": self.yarn_mscale_all_dim,
            }
        v2 = self.model_type == "deepseek_v2"
        cfg: dict[str, Any] = {
            "architectures": ["DeepseekV2ForCausalLM" if v2 else "DeepseekV3ForCausalLM"],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "moe_intermediate_size": self.moe_intermediate_size,
            "num_hidden_layers": layers,
            "first_k_dense_replace": min(self.first_k_dense_replace, layers),
            "moe_layer_freq": 1,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_attention_heads,
            "n_routed_experts": self.n_routed_experts,
            "n_shared_experts": self.n_shared_experts,
            "num_experts_per_tok": self.num_experts_per_tok,
            "n_group": self.n_group,
            "topk_group": self.topk_group,
            "topk_method": self.topk_method,
            "scoring_func": "softmax" if v2 else "sigmoid",
            "norm_topk_prob": self.norm_topk_prob,
            "routed_scaling_factor": self.routed_scaling_factor,
            "ep_size": 1,
            "q_lora_rank": self.q_lora_rank,
            "kv_lora_rank": self.kv_lora_rank,
            "qk_nope_head_dim": self.qk_nope_head_dim,
            "qk_rope_head_dim": self.qk_rope_head_dim,
            "v_head_dim": self.v_head_dim,
            "rope_theta": self.rope_theta,
            "rope_scaling": rope_scaling,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": 1e-6,
            "hidden_act": "silu",
            "attention_bias": False,
            "attention_dropout": 0.0,
            "initializer_range": self.initializer_range,
            "bos_token_id": BOS_TOKEN_ID,
            "eos_token_id": EOS_TOKEN_ID,
            "tie_word_embeddings": False,
            "num_nextn_predict_layers": 0,
            "use_cache": True,
            "torch_dtype": DTYPES[dtype],
        }
        validate_config(cfg)
        return cfg


REQUIRED_KEYS = (
    "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
    "num_attention_heads", "n_routed_experts", "num_experts_per_tok", "n_group", "topk_group",
    "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "max_position_embeddings",
)


def validate_config(cfg: dict[str, Any]) -> None:
    """Raise UserError if the MoE/attention shapes cannot form a valid DeepSeek-V3 model."""
    missing = [k for k in REQUIRED_KEYS if cfg.get(k) is None]
    if missing:
        raise UserError(f"config is missing required field(s): {', '.join(missing)}")
    experts, groups = cfg["n_routed_experts"], cfg["n_group"]
    if groups < 1 or experts % groups:
        raise UserError(f"n_routed_experts={experts} must be a multiple of n_group={groups}")
    per_group = experts // groups
    if per_group < 2 and cfg.get("topk_method", "noaux_tc") == "noaux_tc":
        raise UserError(f"each expert group needs >= 2 experts (n_routed_experts={experts}, n_group={groups})")
    if not 1 <= cfg["topk_group"] <= groups:
        raise UserError(f"topk_group={cfg['topk_group']} must be in 1..n_group={groups}")
    if not 1 <= cfg["num_experts_per_tok"] <= cfg["topk_group"] * per_group:
        raise UserError(
            f"num_experts_per_tok={cfg['num_experts_per_tok']} must be in 1..topk_group*experts_per_group="
            f"{cfg['topk_group'] * per_group}")
    if cfg["vocab_size"] < 16:
        raise UserError(f"vocab_size={cfg['vocab_size']} is too small (need >= 16)")


TINY = ModelPreset(
    name="tiny", description="CPU tests: 4 layers, H=64, 16 experts top-4 (~0.5 M params)",
    vocab_size=1024, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
    num_hidden_layers=4, first_k_dense_replace=1, num_attention_heads=4,
    n_routed_experts=16, num_experts_per_tok=4, n_shared_experts=1, n_group=4, topk_group=2,
    routed_scaling_factor=2.5, norm_topk_prob=True,
    q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16,
    max_position_embeddings=2048, default_dtype="fp32",
)

SMALL = ModelPreset(
    name="small", description="CPU benchmarks: 6 layers, H=256, 32 experts top-4, YaRN RoPE (~19 M params)",
    vocab_size=2048, hidden_size=256, intermediate_size=512, moe_intermediate_size=128,
    num_hidden_layers=6, first_k_dense_replace=1, num_attention_heads=8,
    n_routed_experts=32, num_experts_per_tok=4, n_shared_experts=1, n_group=4, topk_group=2,
    routed_scaling_factor=2.5, norm_topk_prob=True,
    q_lora_rank=128, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
    max_position_embeddings=4096, default_dtype="fp32",
    yarn_factor=4.0, yarn_original_max_position=1024,
)

V2_LITE_SHAPE = ModelPreset(
    name="v2-lite-shape",
    description="GPU benchmarks: DeepSeek-V2-Lite shapes in the V3 architecture, 27 layers, 64 experts top-6 (~15.7 B)",
    vocab_size=102400, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
    num_hidden_layers=27, first_k_dense_replace=1, num_attention_heads=16,
    n_routed_experts=64, num_experts_per_tok=6, n_shared_experts=2, n_group=1, topk_group=1,
    routed_scaling_factor=1.0, norm_topk_prob=False,
    q_lora_rank=None, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
    max_position_embeddings=16384, default_dtype="bf16",
)

DEEPSEEK_V2_LITE = ModelPreset(
    name="deepseek-v2-lite",
    description="the published DeepSeek-V2-Lite config: 27 layers, 64 experts top-6, greedy softmax router, "
                "no q-LoRA, YaRN (~15.7 B)",
    vocab_size=102400, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
    num_hidden_layers=27, first_k_dense_replace=1, num_attention_heads=16,
    n_routed_experts=64, num_experts_per_tok=6, n_shared_experts=2, n_group=1, topk_group=1,
    routed_scaling_factor=1.0, norm_topk_prob=False,
    q_lora_rank=None, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
    max_position_embeddings=163840, default_dtype="bf16",
    yarn_factor=40.0, yarn_original_max_position=4096, yarn_mscale=0.707, yarn_mscale_all_dim=0.707,
    model_type="deepseek_v2", topk_method="greedy", like=True,
)

DEEPSEEK_V3 = ModelPreset(
    name="deepseek-v3",
    description="the published DeepSeek-V3/R1 config: 61 layers (3 dense), 256 experts top-8 in 8 groups, "
                "noaux_tc sigmoid router, YaRN (~671 B; use --layers)",
    vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
    num_hidden_layers=61, first_k_dense_replace=3, num_attention_heads=128,
    n_routed_experts=256, num_experts_per_tok=8, n_shared_experts=1, n_group=8, topk_group=4,
    routed_scaling_factor=2.5, norm_topk_prob=True,
    q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
    max_position_embeddings=163840, default_dtype="bf16",
    yarn_factor=40.0, yarn_original_max_position=4096, like=True,
)

PRESETS: dict[str, ModelPreset] = {p.name: p for p in (TINY, SMALL, V2_LITE_SHAPE, DEEPSEEK_V2_LITE, DEEPSEEK_V3)}
LIKE = tuple(p.name for p in PRESETS.values() if p.like)


def get_preset(name: str) -> ModelPreset:
    try:
        return PRESETS[name]
    except KeyError:
        raise UserError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}") from None


def preset_config(name: str, *, num_layers: int | None = None, dtype: str | None = None) -> dict[str, Any]:
    """The official-format config.json dict of preset `name` (see `ModelPreset.config`)."""
    return get_preset(name).config(num_layers=num_layers, dtype=dtype)
