"""Roofline planner: per MoE layer and per rank, should DWDP, DEP or TP win, and why.

Pure-Python policy module (no torch). Everything is derived from a DeepSeek-V3-family `config.json`
(`load_model_shape`) and a machine model (`dynamo_dwdp.planner.hardware`); nothing is fitted.

Cost model (one MoE layer, one rank, one iteration of T tokens per rank)
-------------------------------------------------------------------------
Every op costs `max(FLOPs / achievable tensor rate of its dtype, HBM bytes / achievable HBM rate)`.
Ops: MLA projections (q_a/q_b or q_proj, kv_a, kv_b, o; dense dtype), attention core (attn dtype),
router (bf16), routed experts (weight dtype, T*top_k token-expert pairs) and shared experts.
HBM bytes = weights read once + approximate activation traffic (each GEMM input read and output
written once; for experts also the gate/up and SwiGLU intermediates).
Not modelled here: norms, RoPE, elementwise kernels, launch and collective latency floors (they matter
in decode; one GPU's whole step with these, priced from measured records: `planner/step_model.py`),
the HBM traffic of the prefetch itself, and the compute slow-down under concurrent copies (the paper
measured +19% attention; DWDP paper, arXiv 2604.01621, and its tech blog).

- Prefill attention core: T tokens split into `batch` sequences of S = T/batch fresh tokens, causal:
  FLOPs = 2 * heads * (qk_head_dim + v_head_dim) * batch * S(S+1)/2 (non-absorbed MLA, as in prefill).
- Decode attention core (absorbed MLA): every sequence adds one token and reads `context` latent KV
  entries: FLOPs = 2 * heads * (2*kv_lora_rank + qk_rope_head_dim) * (context+1) per sequence, bytes
  = (context+1) * (kv_lora_rank + qk_rope_head_dim) * kv bytes.
- Expert weights are read from HBM once per layer for every *touched* expert; with uniform routing
  (each token picks top_k of E experts, each expert with probability k/E, independently per token;
  group-limited routing does not change that marginal) the expected number of experts touched by
  n tokens is  E * (1 - (1 - k/E)**n).

Strategies
- DWDP: attention-DP; rank keeps L experts and pulls ALL E - L remote experts of the next layer over
  the peer link (routing is unknown when the prefetch is issued):
      t_prefetch = (E - L) * bytes_per_expert / link,   t_dwdp = max(t_compute, t_prefetch)
  (t_exposed = max(0, t_prefetch - t_compute)). `t_prefetch_routed_ms` is the hypothetical
  routed-only fetch: (E - L) * (1 - (1 - k/E)**T) experts (uniform assumption above).
- DEP: attention-DP + expert parallel; rank keeps E/N experts, dispatch/combine all-to-all of
  top_k * hidden * (dispatch bytes + 2) bytes per token (no per-rank de-duplication, fp8 dispatch with
  per-128 fp32 scales for fp8/nvfp4 models, bf16 combine), of which (N-1)/N leaves the rank.
  Sync wait: per-rank step times ~ Normal(mu, (cv*mu)^2); a synchronised step lasts E[max of N] =
  mu * (1 + cv * k_N), k_N = E[max of N standard normals] (k_2 = 0.564, k_4 = 1.029, k_8 = 1.424), so
      t_dep = t_compute_dep * (1 + cv * k_N) + t_all_to_all.
- TP: the N ranks process N*T tokens together, each doing 1/N of every per-head and expert op
  with 1/N of those weights (MLA's latent down-projections q_a/kv_a and the router have no head
  dimension and run replicated); two ring all-reduces per layer of N*T*hidden bf16 values, 2(N-1)/N
  of the message per rank each; no sync wait (all ranks share the same tokens). MLA's latent KV is
  replicated on every TP rank.

Memory per rank: local experts (DWDP: L; DEP: ceil(E/N); TP: E/N) over all MoE layers, DWDP's two
prefetch slots (2 * (E-L) experts), non-expert weights (embeddings, lm_head, attention, dense MLPs,
shared experts, routers), and KV of the tokens in flight (prefill: T; decode: sequences*(context+1)).
A plan fits when the sum is at most USABLE_MEMORY_FRACTION of HBM (activations/workspace not counted).

JSON layout (`build_report`; `dynamo-dwdp plan --json` prints exactly this object)
---------------------------------------------------------------------------------
{
  "model":    {source, model_type, hidden_size, ..., n_moe_layers, bytes_per_expert: {bf16, fp8, nvfp4}},
  "hardware": {name, dense_tflops, hbm_tbps, link_gbps, memory_gib, *_efficiency, achievable, sources},
  "settings": {ranks, precision: {weight, dense, attn, kv, dispatch}, imbalance_cv,
               placement: {experts, ranks, experts_per_rank, prefetch_per_peer, remote_experts}},
  "prefill" | "decode": {                 # the phases asked for (--phase)
    "phase", "tokens_per_iter", "sequences", "context_per_sequence",
    "dwdp": {"per_moe_layer": {t_compute_ms, t_prefetch_ms, t_prefetch_routed_ms, t_exposed_ms,
                               t_dwdp_ms, compute_over_prefetch, prefetch_gb, routed_remote_experts,
                               breakdown_ms: {attn_proj, attn_core, router, moe_routed, moe_shared}},
             "memory_gib": {local_experts, prefetch_slots, non_expert, kv, total, usable, fits}},
    "dep":  {"per_moe_layer": {t_compute_ms, t_all_to_all_ms, t_sync_ms, t_dep_ms, sync_k_n,
                               breakdown_ms}, "memory_gib": {...}},
    "tp":   {"per_moe_layer": {t_compute_ms, t_all_reduce_ms, t_tp_ms, breakdown_ms}, "memory_gib": {...}},
    "dep_over_dwdp", "tp_over_dwdp",
    "crossover": {"tokens_per_iter": float | null, "note": str},
    "verdict": {"winner": "dwdp" | "dep" | "tp", "why": str}
  }
}
So the headline figures live at `report["prefill"]["dwdp"]["per_moe_layer"]["t_compute_ms"]` and
`...["t_prefetch_ms"]`. All times are milliseconds per MoE layer per rank.
"""
from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from dynamo_dwdp.planner.hardware import DTYPES, Hardware
from dynamo_dwdp.dwdp.placement import Placement
from dynamo_dwdp.errors import CheckpointError, UserError
from dynamo_dwdp.model.config import config_from_dict
from dynamo_dwdp.strategies import GROUP_STRATEGIES

