"""GPU arithmetic for Triton's CPU interpreter (TRITON_INTERPRET=1), so that CPU checks of the kernels
see the numbers a GPU produces. Imported by the interpreter check scripts before any kernel runs.

The interpreter departs from an NVIDIA GPU in four ways that matter here (Triton 3.x):
- a `tl.dot` of bf16 operands multiplies the raw 16-bit patterns as integers (garbage); a GPU's
  tensor cores form exact products and accumulate them in fp32;
- casts from fp32 to bf16 truncate; a GPU rounds to nearest even;
- a `tl.dot` of fp32 operands at the default input precision ("tf32") is computed in fp32; a GPU's
  tensor cores read only 10 mantissa bits of each operand (TF32), so a kernel that forgets
  `input_precision="ieee"` gives results ~1e-3 off on the GPU and exact ones in the interpreter;
- fp32 -> e4m3 casts (even with fp_downcast_rounding="rtne") round ties up (17.0 -> 18, not 16); a
  GPU (`cvt.rn.satfinite.e4m3x2.f32`) rounds to nearest even, as torch's float8_e4m3fn cast does.

`install()` makes the interpreter do what the GPU does in all four cases (TF32 operands rounded to
nearest, ties away, as Triton's `cvt.rna.tf32.f32`) and counts the fp32 dots that ran at TF32
(`TF32_DOTS`), so that a check can both see the error and name its cause.
"""
from __future__ import annotations

import numpy as np
import torch

TF32_DOTS: list[tuple[int, ...]] = []       # operand shapes of the fp32 dots that ran at TF32 precision


def _as_f32(handle, tl) -> np.ndarray:
    if handle.dtype.scalar == tl.bfloat16:                       # stored as uint16 bit patterns
        return (handle.data.astype(np.uint32) << 16).view(np.float32)
    return handle.data.astype(np.float32)


def _tf32(x: np.ndarray) -> np.ndarray:
    """fp32 -> the nearest TF32 value (10 mantissa bits; ties away from zero), kept in fp32."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    return ((u + np.uint32(0x1000)) & np.uint32(0xFFFFE000)).view(np.float32)


def install() -> None:
    import triton.language as tl
    from triton._C.libtriton import ir
    from triton.runtime import interpreter

    from tests.model import interpreter_patch_once

    interpreter_patch_once.install()          # speed only: see that module
    builder = interpreter.InterpreterBuilder
    if getattr(builder, "_gpu_numerics", False):
        return
    dot, cast, fp_to_fp = builder.create_dot, builder.cast_impl, builder.create_fp_to_fp

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if tl.bfloat16 in (a.dtype.scalar, b.dtype.scalar):
            prod = np.matmul(_as_f32(a, tl), _as_f32(b, tl), dtype=np.float32)
            return interpreter.TensorHandle(prod.astype(d.data.dtype) + d.data, d.dtype.scalar)
        if a.dtype.scalar == tl.float32 and input_precision == ir.INPUT_PRECISION.TF32:
            TF32_DOTS.append(tuple(a.data.shape))
            prod = np.matmul(_tf32(a.data), _tf32(b.data), dtype=np.float32)
            return interpreter.TensorHandle(prod + d.data, d.dtype.scalar)
        return dot(self, a, b, d, input_precision, max_num_imprecise_acc)

    def cast_impl(self, src, dst_type):
        if dst_type.scalar == tl.bfloat16 and src.dtype.scalar == tl.float32:
            t = torch.from_numpy(np.ascontiguousarray(src.data)).to(torch.bfloat16)   # round to nearest even
            return interpreter.TensorHandle(t.view(torch.int16).numpy().view(np.uint16), tl.bfloat16)
        return cast(self, src, dst_type)

    def create_fp_to_fp(self, src, dst_type, rounding_mode):
        if dst_type.scalar == tl.float8e4nv and src.dtype.scalar == tl.float32:
            t = torch.from_numpy(np.ascontiguousarray(src.data)).clamp(-448.0, 448.0).to(torch.float8_e4m3fn)
            return interpreter.TensorHandle(t.view(torch.uint8).numpy(), tl.float8e4nv)
        return fp_to_fp(self, src, dst_type, rounding_mode)

    builder.create_dot = create_dot
    builder.create_fp_to_fp = create_fp_to_fp
    builder.cast_impl = cast_impl
    builder._gpu_numerics = True
