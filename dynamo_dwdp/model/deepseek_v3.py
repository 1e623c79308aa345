"""DeepSeek-V3 for causal LM over a paged MLA cache. Module names mirror the Hugging Face checkpoint
(`model.layers.N.self_attn.q_a_proj`, `model.layers.N.mlp.gate`, ...) so that the loader maps names 1:1.

The model never knows the parallel strategy: routed experts go through `executor.forward(...)`,
dense layers through `TensorParallel` (size 1 unless the strategy is tp).
"""
from __future__ import annotations

import torch
from torch import nn

from dynamo_dwdp.model.attention import MLAttention
from dynamo_dwdp.model.batch import ForwardBatch
from dynamo_dwdp.model.config import ModelConfig
from dynamo_dwdp.model.layers import DenseMLP, RMSNorm
from dynamo_dwdp.model.moe import MoEBlock
from dynamo_dwdp.model.rope import RotaryEmbedding
from dynamo_dwdp.model.tensor_parallel import TensorParallel


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, idx: int, tp: TensorParallel, executor):
        super().__init__()
        self.idx = idx
        self.tp = tp
        self.self_attn = MLAttention(cfg, tp)
        self.mlp = (MoEBlock(cfg, idx, tp, executor) if cfg.is_moe_layer(idx)
                    else DenseMLP(cfg.hidden_size, cfg.intermediate_size, tp))
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, pending, batch, kv_layer, rope, cos, sin):
        """x: the residual stream; pending: the previous layer's MLP output, not yet added (None before
        the first layer; see `add_pending`). Returns (the stream after this layer's attention, this
        layer's pending MLP output): each residual add runs fused with the norm that follows it (and
        with TP's all-reduce), so a layer costs two add + RMSNorm passes over the stream instead of
        four kernels (five with the shared experts' add)."""
        if pending is None:
            h = self.input_layernorm(x)
        else:
            x, h = add_pending(self.tp, pending, x, self.input_layernorm)
        attn = self.self_attn(h, batch, kv_layer, rope, cos, sin)
        x, h = self.tp.all_reduce_add_rmsnorm(attn, x, self.post_attention_layernorm)
        if self.tp.size == 1 and isinstance(self.mlp, MoEBlock):
            return x, self.mlp(h, separate=True)
        return x, self.mlp(h)


def add_pending(tp: TensorParallel, pending, x: torch.Tensor, norm: RMSNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + pending, norm of it). pending: a TP-partial tensor (all-reduced first), or at TP size 1 the
    MoE block's (routed, shared or None) pair, added as x + (routed + shared) with torch's roundings."""
    if isinstance(pending, tuple):
        return norm.add_and_norm(pending[0], x, pending[1])
    return tp.all_reduce_add_rmsnorm(pending, x, norm)


class DeepseekV3Body(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TensorParallel, executor):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.embed_tokens.weight.requires_grad_(False)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, tp, executor) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class DeepseekV3ForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TensorParallel | None = None, executor=None):
        super().__init__()
        self.cfg = cfg
        self.tp = tp or TensorParallel()
        self.executor = executor
        self.model = DeepseekV3Body(cfg, self.tp, executor)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.lm_head.weight.requires_grad_(False)
        self.rope = RotaryEmbedding(cfg)

    def fuse_weights(self, gate_up: bool) -> None:
        """Store weights that read the same input as one tensor (views kept for the single GEMMs): every
        attention's input projections (`MLAttention.fuse_input_projections`) and, with gate_up (CUDA
        kernels), the dense MLPs' gate and up. Anything that replaces weights afterwards (the loader, FP8
        quantization) calls `refuse_weights`."""
        for mod in self.modules():
            if isinstance(mod, MLAttention):
                mod.fuse_input_projections()
            elif isinstance(mod, DenseMLP) and gate_up:
                mod.fuse_gate_up()

    def refuse_weights(self) -> None:
        """Rebuild the fused tensors of `fuse_weights` from the weights the Linears hold now."""
        for mod in self.modules():
            if isinstance(mod, MLAttention) and mod.in_proj is not None:
                mod.in_proj = mod.in_proj_scale = None
                mod.fuse_input_projections()
            elif isinstance(mod, DenseMLP) and mod.gate_up is not None:
                mod.gate_up = mod.gate_up_scale = None
                mod.fuse_gate_up()

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, kv_pool: torch.Tensor) -> torch.Tensor:
        """Run one step. kv_pool [num_blocks, num_layers, block_size, kv_cache_dim] is updated in
        place with this step's latents. Returns float32 logits [len(logits_indices), vocab]."""
        if self.executor is not None:
            self.executor.begin_step()
        try:
            x = self.model.embed_tokens(batch.input_ids)
            cos, sin = self.rope.cos_sin(batch.positions)
            pending = None
            for i, layer in enumerate(self.model.layers):
                x, pending = layer(x, pending, batch, kv_pool[:, i], self.rope, cos, sin)
            if pending is None:                        # no layers
                x = self.model.norm(x[batch.logits_indices])
            else:                                      # the last MLP output, added for the sampled rows only
                idx = batch.logits_indices
                rows = (tuple(None if p is None else p[idx] for p in pending) if isinstance(pending, tuple)
                        else pending[idx])
                _, x = add_pending(self.tp, rows, x[idx], self.model.norm)
            return self.lm_head(x).float()
        finally:
            if self.executor is not None:
                self.executor.end_step()