# Storage bytes per element (scales are added separately where they exist).
DTYPE_BYTES = {"bf16": 2.0, "fp8": 1.0, "nvfp4": 0.5}
# Activation bytes per element when a GEMM input is quantized to the weight dtype (with its scales).
ACT_BYTES = {"bf16": 2.0, "fp8": 1.0 + 4.0 / 128, "nvfp4": 0.5 + 1.0 / 16}
NVFP4_GROUP = 16  # NVFP4: one e4m3 scale per 16 elements along K, plus an fp32 global scale per matrix
USABLE_MEMORY_FRACTION = 0.9  # of HBM; the rest is left to activations, workspace, allocator slack
PHASES = ("prefill", "decode")
STRATEGIES = GROUP_STRATEGIES     # the strategies with a cost model here (dynamo_dwdp/strategies.py)


# ----------------------------------------------------------------------------------------------------
# Model shape (parsed from config.json)
# ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelShape:
    """The fields of a DeepSeek-V3-family config that the cost model needs."""

    source: str
    model_type: str
    hidden_size: int
    intermediate_size: int  # dense MLP of the first_k_dense_replace layers
    moe_intermediate_size: int
    num_hidden_layers: int
    first_k_dense_replace: int
    moe_layer_freq: int
    n_routed_experts: int
    num_experts_per_tok: int
    n_shared_experts: int
    num_attention_heads: int
    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    vocab_size: int
    tie_word_embeddings: bool = False
    n_group: int | None = None
    topk_group: int | None = None
    fp8_block: tuple[int, int] = (128, 128)
    checkpoint_dtype: str | None = None  # "bf16" | "fp8" | "nvfp4" when the config says so

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def moe_layer_ids(self) -> list[int]:
        return [
            i
            for i in range(self.num_hidden_layers)
            if i >= self.first_k_dense_replace and i % self.moe_layer_freq == 0
        ]

    @property
    def n_moe_layers(self) -> int:
        return len(self.moe_layer_ids)

    @property
    def n_dense_layers(self) -> int:
        return self.num_hidden_layers - self.n_moe_layers

    @property
    def expert_params(self) -> int:
        """gate + up + down of one routed (or shared) expert."""
        return 3 * self.hidden_size * self.moe_intermediate_size

    def attention_latent_matrices(self) -> list[tuple[int, int]]:
        """MLA down-projections to the latents (q_a, kv_a) as (out_features, in_features = K).
        They have no head dimension, so tensor parallelism replicates them."""
        h = self.hidden_size
        mats = [(self.q_lora_rank, h)] if self.q_lora_rank else []
        return mats + [(self.kv_lora_rank + self.qk_rope_head_dim, h)]  # kv_a: latent + shared rope key

    def attention_head_matrices(self) -> list[tuple[int, int]]:
        """MLA per-head projections (q_b or q_proj, kv_b, o); tensor parallelism splits them by head."""
        h, n = self.hidden_size, self.num_attention_heads
        q_in = self.q_lora_rank or h
        return [
            (n * self.qk_head_dim, q_in),
            (n * (self.qk_nope_head_dim + self.v_head_dim), self.kv_lora_rank),  # kv_b
            (h, n * self.v_head_dim),  # o
        ]

    def attention_matrices(self) -> list[tuple[int, int]]:
        """All MLA projection matrices as (out_features, in_features)."""
        return self.attention_latent_matrices() + self.attention_head_matrices()

    @property
    def attention_params(self) -> int:
        return sum(o * k for o, k in self.attention_matrices())

    @property
    def kv_elems_per_token(self) -> int:
        """MLA caches the compressed latent plus the rope key, per layer."""
        return self.num_hidden_layers * (self.kv_lora_rank + self.qk_rope_head_dim)

    def summary(self) -> dict:
        return {
            "source": self.source,
            "model_type": self.model_type,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_hidden_layers,
            "n_moe_layers": self.n_moe_layers,
            "n_routed_experts": self.n_routed_experts,
            "num_experts_per_tok": self.num_experts_per_tok,
            "n_shared_experts": self.n_shared_experts,
            "moe_intermediate_size": self.moe_intermediate_size,
            "num_attention_heads": self.num_attention_heads,
            "attention_params_per_layer": self.attention_params,
            "expert_params": self.expert_params,
            "bytes_per_expert": {d: bytes_per_expert(self, d) for d in DTYPES},
        }


def _int_field(cfg: dict, key: str, source: str, *, default: Any = ..., nullable: bool = False,
               minimum: int = 1) -> Any:
    if key not in cfg:
        if default is ...:
            raise CheckpointError(f"{source}: missing field {key!r} (needed by the roofline planner)")
        return default
    value = cfg[key]
    if value is None and nullable:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise CheckpointError(f"{source}: field {key!r} must be an integer >= {minimum}, got {value!r}")
    return value


def _checkpoint_dtype(cfg: dict, model_dir: Path | None) -> tuple[str | None, tuple[int, int]]:
    block = (128, 128)
    qc = cfg.get("quantization_config") or {}
    method = str(qc.get("quant_method", "")).lower()
    algo = str(qc.get("quant_algo", "")).upper()
    if model_dir is not None and not algo and (model_dir / "hf_quant_config.json").is_file():
        try:
            hq = json.loads((model_dir / "hf_quant_config.json").read_text())
            algo = str((hq.get("quantization") or {}).get("quant_algo", "")).upper()
        except (OSError, ValueError, AttributeError):
            algo = ""
    if "NVFP4" in algo:
        return "nvfp4", block
    if method == "fp8" or algo.startswith("FP8"):
        wbs = qc.get("weight_block_size")
        if isinstance(wbs, list) and len(wbs) == 2 and all(isinstance(x, int) and x > 0 for x in wbs):
            block = (wbs[0], wbs[1])
        return "fp8", block
    dtype = str(cfg.get("dtype") or cfg.get("torch_dtype") or "").lower()
    if dtype in ("bfloat16", "bf16"):
        return "bf16", block
    return None, block


