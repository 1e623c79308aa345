"""Multi-head Latent Attention (MLA) over a paged cache of the compressed latent.

Per token and layer the cache holds [kv_lora_rank latent (after kv_a_layernorm) | qk_rope_head_dim
rotated shared key] — 576 values for DeepSeek-V3 instead of 2*128*heads. Attention runs in the
"absorbed" form: the query's no-rope part is mapped into latent space through kv_b_proj's key half,
scores are taken against the latent directly, and the output latent is mapped back through the value
half. This is mathematically the reference (expand-then-attend) computation.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dynamo_dwdp.model.batch import ForwardBatch
from dynamo_dwdp.model.config import ModelConfig
from dynamo_dwdp.model.layers import Linear, RMSNorm
from dynamo_dwdp.model.rope import RotaryEmbedding
from dynamo_dwdp.parallel.context import TensorParallel


class MLAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TensorParallel):
        super().__init__()
        self.cfg = cfg
        self.tp = tp
        self.num_heads = tp.shard(cfg.num_attention_heads, "num_attention_heads")
        self.nope, self.rope_dim, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.kv_lora = cfg.kv_lora_rank
        qk = cfg.qk_head_dim
        H = cfg.hidden_size
        if cfg.q_lora_rank is None:
            self.q_proj = Linear(H, cfg.num_attention_heads * qk, tp, tp_dim=0)
        else:
            self.q_a_proj = Linear(H, cfg.q_lora_rank, tp)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps)
            self.q_b_proj = Linear(cfg.q_lora_rank, cfg.num_attention_heads * qk, tp, tp_dim=0)
        self.kv_a_proj_with_mqa = Linear(H, cfg.kv_lora_rank + cfg.qk_rope_head_dim, tp)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, cfg.rms_norm_eps)
        self.kv_b_proj = Linear(cfg.kv_lora_rank, cfg.num_attention_heads * (self.nope + self.v_dim), tp, tp_dim=0)
        self.o_proj = Linear(cfg.num_attention_heads * self.v_dim, H, tp, tp_dim=1)
        self.scale = cfg.softmax_scale

    def forward(self, x: torch.Tensor, batch: ForwardBatch, kv_layer: torch.Tensor,
                rope: RotaryEmbedding, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [T, H]; kv_layer [num_blocks, block_size, kv_lora+rope] (a strided view into the pool).
        Writes this step's latents into the cache, returns the (TP-partial) attention output [T, H]."""
        T = x.shape[0]
        h = self.num_heads
        if self.cfg.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(T, h, self.nope + self.rope_dim)
        q_nope, q_pe = q.split([self.nope, self.rope_dim], dim=-1)
        latent, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_lora, self.rope_dim], dim=-1)
        latent = self.kv_a_layernorm(latent)
        q_pe = rope.apply(q_pe, cos, sin)
        k_pe = rope.apply(k_pe, cos, sin)

        bs = kv_layer.shape[1]
        kv_layer[batch.slot_mapping // bs, batch.slot_mapping % bs] = torch.cat([latent, k_pe], -1).to(kv_layer.dtype)

        w = self.kv_b_proj.weight.view(h, self.nope + self.v_dim, self.kv_lora)
        w_uk, w_uv = w[:, : self.nope], w[:, self.nope:]
        q_latent = torch.einsum("thn,hnc->thc", q_nope, w_uk)
        query = torch.cat([q_latent, q_pe], dim=-1)                        # [T, h, C+R]
        out_latent = paged_latent_attention(query, batch, kv_layer, self.kv_lora, self.scale)  # [T, h, C]
        out = torch.einsum("thc,hvc->thv", out_latent, w_uv).reshape(T, h * self.v_dim)
        return self.o_proj(out)


def paged_latent_attention(query: torch.Tensor, batch: ForwardBatch, kv_layer: torch.Tensor,
                           latent_dim: int, scale: float) -> torch.Tensor:
    """Reference paged attention (any device): gather each sequence's cached latents by block
    table, pad to [B, max_q] queries x [B, max_context] keys, causal + length mask, softmax in fp32.

    query [T, h, C+R] -> [T, h, C]. Cost is O(B * max_q * max_context); fine for CPU/tests and
    prefill; GPU decode uses a dedicated kernel with the same contract.
    """
    T, h, d = query.shape
    B, max_q, max_ctx = batch.num_seqs, batch.max_q, batch.max_context
    if T == 0:
        return query.new_zeros(0, h, latent_dim)
    bs = kv_layer.shape[1]
    n_blocks = (max_ctx + bs - 1) // bs
    keys = kv_layer[batch.block_tables[:, :n_blocks]].reshape(B, n_blocks * bs, d)[:, :max_ctx]
    q_pad = query.new_zeros(B * max_q, h, d)
    q_pad[batch.pad_index] = query
    q_pad = q_pad.view(B, max_q, h, d)
    scores = torch.einsum("bqhd,bkd->bhqk", q_pad.float(), keys.float()) * scale
    ctx = batch.context_lens.view(B, 1, 1)
    q_len = torch.tensor(batch.query_lens, device=query.device, dtype=torch.long).view(B, 1, 1)
    q_pos = ctx - q_len + torch.arange(max_q, device=query.device).view(1, max_q, 1)
    k_pos = torch.arange(max_ctx, device=query.device).view(1, 1, max_ctx)
    allowed = (k_pos <= q_pos) & (k_pos < ctx)                             # [B, max_q, max_ctx]
    scores = scores.masked_fill(~allowed.unsqueeze(1), float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num_(0.0)                 # padded query rows -> 0
    out = torch.einsum("bhqk,bkc->bqhc", probs, keys[..., :latent_dim].float())
    return out.reshape(B * max_q, h, latent_dim)[batch.pad_index].to(query.dtype)
