"""Multi-head Latent Attention (MLA) over a paged cache of the compressed latent.

Per token and layer the cache holds [kv_lora_rank latent (after kv_a_layernorm) | qk_rope_head_dim
rotated shared key] — 576 values for DeepSeek-V3 instead of 2*128*heads. Attention runs in the
"absorbed" form: the query's no-rope part is mapped into latent space through kv_b_proj's key half,
scores are taken against the latent directly, and the output latent is mapped back through the value
half. This is mathematically the reference (expand-then-attend) computation.

Two implementations share one contract (query rows in, output rows out, the cache already written):
- `paged_latent_attention`: absorbed form over padded [B, max_q] x [B, max_context]; the reference,
  and the decode path (max_q == 1: O(B x context), static shapes for CUDA graphs);
- `sdpa_prefill_attention`: expand-then-attend per sequence through torch's fused
  scaled_dot_product_attention (flash-style memory-efficient or cuDNN kernels on GPU: no S x S
  score matrix), with a bottom-right causal mask for chunks that follow cached tokens. The prefill
  path on CUDA (`backend="auto"`) runs the implementation `prefill_attention.impl_for` picks: by
  default the Triton flash-attention kernel (`kernels/mla_prefill.py`); this function ("sdpa"),
  cuDNN or flash with v padded on request (`DWDP_PREFILL_ATTENTION`);
On CUDA (unless backend "reference") the kv_a norm, both rotations and the cache write run as one
kernel (`kernels/mla_prep.py`).
- `mla_decode.mla_decode_attention`: a Triton split-K kernel for decode steps that reads the cache
  once through the block table. The decode path on CUDA unless `backend="reference"`.
"""
from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right

from dynamo_dwdp.model import kernels as fused_kernels
from dynamo_dwdp.model import mla_decode, prefill_attention
from dynamo_dwdp.model.kernels import mla_prep
from dynamo_dwdp.model.kernels.moe_gemm import fp8_linear
from dynamo_dwdp.model.batch import ForwardBatch
from dynamo_dwdp.model.config import ModelConfig
from dynamo_dwdp.model.layers import Linear, RMSNorm, fuse_rows
from dynamo_dwdp.model.rope import RotaryEmbedding
from dynamo_dwdp.model.tensor_parallel import TensorParallel