def parse_model_shape(cfg: dict, source: str = "config.json", model_dir: Path | None = None) -> ModelShape:
    """Build a ModelShape from a config dict (official DeepSeek-V3 or transformers-5 layout).

    The architecture is read by the runtime's own parser (`model/config.py: config_from_dict`: the same
    fields, types and routing checks the engine applies); the planner adds only what the cost model
    needs beyond it: `moe_layer_freq`, the checkpoint's storage dtype and FP8 block, and the check
    that at least one layer is an MoE layer.
    """
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{source}: expected a JSON object at top level")
    mc = config_from_dict(cfg, source)
    freq = _int_field(cfg, "moe_layer_freq", source, default=1)
    n_dense = sum(1 for i in range(mc.num_hidden_layers) if not (i >= mc.first_k_dense_replace and i % freq == 0))
    if n_dense == mc.num_hidden_layers:
        raise CheckpointError(f"{source}: no MoE layer (first_k_dense_replace={mc.first_k_dense_replace} >= "
                              "num_hidden_layers)")
    ckpt_dtype, block = _checkpoint_dtype(cfg, model_dir)
    return ModelShape(
        source=source,
        model_type=str(cfg.get("model_type", "unknown")),
        hidden_size=mc.hidden_size,
        intermediate_size=mc.intermediate_size,
        moe_intermediate_size=mc.moe_intermediate_size,
        num_hidden_layers=mc.num_hidden_layers,
        first_k_dense_replace=mc.first_k_dense_replace,
        moe_layer_freq=freq,
        n_routed_experts=mc.n_routed_experts,
        num_experts_per_tok=mc.num_experts_per_tok,
        n_shared_experts=mc.n_shared_experts,
        num_attention_heads=mc.num_attention_heads,
        q_lora_rank=mc.q_lora_rank,
        kv_lora_rank=mc.kv_lora_rank,
        qk_nope_head_dim=mc.qk_nope_head_dim,
        qk_rope_head_dim=mc.qk_rope_head_dim,
        v_head_dim=mc.v_head_dim,
        vocab_size=mc.vocab_size,
        tie_word_embeddings=mc.tie_word_embeddings,
        n_group=mc.n_group,
        topk_group=mc.topk_group,
        fp8_block=block,
        checkpoint_dtype=ckpt_dtype,
    )


def load_model_shape(model_dir: str | Path) -> ModelShape:
    """Read MODEL_DIR/config.json. CheckpointError names the missing file or field."""
    model_dir = Path(model_dir)
    path = model_dir / "config.json"
    if not model_dir.is_dir():
        raise CheckpointError(f"{path}: not found (model directory {model_dir} does not exist)")
    if not path.is_file():
        raise CheckpointError(f"{path}: no config.json in the model directory")
    try:
        cfg = json.loads(path.read_text())
    except ValueError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    return parse_model_shape(cfg, source=str(path), model_dir=model_dir)


# ----------------------------------------------------------------------------------------------------
# Bytes
# ----------------------------------------------------------------------------------------------------
def matrix_bytes(out_features: int, in_features: int, dtype: str, fp8_block: tuple[int, int] = (128, 128)) -> float:
    """Bytes of one weight matrix [out, in] in `dtype`, including its scales.

    fp8: e4m3 values + one fp32 scale per fp8_block tile (DeepSeek-V3 `weight_scale_inv`).
    nvfp4: e2m1 values + one e4m3 scale per 16 elements along `in` + two fp32 global scales.
    """
    n = out_features * in_features
    if dtype == "bf16":
        return 2.0 * n
    if dtype == "fp8":
        tiles = math.ceil(out_features / fp8_block[0]) * math.ceil(in_features / fp8_block[1])
        return n + 4.0 * tiles
    if dtype == "nvfp4":
        return n / 2 + out_features * math.ceil(in_features / NVFP4_GROUP) + 8.0
    raise UserError(f"unknown dtype {dtype!r}; allowed: {', '.join(DTYPES)}")


def bytes_per_expert(model: ModelShape, dtype: str) -> float:
    """gate [I,H] + up [I,H] + down [H,I] of one expert, with block scales."""
    h, i = model.hidden_size, model.moe_intermediate_size
    return 2 * matrix_bytes(i, h, dtype, model.fp8_block) + matrix_bytes(h, i, dtype, model.fp8_block)


def attention_weight_bytes(model: ModelShape, dtype: str) -> float:
    return sum(matrix_bytes(o, k, dtype, model.fp8_block) for o, k in model.attention_matrices())


# ----------------------------------------------------------------------------------------------------
# Precision, placement
# ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Precision:
    """weight: routed + shared experts; dense: attention projections and dense MLPs;
    attn: attention-core math; kv: KV-cache storage; dispatch: DEP all-to-all dispatch payload."""

    weight: str
    dense: str
    attn: str
    kv: str
    dispatch: str

    @classmethod
    def resolve(cls, weight: str, dense: str | None = None, attn: str | None = None,
                kv: str | None = None) -> "Precision":
        """Defaults: non-expert linears and KV in fp8 next to fp8/nvfp4 experts (DeepSeek's native
        fp8 block format; NVIDIA's NVFP4 DeepSeek checkpoints quantize the experts only), bf16 next to
        bf16 experts; attention core in bf16 (flash-style prefill kernels); fp8 dispatch unless bf16."""
        for flag, value, allowed in (
            ("--weight-dtype", weight, DTYPES),
            ("--dense-dtype", dense, ("bf16", "fp8")),
            ("--attn-dtype", attn, ("bf16", "fp8")),
            ("--kv-dtype", kv, ("bf16", "fp8")),
        ):
            if value is not None and value not in allowed:
                raise UserError(f"{flag} {value!r} not allowed; choose one of {', '.join(allowed)}")
        low = "bf16" if weight == "bf16" else "fp8"
        return cls(weight=weight, dense=dense or low, attn=attn or "bf16", kv=kv or low, dispatch=low)


def resolve_placement(experts: int, ranks: int, experts_per_rank: int | None = None,
                      prefetch_per_peer: int | None = None) -> Placement:
    """The runtime's DWDP placement (`dwdp/placement.py`) for the planner's flags.

    Default: the runtime's split, P = floor(E/N), L = E - (N-1)P (a disjoint split when N divides E,
    otherwise adjacent ranks overlap by L - P experts). Unlike a settings file, the planner also
    takes one of L and P alone and derives the other from E = L + (N-1)*P."""
    if ranks < 2:
        raise UserError(f"--ranks must be >= 2 for a DWDP group, got {ranks}")
    n, e = ranks, experts
    if experts_per_rank is None and prefetch_per_peer is None:
        return Placement.choose(e, n)
    if prefetch_per_peer is None:
        lo = experts_per_rank
        if (e - lo) % (n - 1):
            raise UserError(
                f"--experts-per-rank {lo}: E - L = {e - lo} is not divisible by N - 1 = {n - 1} "
                f"(E = L + (N-1)*P with E={e})"
            )
        p = (e - lo) // (n - 1)
    elif experts_per_rank is None:
        p = prefetch_per_peer
        lo = e - (n - 1) * p
    else:
        lo, p = experts_per_rank, prefetch_per_peer
    if p < 1 or lo < 1 or lo > e or lo + (n - 1) * p != e or lo < p:
        raise UserError(
            f"placement L={lo} (--experts-per-rank), P={p} (--prefetch-per-peer) is invalid for "
            f"E={e} experts on N={n} ranks: need E = L + (N-1)*P, 1 <= P <= L <= E"
        )
    return Placement.choose(e, n, lo, p)


