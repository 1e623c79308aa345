"""The DeepSeek MoE block: the family's routers + shared experts; routed experts via a `MoEExecutor`.

One function per routing method (`ROUTING`), all `(logits fp32 [T, E], ...) -> (ids [T, k] long,
weights [T, k] float32)`, chosen from config.json's `topk_method` (validated in model/config.py):

* `noaux_tc` (DeepSeek-V3/R1/V3.1): sigmoid scores; `e_score_correction_bias` is added for *selection
  only*; experts form n_group groups, each scored by the sum of its top-2 biased scores; the best
  topk_group groups are kept and top-k experts picked among them; the weights are the unbiased sigmoid
  scores of the picked experts, normalised when norm_topk_prob, times routed_scaling_factor.
* `greedy` (DeepSeek-V2-Lite): softmax scores, plain top-k, weights = scores x routed_scaling_factor.
* `group_limited_greedy` (DeepSeek-V2): softmax scores; each group scored by its max score, the best
  topk_group groups kept, top-k among them; weights = scores x routed_scaling_factor.

The V2 methods never renormalise: that is transformers' DeepseekV2TopkRouter (config.py refuses
norm_topk_prob=true under deepseek_v2, where DeepSeek's own code would differ). `selection_skew` is a
benchmark knob added to the selection scores of every method; it is zero for real models.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dynamo_dwdp.model import experts
from dynamo_dwdp.model import kernels as fused_kernels
from dynamo_dwdp.model.config import ModelConfig
from dynamo_dwdp.model.kernels import router as fused_router
from dynamo_dwdp.model.kernels.moe_gemm import SharedExperts
from dynamo_dwdp.model.layers import DenseMLP
from dynamo_dwdp.model.tensor_parallel import TensorParallel


def _keep_best_groups(choice: torch.Tensor, group_scores: torch.Tensor, topk_group: int,
                      masked_value: float) -> torch.Tensor:
    """`choice` [T, E] with every expert outside the topk_group best groups set to `masked_value`."""
    T, G = group_scores.shape
    keep = torch.topk(group_scores, k=topk_group, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores).scatter_(1, keep, 1.0)
    expert_mask = group_mask.unsqueeze(-1).expand(T, G, choice.shape[1] // G).reshape(T, choice.shape[1])
    return choice.masked_fill(expert_mask == 0, masked_value)


def route_noaux_tc(logits: torch.Tensor, cfg: ModelConfig, correction_bias: torch.Tensor,
                   skew: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3's router (sigmoid, bias for selection only, groups by top-2 sum)."""
    T, E, G = logits.shape[0], cfg.n_routed_experts, cfg.n_group
    scores = logits.sigmoid()
    choice = scores + correction_bias + skew
    if G > 1:
        group_scores = choice.view(T, G, E // G).topk(2, dim=-1)[0].sum(dim=-1)
        choice = _keep_best_groups(choice, group_scores, cfg.topk_group, float("-inf"))
    ids = torch.topk(choice, k=cfg.num_experts_per_tok, dim=-1, sorted=False)[1]
    weights = scores.gather(1, ids)
    if cfg.norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return ids, weights * cfg.routed_scaling_factor


def route_greedy(logits: torch.Tensor, cfg: ModelConfig, skew: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V2-Lite's router (softmax, plain top-k)."""
    scores = logits.softmax(dim=-1)
    ids = torch.topk(scores + skew, k=cfg.num_experts_per_tok, dim=-1, sorted=False)[1]
    return ids, scores.gather(1, ids) * cfg.routed_scaling_factor


def route_group_limited_greedy(logits: torch.Tensor, cfg: ModelConfig,
                               skew: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V2's router (softmax; groups by their max score; top-k in the best topk_group groups)."""
    T, E, G = logits.shape[0], cfg.n_routed_experts, cfg.n_group
    scores = logits.softmax(dim=-1)
    choice = scores + skew
    if G > 1:
        group_scores = choice.view(T, G, E // G).amax(dim=-1)
        choice = _keep_best_groups(choice, group_scores, cfg.topk_group, float("-inf"))
    ids = torch.topk(choice, k=cfg.num_experts_per_tok, dim=-1, sorted=False)[1]
    return ids, scores.gather(1, ids) * cfg.routed_scaling_factor


class Router(nn.Module):
    """`mlp.gate`: fp32 logits, then the routing function of the config's topk_method."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        E = cfg.n_routed_experts
        self.weight = nn.Parameter(torch.empty(E, cfg.hidden_size), requires_grad=False)
        if cfg.uses_correction_bias:
            self.register_buffer("e_score_correction_bias", torch.zeros(E, dtype=torch.float32))
        # Benchmark knob ("hot experts"): added to the selection scores only; zero for real models.
        self.register_buffer("selection_skew", torch.zeros(E, dtype=torch.float32))

    def forward(self, x: torch.Tensor, always_on: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, H] -> (topk_ids [T, k] long, topk_weights [T, k] float32); `always_on` > 0 appends that many
        columns of ids E, E+1, .. with weight 1 (the shared experts folded into the routed call)."""
        method = self.cfg.topk_method
        if method == "noaux_tc" and fused_decode_path(x):
            cfg = self.cfg     # the V3 router as Triton kernels (kernels/router.py), the extra columns included
            return fused_router.noaux_tc_route(x, self.weight, self.e_score_correction_bias, self.selection_skew,
                                               cfg.num_experts_per_tok, cfg.n_group, cfg.topk_group,
                                               cfg.norm_topk_prob, cfg.routed_scaling_factor, always_on)
        logits = F.linear(x.float(), self.weight.float())
        if method == "noaux_tc":
            ids, weights = route_noaux_tc(logits, self.cfg, self.e_score_correction_bias, self.selection_skew)
        elif method == "greedy":
            ids, weights = route_greedy(logits, self.cfg, self.selection_skew)
        elif method == "group_limited_greedy":
            ids, weights = route_group_limited_greedy(logits, self.cfg, self.selection_skew)
        else:
            raise ValueError(f"topk_method {method!r} has no router")   # config.py refuses it first
        if always_on:
            T, E = x.shape[0], self.cfg.n_routed_experts
            extra = torch.arange(E, E + always_on, device=x.device).expand(T, always_on)
            ids = torch.cat([ids, extra], dim=1)
            weights = torch.cat([weights, weights.new_ones(T, always_on)], dim=1)
        return ids, weights


def fused_decode_path(x: torch.Tensor) -> bool:
    """The Triton decode kernels apply (CUDA, Triton importable and not switched off)."""
    return x.is_cuda and fused_kernels.available()


# Shared experts folded into the routed call (`MoEBlock.folded_shared`) up to this many tokens. One H200,
# 2026-12-02, v2-lite shapes (scripts/gpu_b1.py, docs/performance.md "Decode at batch 1"): the MoE part of a layer
# folded vs routed call + DenseMLP, us: 1 token 47.0 vs 55.2, 2: 69.4 vs 77.8, 4: 107.7 vs 117.8, 8: 163.7 vs
# 173.0, 16: 213.0 vs 223.8; at 64 tokens it tied or lost (246 vs 243, 2026-12-02 sweep). The batch-1 decode
# step (bench engine, 27 layers): 3.026 -> 2.797 ms. 0 switches it off.
FOLD_SHARED_MAX_TOKENS: int | None = None        # None: $DWDP_FOLD_SHARED_MAX_TOKENS, default 16 (`fold_max_tokens`)


def fold_max_tokens() -> int:
    """FOLD_SHARED_MAX_TOKENS, or the environment's value when it is None (checked: a whole number >= 0)."""
    if FOLD_SHARED_MAX_TOKENS is not None:
        return FOLD_SHARED_MAX_TOKENS
    return fused_kernels.env_count("DWDP_FOLD_SHARED_MAX_TOKENS", 16)


class MoEBlock(nn.Module):
    """Router + shared experts (dense, TP-shardable) + routed experts (owned by the executor)."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, tp: TensorParallel, executor):
        super().__init__()
        self.layer_idx = layer_idx
        self.gate = Router(cfg)
        self.shared_experts = (DenseMLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts, tp)
                               if cfg.n_shared_experts else None)
        self.executor = executor
        # the kernel switches, checked once when the model is built, not on a request's path
        self.fold_max_tokens = fold_max_tokens()
        fused_router.fused_select_max_rows()
        experts.prefill_sort()

    def folded_shared(self, x: torch.Tensor) -> SharedExperts | None:
        """The shared experts as always-selected experts of the routed call for this batch, or None (the
        separate DenseMLP): up to `fold_max_tokens()` tokens on the fused decode path, when the executor
        takes them (`MoEExecutor.folds_shared`) and the shared MLP is bf16, unsharded, with fused [gate; up]
        rows of the routed experts' intermediate size."""
        mlp = self.shared_experts
        if (mlp is None or not 0 < x.shape[0] <= self.fold_max_tokens or not getattr(self.executor, "folds_shared",
                                                                                         False)
                or mlp.gate_up is None or mlp.gate_up.dtype != torch.bfloat16 or x.dtype != torch.bfloat16
                or not fused_decode_path(x)):
            return None
        cfg = self.gate.cfg
        S, inter = cfg.n_shared_experts, cfg.moe_intermediate_size
        down = mlp.down_proj.weight
        if mlp.gate_up.shape != (2 * S * inter, cfg.hidden_size) or down.shape != (cfg.hidden_size, S * inter):
            return None                                  # sharded (TP) or another shape
        return SharedExperts(mlp.gate_up, down, S)

    def forward(self, x: torch.Tensor, separate: bool = False):
        """The block's output; with `separate` the pair (routed experts' output, shared experts' output
        or None) not yet summed, so that the decoder layer adds both to the residual in its next fused
        add + norm."""
        shared = self.folded_shared(x)
        if shared is not None:          # one routed call computes both (the shared experts' ids after the routed)
            ids, weights = self.gate(x, always_on=shared.count)
            out = self.executor.forward_folded(self.layer_idx, x, ids, weights, shared)
            return (out, None) if separate else out
        ids, weights = self.gate(x)
        out = self.executor.forward(self.layer_idx, x, ids, weights)
        shared = self.shared_experts(x) if self.shared_experts is not None else None
        if separate:
            return out, shared
        return out if shared is None else out + shared
