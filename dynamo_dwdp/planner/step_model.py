"""Single-GPU step model: one forward step of this engine as the sum of named terms.

Each term is costed from measured, named microbenchmark records (`planner/calibrate.py`: kinds
`kernel`, `small_kernel`, `host_step`, plus the `hbm_copy` / `gemm` ceilings), not from one global
efficiency. A term with no record falls back to the roofline (max of FLOPs / GEMM rate and bytes / HBM
rate) and says so in its `source`. Every term carries the formula it used (`how`) and the records it
came from (`source`), so `dynamo-dwdp plan --explain` shows where the time goes.

Terms (L decoder layers, M of them MoE, T tokens in the step; decode: T sequences over `context`):
- routed_experts  (per MoE layer) up to FUSED_MAX_PAIRS (token, expert) pairs, the engine's fused
  decode kernel: weight bytes of the experts touched / the bandwidth `routed_experts` records reached
  at that token count (interpolated in log tokens, clamped at the ends); above it, the grouped GEMM:
  FLOPs / the rate of the `grouped_gemm` records (same interpolation). Experts touched: given
  (e.g. measured), else the uniform-routing expectation E(1 - (1 - k/E)^T).
- shared_experts, dense_mlp, attn_proj, lm_head  decode: each weight matrix through the
  `dense_linear` records of the nearest measured row count: t = t0 + bytes / bw, t0 and bw by least
  squares over those records (bw never above the HBM copy rate), and never below FLOPs / GEMM rate.
  Prefill: FLOPs / GEMM rate (the `gemm` ceiling), or bytes / HBM rate if larger. attn_proj holds
  q (or q_a + q_b), kv_a, o and, decode, the absorbed W_UK / W_UV products; prefill, the kv_b
  expansion of every context token.
- attention  decode: `mla_decode` records, time piecewise linear in the latent-cache bytes read
  (B x (context + 1) x (kv_lora + rope) x 2), the end segments extended; prefill: per sequence of S
  tokens, causal-pair FLOPs / the rate of the `prefill_attention` records at S (log interpolation).
- router, mla_prep  (per MoE / per decoder layer) time vs tokens, piecewise linear over their records.
- small_kernels  per decoder layer: sum of calls x time per call of the `small_kernel` records of the
  phase (decode: fixed; prefill: scaled by T / the record's tokens) + `layer_fixed`.
- host  `host_step` records of the phase, piecewise linear in tokens: step wall time not covered by
  GPU kernels (the records are taken from steps run one at a time). With `overlap_host` (the engine's
  async scheduling: the next step is prepared while this one runs) only what the host needs beyond
  the GPU terms is exposed: max(0, host - GPU).

Pure Python (no torch). Interpolation, not fitting to the step times this model is compared with.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from dynamo_dwdp.errors import UserError
from dynamo_dwdp.planner.calibrate import Calibration, KernelPoint
from dynamo_dwdp.planner.hardware import Hardware
from dynamo_dwdp.planner.roofline import (DTYPE_BYTES, PHASES, ModelShape, Precision, bytes_per_expert, matrix_bytes,
                                          touched_experts)

# (token, expert) pairs up to which the engine runs routed experts in the fused decode kernel
# (dynamo_dwdp/model/experts.py: SYNC_FREE_MAX_ROWS); larger batches take the grouped GEMM.
FUSED_MAX_PAIRS = 8192


@dataclass(frozen=True)
class Term:
    name: str
    ms: float
    how: str            # the formula with its numbers
    source: str         # the records used (file:line), or "roofline (no record)"

    def as_dict(self) -> dict:
        return {"ms": round(self.ms, 4), "how": self.how, "source": self.source}


@dataclass
class StepPrediction:
    phase: str
    tokens: float
    context: float
    sequences: float
    terms: list[Term] = field(default_factory=list)

    @property
    def total_ms(self) -> float:
        return sum(t.ms for t in self.terms)

    def term(self, name: str) -> Term:
        return next(t for t in self.terms if t.name == name)

    def as_dict(self) -> dict:
        return {"phase": self.phase, "tokens": self.tokens, "sequences": self.sequences, "context": self.context,
                "step_ms": round(self.total_ms, 4), "terms": {t.name: t.as_dict() for t in self.terms}}


# ------------------------------------------------------------------------------------------ interpolation
def interpolate(points: list[tuple[float, float]], x: float, *, log_x: bool = False, clamp: bool = False) -> float:
    """y at x through the (x, y) points: linear between neighbours (in log x if log_x); outside the
    measured range the end value (clamp) or the end segment extended; one point: its y. Points at
    the same x are averaged. Never below 0."""
    if not points:
        raise ValueError("no points")
    by_x: dict[float, list[float]] = {}
    for px, py in points:
        by_x.setdefault(float(px), []).append(float(py))
    pts = sorted((px, sum(v) / len(v)) for px, v in by_x.items())
    if len(pts) == 1:
        return max(0.0, pts[0][1])
    f = math.log if log_x else (lambda v: v)
    if clamp and x <= pts[0][0]:
        return max(0.0, pts[0][1])
    if clamp and x >= pts[-1][0]:
        return max(0.0, pts[-1][1])
    i = 1
    while i < len(pts) - 1 and x > pts[i][0]:
        i += 1
    (x0, y0), (x1, y1) = pts[i - 1], pts[i]
    y = y0 + (y1 - y0) * (f(x) - f(x0)) / (f(x1) - f(x0))
    return max(0.0, y)


def _where(points) -> str:
    """The records' places, lines of one file joined into ranges: "cal.jsonl:6-9,12"."""
    return where_ranges([p.where for p in points])


