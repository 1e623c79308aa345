"""`dynamo-dwdp plan --calibrate BENCH.jsonl`: replace the planner's datasheet constants with measured ones.

Input: JSON lines, one measurement each (scripts/gpu_perf.py and scripts/gpu_collectives.py write them
to $OUT/calibration.jsonl; scripts/build_calibration.py builds the kernel records from result files; any
tool may):

  {"measure": "hbm_copy",  "bytes_per_s": 4.2e12}                      device copy, read + written
  {"measure": "gemm",      "dtype": "bf16", "flops_per_s": 7.5e14}     a large GEMM of that dtype
  {"measure": "peer_pull", "bytes_per_s": 3.86e11}                     one direction, large copy
  {"measure": "collective", "op": "all_reduce" | "dispatch_combine", "bytes": 14336, "seconds": 1.2e-5}
  {"measure": "layer_fixed", "seconds": 2.0e-5}                        per-layer cost outside the roofline
                                                                       (norms, launches, small kernels)

Kernel records, for the single-GPU step model (`planner/step_model.py`; one named microbenchmark each):

  {"measure": "kernel", "op": OP, "dtype": "bf16", "tokens": 64, "bytes": 1.1e9, "seconds": 2.7e-4}
      one call of a kernel family at a size; `tokens` is the rows of the call (decode: the batch;
      prefill attention: the sequence length). Which of "bytes" / "flops" an op needs (KERNEL_OPS):
      routed_experts (bytes: weights of the experts touched), grouped_gemm (flops), mla_decode
      (bytes: latent cache read), dense_linear (bytes: the weight matrix), prefill_attention (flops
      over the causal pairs of one sequence), router and mla_prep (neither: time per MoE / decoder
      layer), routed_shared_folded (neither: one MoE layer's routed and shared experts in one call, the
      engine's small-batch decode path; its records' largest `tokens` is the largest batch it prices).
      "dtype" defaults to bf16.
  {"measure": "small_kernel", "phase": "decode", "name": "rms_norm", "calls_per_layer": 2.04,
   "seconds": 3.5e-6, "tokens": 64}
      a kernel the named terms do not cover: calls per decoder layer x time per call. Decode: a fixed
      cost (latency-bound at decode sizes). Prefill: "tokens" is required and the time per call
      scales with the step's tokens / tokens (bandwidth-bound over per-token activations).
  {"measure": "host_step", "phase": "decode", "tokens": 64, "seconds": 1.1e-3}
      wall time of one step not covered by GPU kernels (host work in `execute`, gaps between
      kernels), at a batch (decode) or prompt length (prefill); interpolated over tokens.
Optional on every line: "shared_gpu": true (two ranks time-sliced one GPU: latencies are an upper
bound, not an interconnect figure), "source": "free text".

Result: a `Hardware` whose measured rates carry efficiency 1.0 (achieved numbers, like the
`*-measured` machines), and a `Calibration` with the latency floors the roofline does not have:
a collective's floor is its fastest measurement at the smallest size measured (what a decode-sized
message costs however small), the per-layer fixed cost the median of its measurements. Each figure
keeps the lines it came from. Bad input: a `UserError` naming the file, line and field.
"""
from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field, replace

from dynamo_dwdp.planner.hardware import DTYPES, Hardware
from dynamo_dwdp.errors import UserError

MEASURES = ("hbm_copy", "gemm", "peer_pull", "collective", "layer_fixed", "kernel", "small_kernel", "host_step")
COLLECTIVE_OPS = ("all_reduce", "dispatch_combine")
# kernel op -> the size field it needs besides tokens and seconds (None: time alone)
KERNEL_OPS = {"routed_experts": "bytes", "grouped_gemm": "flops", "mla_decode": "bytes", "dense_linear": "bytes",
              "prefill_attention": "flops", "router": None, "mla_prep": None, "routed_shared_folded": None}
STEP_PHASES = ("prefill", "decode")


@dataclass(frozen=True)
class KernelPoint:
    """One timed call of a kernel family (a `kernel` record)."""
    tokens: float
    size: float | None          # bytes or flops (KERNEL_OPS), None for router / mla_prep
    seconds: float
    where: str


