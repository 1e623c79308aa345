"""Rotary position embedding for the MLA rope part: default and YaRN, DeepSeek's interleaved pairs."""
from __future__ import annotations

import math

import torch

from dynamo_dwdp.model.config import ModelConfig, RopeConfig, _yarn_mscale


def _yarn_inv_freq(rope: RopeConfig, dim: int) -> tuple[torch.Tensor, float]:
    base = rope.theta
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)
    extrapolation = 1.0 / pos_freqs
    interpolation = 1.0 / (rope.factor * pos_freqs)

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(rope.original_max_position / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extrapolation_weight = 1 - ramp
    inv_freq = interpolation * (1 - extrapolation_weight) + extrapolation * extrapolation_weight
    if rope.attention_factor is not None:
        factor = float(rope.attention_factor)
    elif rope.mscale and rope.mscale_all_dim:
        factor = _yarn_mscale(rope.factor, rope.mscale) / _yarn_mscale(rope.factor, rope.mscale_all_dim)
    else:
        factor = _yarn_mscale(rope.factor)
    return inv_freq, factor


class RotaryEmbedding(torch.nn.Module):
    """cos/sin tables indexed by absolute position; `apply` rotates [T, heads, rope_dim] tensors."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        dim = cfg.qk_rope_head_dim
        if cfg.rope.kind == "yarn":
            inv_freq, self.attention_scaling = _yarn_inv_freq(cfg.rope, dim)
        else:
            inv_freq = 1.0 / (cfg.rope.theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
            self.attention_scaling = 1.0
        self.interleave = cfg.rope.interleave
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def _apply(self, fn, recurse=True):
        """Follow device moves but keep inv_freq in float32: `model.to(bfloat16)` would otherwise round
        the frequencies to 8 bits of mantissa (angle errors of whole radians at long positions)."""
        inv_freq = self.inv_freq
        super()._apply(fn, recurse)
        self.inv_freq = inv_freq.to(device=self.inv_freq.device, dtype=torch.float32)
        return self

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T] -> cos, sin [T, rope_dim/2] (float32, already scaled)."""
        freqs = positions[:, None].float() * self.inv_freq.to(positions.device)
        return freqs.cos() * self.attention_scaling, freqs.sin() * self.attention_scaling

    def apply(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [T, H, d] (or [T, d]); cos/sin [T, d/2]. Returns the rotated tensor in x's dtype.

        Interleaved layout (DeepSeek): pairs (x0,x1),(x2,x3)... rotate together; the output is written
        de-interleaved ([even parts | odd parts]), exactly like the reference. q and k get the same
        permutation, so dot products are unaffected.
        """
        shape_extra = x.dim() - 2
        c = cos.view(cos.shape[0], *([1] * shape_extra), cos.shape[-1]).to(x.dtype)
        s = sin.view(sin.shape[0], *([1] * shape_extra), sin.shape[-1]).to(x.dtype)
        if self.interleave:
            x1, x2 = x[..., 0::2], x[..., 1::2]
        else:
            half = x.shape[-1] // 2
            x1, x2 = x[..., :half], x[..., half:]
        return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)
