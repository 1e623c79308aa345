"""Prefill-size forms of the model's layers that change how work is laid out on the GPU, not what it
computes: the switch that selects them and the side stream they use.

- Expanded keys and values from one GEMM (`model/attention.sdpa_prefill_attention`): the cached
  latents times the whole kv_b weight [h * (N + V), C] at once; the key is its nope part with the
  rotated shared k_pe joined in one concatenation, the value a strided view of the same output.
  The form before ran a batched GEMM over the latents expanded to every head (torch copies the
  stride-0 expansion: h x ctx x C elements written and read again) and a second GEMM for the values.
- Shared experts beside the routed experts (`model/moe.MoEBlock`): at prefill sizes on CUDA the
  shared experts' GEMMs run on a side stream while the main stream routes, sorts, gathers and runs the
  routed experts; the main stream waits for them before the layer's output is used. The routed path's
  small sort/index kernels and memory-bound passes leave most of the GPU idle; the shared GEMMs fill
  it. Same kernels, same inputs: bitwise the same results as running them one after the other.

`DWDP_PREFILL_FORMS=0` (read per call) runs the forms before, so that one process can measure both.
"""
from __future__ import annotations

import functools
import os

import torch

ENV = "DWDP_PREFILL_FORMS"
OVERLAP_MIN_ROWS = 1024      # tokens from which a step is prefill-sized (decode batches stay far below)


def enabled() -> bool:
    """The forms of this module, unless $DWDP_PREFILL_FORMS is "0"."""
    return os.environ.get(ENV, "1") != "0"


def use_side_stream(x: torch.Tensor) -> bool:
    """Run independent prefill work on the side stream: CUDA, at least OVERLAP_MIN_ROWS rows, forms
    enabled, and no CUDA-graph capture in progress (a capture must stay on its own stream)."""
    return (x.is_cuda and x.shape[0] >= OVERLAP_MIN_ROWS and enabled()
            and not torch.cuda.is_current_stream_capturing())


@functools.cache
def _side_stream(index: int) -> torch.cuda.Stream:
    return torch.cuda.Stream(device=index)


def start_beside(fn, x: torch.Tensor):
    """Launch fn(x) on the device's side stream once the current stream's work so far is done; returns
    a `join()` that makes the current stream wait for it and returns fn's result (a tensor or None).

    Memory: x is marked as used by the side stream and the result as used by the current stream, so the
    caching allocator reuses neither block before the other stream's work on it is done."""
    main = torch.cuda.current_stream(x.device)
    side = _side_stream(x.device.index if x.device.index is not None else torch.cuda.current_device())
    side.wait_stream(main)
    with torch.cuda.stream(side):
        result = fn(x)
    x.record_stream(side)

    def join():
        main.wait_stream(side)
        if result is not None:
            result.record_stream(main)
        return result
    return join
