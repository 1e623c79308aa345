"""The DeepSeek-V3 MoE block: exact V3 router + shared experts; routed experts via a `MoEExecutor`.

Router (noaux_tc): sigmoid scores; `e_score_correction_bias` is added for *selection only*;
experts are grouped into n_group groups, each group scored by the sum of its top-2 biased scores,
the best topk_group groups are kept, top-k experts are picked among them; the weights are the
unbiased sigmoid scores of the picked experts, optionally normalised, times routed_scaling_factor.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dynamo_dwdp.model.config import ModelConfig
from dynamo_dwdp.model.layers import DenseMLP
from dynamo_dwdp.model.tensor_parallel import TensorParallel


class Router(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        E = cfg.n_routed_experts
        self.weight = nn.Parameter(torch.empty(E, cfg.hidden_size), requires_grad=False)
        self.register_buffer("e_score_correction_bias", torch.zeros(E, dtype=torch.float32))
        # Benchmark knob ("hot experts"): added to the selection scores only; zero for real models.
        self.register_buffer("selection_skew", torch.zeros(E, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, H] -> (topk_ids [T, k] long, topk_weights [T, k] float32)."""
        cfg = self.cfg
        T, E, G = x.shape[0], cfg.n_routed_experts, cfg.n_group
        scores = F.linear(x.float(), self.weight.float()).sigmoid()
        choice = scores + self.e_score_correction_bias + self.selection_skew
        if G > 1:
            group_scores = choice.view(T, G, E // G).topk(2, dim=-1)[0].sum(dim=-1)
            keep = torch.topk(group_scores, k=cfg.topk_group, dim=-1, sorted=False)[1]
            group_mask = torch.zeros_like(group_scores).scatter_(1, keep, 1.0)
            expert_mask = group_mask.unsqueeze(-1).expand(T, G, E // G).reshape(T, E)
            choice = choice.masked_fill(expert_mask == 0, float("-inf"))
        ids = torch.topk(choice, k=cfg.num_experts_per_tok, dim=-1, sorted=False)[1]
        weights = scores.gather(1, ids)
        if cfg.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return ids, weights * cfg.routed_scaling_factor


class MoEBlock(nn.Module):
    """Router + shared experts (dense, TP-shardable) + routed experts (owned by the executor)."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, tp: TensorParallel, executor):
        super().__init__()
        self.layer_idx = layer_idx
        self.gate = Router(cfg)
        self.shared_experts = (DenseMLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts, tp)
                               if cfg.n_shared_experts else None)
        self.executor = executor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids, weights = self.gate(x)
        out = self.executor.forward(self.layer_idx, x, ids, weights)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out