def remote_experts(place: Placement) -> int:
    """Experts a rank pulls per MoE layer (E - L, the same for every rank)."""
    return place.num_experts - place.experts_per_rank


# ----------------------------------------------------------------------------------------------------
# Ops and their roofline times
# ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Op:
    flops: float
    bytes: float
    dtype: str

    def seconds(self, hw: Hardware) -> float:
        return max(self.flops / hw.flops_per_s(self.dtype), self.bytes / hw.hbm_bytes_per_s)

    def scaled(self, f: float) -> "Op":
        return Op(self.flops * f, self.bytes * f, self.dtype)


def touched_experts(pool: float, n_experts: int, top_k: int, tokens: float) -> float:
    """Expected experts of a `pool` touched by `tokens` tokens under uniform top-k routing."""
    if tokens <= 0:
        return 0.0
    return pool * (1.0 - (1.0 - top_k / n_experts) ** tokens)


def _expert_pair_act_bytes(model: ModelShape, dtype: str) -> float:
    """Approximate activation traffic of one token-expert pair: quantized input, gate/up output
    written and read (bf16), quantized SwiGLU output written and read, bf16 output written and read."""
    h, i, a = model.hidden_size, model.moe_intermediate_size, ACT_BYTES[dtype]
    return h * a + 4 * i * 2 + 2 * i * a + 2 * h * 2


def _proj_op(mats: list[tuple[int, int]], tokens: float, dtype: str, block: tuple[int, int]) -> Op:
    params = sum(o * k for o, k in mats)
    act_elems = sum(o + k for o, k in mats)  # each input read once, each output written once (bf16)
    weights = sum(matrix_bytes(o, k, dtype, block) for o, k in mats)
    return Op(2.0 * tokens * params, weights + tokens * act_elems * 2.0, dtype)


def layer_ops(model: ModelShape, prec: Precision, *, phase: str, tokens: float, sequences: float,
              context: float, expert_pool: float, routing_tokens: float, tp: int = 1) -> dict[str, Op]:
    """Ops of one MoE layer on one rank holding `expert_pool` experts' weights, computing `tokens`
    tokens (split into `sequences`); `routing_tokens` tokens (from all ranks) route into that pool.

    tp > 1: `tokens` are the whole TP group's; the rank does 1/tp of every per-head and expert op
    (1/tp of the weights) but the latent down-projections and the router in full (replicated)."""
    m = model
    h, heads, k, e = m.hidden_size, m.num_attention_heads, m.num_experts_per_tok, m.n_routed_experts
    latent = _proj_op(m.attention_latent_matrices(), tokens, prec.dense, m.fp8_block)
    per_head = _proj_op(m.attention_head_matrices(), tokens, prec.dense, m.fp8_block).scaled(1.0 / tp)
    ops = {"attn_proj": Op(latent.flops + per_head.flops, latent.bytes + per_head.bytes, prec.dense)}
    if phase == "prefill":
        s = tokens / sequences
        pairs = sequences * s * (s + 1) / 2.0
        ops["attn_core"] = Op(2.0 * heads * (m.qk_head_dim + m.v_head_dim) * pairs,
                              tokens * heads * (2 * m.qk_head_dim + 2 * m.v_head_dim) * 2.0, prec.attn)
    else:
        kv_len = context + 1.0
        lat = m.kv_lora_rank + m.qk_rope_head_dim
        ops["attn_core"] = Op(
            sequences * 2.0 * heads * (lat + m.kv_lora_rank) * kv_len,
            sequences * (kv_len * lat * DTYPE_BYTES[prec.kv] + heads * (lat + m.kv_lora_rank) * 2.0),
            prec.attn,
        )
    if tp > 1:
        ops["attn_core"] = ops["attn_core"].scaled(1.0 / tp)
    ops["router"] = Op(2.0 * tokens * h * e, e * h * 2.0 + tokens * (h * 2.0 + e * 4.0), "bf16")
    bpe = bytes_per_expert(m, prec.weight)
    expert_flops = 2.0 * m.expert_params
    pair_act = _expert_pair_act_bytes(m, prec.weight)
    routed_pairs = tokens * k
    ops["moe_routed"] = Op(
        routed_pairs * expert_flops,
        touched_experts(expert_pool, e, k, routing_tokens) * bpe + routed_pairs * pair_act,
        prec.weight,
    )
    shared_pairs = tokens * m.n_shared_experts
    ops["moe_shared"] = Op(shared_pairs * expert_flops,
                           m.n_shared_experts * bpe + shared_pairs * pair_act, prec.weight)
    if tp > 1:
        ops["moe_routed"] = ops["moe_routed"].scaled(1.0 / tp)
        ops["moe_shared"] = ops["moe_shared"].scaled(1.0 / tp)
    return ops


def _times_ms(ops: dict[str, Op], hw: Hardware) -> dict[str, float]:
    return {name: op.seconds(hw) * 1e3 for name, op in ops.items()}


@functools.lru_cache(maxsize=None)
def expected_max_std_normal(n: int) -> float:
    """k_N = E[max of N iid standard normals] = integral of x * N phi(x) Phi(x)^(N-1) dx (Simpson)."""
    if n <= 1:
        return 0.0
    lo, hi, steps = -9.0, 9.0, 3600
    dx = (hi - lo) / steps
    total = 0.0
    for j in range(steps + 1):
        x = lo + j * dx
        phi = math.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)
        cdf = 0.5 * (1.0 + math.erf(x / math.sqrt(2)))
        w = 1 if j in (0, steps) else (4 if j % 2 else 2)
        total += w * x * n * phi * cdf ** (n - 1)
    return total * dx / 3.0