@dataclass(frozen=True)
class SmallKernel:
    """A kernel outside the named terms (a `small_kernel` record)."""
    name: str
    calls_per_layer: float
    seconds: float              # per call, at `tokens` (prefill: scales with tokens)
    tokens: float | None
    where: str


@dataclass
class Calibration:
    all_reduce_floor_s: float = 0.0              # one all-reduce of a decode-sized message
    dispatch_combine_floor_s: float = 0.0        # one DEP dispatch + combine
    layer_fixed_s: float = 0.0                   # per decoder layer, every strategy
    shared_gpu: bool = False                     # some figure came from ranks sharing one GPU
    sources: dict[str, list[str]] = field(default_factory=dict)
    # the step model's records: (op, dtype) -> points; phase -> small kernels; phase -> (tokens, s, where)
    kernels: dict[tuple[str, str], list[KernelPoint]] = field(default_factory=dict)
    small_kernels: dict[str, list[SmallKernel]] = field(default_factory=dict)
    host_steps: dict[str, list[tuple[float, float, str]]] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"all_reduce_floor_us": round(self.all_reduce_floor_s * 1e6, 2),
                "dispatch_combine_floor_us": round(self.dispatch_combine_floor_s * 1e6, 2),
                "layer_fixed_us": round(self.layer_fixed_s * 1e6, 2), "shared_gpu": self.shared_gpu,
                "sources": self.sources,
                "kernel_records": {f"{op}/{d}": len(v) for (op, d), v in sorted(self.kernels.items())},
                "small_kernel_records": {ph: len(v) for ph, v in sorted(self.small_kernels.items())},
                "host_step_records": {ph: len(v) for ph, v in sorted(self.host_steps.items())}}


def _positive(rec: dict, key: str, where: str) -> float:
    v = rec.get(key)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
        raise UserError(f"{where}: field {key!r} must be a number > 0, got {v!r}")
    return float(v)


def _choice(rec: dict, key: str, allowed, where: str, default=None):
    v = rec.get(key, default)
    if v not in allowed:
        raise UserError(f"{where}: field {key!r} must be one of {', '.join(allowed)}, got {v!r}")
    return v


COMMON_FIELDS = {"measure", "source", "shared_gpu"}
FIELDS = {"kernel": {"op", "dtype", "tokens", "bytes", "flops", "seconds"},
          "small_kernel": {"phase", "name", "calls_per_layer", "seconds", "tokens"},
          "host_step": {"phase", "tokens", "seconds"}}


def _no_unknown_fields(rec: dict, where: str) -> None:
    """The step model's record kinds take only their own fields (a misspelt one is an error, not ignored)."""
    extra = sorted(set(rec) - COMMON_FIELDS - FIELDS[rec["measure"]])
    if extra:
        raise UserError(f"{where}: unknown field {extra[0]!r} for measure {rec['measure']!r} "
                        f"(allowed: {', '.join(sorted(FIELDS[rec['measure']] | COMMON_FIELDS))})")


def _kernel(rec: dict, where: str, cal: Calibration) -> None:
    op = _choice(rec, "op", tuple(KERNEL_OPS), where)
    dtype = _choice(rec, "dtype", DTYPES, where, default="bf16")
    need = KERNEL_OPS[op]
    size = _positive(rec, need, where) if need else None
    point = KernelPoint(_positive(rec, "tokens", where), size, _positive(rec, "seconds", where), where)
    cal.kernels.setdefault((op, dtype), []).append(point)


def _small_kernel(rec: dict, where: str, cal: Calibration) -> None:
    phase = _choice(rec, "phase", STEP_PHASES, where)
    name = rec.get("name")
    if not isinstance(name, str) or not name.strip():
        raise UserError(f"{where}: field 'name' must be a non-empty string, got {name!r}")
    tokens = _positive(rec, "tokens", where) if phase == "prefill" or "tokens" in rec else None
    cal.small_kernels.setdefault(phase, []).append(
        SmallKernel(name, _positive(rec, "calls_per_layer", where), _positive(rec, "seconds", where), tokens, where))


def _host_step(rec: dict, where: str, cal: Calibration) -> None:
    phase = _choice(rec, "phase", STEP_PHASES, where)
    cal.host_steps.setdefault(phase, []).append((_positive(rec, "tokens", where), _positive(rec, "seconds", where),
                                                 where))


