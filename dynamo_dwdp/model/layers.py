"""Small building blocks: RMSNorm, a Linear that knows how it is sharded under TP, the dense MLP."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

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
        return F.linear(x, self.weight)


class DenseMLP(nn.Module):
    """down(silu(gate(x)) * up(x)); under TP the result is a partial sum (caller reduces)."""

    def __init__(self, hidden: int, intermediate: int, tp: TensorParallel):
        super().__init__()
        self.gate_proj = Linear(hidden, intermediate, tp, tp_dim=0)
        self.up_proj = Linear(hidden, intermediate, tp, tp_dim=0)
        self.down_proj = Linear(intermediate, hidden, tp, tp_dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