# ----------------------------------------------------------------------------------------------------
# Memory
# ----------------------------------------------------------------------------------------------------
def non_expert_bytes(model: ModelShape, prec: Precision) -> float:
    """Replicated weights: embeddings, lm_head, attention, dense MLPs, shared experts, routers."""
    m = model
    emb = m.vocab_size * m.hidden_size * 2.0 * (1 if m.tie_word_embeddings else 2)
    attn = m.num_hidden_layers * attention_weight_bytes(m, prec.dense)
    dense_mlp = m.n_dense_layers * (
        2 * matrix_bytes(m.intermediate_size, m.hidden_size, prec.dense, m.fp8_block)
        + matrix_bytes(m.hidden_size, m.intermediate_size, prec.dense, m.fp8_block)
    )
    per_moe = m.n_shared_experts * bytes_per_expert(m, prec.weight) + m.n_routed_experts * m.hidden_size * 2.0
    return emb + attn + dense_mlp + m.n_moe_layers * per_moe


@dataclass(frozen=True)
class Memory:
    local_experts: float  # bytes
    prefetch_slots: float
    non_expert: float
    kv: float
    capacity: float

    @property
    def total(self) -> float:
        return self.local_experts + self.prefetch_slots + self.non_expert + self.kv

    @property
    def usable(self) -> float:
        return self.capacity * USABLE_MEMORY_FRACTION

    @property
    def fits(self) -> bool:
        return self.total <= self.usable

    def as_dict(self) -> dict:
        g = 2.0**30
        return {
            "local_experts": round(self.local_experts / g, 2),
            "prefetch_slots": round(self.prefetch_slots / g, 2),
            "non_expert": round(self.non_expert / g, 2),
            "kv": round(self.kv / g, 2),
            "total": round(self.total / g, 2),
            "usable": round(self.usable / g, 2),
            "fits": self.fits,
        }


# ----------------------------------------------------------------------------------------------------
# One layer, one phase
# ----------------------------------------------------------------------------------------------------
@dataclass
class StrategyCost:
    t_compute_ms: float
    breakdown_ms: dict[str, float]
    t_total_ms: float
    extra: dict[str, float] = field(default_factory=dict)  # strategy-specific terms
    memory: Memory | None = None


@dataclass
class LayerPlan:
    """Predicted cost of one MoE layer on one rank for one iteration, under DWDP, DEP and TP."""

    phase: str
    tokens_per_iter: float
    sequences: float
    context: float
    ranks: int
    precision: Precision
    placement: Placement
    bytes_per_expert: float
    imbalance_cv: float
    dwdp: StrategyCost
    dep: StrategyCost
    tp: StrategyCost

    # Headline figures.
    @property
    def t_compute_ms(self) -> float:
        return self.dwdp.t_compute_ms

    @property
    def t_prefetch_ms(self) -> float:
        return self.dwdp.extra["t_prefetch_ms"]

    @property
    def t_dwdp_ms(self) -> float:
        return self.dwdp.t_total_ms

    @property
    def t_dep_ms(self) -> float:
        return self.dep.t_total_ms

    @property
    def t_tp_ms(self) -> float:
        return self.tp.t_total_ms

    @property
    def compute_over_prefetch(self) -> float:
        return self.t_compute_ms / self.t_prefetch_ms if self.t_prefetch_ms > 0 else math.inf

    @property
    def dep_over_dwdp(self) -> float:
        return self.t_dep_ms / self.t_dwdp_ms

    @property
    def tp_over_dwdp(self) -> float:
        return self.t_tp_ms / self.t_dwdp_ms

    def as_dict(self) -> dict:
        def r(x: float) -> float:
            return round(x, 4)

        def cost(c: StrategyCost, total_key: str) -> dict:
            d = {"t_compute_ms": r(c.t_compute_ms)}
            d.update({k: (r(v) if isinstance(v, float) else v) for k, v in c.extra.items()})
            d[total_key] = r(c.t_total_ms)
            d["breakdown_ms"] = {k: r(v) for k, v in c.breakdown_ms.items()}
            return {"per_moe_layer": d, "memory_gib": c.memory.as_dict() if c.memory else None}

        dwdp = cost(self.dwdp, "t_dwdp_ms")
        dwdp["per_moe_layer"]["compute_over_prefetch"] = r(self.compute_over_prefetch)
        return {
            "phase": self.phase,
            "tokens_per_iter": r(self.tokens_per_iter),
            "sequences": r(self.sequences),
            "context_per_sequence": r(self.context),
            "dwdp": dwdp,
            "dep": cost(self.dep, "t_dep_ms"),
            "tp": cost(self.tp, "t_tp_ms"),
            "dep_over_dwdp": r(self.dep_over_dwdp),
            "tp_over_dwdp": r(self.tp_over_dwdp),
        }


def plan_single_layer(model: ModelShape, hw: Hardware, tokens_per_iter: float, batch: float = 1, *,
                      phase: str = "prefill", context: float = 0.0, weight_dtype: str | None = None) -> dict:
    """One MoE layer on one GPU holding every expert (no group, no communication): the compute
    roofline that the strategies' costs build on. Returns {"t_compute_ms", "breakdown_ms"}."""
    if phase not in PHASES:
        raise UserError(f"--phase {phase!r} not allowed; choose prefill or decode")
    if tokens_per_iter <= 0:
        raise UserError(f"--tokens-per-iter must be > 0, got {tokens_per_iter}")
    prec = Precision.resolve(weight_dtype or model.checkpoint_dtype or "bf16")
    t = float(tokens_per_iter)
    seqs, ctx = (float(batch), t / batch) if phase == "prefill" else (t, float(context))
    ops = layer_ops(model, prec, tokens=t, sequences=seqs, expert_pool=model.n_routed_experts, routing_tokens=t,
                    phase=phase, context=ctx)
    br = _times_ms(ops, hw)
    return {"t_compute_ms": sum(br.values()), "breakdown_ms": br}