# torch >= 2.8: bmm with bf16/fp16 operands and an fp32 result (CUDA)
_BMM_OUT_DTYPE = "dtype" in torch.ops.aten.bmm.overloads()


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
        self.in_proj: torch.Tensor | None = None          # [q | kv_a] rows, set by fuse_input_projections
        self.in_proj_scale: torch.Tensor | None = None    # its block scale_inv when FP8
        self.backend = "auto"            # auto | reference | sdpa (set by the model runner)
        # the Triton decode kernel tiles the latent and rotary widths: powers of two (every DeepSeek model)
        self.kernel_shapes_ok = all(n & (n - 1) == 0 for n in (self.kv_lora, self.rope_dim))

    def fuse_input_projections(self) -> bool:
        """The query's first projection (q_proj, or q_a_proj with a q LoRA) and kv_a_proj_with_mqa both
        read x: store their weights as one [Nq + C + R, H] tensor (the two Linears keep views of it, no
        copy), so a step runs one GEMM instead of two: one launch less per layer, where a batch-1 step's
        GEMMs are launch-bound, and at prefill one N = Nq + C + R GEMM instead of a narrow kv_a one (576
        columns on DeepSeek: a partial wave of tiles). Prefill chunks on the CPU keep the two GEMMs (their
        results stay those of the separate projections there). Not under TP (q is split across ranks,
        kv_a is not); FP8 weights only when Nq is a multiple of the 128-row scale block (the scales then
        concatenate too). Call again after the weights change. Returns whether it fused."""
        if self.tp.size > 1:
            return False
        fused = fuse_rows(self.q_proj if self.cfg.q_lora_rank is None else self.q_a_proj, self.kv_a_proj_with_mqa)
        if fused is None:
            return False
        self.in_proj, self.in_proj_scale = fused
        return True

    def _input_projections(self, x: torch.Tensor, batch: ForwardBatch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(q, or q_a with a q LoRA; kv_a or None = compute it when needed)."""
        if self.in_proj is None or (batch.max_q != 1 and not x.is_cuda):
            first = self.q_proj if self.cfg.q_lora_rank is None else self.q_a_proj
            return first(x), None
        if self.in_proj_scale is not None:
            both = fp8_linear(x, self.in_proj, self.in_proj_scale)
        else:
            both = F.linear(x, self.in_proj)
        nq = self.in_proj.shape[0] - self.kv_lora - self.rope_dim
        return both[:, :nq], both[:, nq:]

    def warm_up_prefill(self, device: torch.device, dtype: torch.dtype) -> bool:
        """Compile the prefill attention kernel for this layer's dims now (start-up), not on a prompt's
        path; True if it ran (CUDA, backend not "reference", the Triton implementation chosen)."""
        if device.type != "cuda" or self.backend == "reference":
            return False
        return prefill_attention.warm_up(self.num_heads, self.nope, self.rope_dim, self.v_dim, self.kv_lora, dtype,
                                         device)

    def use_decode_kernel(self, query: torch.Tensor, batch: ForwardBatch) -> bool:
        """Decode steps (one row per sequence) on CUDA use the Triton kernel unless backend is
        "reference" (latent and rotary widths must be powers of two, as in every DeepSeek model)."""
        if self.backend == "reference" or not query.is_cuda or batch.max_q != 1 or query.shape[0] != batch.num_seqs:
            return False
        return self.kernel_shapes_ok and mla_decode.available()

    def use_fused_prep(self, x: torch.Tensor) -> bool:
        """CUDA, unless backend is "reference": the fused norm/rope/cache-write kernel."""
        return (x.is_cuda and self.backend != "reference" and fused_kernels.available()
                and mla_prep.supported(self.kv_lora, self.rope_dim))

    def use_sdpa(self, x: torch.Tensor, batch: ForwardBatch) -> bool:
        """Prefill chunks (max_q > 1) go through SDPA on CUDA under "auto", always under "sdpa"."""
        if batch.max_q <= 1 or self.backend == "reference":
            return False
        return self.backend == "sdpa" or x.is_cuda

    def forward(self, x: torch.Tensor, batch: ForwardBatch, kv_layer: torch.Tensor,
                rope: RotaryEmbedding, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [T, H]; kv_layer [num_blocks, block_size, kv_lora+rope] (a strided view into the pool).
        Writes this step's latents into the cache, returns the (TP-partial) attention output [T, H]."""
        T = x.shape[0]
        h = self.num_heads
        q, kv_a = self._input_projections(x, batch)
        if self.cfg.q_lora_rank is not None:
            q = self.q_b_proj(self.q_a_layernorm(q))
        q = q.view(T, h, self.nope + self.rope_dim)
        if kv_a is None:
            kv_a = self.kv_a_proj_with_mqa(x)
        sdpa_impl = prefill_attention.impl_for(x) if self.use_sdpa(x, batch) else None
        q_whole = None                              # q with its rope part rotated in place (prefill: no cat)
        if self.use_fused_prep(x):                  # norm + rope + cache write in one kernel (kernels/mla_prep.py)
            q_nope = q[..., :self.nope]
            in_place = sdpa_impl == "sdpa"
            q_pe = mla_prep.mla_prep(q, kv_a, self.kv_a_layernorm.weight,
                                     self.kv_a_layernorm.eps, cos, sin, batch.slot_mapping, kv_layer, self.nope,
                                     rope.interleave, q_pe_out=q[..., self.nope:] if in_place else None)
            q_whole = q if in_place else None
        else:
            q_nope, q_pe = q.split([self.nope, self.rope_dim], dim=-1)
            latent, k_pe = kv_a.split([self.kv_lora, self.rope_dim], dim=-1)
            latent = self.kv_a_layernorm(latent)
            q_pe = rope.apply(q_pe, cos, sin)
            k_pe = rope.apply(k_pe, cos, sin)
            bs = kv_layer.shape[1]
            kv_layer[batch.slot_mapping // bs, batch.slot_mapping % bs] = torch.cat([latent, k_pe], -1).to(kv_layer.dtype)

        w = self.kv_b_proj.weight.view(h, self.nope + self.v_dim, self.kv_lora)
        w_uk, w_uv = w[:, : self.nope], w[:, self.nope:]
        if sdpa_impl is not None:
            if sdpa_impl == "sdpa":
                out = sdpa_prefill_attention(q_nope, q_pe, batch, kv_layer, w_uk, w_uv, self.scale, q_whole=q_whole)
            else:                                  # triton / cudnn / flash_pad (model/prefill_attention.py)
                out = prefill_attention.expanded_prefill_attention(sdpa_impl, q_nope, q_pe, batch, kv_layer, w,
                                                                   self.scale)
            return self.o_proj(out.reshape(T, h * self.v_dim))
        q_latent = torch.einsum("thn,hnc->thc", q_nope, w_uk)
        if self.use_decode_kernel(q_latent, batch):                        # q_pe read in place: no concatenation
            out_latent = mla_decode.mla_decode_attention(q_latent, kv_layer, batch.block_tables, batch.context_lens,
                                                         self.kv_lora, self.scale, batch.max_context, q_pe=q_pe)
        else:
            query = torch.cat([q_latent, q_pe], dim=-1)                    # [T, h, C+R]
            out_latent = paged_latent_attention(query, batch, kv_layer, self.kv_lora, self.scale)  # [T, h, C]
        out = torch.einsum("thc,hvc->thv", out_latent, w_uv).reshape(T, h * self.v_dim)
        return self.o_proj(out)


def paged_latent_attention(query: torch.Tensor, batch: ForwardBatch, kv_layer: torch.Tensor,
                           latent_dim: int, scale: float) -> torch.Tensor:
    """Paged attention in latent space (any device): gather each sequence's cached latents by block
    table, pad to [B, max_q] queries x [B, max_context] keys, causal + length mask, fp32 softmax.

    query [T, h, C+R] -> [T, h, C]. Cost O(B * max_q * max_context): the reference for prefill, and
    the decode path. Scores are accumulated and kept in fp32; on CUDA with 16-bit caches the keys are
    read in their own dtype (no fp32 copy of the cache). No host sync: CUDA-graph capturable.
    """
    T, h, d = query.shape
    B, max_q, max_ctx = batch.num_seqs, batch.max_q, batch.max_context
    if T == 0:
        return query.new_zeros(0, h, latent_dim)
    bs = kv_layer.shape[1]
    n_blocks = (max_ctx + bs - 1) // bs
    keys = kv_layer[batch.block_tables[:, :n_blocks]].reshape(B, n_blocks * bs, d)[:, :max_ctx]
    if max_q == 1 and T == B:                                              # decode: one row per sequence
        q_pad = query.view(B, 1, h, d)
    else:
        q_pad = query.new_zeros(B * max_q, h, d)
        q_pad[batch.pad_index] = query
        q_pad = q_pad.view(B, max_q, h, d)
    half = query.is_cuda and keys.dtype in (torch.bfloat16, torch.float16) and _BMM_OUT_DTYPE
    qh = q_pad.reshape(B, max_q * h, d)                                    # rows (q, head)
    if half:
        scores = torch.bmm(qh.to(keys.dtype), keys.transpose(1, 2), out_dtype=torch.float32)
    else:
        scores = torch.bmm(qh.float(), keys.float().transpose(1, 2))
    scores = scores.view(B, max_q, h, max_ctx) * scale
    ctx = batch.context_lens.view(B, 1, 1, 1)
    q_pos = ctx - batch.query_lens_t.view(B, 1, 1, 1) + torch.arange(max_q, device=query.device).view(1, max_q, 1, 1)
    k_pos = torch.arange(max_ctx, device=query.device).view(1, 1, 1, max_ctx)
    allowed = (k_pos <= q_pos) & (k_pos < ctx)                             # [B, max_q, 1, max_ctx]
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num_(0.0)                 # padded query rows -> 0
    values = keys[..., :latent_dim]
    if half:
        out = torch.bmm(probs.view(B, max_q * h, max_ctx).to(keys.dtype), values)
    else:
        out = torch.bmm(probs.view(B, max_q * h, max_ctx), values.float())
    out = out.view(B * max_q, h, latent_dim)
    if not (max_q == 1 and T == B):
        out = out[batch.pad_index]
    return out.to(query.dtype)


def sdpa_prefill_attention(q_nope: torch.Tensor, q_pe: torch.Tensor, batch: ForwardBatch, kv_layer: torch.Tensor,
                           w_uk: torch.Tensor, w_uv: torch.Tensor, scale: float,
                           q_whole: torch.Tensor | None = None) -> torch.Tensor:
    """Expand-then-attend, one sequence at a time, through F.scaled_dot_product_attention.

    q_nope [T, h, N], q_pe [T, h, R]; the sequence's cached latents [ctx, C | R] are expanded to
    keys [ctx, h, N+R] (k_nope = latent @ w_uk^T, the shared rotated k_pe broadcast over heads) and
    values [ctx, h, V]. A chunk of q new tokens after ctx-q cached ones sees keys 0..ctx-q+i
    (bottom-right causal). Returns [T, h, V]. Memory O(ctx * h * (N+R+V)) per sequence, no ctx^2 term.

    No concatenation on the way in: the key's nope part is written by the GEMM straight into its
    slot of a [ctx, h, N+R] buffer and k_pe broadcast into the rest; `q_whole` [T, h, N+R], when given,
    is the query whose parts q_nope and q_pe are (the fused prep rotates q's rope part in place), else
    the two are concatenated. A batch of one sequence returns SDPA's output as it is (no copy).
    """
    T, h, N = q_nope.shape
    C = w_uk.shape[-1]
    R = q_pe.shape[-1]
    out = None
    # fp32 on CUDA: the math backend (plain fp32 GEMMs); the memory-efficient kernel computes fp32 as 3xTF32
    math_only = q_nope.is_cuda and q_nope.dtype == torch.float32
    for rows, latent, k_pe in prefill_attention.cached_sequences(batch, kv_layer, C, q_nope.dtype):
        ctx, q_len = latent.shape[0], rows.stop - rows.start
        k = latent.new_empty(ctx, h, N + R)
        torch.bmm(latent.expand(h, ctx, C), w_uk.transpose(1, 2), out=k[..., :N].transpose(0, 1))
        k[..., N:] = k_pe.unsqueeze(1)
        v = torch.einsum("sc,hvc->hsv", latent, w_uv)
        if q_whole is not None:
            q = q_whole[rows].transpose(0, 1)                                 # [h, q, N+R]
        else:
            q = torch.cat([q_nope[rows], q_pe[rows]], dim=-1).transpose(0, 1)
        q, k, v = q.unsqueeze(0), k.transpose(0, 1).unsqueeze(0), v.unsqueeze(0)   # 4-D: the fused kernels' layout
        with sdpa_kernel(SDPBackend.MATH) if math_only else nullcontext():
            if q_len == ctx:
                o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
            else:
                o = F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(q_len, ctx), scale=scale)
        if rows.start == 0 and rows.stop == T:                                # the only sequence: no copy
            return o[0].transpose(0, 1)
        if out is None:
            out = q_nope.new_empty(T, h, w_uv.shape[1])
        out[rows] = o[0].transpose(0, 1)
    return q_nope.new_empty(T, h, w_uv.shape[1]) if out is None else out
