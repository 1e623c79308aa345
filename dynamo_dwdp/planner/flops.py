"""Work model of one forward of this project's DeepSeek-V3 engine: FLOPs and HBM bytes, from config.json.

Pure arithmetic (no torch). It counts what `dynamo_dwdp.model` computes, so that an engine benchmark can
turn measured step times into achieved FLOP/s and HBM bytes/s.

FLOPs (2 per multiply-add; matrix products only: norms, RoPE, softmax, SiLU are not counted)
--------------------------------------------------------------------------------------------
Per token and layer:
- attention projections: q_a + q_b (or q_proj), kv_a, o_proj, plus, in the *absorbed* form (decode, and
  the reference kernel), the two MLA products that replace expanding kv_b: q_nope -> latent (heads *
  nope * kv_lora) and the output latent -> values (heads * kv_lora * v). In the *expanded* form (the
  SDPA prefill path) kv_b expands every context token instead: heads * kv_lora * (nope + v) per
  context token of each sequence with new tokens.
- attention core, per (query, key) pair: absorbed, scores over the cached [latent | rope key] (heads *
  (kv_lora + rope)) and probabilities times latents (heads * kv_lora); expanded, heads * qk_head_dim
  and heads * v_head_dim.
  `attention="causal"` counts the pairs a query really attends (sequence of q new tokens ending at
  context c: q*(c-q) + q(q+1)/2); `attention="dense"` counts what the reference kernel
  (`paged_latent_attention`) executes: every sequence padded to [max_q, max_context].
- MoE layers: router (hidden * E), top-k routed experts and the shared experts, 3 matrices of
  hidden * moe_intermediate each; dense layers (< first_k_dense_replace): the dense MLP.
Per logits row: lm_head (hidden * vocab).
The routed count is exact whatever the routing: every token meets exactly top_k experts. Strategies do
not change the model's useful FLOPs; under TP every rank does 1/N of most of them, and this module
counts them once (model FLOPs, as in MFU).

HBM bytes (one rank, one forward; weights read once per forward; activations not counted)
-----------------------------------------------------------------------------------------
attention weights (every layer), dense MLPs, shared experts, routers (kept in fp32), the routed experts
the rank's tokens touched (a count per MoE layer; default all experts), lm_head (when a row is wanted),
the embedding rows of the tokens, KV read (each sequence's context, causal; the latent cache is
[kv_lora | rope] per token and layer) and KV written (the new tokens). `tp` > 1: the rank reads 1/tp of
the per-head attention projections (q_b/q_proj, kv_b, o), dense MLPs, shared and routed experts; the
latent down-projections (q_a, kv_a), router, lm_head, embeddings and KV (replicated latent) in full.
"""
from __future__ import annotations

from typing import Sequence

from dynamo_dwdp.errors import UserError
from dynamo_dwdp.model.config import ModelConfig

ATTENTION_MODES = ("causal", "dense")
ATTENTION_FORMS = ("absorbed", "expanded")
ROUTER_BYTES = 4  # the router runs in fp32 (ModelRunner keeps `gate` in float)


def _check_seqs(seqs: Sequence[tuple[int, int]]) -> None:
    for q, c in seqs:
        if q < 0 or c < q:
            raise UserError(f"sequence shape (new={q}, context={c}) is invalid: need 0 <= new <= context")


