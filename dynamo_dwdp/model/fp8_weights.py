"""FP8-resident weights: quantize a loaded bf16 model's experts and dense linears at load (CUDA).

Each weight matrix [out, in] becomes float8_e4m3fn with one float32 scale_inv per 128x128 block,
the official DeepSeek-V3 layout (`model/fp8.py`). For a model loaded from an official FP8
checkpoint (dequantized on load) this is exact: the blocks line up and each block's amax maps to
448 again, so the original e4m3 values and scales come back. For a bf16 model it rounds every
weight to e4m3 (the "dequantized bf16 model" is then the reference the FP8 engine is compared to).

What stays in the model's dtype: embeddings, lm_head (bf16 in the official files too), norms, the
fp32 router, and kv_b_proj (the absorbed attention uses it as a batched-matmul operand; 4 MiB a
layer at v2-lite shapes). Dense linears then run through `kernels/moe_gemm.fp8_linear` and expert
banks through `kernels/moe_gemm.routed_experts_fused` (FP8 tiles dequantized in registers), or with
`weight_format=fp8-block-a8` through `kernels/moe_fp8a8.routed_experts_fp8a8` (activations quantized to
FP8 too, FP8 tensor-core MMAs; the banks carry `fp8_activations=True`).
"""
from __future__ import annotations

import torch

from dynamo_dwdp.errors import UserError
from dynamo_dwdp.model.fp8 import dequantize_block_fp8, quantize_block_fp8
from dynamo_dwdp.model.layers import Linear

KEEP = ("kv_b_proj",)          # Linear modules (by name suffix) that stay in the model's dtype


def _quantize_stack(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    qs, ss = zip(*(quantize_block_fp8(w[i]) for i in range(w.shape[0])))
    return torch.stack(qs), torch.stack(ss)


def _targets(model, executor, weight_format: str = "fp8-block"):
    linears = [m for n, m in model.named_modules() if isinstance(m, Linear) and not n.endswith(KEEP)]
    banks = getattr(executor, "banks", None)
    if not isinstance(banks, dict):
        raise UserError(f"engine weight_format={weight_format}: the {executor.strategy} executor's expert banks "
                        "cannot be quantized (strategy single or dp only)")
    return linears, [b for v in banks.values() for b in (v if isinstance(v, list) else [v])]


def round_trip_fp8(model, executor) -> None:
    """The reference of the FP8 engine: the same weights rounded through the FP8 block format and
    kept in the model's dtype (`dequantize_block_fp8(*quantize_block_fp8(w))`), any device."""
    def rt(w):
        return dequantize_block_fp8(*quantize_block_fp8(w), dtype=w.dtype)

    linears, banks = _targets(model, executor)
    for mod in linears:
        mod.weight.data = rt(mod.weight.data)
    for bank in banks:
        bank.w13 = torch.stack([rt(w) for w in bank.w13])
        bank.w2 = torch.stack([rt(w) for w in bank.w2])
    model.refuse_weights()      # fused tensors follow the new weights


def make_fp8_resident(model, executor, weight_format: str = "fp8-block") -> dict:
    """Quantize in place (`weight_format` fp8-block: W8A16, or fp8-block-a8: the expert banks marked for
    FP8 activations); returns {"linears": n, "expert_banks": n, "bytes_before": b, "bytes_after": b}."""
    if weight_format not in ("fp8-block", "fp8-block-a8"):
        raise UserError(f"engine weight_format={weight_format!r}: not an FP8 format (fp8-block, fp8-block-a8)")
    if next(model.parameters()).device.type != "cuda":
        raise UserError(f"engine weight_format={weight_format} needs device=cuda (the FP8 kernels are GPU kernels)")
    linears, banks = _targets(model, executor, weight_format)
    before = after = 0
    for mod in linears:
        w = mod.weight.data
        before += w.numel() * w.element_size()
        q, s = quantize_block_fp8(w)
        mod.weight = torch.nn.Parameter(q, requires_grad=False)
        mod.register_buffer("weight_scale_inv", s, persistent=False)
        after += q.numel() + s.numel() * 4
    for bank in banks:
        before += (bank.w13.numel() + bank.w2.numel()) * bank.w13.element_size()
        bank.w13, bank.w13_scale = _quantize_stack(bank.w13)
        bank.w2, bank.w2_scale = _quantize_stack(bank.w2)
        bank.fp8_activations = weight_format == "fp8-block-a8"
        after += bank.w13.numel() + bank.w2.numel() + 4 * (bank.w13_scale.numel() + bank.w2_scale.numel())
    model.refuse_weights()
    torch.cuda.empty_cache()
    return {"linears": len(linears), "expert_banks": len(banks), "bytes_before": before, "bytes_after": after}