def plan_layer(
    model: ModelShape,
    hw: Hardware,
    ranks: int,
    tokens_per_iter: float,
    batch: float = 1,
    weight_dtype: str | None = None,
    *,
    phase: str = "prefill",
    context: float | None = None,
    dense_dtype: str | None = None,
    attn_dtype: str | None = None,
    kv_dtype: str | None = None,
    imbalance_cv: float = 0.2,
    experts_per_rank: int | None = None,
    prefetch_per_peer: int | None = None,
) -> LayerPlan:
    """Cost of one MoE layer per rank when every rank runs `tokens_per_iter` tokens.

    prefill: the tokens are `batch` fresh sequences of tokens_per_iter/batch tokens (`context`
    unused). decode: tokens_per_iter sequences each add one token over `context` cached tokens
    (`batch` unused). tokens_per_iter may be fractional (the crossover solver uses that).
    weight_dtype defaults to the checkpoint's own (config.json quantization), else bf16.
    """
    if phase not in PHASES:
        raise UserError(f"--phase {phase!r} not allowed; choose prefill, decode or both")
    if tokens_per_iter <= 0:
        raise UserError(f"--tokens-per-iter must be > 0, got {tokens_per_iter}")
    if imbalance_cv < 0:
        raise UserError(f"--imbalance-cv must be >= 0, got {imbalance_cv}")
    prec = Precision.resolve(weight_dtype or model.checkpoint_dtype or "bf16", dense_dtype, attn_dtype, kv_dtype)
    for d in {prec.weight, prec.dense, prec.attn}:
        hw.flops_per_s(d)  # raises UserError if the GPU lacks that tensor-core path
    place = resolve_placement(model.n_routed_experts, ranks, experts_per_rank, prefetch_per_peer)
    n, t, e, k = ranks, float(tokens_per_iter), model.n_routed_experts, model.num_experts_per_tok
    if phase == "prefill":
        if batch <= 0 or batch > t:
            raise UserError(f"--batch must be between 1 and --tokens-per-iter ({t:g}), got {batch}")
        seqs, ctx = float(batch), t / batch
        kv_tokens = t
    else:
        if context is None or context < 0:
            raise UserError(f"decode needs --context >= 0 (cached tokens per sequence), got {context}")
        seqs, ctx = t, float(context)
        kv_tokens = t * (ctx + 1)
    bpe = bytes_per_expert(model, prec.weight)
    kv_bytes_per_token = model.kv_elems_per_token * DTYPE_BYTES[prec.kv]
    ne_bytes = non_expert_bytes(model, prec)
    cap = hw.memory_bytes
    moe_layers = model.n_moe_layers
    common = dict(phase=phase, context=ctx)

    # DWDP: own tokens over all E experts (local + prefetched); prefetch all remote experts.
    ops = layer_ops(model, prec, tokens=t, sequences=seqs, expert_pool=e, routing_tokens=t, **common)
    br = _times_ms(ops, hw)
    t_comp = sum(br.values())
    t_pref = remote_experts(place) * bpe / hw.link_bytes_per_s * 1e3
    routed_remote = touched_experts(remote_experts(place), e, k, t)
    t_pref_routed = routed_remote * bpe / hw.link_bytes_per_s * 1e3
    exposed = max(0.0, t_pref - t_comp)
    dwdp = StrategyCost(
        t_compute_ms=t_comp,
        breakdown_ms=br,
        t_total_ms=t_comp + exposed,
        extra={
            "t_prefetch_ms": t_pref,
            "t_prefetch_routed_ms": t_pref_routed,
            "t_exposed_ms": exposed,
            "prefetch_gb": remote_experts(place) * bpe / 1e9,
            "routed_remote_experts": routed_remote,
        },
        memory=Memory(place.experts_per_rank * bpe * moe_layers, 2 * remote_experts(place) * bpe,
                      ne_bytes, kv_tokens * kv_bytes_per_token, cap),
    )

    # DEP: own tokens' attention; E/N local experts receive the balanced share of all N*T tokens.
    ops = layer_ops(model, prec, tokens=t, sequences=seqs, expert_pool=e / n, routing_tokens=n * t, **common)
    br = _times_ms(ops, hw)
    t_comp = sum(br.values())
    h = model.hidden_size
    dispatch = h * DTYPE_BYTES[prec.dispatch] + (h / 128 * 4.0 if prec.dispatch == "fp8" else 0.0)
    a2a_bytes_per_token = k * (dispatch + h * 2.0)
    t_a2a = t * a2a_bytes_per_token * (n - 1) / n / hw.link_bytes_per_s * 1e3
    k_n = expected_max_std_normal(n)
    t_sync = imbalance_cv * k_n * t_comp
    dep = StrategyCost(
        t_compute_ms=t_comp,
        breakdown_ms=br,
        t_total_ms=t_comp + t_a2a + t_sync,
        extra={"t_all_to_all_ms": t_a2a, "t_sync_ms": t_sync, "sync_k_n": k_n,
               "all_to_all_bytes_per_token": a2a_bytes_per_token},
        memory=Memory(math.ceil(e / n) * bpe * moe_layers, 0.0, ne_bytes,
                      kv_tokens * kv_bytes_per_token, cap),
    )

    # TP: N ranks share N*T tokens; every weight split N ways; two all-reduces per layer.
    ops = layer_ops(model, prec, tokens=n * t, sequences=n * seqs, expert_pool=e, routing_tokens=n * t,
                    tp=n, **common)
    br = _times_ms(ops, hw)
    t_comp = sum(br.values())
    t_ar = 2 * (2.0 * (n - 1) / n) * (n * t * h * 2.0) / hw.link_bytes_per_s * 1e3
    tp = StrategyCost(
        t_compute_ms=t_comp,
        breakdown_ms=br,
        t_total_ms=t_comp + t_ar,
        extra={"t_all_reduce_ms": t_ar},
        memory=Memory(e * bpe * moe_layers / n, 0.0, ne_bytes / n,
                      n * kv_tokens * kv_bytes_per_token, cap),
    )
    return LayerPlan(
        phase=phase, tokens_per_iter=t, sequences=seqs, context=ctx, ranks=n, precision=prec,
        placement=place, bytes_per_expert=bpe, imbalance_cv=imbalance_cv, dwdp=dwdp, dep=dep, tp=tp,
    )


# ----------------------------------------------------------------------------------------------------
# Crossover and verdict
# ----------------------------------------------------------------------------------------------------
def solve_increasing(f: Callable[[float], float], lo: float, hi: float, rel_tol: float = 1e-7) -> float | None:
    """Root of an increasing f on [lo, hi] by bisection in log space; None if f has no sign change."""
    flo, fhi = f(lo), f(hi)
    if flo > 0 or fhi < 0:
        return None
    while hi / lo - 1.0 > rel_tol:
        mid = math.sqrt(lo * hi)
        if f(mid) < 0:
            lo = mid
        else:
            hi = mid
    return math.sqrt(lo * hi)


CROSSOVER_MAX_TOKENS = float(2**27)


def find_crossover(model: ModelShape, hw: Hardware, ranks: int, *, phase: str = "prefill",
                   batch: float = 1, context: float | None = None, **kw: Any) -> float | None:
    """Tokens per iteration (prefill: `batch` sequences share them; decode: sequences, each over
    `context` cached tokens) at which DWDP's t_compute equals t_prefetch. The prefetch does not
    depend on tokens and t_compute grows with them, so the root is unique. None when outside
    [batch (prefill) or 1 (decode), CROSSOVER_MAX_TOKENS]."""
    def gap(tokens: float) -> float:
        p = plan_layer(model, hw, ranks, tokens, batch, phase=phase, context=context, **kw)
        return p.t_compute_ms - p.t_prefetch_ms

    lo = float(batch) if phase == "prefill" else 1.0
    return solve_increasing(gap, lo, CROSSOVER_MAX_TOKENS)


