"""Prefill-size forms of the model's layers that change how work is laid out on the GPU, not what it
computes: the switch that selects them and the side stream they use.

- `kv_gemm`, expanded keys from a plain GEMM (`model/attention.sdpa_prefill_attention`): the cached
  latents [ctx, C] times kv_b's key rows [h * N, C] as one GEMM, the key its output joined with the
  rotated shared k_pe in one concatenation; the values as before (one GEMM, the same layout). The form
  before ran a batched GEMM over the latents expanded to every head, and torch copies that stride-0
  expansion first (h x ctx x C elements written and read again: 134 MB a layer at 8K tokens, v2-lite).
- `shared_beside`, shared experts beside the routed experts (`model/moe.MoEBlock`): at prefill sizes on CUDA the
  shared experts' GEMMs run on a side stream while the main stream routes, sorts, gathers and runs the
  routed experts; the main stream waits for them before the layer's output is used. The routed path's
  small sort/index kernels and memory-bound passes leave most of the GPU idle; the shared GEMMs fill
  it. Same kernels, same inputs: bitwise the same results as running them one after the other.
- `pair_sort`, the routed pairs sorted by one kernel (`model/experts.routed_experts_grouped`, one bank
  from expert 0): order, grouped-GEMM offsets and the combine's inverse from `kernels/moe_prefill.sort_pairs`
  instead of torch's radix sort, a searchsorted and a scatter (about a dozen small launches a layer).

`DWDP_PREFILL_FORMS` (read per call): unset or "1" = all forms, "0" = the forms before, or a comma
list of form names; so that one process can measure each.
"""
from __future__ import annotations

import functools
import os

import torch

from dynamo_dwdp.errors import UserError

ENV = "DWDP_PREFILL_FORMS"
OVERLAP_MIN_ROWS = 1024      # tokens from which a step is prefill-sized (decode batches stay far below)


FORMS = ("kv_gemm", "shared_beside", "pair_sort")


def enabled(form: str) -> bool:
    """Whether `form` (one of FORMS) runs: $DWDP_PREFILL_FORMS unset or "1" = all, "0" = none, else
    the forms it lists (comma-separated; an unknown name is refused)."""
    if form not in FORMS:
        raise ValueError(f"prefill form {form!r} is not one of {', '.join(FORMS)}")
    want = os.environ.get(ENV, "1").strip()
    if want in ("", "1"):
        return True
    if want == "0":
        return False
    names = {w.strip() for w in want.split(",") if w.strip()}
    bad = names - set(FORMS)
    if bad:
        raise UserError(f"{ENV}={want!r}: {', '.join(sorted(bad))} not among {', '.join(FORMS)} (or 0 / 1)")
    return form in names


def use_side_stream(x: torch.Tensor) -> bool:
    """Run independent prefill work on the side stream: CUDA, at least OVERLAP_MIN_ROWS rows, forms
    enabled, and no CUDA-graph capture in progress (a capture must stay on its own stream)."""
    return (x.is_cuda and x.shape[0] >= OVERLAP_MIN_ROWS and enabled("shared_beside")
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