def where_ranges(wheres: list[str]) -> str:
    by_file: dict[str, list[int]] = {}
    for w in wheres:
        path, _, line = w.rpartition(":")
        by_file.setdefault(path, []).append(int(line)) if line.isdigit() else by_file.setdefault(w, [])
    parts = []
    for path, lines in by_file.items():
        runs, lines = [], sorted(set(lines))
        for n in lines:
            if runs and n == runs[-1][1] + 1:
                runs[-1][1] = n
            else:
                runs.append([n, n])
        spans = ",".join(f"{a}" if a == b else f"{a}-{b}" for a, b in runs)
        parts.append(f"{path}:{spans}" if spans else path)
    return "; ".join(parts)


# ------------------------------------------------------------------------------------------ the model
class _Costs:
    """Prices the parts of one step from a Calibration (and a Hardware for its ceilings)."""

    def __init__(self, hw: Hardware, cal: Calibration):
        self.hw, self.cal = hw, cal

    def records(self, op: str, dtype: str) -> list[KernelPoint]:
        return self.cal.kernels.get((op, dtype), [])

    def roofline_s(self, flops: float, nbytes: float, dtype: str) -> float:
        return max(flops / self.hw.flops_per_s(dtype), nbytes / self.hw.hbm_bytes_per_s)

    # one weight matrix [out, in] applied to `rows` rows: (seconds, how, records used)
    def linear(self, out_f: int, in_f: int, rows: float, dtype: str, block, phase: str):
        nbytes = matrix_bytes(out_f, in_f, dtype, block)
        flops = 2.0 * rows * out_f * in_f
        recs = self.records("dense_linear", dtype) if phase == "decode" else []
        if not recs:
            what = "FLOPs / GEMM ceiling" if phase == "prefill" else "roofline (no record)"
            return self.roofline_s(flops, nbytes + rows * (out_f + in_f) * 2.0, dtype), what, []
        near = min({p.tokens for p in recs}, key=lambda r: (abs(math.log(r) - math.log(max(rows, 1.0))), -r))
        pts = [p for p in recs if p.tokens == near]
        slope, t0 = _latency_bandwidth(pts, 1.0 / self.hw.hbm_bytes_per_s)
        how = f"{t0 * 1e6:.2f} us + bytes / {1 / slope / 1e9:,.0f} GB/s (dense_linear at {near:g} rows)"
        return max(t0 + nbytes * slope, flops / self.hw.flops_per_s(dtype)), how, pts

    def linears(self, mats, rows: float, dtype: str, block, phase: str):
        total, how, used = 0.0, set(), []
        for o, k in mats:
            s, w, pts = self.linear(o, k, rows, dtype, block, phase)
            total += s
            how.add(w)
            used += [p for p in pts if p not in used]
        return total, how, used

    def curve(self, op: str, dtype: str, tokens: float) -> tuple[float, list[KernelPoint]] | None:
        """router / mla_prep: seconds vs tokens, piecewise linear (end segments extended)."""
        recs = self.records(op, dtype)
        if not recs:
            return None
        return interpolate([(p.tokens, p.seconds) for p in recs], tokens), recs

    def rate(self, op: str, dtype: str, tokens: float) -> tuple[float, list[KernelPoint]] | None:
        """bytes/s or FLOP/s that `op`'s records reached, log-interpolated over tokens, clamped."""
        recs = self.records(op, dtype)
        if not recs:
            return None
        return interpolate([(p.tokens, p.size / p.seconds) for p in recs], tokens, log_x=True, clamp=True), recs