def verdict(p: LayerPlan) -> tuple[str, str]:
    """(winner, one-sentence reason). Strategies that do not fit in memory only win if none fits."""
    times = {"dwdp": p.t_dwdp_ms, "dep": p.t_dep_ms, "tp": p.t_tp_ms}
    costs = {"dwdp": p.dwdp, "dep": p.dep, "tp": p.tp}
    fitting = [s for s in STRATEGIES if costs[s].memory is None or costs[s].memory.fits]
    pool = fitting or list(STRATEGIES)
    winner = min(pool, key=lambda s: times[s])
    rest = sorted((s for s in STRATEGIES if s != winner), key=lambda s: times[s])
    c, pref, exp = p.dwdp.t_compute_ms, p.t_prefetch_ms, p.dwdp.extra["t_exposed_ms"]
    a2a, sync = p.dep.extra["t_all_to_all_ms"], p.dep.extra["t_sync_ms"]
    misfit = [s for s in STRATEGIES if s not in fitting]
    others = []
    for s in rest:
        rel = times[s] / times[winner] - 1.0
        word = f"{rel:.0%} slower" if rel >= 0 else f"{-rel:.0%} faster"
        others.append(f"{s} {times[s]:.3g} ms, {word}" + (", does not fit in memory" if s in misfit else ""))
    lead = f"{winner} {times[winner]:.3g} ms; " + "; ".join(others)
    note = "; nothing fits in memory, least-bad choice" if not fitting else ""
    if winner == "dwdp":
        if exp <= 0:
            why = (f"compute window {c:.3g} ms covers the {pref:.3g} ms prefetch, so DWDP pays no "
                   f"communication while DEP adds {a2a:.3g} ms all-to-all + {sync:.3g} ms sync wait")
        else:
            why = (f"the {pref:.3g} ms prefetch is exposed by {exp:.3g} ms beyond the {c:.3g} ms compute "
                   f"window, still less than DEP's {a2a:.3g} ms all-to-all + {sync:.3g} ms sync wait")
    elif winner == "dep":
        if "dwdp" in misfit:
            why = "DWDP's local experts + prefetch slots do not fit, and DEP is the fastest that does"
        elif exp > 0:
            why = (f"the {pref:.3g} ms prefetch exceeds the {c:.3g} ms compute window by {exp:.3g} ms, "
                   f"more than DEP's {a2a:.3g} ms all-to-all + {sync:.3g} ms sync wait")
        else:
            why = (f"DEP's {p.dep.t_compute_ms:.3g} ms compute (only {math.ceil(p.placement.num_experts / p.ranks)} "
                   f"experts' weights from HBM) + {a2a + sync:.3g} ms all-to-all/sync beats DWDP's {c:.3g} ms, "
                   f"which streams all {p.placement.num_experts} experts from HBM")
    else:
        ar = p.tp.extra["t_all_reduce_ms"]
        why = (f"TP's {p.tp.t_compute_ms:.3g} ms compute (1/{p.ranks} of every weight per rank) + "
               f"{ar:.3g} ms all-reduce beats DWDP's exposed prefetch ({exp:.3g} ms) and DEP's "
               f"{a2a + sync:.3g} ms all-to-all/sync")
    return winner, f"{why} [{lead}{note}]"


# ----------------------------------------------------------------------------------------------------
# Report and rendering
# ----------------------------------------------------------------------------------------------------
def build_report(
    model: ModelShape,
    hw: Hardware,
    ranks: int,
    tokens_per_iter: float,
    *,
    batch: float = 1,
    phases: tuple[str, ...] = PHASES,
    decode_batch: int = 64,
    context: float | None = None,
    **kw: Any,
) -> dict:
    """The JSON-ready report (layout in the module docstring). kw go to plan_layer.

    decode uses `decode_batch` sequences over `context` cached tokens (default: the prefill sequence
    length tokens_per_iter / batch)."""
    if not 0 < batch <= tokens_per_iter:
        raise UserError(f"--batch must be between 1 and --tokens-per-iter ({tokens_per_iter}), got {batch}")
    ctx = float(context) if context is not None else float(tokens_per_iter) / float(batch)
    report: dict[str, Any] = {"model": model.summary(), "hardware": hw.as_dict(), "settings": {}}
    for phase in phases:
        if phase == "prefill":
            p = plan_layer(model, hw, ranks, tokens_per_iter, batch, phase="prefill", **kw)
            cross = find_crossover(model, hw, ranks, phase="prefill", batch=batch, **kw)
            unit = f"tokens per iteration ({batch:g} sequence(s))"
        else:
            p = plan_layer(model, hw, ranks, decode_batch, phase="decode", context=ctx, **kw)
            cross = find_crossover(model, hw, ranks, phase="decode", context=ctx, **kw)
            unit = f"decode sequences per iteration (context {ctx:g})"
        d = p.as_dict()
        if cross is None:
            above = plan_layer(model, hw, ranks, CROSSOVER_MAX_TOKENS, phase=phase,
                               batch=batch if phase == "prefill" else 1, context=ctx, **kw)
            note = ("compute covers the prefetch at every size" if above.compute_over_prefetch >= 1
                    else f"compute never covers the prefetch below {CROSSOVER_MAX_TOKENS:.3g} {unit}")
        else:
            at = plan_layer(model, hw, ranks, cross, phase=phase,
                            batch=batch if phase == "prefill" else 1, context=ctx, **kw)
            mem = at.dwdp.memory
            note = (f"t_compute = t_prefetch = {at.t_prefetch_ms:.3g} ms at {cross:,.0f} {unit}; "
                    f"DWDP memory there {mem.total / 2**30:.1f} of {mem.usable / 2**30:.1f} GiB usable"
                    + ("" if mem.fits else " (does not fit)"))
        d["crossover"] = {"tokens_per_iter": None if cross is None else round(cross, 1), "note": note}
        winner, why = verdict(p)
        d["verdict"] = {"winner": winner, "why": why}
        report[phase] = d
        if not report["settings"]:
            report["settings"] = {
            "ranks": ranks,
            "precision": p.precision.__dict__.copy(),
            "imbalance_cv": p.imbalance_cv,
            "placement": {
                "experts": p.placement.num_experts,
                "ranks": p.placement.group_size,
                "experts_per_rank": p.placement.experts_per_rank,
                "prefetch_per_peer": p.placement.prefetch_per_peer,
                "remote_experts": remote_experts(p.placement),
            },
        }
    return report


