"""Prefill-size forms of the model's layers that change how work is laid out on the GPU, not what it
computes: the switch that selects them and the side stream they use.

- `kv_gemm`, expanded keys from a plain GEMM (`model/attention.sdpa_prefill_attention`): the cached
  latents [ctx, C] times kv_b's key rows [h * N, C] as one GEMM, the key its output joined with the
  rotated shared k_pe in one concatenation; the values as before (one GEMM, the same layout). The form
  before ran a batched GEMM over the latents expanded to every head, and torch copies that stride-0
  expansion first (h x ctx x C elements written and read again: 134 MB a layer at 8K tokens, v2-lite).
- `shared_beside` and `routed_first`, the shared experts beside the routed experts (`model/moe.MoEBlock`):
  at prefill sizes on CUDA the two branches of an MoE block run on two streams and the main stream
  waits for both before the layer's output is used. `shared_beside`: the shared experts on a side
  stream of the default priority, routing and routed experts on the main stream. `routed_first`: routing
  and routed experts on a high-priority side stream, the shared experts on the main stream, so that the
  block scheduler hands free multiprocessors to the routed chain first (the layer's critical path: router,
  sort, gather, two grouped GEMMs, SwiGLU, combine) and the shared GEMMs take what it leaves (its small
  sort/index kernels and memory-bound passes leave most multiprocessors idle); only for executors whose
  forward may run on any stream (`MoEExecutor.stream_agnostic`). Both: same kernels, same inputs,
  bitwise the same results as running the branches one after the other.
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


FORMS = ("kv_gemm", "shared_beside", "routed_first", "pair_sort")


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


def stream_form(x: torch.Tensor, routed_any_stream: bool) -> str | None:
    """How an MoE block on x runs its two branches: "routed_first" (when enabled and the executor's
    forward may run on any stream), else "shared_beside" (when enabled), else None (one after the other).
    Two streams only on CUDA, from OVERLAP_MIN_ROWS rows, and never while a CUDA graph is being captured
    (a capture must stay on its own stream)."""
    if not x.is_cuda or x.shape[0] < OVERLAP_MIN_ROWS or torch.cuda.is_current_stream_capturing():
        return None
    if routed_any_stream and enabled("routed_first"):
        return "routed_first"
    return "shared_beside" if enabled("shared_beside") else None


@functools.cache
def _side_stream(index: int, high_priority: bool) -> torch.cuda.Stream:
    return torch.cuda.Stream(device=index, priority=-1 if high_priority else 0)


def start_beside(fn, x: torch.Tensor, high_priority: bool = False):
    """Launch fn(x) on a side stream of x's device (high priority: its blocks are scheduled before those
    of the default-priority streams) once the current stream's work so far is done; returns a `join()`
    that makes the current stream wait for it and returns fn's result (a tensor or None).

    Memory: x is marked as used by the side stream and the result as used by the current stream, so the
    caching allocator reuses neither block before the other stream's work on it is done."""
    main = torch.cuda.current_stream(x.device)
    index = x.device.index if x.device.index is not None else torch.cuda.current_device()
    side = _side_stream(index, high_priority)
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