def _latency_bandwidth(pts: list[KernelPoint], min_slope: float) -> tuple[float, float]:
    """(seconds per byte, fixed seconds) of t = t0 + bytes * slope, least squares over the points;
    the slope never below min_slope (1 / HBM copy rate), t0 never below 0."""
    xs = [p.size for p in pts]
    ys = [p.seconds for p in pts]
    n = len(pts)
    mx, my = sum(xs) / n, sum(ys) / n
    var = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var if var > 0 else 0.0
    slope = max(slope, min_slope)
    return slope, max(0.0, my - slope * mx)


def predict_step(model: ModelShape, hw: Hardware, cal: Calibration | None = None, *, phase: str, tokens: float,
                 context: float = 0.0, batch: float = 1, weight_dtype: str | None = None,
                 dense_dtype: str | None = None, kv_dtype: str | None = None,
                 experts_touched: float | None = None, overlap_host: bool = False) -> StepPrediction:
    """One step on one GPU holding the whole model (strategy `single`).

    prefill: `tokens` fresh prompt tokens in `batch` sequences (context unused); decode: `tokens`
    sequences each adding one token over `context` cached tokens. experts_touched: routed experts
    read per MoE layer (default: the uniform-routing expectation). overlap_host: the host's work
    overlaps the GPU's (async scheduling), so the host term is only its excess over the GPU terms."""
    if phase not in PHASES:
        raise UserError(f"--phase {phase!r} not allowed; choose prefill or decode")
    if not tokens > 0:
        raise UserError(f"tokens per step must be > 0, got {tokens}")
    if phase == "prefill" and not 0 < batch <= tokens:
        raise UserError(f"--batch must be between 1 and the prefill tokens ({tokens:g}), got {batch}")
    if phase == "decode" and not context >= 0:
        raise UserError(f"decode needs --context >= 0 (cached tokens per sequence), got {context}")
    cal = cal or Calibration()
    c = _Costs(hw, cal)
    m = model
    prec = Precision.resolve(weight_dtype or m.checkpoint_dtype or "bf16", dense_dtype, None, kv_dtype)
    wd, dd = prec.weight, prec.dense
    T = float(tokens)
    seqs = float(batch) if phase == "prefill" else T
    L, M = m.num_hidden_layers, m.n_moe_layers
    D = L - M
    blk = m.fp8_block
    out = StepPrediction(phase, T, float(context) if phase == "decode" else T / seqs, seqs)
    add = out.terms.append

    # routed experts
    k, E = m.num_experts_per_tok, m.n_routed_experts
    bpe = bytes_per_expert(m, wd)
    flops_routed = 2.0 * m.expert_params * T * k
    u = experts_touched if experts_touched is not None else touched_experts(E, E, k, T)
    nbytes = u * bpe
    if T * k <= FUSED_MAX_PAIRS and (r := c.rate("routed_experts", wd, T)):
        s = max(nbytes / r[0], flops_routed / hw.flops_per_s(wd))
        how = f"{M} x {u:.1f} experts x {bpe / 1e6:.2f} MB / {r[0] / 1e9:,.0f} GB/s (fused kernel at {T:g} tokens)"
        src = _where(r[1])
    elif T * k > FUSED_MAX_PAIRS and (r := c.rate("grouped_gemm", wd, T)):
        s = max(flops_routed / r[0], nbytes / hw.hbm_bytes_per_s)
        how = f"{M} x {flops_routed / 1e9:,.1f} GFLOP / {r[0] / 1e12:,.0f} TFLOP/s (grouped GEMM at {T:g} tokens)"
        src = _where(r[1])
    else:
        s = c.roofline_s(flops_routed, nbytes, wd)
        how, src = f"{M} x max({flops_routed / 1e9:,.1f} GFLOP, {nbytes / 1e6:,.0f} MB) at the ceilings", \
            "roofline (no record)"
    # the engine's small decode batches run the shared experts inside the routed call (model/moe.py): priced
    # from the folded call's own records, up to the largest batch they cover
    folded = c.records("routed_shared_folded", wd) if phase == "decode" and m.n_shared_experts else []
    fold = bool(folded) and T <= max(p.tokens for p in folded)
    if fold:
        s = interpolate([(p.tokens, p.seconds) for p in folded], T)
        how = f"{M} x routed + shared experts in one call at {T:g} tokens (folded: {s * 1e6:.1f} us)"
        src = _where(folded)
    add(Term("routed_experts", M * s * 1e3, how, src))

    # dense matrices: shared experts, dense MLP, attention projections, lm_head
    h = m.hidden_size
    i_s = m.moe_intermediate_size * m.n_shared_experts
    mats = {
        "shared_experts": (M, [(2 * i_s, h), (h, i_s)], T, wd),
        "dense_mlp": (D, [(2 * m.intermediate_size, h), (h, m.intermediate_size)], T, dd),
    }
    heads = m.num_attention_heads
    proj = m.attention_matrices()
    if phase == "decode":              # absorbed MLA: W_UK and W_UV per head instead of expanding kv_b
        q, _kv_b, o = m.attention_head_matrices()
        proj = m.attention_latent_matrices() + [q, o, (heads * m.kv_lora_rank, m.qk_nope_head_dim),
                                                (heads * m.v_head_dim, m.kv_lora_rank)]
    mats["attn_proj"] = (L, proj, T, dd)   # prefill: kv_b expands every (fresh) context token
    mats["lm_head"] = (1, [(m.vocab_size, h)], seqs, "bf16")
    for name, (count, ms_, rows, dt) in mats.items():
        if name == "shared_experts" and fold:
            add(Term(name, 0.0, "folded into the routed call (routed_experts)", _where(folded)))
            continue
        s, how, used = c.linears(ms_, rows, dt, blk, phase)
        src = _where(used) if used else ("gemm ceiling" if phase == "prefill" else "roofline (no record)")
        shapes = " + ".join(f"{o}x{kk}" for o, kk in ms_)
        add(Term(name, count * s * 1e3, f"{count} x ({shapes}) {dt} at {rows:g} rows: {'; '.join(sorted(how))}",
                 src))

    # attention core
    lat = m.kv_lora_rank + m.qk_rope_head_dim
    if phase == "decode":
        cache = T * (context + 1.0) * lat * DTYPE_BYTES[prec.kv]
        recs = c.records("mla_decode", prec.kv)
        if recs:
            s = interpolate([(p.size, p.seconds) for p in recs], cache)
            how, src = f"{L} x mla_decode at {cache / 1e6:,.1f} MB of cache", _where(recs)
        else:
            fl = T * 2.0 * heads * (lat + m.kv_lora_rank) * (context + 1.0)
            s, how, src = c.roofline_s(fl, cache, prec.attn), f"{L} x roofline over {cache / 1e6:,.1f} MB", \
                "roofline (no record)"
    else:
        S = T / seqs
        fl = seqs * 2.0 * heads * (m.qk_head_dim + m.v_head_dim) * S * (S + 1) / 2.0
        r = c.rate("prefill_attention", prec.attn, S)
        if r:
            s, how, src = fl / r[0], f"{L} x {fl / 1e12:.3f} TFLOP / {r[0] / 1e12:,.0f} TFLOP/s at {S:g} tokens", \
                _where(r[1])
        else:
            s = c.roofline_s(fl, 0.0, prec.attn)
            how, src = f"{L} x {fl / 1e12:.3f} TFLOP at the GEMM ceiling", "roofline (no record)"
    add(Term("attention", L * s * 1e3, how, src))

    # router (per MoE layer) and MLA prep (per layer)
    got = c.curve("router", "bf16", T)
    if got:
        add(Term("router", M * got[0] * 1e3, f"{M} x router at {T:g} tokens", _where(got[1])))
    else:
        s = c.roofline_s(2.0 * T * h * E, E * h * 4.0 + T * (h * 2.0 + E * 4.0), "bf16")
        add(Term("router", M * s * 1e3, f"{M} x roofline", "roofline (no record)"))
    got = c.curve("mla_prep", "bf16", T)
    if got:
        add(Term("mla_prep", L * got[0] * 1e3, f"{L} x kv_a norm + rope + cache write at {T:g} tokens",
                 _where(got[1])))
    else:
        add(Term("mla_prep", 0.0, "not modelled without a record", "none"))

    # small kernels + layer_fixed, per decoder layer
    smalls = cal.small_kernels.get(phase, [])
    per_layer = sum(sk.calls_per_layer * sk.seconds * (T / sk.tokens if phase == "prefill" else 1.0)
                    for sk in smalls) + cal.layer_fixed_s
    names = ", ".join(f"{sk.name} {sk.calls_per_layer:.3g}x{sk.seconds * 1e6:.3g}us" for sk in smalls)
    src = _where(smalls) + (f"; layer_fixed {cal.layer_fixed_s * 1e6:.3g} us" if cal.layer_fixed_s else "")
    add(Term("small_kernels", L * per_layer * 1e3,
             f"{L} x {per_layer * 1e6:.2f} us" + (f" ({names})" if names else ""), src or "none"))

    # host time of the step
    hs = cal.host_steps.get(phase, [])
    if hs:
        s = interpolate([(tk, sec) for tk, sec, _ in hs], T)
        where = where_ranges([w for _, _, w in hs])
        if overlap_host:
            gpu = sum(t.ms for t in out.terms)
            add(Term("host", max(0.0, s * 1e3 - gpu), f"host_step at {T:g} tokens ({s * 1e3:.3f} ms) overlapped "
                                                      f"with {gpu:.3f} ms of GPU terms (async scheduling)", where))
        else:
            add(Term("host", s * 1e3, f"host_step at {T:g} tokens", where))
    else:
        add(Term("host", 0.0, "not modelled without a record", "none"))
    return out


def render_terms(pred: StepPrediction) -> str:
    """A table of the step's terms (for `plan --explain`)."""
    total = pred.total_ms
    what = (f"decode: {pred.tokens:g} sequences over {pred.context:g} cached tokens" if pred.phase == "decode"
            else f"prefill: {pred.tokens:g} tokens in {pred.sequences:g} sequence(s)")
    lines = [f"single-GPU step, {what}: {total:.3f} ms"]
    for t in pred.terms:
        share = 100.0 * t.ms / total if total > 0 else 0.0
        lines.append(f"  {t.name:<15} {t.ms:9.3f} ms {share:5.1f}%  {t.how}  [{t.source}]")
    return "\n".join(lines)