def _fmt(x: Any, unit: str = "") -> str:
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "NO"
    if isinstance(x, float):
        return f"{x:.3g}{unit}" if abs(x) < 1000 else f"{x:,.0f}{unit}"
    return f"{x}{unit}"


def render_table(report: dict) -> str:
    """Human-readable rendering of `build_report` output."""
    m, hw, st = report["model"], report["hardware"], report["settings"]
    pl, pr = st["placement"], st["precision"]
    phases = [ph for ph in PHASES if ph in report]
    bpe = m["bytes_per_expert"][pr["weight"]]
    ach = hw["achievable"]
    lines = [
        f"DWDP roofline plan: {m['model_type']} ({m['num_hidden_layers']} layers, {m['n_moe_layers']} MoE; "
        f"{m['n_routed_experts']} experts top-{m['num_experts_per_tok']}, {m['n_shared_experts']} shared) "
        f"on {hw['name']} x {st['ranks']}",
        f"  precision: experts {pr['weight']}, dense {pr['dense']}, attention core {pr['attn']}, "
        f"KV {pr['kv']}, DEP dispatch {pr['dispatch']}; imbalance CV {st['imbalance_cv']:g}",
        "  achievable rates: " + ", ".join(f"{v:,.0f} TFLOP/s {k}" for k, v in ach["tflops"].items())
        + f"; HBM {ach['hbm_tbps']:.3g} TB/s; peer link {ach['link_gbps']:.0f} GB/s per direction"
        f" (math x{hw['math_efficiency']:g}, HBM x{hw['hbm_efficiency']:g}, link x{hw['link_efficiency']:g})",
        f"  placement: L={pl['experts_per_rank']} local, P={pl['prefetch_per_peer']} per peer -> "
        f"{pl['remote_experts']} remote experts x {bpe / 1e6:.2f} MB = "
        f"{pl['remote_experts'] * bpe / 1e9:.2f} GB pulled per layer",
        "",
    ]
    head = ["per MoE layer, per rank"] + [
        f"prefill: {report[ph]['tokens_per_iter']:,.0f} tok / {report[ph]['sequences']:g} seq"
        if ph == "prefill" else
        f"decode: {report[ph]['sequences']:,.0f} seq, ctx {report[ph]['context_per_sequence']:,.0f}"
        for ph in phases
    ]
    rows: list[tuple[str, Callable[[dict], Any]]] = [
        ("DWDP t_compute (attn + MoE)", lambda d: _fmt(d["dwdp"]["per_moe_layer"]["t_compute_ms"], " ms")),
        ("  attn proj / core", lambda d: "{} / {}".format(
            _fmt(d["dwdp"]["per_moe_layer"]["breakdown_ms"]["attn_proj"]),
            _fmt(d["dwdp"]["per_moe_layer"]["breakdown_ms"]["attn_core"]))),
        ("  MoE routed / shared", lambda d: "{} / {}".format(
            _fmt(d["dwdp"]["per_moe_layer"]["breakdown_ms"]["moe_routed"]),
            _fmt(d["dwdp"]["per_moe_layer"]["breakdown_ms"]["moe_shared"]))),
        ("DWDP t_prefetch (all remote)", lambda d: _fmt(d["dwdp"]["per_moe_layer"]["t_prefetch_ms"], " ms")),
        ("  routed-only fetch (hypothetical)",
         lambda d: _fmt(d["dwdp"]["per_moe_layer"]["t_prefetch_routed_ms"], " ms")),
        ("T_compute / T_prefetch", lambda d: _fmt(d["dwdp"]["per_moe_layer"]["compute_over_prefetch"])),
        ("DWDP t_dwdp = max(...)", lambda d: _fmt(d["dwdp"]["per_moe_layer"]["t_dwdp_ms"], " ms")),
        ("DEP compute / a2a / sync", lambda d: "{} / {} / {}".format(
            _fmt(d["dep"]["per_moe_layer"]["t_compute_ms"]), _fmt(d["dep"]["per_moe_layer"]["t_all_to_all_ms"]),
            _fmt(d["dep"]["per_moe_layer"]["t_sync_ms"]))),
        ("DEP t_dep", lambda d: _fmt(d["dep"]["per_moe_layer"]["t_dep_ms"], " ms")),
        ("TP compute / all-reduce", lambda d: "{} / {}".format(
            _fmt(d["tp"]["per_moe_layer"]["t_compute_ms"]), _fmt(d["tp"]["per_moe_layer"]["t_all_reduce_ms"]))),
        ("TP t_tp", lambda d: _fmt(d["tp"]["per_moe_layer"]["t_tp_ms"], " ms")),
        ("T_DEP / T_DWDP", lambda d: _fmt(d["dep_over_dwdp"])),
        ("memory GiB dwdp (fits?)", lambda d: "{} of {} ({})".format(
            _fmt(d["dwdp"]["memory_gib"]["total"]), _fmt(d["dwdp"]["memory_gib"]["usable"]),
            _fmt(d["dwdp"]["memory_gib"]["fits"]))),
        ("  experts / slots / other / KV", lambda d: " / ".join(_fmt(d["dwdp"]["memory_gib"][k]) for k in
                                                             ("local_experts", "prefetch_slots", "non_expert", "kv"))),
        ("memory GiB dep / tp", lambda d: "{} ({}) / {} ({})".format(
            _fmt(d["dep"]["memory_gib"]["total"]), _fmt(d["dep"]["memory_gib"]["fits"]),
            _fmt(d["tp"]["memory_gib"]["total"]), _fmt(d["tp"]["memory_gib"]["fits"]))),
        ("crossover (t_compute = t_prefetch)", lambda d: _fmt(d["crossover"]["tokens_per_iter"])),
        ("winner", lambda d: d["verdict"]["winner"].upper()),
    ]
    table = [head] + [[label] + [fn(report[ph]) for ph in phases] for label, fn in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(head))]
    for i, r in enumerate(table):
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    lines.append("")
    for ph in phases:
        d = report[ph]
        lines.append(f"{ph} verdict: {d['verdict']['winner'].upper()}: {d['verdict']['why']}")
        lines.append(f"{ph} crossover: {d['crossover']['note']}")
    return "\n".join(lines)