def attention_pairs(seqs: Sequence[tuple[int, int]], attention: str = "causal") -> int:
    """(query, key) pairs of one layer. seqs: (new tokens q, context c after the step) per sequence."""
    _check_seqs(seqs)
    if attention == "causal":
        return sum(q * (c - q) + q * (q + 1) // 2 for q, c in seqs)
    if attention == "dense":
        live = [(q, c) for q, c in seqs]
        if not live or sum(q for q, _ in live) == 0:
            return 0
        return len(live) * max(q for q, _ in live) * max(c for _, c in live)
    raise UserError(f"attention mode {attention!r} is not one of {', '.join(ATTENTION_MODES)}")


def attention_projection_flops_per_token(cfg: ModelConfig, form: str = "absorbed") -> int:
    h, H = cfg.num_attention_heads, cfg.hidden_size
    if cfg.q_lora_rank is None:
        q = 2 * H * h * cfg.qk_head_dim
    else:
        q = 2 * H * cfg.q_lora_rank + 2 * cfg.q_lora_rank * h * cfg.qk_head_dim
    kv_a = 2 * H * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    absorb = 2 * h * cfg.qk_nope_head_dim * cfg.kv_lora_rank + 2 * h * cfg.kv_lora_rank * cfg.v_head_dim
    o = 2 * h * cfg.v_head_dim * H
    return q + kv_a + (absorb if form == "absorbed" else 0) + o


def attention_expansion_flops_per_context_token(cfg: ModelConfig) -> int:
    """Expanded form: kv_b turns one cached latent into every head's key (nope part) and value."""
    return 2 * cfg.num_attention_heads * cfg.kv_lora_rank * (cfg.qk_nope_head_dim + cfg.v_head_dim)


def attention_core_flops_per_pair(cfg: ModelConfig, form: str = "absorbed") -> int:
    h = cfg.num_attention_heads
    if form == "expanded":
        return 2 * h * cfg.qk_head_dim + 2 * h * cfg.v_head_dim
    return 2 * h * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) + 2 * h * cfg.kv_lora_rank


def expert_flops_per_token(cfg: ModelConfig, intermediate: int) -> int:
    """gate + up + down of one SwiGLU MLP of width `intermediate`."""
    return 6 * cfg.hidden_size * intermediate


def forward_flops(cfg: ModelConfig, seqs: Sequence[tuple[int, int]], logits_rows: int | None = None,
                  attention: str = "causal", form: str = "absorbed") -> dict[str, float]:
    """FLOPs of one forward over `seqs` [(new tokens, context after the step)], by component + "total".
    logits_rows defaults to one per sequence with new tokens. form: the attention form that ran
    (absorbed | expanded); with expanded, attention="dense" counts each sequence's q x context
    pairs (the SDPA path works per sequence, unpadded)."""
    _check_seqs(seqs)
    if form not in ATTENTION_FORMS:
        raise UserError(f"attention form {form!r} is not one of {', '.join(ATTENTION_FORMS)}")
    tokens = sum(q for q, _ in seqs)
    if logits_rows is None:
        logits_rows = sum(1 for q, _ in seqs if q > 0)
    layers = cfg.num_hidden_layers
    moe = len(cfg.moe_layers)
    dense = layers - moe
    if form == "expanded" and attention == "dense":
        pairs = sum(q * c for q, c in seqs)
    else:
        pairs = attention_pairs(seqs, attention)
    out = {
        "attn_proj": float(tokens * layers * attention_projection_flops_per_token(cfg, form)
                           + (layers * sum(c for q, c in seqs if q > 0) * attention_expansion_flops_per_context_token(cfg)
                              if form == "expanded" else 0)),
        "attn_core": float(layers * pairs * attention_core_flops_per_pair(cfg, form)),
        "router": float(tokens * moe * 2 * cfg.hidden_size * cfg.n_routed_experts),
        "moe_routed": float(tokens * moe * cfg.num_experts_per_tok
                            * expert_flops_per_token(cfg, cfg.moe_intermediate_size)),
        "moe_shared": float(tokens * moe * expert_flops_per_token(
            cfg, cfg.moe_intermediate_size * cfg.n_shared_experts)),
        "dense_mlp": float(tokens * dense * expert_flops_per_token(cfg, cfg.intermediate_size)),
        "lm_head": float(logits_rows * 2 * cfg.hidden_size * cfg.vocab_size),
    }
    out["total"] = sum(out.values())
    return out


