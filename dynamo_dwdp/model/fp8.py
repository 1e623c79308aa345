"""The official DeepSeek-V3 FP8 block format: e4m3 weights with one float32 `scale_inv` per block.

Contract (as in the published V3/R1 files, `quantization_config: {quant_method: fp8,
weight_block_size: [128, 128]}`):
- `<name>.weight` is float8_e4m3fn [out, in];
- `<name>.weight_scale_inv` is float32 [ceil(out / 128), ceil(in / 128)];
- the real weight is `weight[i, j] * scale_inv[i // 128, j // 128]` (a multiplication, despite the
  name); blocks at the right and bottom edges are partial when a dimension is not a multiple of 128.

These are the format's two directions, exact on any device: `dequantize_block_fp8` is the loader's
and the references' ground truth, `quantize_block_fp8` writes checkpoints and resident GPU weights.
`quantize_act_fp8` is the activation side of W8A8 (per token, 1 x 128 groups), the reference of the
FP8-activation kernels.
"""
from __future__ import annotations

import math

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite float8_e4m3fn
DEFAULT_BLOCK = (128, 128)


def scale_shape(shape: tuple[int, int], block: tuple[int, int] = DEFAULT_BLOCK) -> tuple[int, int]:
    """Shape of the `scale_inv` tensor that goes with a weight of `shape` [out, in]."""
    return math.ceil(shape[0] / block[0]), math.ceil(shape[1] / block[1])


def _expand(scale_inv: torch.Tensor, shape: tuple[int, int], block: tuple[int, int]) -> torch.Tensor:
    """Per-element scale: every block's scale repeated over its (possibly partial) block."""
    full = scale_inv.repeat_interleave(block[0], dim=0).repeat_interleave(block[1], dim=1)
    return full[: shape[0], : shape[1]]


def dequantize_block_fp8(weight: torch.Tensor, scale_inv: torch.Tensor,
                         block: tuple[int, int] = DEFAULT_BLOCK,
                         dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """e4m3 [out, in] x float32 scale_inv [ceil(out/b0), ceil(in/b1)] -> `dtype` [out, in].

    Computed in float32 (every e4m3 value and its product with a float32 scale is exact there up to
    float32 rounding of the product), then cast once to `dtype`.
    """
    if weight.dim() != 2:
        raise ValueError(f"FP8 block weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
    want = scale_shape(tuple(weight.shape), block)
    if tuple(scale_inv.shape) != want:
        raise ValueError(f"weight_scale_inv has shape {tuple(scale_inv.shape)}, expected {want} "
                         f"for a weight of shape {tuple(weight.shape)} in {block[0]}x{block[1]} blocks")
    out = weight.to(torch.float32) * _expand(scale_inv.to(torch.float32), tuple(weight.shape), block)
    return out.to(dtype)


def quantize_block_fp8(weight: torch.Tensor, block: tuple[int, int] = DEFAULT_BLOCK
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] float weight -> (e4m3 [out, in], float32 scale_inv [ceil(out/b0), ceil(in/b1)]).

    Each block's scale maps its largest magnitude onto FP8_MAX (an all-zero block gets scale 1), the
    rule the official conversion uses; values are rounded to nearest by the float8 cast.
    """
    if weight.dim() != 2:
        raise ValueError(f"FP8 block weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
    rows, cols = weight.shape
    sr, sc = scale_shape((rows, cols), block)
    w = weight.to(torch.float32)
    padded = torch.zeros(sr * block[0], sc * block[1], dtype=torch.float32, device=w.device)
    padded[:rows, :cols] = w
    amax = padded.abs().view(sr, block[0], sc, block[1]).amax(dim=(1, 3))
    scale_inv = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (w / _expand(scale_inv, (rows, cols), block)).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale_inv.contiguous()


ACT_GROUP = 128  # activations are quantized per token in 1 x ACT_GROUP groups (DeepSeek-V3's inference)


def quantize_act_fp8(x: torch.Tensor, group: int = ACT_GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """[rows, n] activations -> (e4m3 [rows, n], float32 scale [rows, ceil(n / group)]), per row in
    1 x `group` groups: scale = amax / FP8_MAX in float32 (an all-zero group gets 1), q = x / scale
    clamped to +-FP8_MAX and rounded to nearest even. The torch statement of what
    `kernels/moe_fp8a8.py` computes on the GPU (same operations, same order)."""
    if x.dim() != 2:
        raise ValueError(f"activations must be 2-D [rows, n], got shape {tuple(x.shape)}")
    rows, n = x.shape
    g = math.ceil(n / group)
    padded = torch.zeros(rows, g * group, dtype=torch.float32, device=x.device)
    padded[:, :n] = x.to(torch.float32)
    amax = padded.view(rows, g, group).abs().amax(dim=2)
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (padded.view(rows, g, group) / scale[:, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q.view(rows, g * group)[:, :n].contiguous(), scale


def dequantize_act_fp8(q: torch.Tensor, scale: torch.Tensor, group: int = ACT_GROUP,
                       dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of `quantize_act_fp8` (exact in float32 up to the product's rounding)."""
    full = scale.to(torch.float32).repeat_interleave(group, dim=1)[:, : q.shape[1]]
    return (q.to(torch.float32) * full).to(dtype)
