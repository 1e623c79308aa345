"""Torch references for the W8A8 routed experts (kernels/moe_fp8a8.py), float64 arithmetic.

- `emulated_experts`: the same quantization as the kernel (x in 1 x 128 groups, h in 1 x h_group
  groups, `model.fp8.quantize_act_fp8`), everything else exact: it differs from the kernel by the
  fp32 accumulation order (and on a GPU the tensor core's accumulator) and the output's rounding;
- `dequantized_experts`: the dequantized model (FP8 weights times their block scales, activations
  not quantized): what the W8A16 kernel computes, the accuracy reference.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from dynamo_dwdp.model.fp8 import dequantize_act_fp8, dequantize_block_fp8, quantize_act_fp8


def _experts(x, ids, w, banks, act):
    """sum_k w[t,k] * expert_{ids[t,k]}(x[t]), one expert at a time (each expert's weights dequantized
    once), pairs of experts in no bank skipped; `act(v, group)` is what the activations go through."""
    out = torch.zeros(x.shape, dtype=torch.float64, device=x.device)
    for b in banks:
        for i in range(b.count):
            t, j = (ids == b.first + i).nonzero(as_tuple=True)
            if t.numel() == 0:
                continue
            w13 = dequantize_block_fp8(b.w13[i], b.w13_scale[i]).double()
            w2 = dequantize_block_fp8(b.w2[i], b.w2_scale[i]).double()
            gate, up = (act(x[t], 128) @ w13.T).chunk(2, dim=-1)
            h = F.silu(gate) * up
            out.index_add_(0, t, w[t, j].double()[:, None] * (act(h, None) @ w2.T))
    return out


def emulated_experts(x, ids, w, banks, h_group: int) -> torch.Tensor:
    def act(v, group):
        # h: the kernel's fp32 epilogue value; x: its given dtype (fp32 or bf16), exact in float64
        q, s = quantize_act_fp8(v.float(), group or h_group)
        return dequantize_act_fp8(q, s, group or h_group).double()
    return _experts(x, ids, w, banks, act)


def dequantized_experts(x, ids, w, banks) -> torch.Tensor:
    return _experts(x, ids, w, banks, lambda v, group: v.double())