# ------------------------------------------------------------------------------------------------ bytes
def attention_weight_elems(cfg: ModelConfig, tp: int = 1) -> float:
    """Elements of one layer's attention projections one rank reads (per-head ones split by tp)."""
    h, H = cfg.num_attention_heads, cfg.hidden_size
    latent = H * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)            # kv_a
    if cfg.q_lora_rank is None:
        per_head = H * h * cfg.qk_head_dim                             # q_proj
    else:
        latent += H * cfg.q_lora_rank                                  # q_a
        per_head = cfg.q_lora_rank * h * cfg.qk_head_dim               # q_b
    per_head += cfg.kv_lora_rank * h * (cfg.qk_nope_head_dim + cfg.v_head_dim)   # kv_b
    per_head += h * cfg.v_head_dim * H                                 # o
    return latent + per_head / tp


def expert_elems(cfg: ModelConfig, intermediate: int | None = None) -> int:
    return 3 * cfg.hidden_size * (cfg.moe_intermediate_size if intermediate is None else intermediate)


FP8_BLOCK_BYTES = 1.0 + 4.0 / (128 * 128)   # an e4m3 element plus its share of the fp32 scale of a 128x128 block


def forward_hbm_bytes(cfg: ModelConfig, seqs: Sequence[tuple[int, int]], elem_bytes: int,
                      touched_experts: Sequence[float] | None = None, logits_rows: int | None = None,
                      tp: int = 1, weight_bytes: float | None = None) -> dict[str, float]:
    """HBM bytes one rank reads/writes in one forward (see the module docstring), by component + "total".

    touched_experts: routed experts whose weights this rank read, one count per MoE layer (DEP: of its
    own shard; TP: whole experts, of which it reads 1/tp); None = all n_routed_experts (prefill).
    weight_bytes: bytes per element of FP8-resident weights (`model/fp8_weights.py`: the routed, shared and
    dense-MLP experts and the attention projections but kv_b; `FP8_BLOCK_BYTES` with their block scales);
    None = elem_bytes. Embeddings, lm_head, kv_b and the KV cache stay at elem_bytes, the router fp32."""
    _check_seqs(seqs)
    tokens = sum(q for q, _ in seqs)
    if logits_rows is None:
        logits_rows = sum(1 for q, _ in seqs if q > 0)
    moe = len(cfg.moe_layers)
    dense = cfg.num_hidden_layers - moe
    if touched_experts is None:
        touched_experts = [cfg.n_routed_experts] * moe
    if len(touched_experts) != moe:
        raise UserError(f"touched_experts has {len(touched_experts)} entries; the model has {moe} MoE layers")
    H, b = cfg.hidden_size, elem_bytes
    wb = b if weight_bytes is None else weight_bytes
    kv_elems = cfg.kv_cache_dim * cfg.num_hidden_layers
    has_work = tokens > 0
    kv_b = cfg.kv_lora_rank * cfg.num_attention_heads * (cfg.qk_nope_head_dim + cfg.v_head_dim) / tp
    attn = (attention_weight_elems(cfg, tp) - kv_b) * wb + kv_b * b
    out = {
        "attn_weights": cfg.num_hidden_layers * attn if has_work else 0.0,
        "dense_mlp_weights": dense * expert_elems(cfg, cfg.intermediate_size) * wb / tp if has_work else 0.0,
        "shared_expert_weights": (moe * expert_elems(cfg, cfg.moe_intermediate_size * cfg.n_shared_experts) * wb / tp
                                  if has_work else 0.0),
        "router_weights": moe * cfg.n_routed_experts * H * ROUTER_BYTES if has_work else 0.0,
        "routed_expert_weights": float(sum(touched_experts)) * expert_elems(cfg) * wb / tp,
        "lm_head": float(cfg.vocab_size * H * b) if logits_rows else 0.0,
        "embeddings": float(tokens * H * b),
        "kv_read": float(sum(c for _, c in seqs) * kv_elems * b),
        "kv_write": float(tokens * kv_elems * b),
    }
    out = {k: float(v) for k, v in out.items()}
    out["total"] = sum(out.values())
    return out
