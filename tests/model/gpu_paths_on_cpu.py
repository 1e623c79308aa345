"""The engine's CUDA decode path on the CPU: every fused Triton kernel hooked in where the model takes
it on a GPU (router, MLA prep, decode attention, routed experts, dense SwiGLU), torch's fused
`rms_norm` and SDPA prefill, all under Triton's interpreter computing as the GPU does
(`interpreter_numerics`). Used as a `run_local_group` target, so that every rank process (TP's
followers too) runs the same paths; the hooks are installed when the target starts, before the
first forward (the model looks each of them up at call time).

`forced_tokens_and_routes` also replaces greedy sampling with a fixed token schedule (identical in
every run with the same batches), so that two strategies decode the same tokens however their logits
differ, and records every router decision, so that a logits difference can be traced to the tokens
whose expert selection differs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

ROUTES: list = []          # per router call: [T, k] expert ids, sorted per token


def install(fused_kernels: bool = True, forced: bool = True, without: frozenset = frozenset()) -> None:
    """The router record always; `forced` sampling; with `fused_kernels` the GPU decode path too (else
    the model's own CPU paths: the torch reference), less the hooks named in `without` (router,
    mla_prep, decode, sdpa, experts, rms_norm, add_rmsnorm, dense_swiglu)."""
    from tests.model import interpreter_numerics
    from dynamo_dwdp.engine import engine_core
    from dynamo_dwdp.model import attention, experts, layers, moe
    from dynamo_dwdp.model.kernels import mla_prep, moe_gemm
    from dynamo_dwdp.model.kernels import norm as fused_norm
    from dynamo_dwdp.model.kernels import router as fused_router

    calls = [0]

    def forced_sample(logits, params, generators):
        calls[0] += 1
        return torch.tensor([(1000003 * calls[0] + 7919 * i) % (logits.shape[1] - 8) + 5
                             for i in range(logits.shape[0])], dtype=torch.long)

    if forced:
        engine_core.sample_tokens = forced_sample
    torch_route = moe.Router.forward

    def route(self, x):
        if fused_kernels and "router" not in without:
            c = self.cfg
            ids, w = fused_router.noaux_tc_route(x, self.weight, self.e_score_correction_bias, self.selection_skew,
                                                 c.num_experts_per_tok, c.n_group, c.topk_group, c.norm_topk_prob,
                                                 c.routed_scaling_factor)
        else:
            ids, w = torch_route(self, x)
        ROUTES.append(ids.sort(1).values.numpy().copy())
        return ids, w

    moe.Router.forward = route
    if not fused_kernels:
        return
    interpreter_numerics.install()
    if "mla_prep" not in without:
        attention.MLAttention.use_fused_prep = lambda self, x: mla_prep.supported(self.kv_lora, self.rope_dim)
    if "decode" not in without:
        attention.MLAttention.use_decode_kernel = lambda self, q, b: b.max_q == 1 and q.shape[0] == b.num_seqs
    if "sdpa" not in without:
        attention.MLAttention.use_sdpa = lambda self, x, b: b.max_q > 1
    if "experts" not in without:                       # as on CUDA: bf16 only (fp32 takes the torch loop)
        experts.use_fused_experts = lambda x, ids, banks: ids.numel() <= experts.SYNC_FREE_MAX_ROWS and \
            x.dtype == torch.bfloat16
    if "rms_norm" not in without:
        layers.RMSNorm.forward = lambda self, x: F.rms_norm(x, self.weight.shape, self.weight.to(x.dtype), self.eps)
    if "add_rmsnorm" not in without:
        layers.RMSNorm.add_and_norm = lambda self, d, r, d2=None: fused_norm.add_rmsnorm(d, r, self.weight, self.eps, d2)
    if "dense_swiglu" in without:
        return

    def dense_mlp(self, x):
        if self.gate_up is None:
            self.fuse_gate_up()                                  # the runner does this on CUDA
        if x.shape[0] <= moe_gemm.BF16_SWIGLU_MAX_ROWS:
            return self.down_proj(moe_gemm.dense_swiglu(x, self.gate_up))
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

    layers.DenseMLP.forward = dense_mlp


def forced_tokens_and_routes(rank_engine, payload):
    """run_local_group target, payload (prompts, SamplingParams, fused_kernels[, forced, without]):
    (tokens, per-step float32 logits, router decisions) of this rank."""
    from dynamo_dwdp.rank.local_group import generate_rank

    prompts, params, fused_kernels, *rest = payload
    install(fused_kernels, *rest)
    steps = []
    runner = rank_engine.runner
    inner = runner.launch

    def launch(chunks, *args, **kwargs):
        logits = inner(chunks, *args, **kwargs)
        if logits.numel():
            steps.append(logits.detach().float().numpy().copy())
        return logits

    runner.launch = launch
    return generate_rank(rank_engine, (prompts, params)), steps, ROUTES
