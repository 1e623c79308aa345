"""Small building blocks: RMSNorm, a Linear that knows how it is sharded under TP, the dense MLP."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dynamo_dwdp.model import kernels as fused_kernels
from dynamo_dwdp.model.kernels import moe_prefill
from dynamo_dwdp.model.kernels import norm as fused_norm
from dynamo_dwdp.model.kernels.moe_gemm import BF16_SWIGLU_MAX_ROWS, FP8_LINEAR_MAX_ROWS, dense_swiglu, fp8_linear
from dynamo_dwdp.model.tensor_parallel import TensorParallel


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:                        # one fused kernel (fp32 inside, like the formula below)
            return F.rms_norm(x, self.weight.shape, self.weight.to(x.dtype), self.eps)
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)

    def add_and_norm(self, delta: torch.Tensor, residual: torch.Tensor,
                     delta2: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(residual + delta, this norm of it), with `delta2` given residual + (delta + delta2): one
        fused kernel on CUDA (kernels/norm.py: the sums rounded as torch rounds them, the norm as
        `F.rms_norm` computes it), else the adds and `forward`."""
        if delta.is_cuda and fused_kernels.available() and fused_norm.supported(delta, residual, delta2):
            return fused_norm.add_rmsnorm(delta, residual, self.weight, self.eps, delta2)
        h = residual + (delta if delta2 is None else delta + delta2)
        return h, self(h)


class Linear(nn.Module):
    """y = x W^T, no bias. `tp_dim` says how the checkpoint tensor is split across TP ranks:
    None = replicated, 0 = output rows split (column parallel), 1 = input columns split (row parallel;
    the caller all-reduces the partial sums)."""

    def __init__(self, in_features: int, out_features: int, tp: TensorParallel, tp_dim: int | None = None):
        super().__init__()
        if tp_dim == 0:
            out_features = tp.shard(out_features, "output features")
        elif tp_dim == 1:
            in_features = tp.shard(in_features, "input features")
        self.tp_dim = tp_dim
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.dtype == torch.float8_e4m3fn:          # FP8-resident (model/fp8_weights.py)
            return fp8_linear(x, self.weight, self.weight_scale_inv)
        return F.linear(x, self.weight)


def fuse_rows(first: Linear, second: Linear) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """Store two Linears that read the same input as one [N1 + N2, K] weight, the two keeping views of
    it (no copy kept). FP8 weights only when both are FP8 and N1 is a multiple of the 128-row scale block
    (the block scales then concatenate too). Returns (weight, its scale_inv or None), or None when the
    two cannot be fused."""
    fp8 = first.weight.dtype == torch.float8_e4m3fn
    n1 = first.weight.shape[0]
    if fp8 != (second.weight.dtype == torch.float8_e4m3fn) or (fp8 and n1 % 128):
        return None
    fused = torch.cat([first.weight.data, second.weight.data])
    first.weight = nn.Parameter(fused[:n1], requires_grad=False)
    second.weight = nn.Parameter(fused[n1:], requires_grad=False)
    scale = None
    if fp8:
        scale = torch.cat([first.weight_scale_inv, second.weight_scale_inv])
        first.weight_scale_inv, second.weight_scale_inv = scale[:n1 // 128], scale[n1 // 128:]
    return fused, scale


class DenseMLP(nn.Module):
    """down(silu(gate(x)) * up(x)); under TP the result is a partial sum (caller reduces).

    After `fuse_gate_up()` (CUDA) gate and up weights are two views of one [2I, H] tensor: small
    batches run gate, up, silu and the product as one kernel (kernels/moe_gemm.dense_swiglu), larger
    ones one GEMM over [gate; up] and the activation as one pass (kernels/moe_prefill.swiglu)."""

    def __init__(self, hidden: int, intermediate: int, tp: TensorParallel):
        super().__init__()
        self.gate_proj = Linear(hidden, intermediate, tp, tp_dim=0)
        self.up_proj = Linear(hidden, intermediate, tp, tp_dim=0)
        self.down_proj = Linear(intermediate, hidden, tp, tp_dim=1)
        self.gate_up: torch.Tensor | None = None          # [2I, H] (bf16 or FP8), set by fuse_gate_up
        self.gate_up_scale: torch.Tensor | None = None    # its block scale_inv when FP8

    def fuse_gate_up(self) -> bool:
        """Store gate and up as one tensor (`fuse_rows`: no copy kept; FP8 when I is a multiple of the
        128-row scale block). Returns whether it fused."""
        fused = fuse_rows(self.gate_proj, self.up_proj)
        if fused is None:
            return False
        self.gate_up, self.gate_up_scale = fused
        return True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up is not None and x.is_cuda:
            fp8 = self.gate_up_scale is not None
            if x.shape[0] <= _fused_rows(fp8):
                return self.down_proj(dense_swiglu(x, self.gate_up, self.gate_up_scale))
            h = fp8_linear(x, self.gate_up, self.gate_up_scale) if fp8 else F.linear(x, self.gate_up)
            return self.down_proj(moe_prefill.swiglu(h))
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def _fused_rows(fp8: bool) -> int:
    return FP8_LINEAR_MAX_ROWS if fp8 else BF16_SWIGLU_MAX_ROWS
