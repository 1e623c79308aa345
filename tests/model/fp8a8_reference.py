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


def _weights(banks, e):
    for b in banks:
        if b.first <= e < b.first + b.count:
            i = e - b.first
            return (dequantize_block_fp8(b.w13[i], b.w13_scale[i]).double(),
                    dequantize_block_fp8(b.w2[i], b.w2_scale[i]).double())
    return None


def _experts(x, ids, w, banks, act):
    out = torch.zeros(x.shape, dtype=torch.float64, device=x.device)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            ws = _weights(banks, int(ids[t, j]))
            if ws is None:
                continue
            gate, up = (act(x[t:t + 1], 128) @ ws[0].T).chunk(2, dim=-1)
            h = F.silu(gate) * up
            out[t] += w[t, j].double() * (act(h, None) @ ws[1].T)[0]
    return out


def emulated_experts(x, ids, w, banks, h_group: int) -> torch.Tensor:
    def act(v, group):
        # h: the kernel's fp32 epilogue value; x: its given dtype (fp32 or bf16), exact in float64
        q, s = quantize_act_fp8(v.float(), group or h_group)
        return dequantize_act_fp8(q, s, group or h_group).double()
    return _experts(x, ids, w, banks, act)


def dequantized_experts(x, ids, w, banks) -> torch.Tensor:
    return _experts(x, ids, w, banks, lambda v, group: v.double())