def read_records(path: str) -> list[tuple[str, dict]]:
    """[(where, record)] of a calibration JSONL file; UserError naming the line that is wrong."""
    try:
        f = open(path, encoding="utf-8")
    except OSError as exc:
        raise UserError(f"--calibrate {path}: cannot read ({exc.strerror or exc})") from None
    out = []
    with f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{i}"
            try:
                rec = json.loads(line)
            except ValueError as exc:
                raise UserError(f"{where}: not valid JSON ({exc})") from None
            if not isinstance(rec, dict) or rec.get("measure") not in MEASURES:
                got = rec.get("measure") if isinstance(rec, dict) else rec
                raise UserError(f"{where}: field 'measure' must be one of {', '.join(MEASURES)}, got {got!r}")
            out.append((where, rec))
    if not out:
        raise UserError(f"--calibrate {path}: no measurements in the file")
    return out


def calibrate(hw: Hardware, records: list[tuple[str, dict]]) -> tuple[Hardware, Calibration]:
    cal = Calibration()
    hbm, link, gemm, floors, fixed = [], [], {}, {op: [] for op in COLLECTIVE_OPS}, []
    for where, rec in records:
        m = rec["measure"]
        cal.shared_gpu |= bool(rec.get("shared_gpu"))
        if m == "hbm_copy":
            hbm.append((_positive(rec, "bytes_per_s", where), where))
        elif m == "peer_pull":
            link.append((_positive(rec, "bytes_per_s", where), where))
        elif m == "gemm":
            d = rec.get("dtype")
            if d not in DTYPES:
                raise UserError(f"{where}: field 'dtype' must be one of {', '.join(DTYPES)}, got {d!r}")
            gemm.setdefault(d, []).append((_positive(rec, "flops_per_s", where), where))
        elif m == "collective":
            op = rec.get("op")
            if op not in COLLECTIVE_OPS:
                raise UserError(f"{where}: field 'op' must be one of {', '.join(COLLECTIVE_OPS)}, got {op!r}")
            floors[op].append((_positive(rec, "bytes", where), _positive(rec, "seconds", where), where))
        elif m in FIELDS:
            _no_unknown_fields(rec, where)
            {"kernel": _kernel, "small_kernel": _small_kernel, "host_step": _host_step}[m](rec, where, cal)
        else:
            fixed.append((_positive(rec, "seconds", where), where))
    changes = {}
    if hbm:
        best = max(hbm)                                   # the best achieved copy is the ceiling
        changes.update(hbm_tbps=best[0] / 1e12, hbm_efficiency=1.0)
        cal.sources["hbm"] = [best[1]]
    if link:
        best = max(link)
        changes.update(link_gbps=best[0] / 1e9, link_efficiency=1.0)
        cal.sources["peer_link"] = [best[1]]
    if gemm:
        # measured dtypes as achieved rates; the others keep datasheet x efficiency, folded in so that
        # one efficiency of 1.0 serves all
        tflops = {d: v * hw.math_efficiency for d, v in hw.dense_tflops.items()}
        for d, vals in gemm.items():
            best = max(vals)
            tflops[d] = best[0] / 1e12
            cal.sources[f"gemm_{d}"] = [best[1]]
        changes.update(dense_tflops=tflops, math_efficiency=1.0)
    for op, vals in floors.items():
        if vals:
            smallest = min(b for b, _, _ in vals)
            at = [(s, w) for b, s, w in vals if b == smallest]
            best = min(at)
            setattr(cal, f"{op}_floor_s", best[0])
            cal.sources[op] = [best[1]]
    if fixed:
        cal.layer_fixed_s = statistics.median(v for v, _ in fixed)
        cal.sources["layer_fixed"] = [w for _, w in fixed]
    out = replace(hw, name=f"{hw.name}+calibrated", **changes) if changes else hw
    if changes:
        out = replace(out, sources=tuple(out.sources) + tuple(f"calibrated: {k} from {', '.join(v)}"
                                                              for k, v in cal.sources.items()))
    return out, cal


def load_calibration(hw: Hardware, path: str) -> tuple[Hardware, Calibration]:
    return calibrate(hw, read_records(path))
