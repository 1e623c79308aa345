"""`dynamo-dwdp plan --recommend`: a deployment answer per pool (prefill, decode) from the roofline.

Question: for a model, GPU kind, group size N, memory and workload (ISL/OSL and a concurrency or a
TPS/user target), which strategy should each pool run, with which DWDP placement
(`experts_per_rank` L, `prefetch_per_peer` P, E = L + (N-1)·P), and what throughput to expect.

Model (policy on top of `planner.roofline.plan_layer`, which prices one MoE layer per rank):
- prefill pool: every rank runs floor(max_num_tokens / ISL) whole prompts per iteration (at least
  one; a longer prompt runs in max_num_tokens chunks), with per-rank imbalance `imbalance_cv`;
- decode pool: B sequences per rank over a context of ISL + OSL/2 tokens; B = ceil(concurrency / N),
  or with a TPS/user target the largest power-of-two B whose predicted TPS/user meets it;
- a step costs n_moe_layers · (the layer's roofline time + its collective latency floors: DEP one
  dispatch+combine, TP two all-reduces) + num_hidden_layers · layer_fixed; the floors and the fixed
  cost are 0 unless measured (`--calibrate`); dense layers' compute is not modelled (3 of 61 in V3);
- DWDP placements: every P from floor(E/N) down to 1 (L = E − (N−1)·P); more local experts (larger
  L) mean fewer pulled per layer (less exposed prefetch) and more memory. The pick is the fastest
  placement that fits in memory, and among those within 1% of it the one with the least memory
  (when none fits, the one that needs the least, and the reason says that nothing fits);
- throughput: prefill TPS/GPU = prompt tokens per rank per second; decode TPS/GPU = B / step,
  TPS/user = 1 / step. A strategy that fits in no memory is never recommended while another fits.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from dynamo_dwdp.planner.calibrate import Calibration
from dynamo_dwdp.planner.hardware import Hardware
from dynamo_dwdp.planner.roofline import STRATEGIES, ModelShape, plan_layer
from dynamo_dwdp.errors import UserError

DECODE_BATCHES = tuple(2 ** i for i in range(10))          # 1 .. 512 sequences per rank
NEAR_BEST = 1.01


@dataclass
class Workload:
    isl: int
    osl: int
    concurrency: int | None = None
    tps_per_user: float | None = None
    max_num_tokens: int = 32768                 # prefill tokens per rank per iteration (the paper's MNT)
    imbalance_cv: float = 0.2

    def validate(self) -> "Workload":
        for name in ("isl", "osl", "max_num_tokens"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise UserError(f"--{name.replace('_', '-')} must be an integer >= 1, got {v!r}")
        if self.concurrency is None and self.tps_per_user is None:
            raise UserError("--recommend needs --concurrency C or --tps-per-user R for the decode pool")
        if self.concurrency is not None and self.concurrency < 1:
            raise UserError(f"--concurrency must be >= 1, got {self.concurrency}")
        if self.tps_per_user is not None and not self.tps_per_user > 0:
            raise UserError(f"--tps-per-user must be > 0, got {self.tps_per_user}")
        if self.imbalance_cv < 0:
            raise UserError(f"--imbalance-cv must be >= 0, got {self.imbalance_cv}")
        return self


def _placements(experts: int, ranks: int) -> list[tuple[int, int]]:
    return [(experts - (ranks - 1) * p, p) for p in range(experts // ranks, 0, -1)]


def _option(model, hw, cal, ranks, tokens, phase, *, batch=1, context=None, weight_dtype, cv, strategy,
            placement=None) -> dict:
    kw = dict(phase=phase, context=context, imbalance_cv=cv)
    if placement is not None:
        kw.update(experts_per_rank=placement[0], prefetch_per_peer=placement[1])
    p = plan_layer(model, hw, ranks, tokens, batch, weight_dtype, **kw)
    cost = {"dwdp": p.dwdp, "dep": p.dep, "tp": p.tp}[strategy]
    floor = {"dwdp": 0.0, "dep": cal.dispatch_combine_floor_s, "tp": 2 * cal.all_reduce_floor_s}[strategy]
    layer_ms = cost.t_total_ms + floor * 1e3
    step_ms = model.n_moe_layers * layer_ms + model.num_hidden_layers * cal.layer_fixed_s * 1e3
    e, n = model.n_routed_experts, ranks
    local = {"dwdp": p.placement.experts_per_rank, "dep": math.ceil(e / n), "tp": e}[strategy]
    out = {
        "strategy": strategy,
        "experts_per_rank": local,
        "prefetch_per_peer": p.placement.prefetch_per_peer if strategy == "dwdp" else None,
        "step_ms": round(step_ms, 4),
        "layer_ms": round(layer_ms, 4),
        "memory_gib": cost.memory.as_dict() if cost.memory else None,
        "fits": cost.memory is None or cost.memory.fits,
    }
    if strategy == "dwdp":
        out["exposed_prefetch_ms_per_layer"] = round(cost.extra["t_exposed_ms"], 4)
        out["prefetch_ms_per_layer"] = round(cost.extra["t_prefetch_ms"], 4)
        out["compute_ms_per_layer"] = round(cost.t_compute_ms, 4)
    if strategy == "dep":
        out["sync_ms_per_layer"] = round(cost.extra["t_sync_ms"], 4)
        out["all_to_all_ms_per_layer"] = round(cost.extra["t_all_to_all_ms"], 4)
    return out


def _best_dwdp(options: list[dict]) -> dict:
    fitting = [o for o in options if o["fits"]]
    if not fitting:                                  # none fits: the placement that needs the least memory
        return min(options, key=lambda o: o["memory_gib"]["total"] if o["memory_gib"] else 0.0)
    fastest = min(o["step_ms"] for o in fitting)
    near = [o for o in fitting if o["step_ms"] <= fastest * NEAR_BEST]
    return min(near, key=lambda o: (o["memory_gib"]["total"] if o["memory_gib"] else 0.0, o["step_ms"]))


def _pool(model, hw, cal, ranks, tokens, phase, *, batch=1, context=None, weight_dtype, cv) -> dict[str, dict]:
    common = dict(batch=batch, context=context, weight_dtype=weight_dtype, cv=cv)
    opts = {s: _option(model, hw, cal, ranks, tokens, phase, strategy=s, **common) for s in ("dep", "tp")}
    opts["dwdp"] = _best_dwdp([_option(model, hw, cal, ranks, tokens, phase, strategy="dwdp", placement=pl, **common)
                               for pl in _placements(model.n_routed_experts, ranks)])
    return opts


def _winner(opts: dict[str, dict], score) -> str:
    """The best-scoring strategy that fits; when none fits, the one that needs the least memory."""
    fitting = [s for s in STRATEGIES if opts[s]["fits"]]
    if not fitting:
        return min(STRATEGIES, key=lambda s: opts[s]["memory_gib"]["total"] if opts[s]["memory_gib"] else 0.0)
    return max(fitting, key=lambda s: score(opts[s]))


def recommend(model: ModelShape, hw: Hardware, ranks: int, work: Workload, *, weight_dtype: str | None = None,
              calibration: Calibration | None = None) -> dict:
    work.validate()
    if ranks < 2:
        raise UserError(f"--ranks must be >= 2 for a recommendation between DWDP, DEP and TP, got {ranks}")
    cal = calibration or Calibration()
    cv = work.imbalance_cv

    seqs = max(1, work.max_num_tokens // work.isl)
    tokens = seqs * work.isl if work.isl <= work.max_num_tokens else work.max_num_tokens
    pre = _pool(model, hw, cal, ranks, tokens, "prefill", batch=seqs if work.isl <= work.max_num_tokens else 1,
                weight_dtype=weight_dtype, cv=cv)
    for o in pre.values():
        o["predicted_tps_per_gpu"] = round(tokens / (o["step_ms"] / 1e3), 1)
    pw = _winner(pre, lambda o: o["predicted_tps_per_gpu"])

    context = work.isl + work.osl / 2
    if work.concurrency is not None:
        b = math.ceil(work.concurrency / ranks)
        dec = _pool(model, hw, cal, ranks, b, "decode", context=context, weight_dtype=weight_dtype, cv=cv)
        for o in dec.values():
            o["batch_per_rank"] = b
    else:
        dec = {}
        for b in DECODE_BATCHES:
            trial = _pool(model, hw, cal, ranks, b, "decode", context=context, weight_dtype=weight_dtype, cv=cv)
            for s, o in trial.items():
                if 1e3 / o["step_ms"] >= work.tps_per_user and (o["fits"] or s not in dec):
                    o["batch_per_rank"] = b
                    dec[s] = o
        missing = [s for s in STRATEGIES if s not in dec]
        if len(missing) == len(STRATEGIES):
            raise UserError(f"--tps-per-user {work.tps_per_user:g}: no strategy reaches it even at one sequence "
                            f"per rank")
        for s in missing:                     # cannot meet the target: listed, never recommended
            o = _pool(model, hw, cal, ranks, 1, "decode", context=context, weight_dtype=weight_dtype, cv=cv)[s]
            o.update(batch_per_rank=1, fits=False, misses_target=True)
            dec[s] = o
    for o in dec.values():
        o["predicted_tps_per_gpu"] = round(o["batch_per_rank"] / (o["step_ms"] / 1e3), 1)
        o["predicted_tps_per_user"] = round(1e3 / o["step_ms"], 2)
    dw = _winner(dec, lambda o: o["predicted_tps_per_gpu"])

    pools = {"prefill": {**pre[pw], "tokens_per_iter": tokens, "sequences_per_iter": seqs,
                         "alternatives": {s: pre[s] for s in STRATEGIES if s != pw}},
             "decode": {**dec[dw], "context": context,
                        "alternatives": {s: dec[s] for s in STRATEGIES if s != dw}}}
    return {"pools": pools, "reason": _reason(pools, ranks, model, cal),
            "inputs": {"ranks": ranks, "isl": work.isl, "osl": work.osl, "concurrency": work.concurrency,
                       "tps_per_user": work.tps_per_user, "max_num_tokens": work.max_num_tokens,
                       "imbalance_cv": cv, "weight_dtype": weight_dtype or model.checkpoint_dtype or "bf16"},
            "hardware": hw.as_dict(), "calibration": cal.as_dict()}


def _why(pool: str, chosen: dict, alts: dict) -> str:
    if not chosen["fits"] and not any(v["fits"] for v in alts.values()):
        mem = chosen["memory_gib"] or {}
        return (f"{pool.capitalize()}: nothing fits in memory (the least is {chosen['strategy'].upper()}, "
                f"{mem.get('total', 0):.1f} of {mem.get('usable', 0):.1f} GiB usable per GPU): use more GPUs per "
                f"group or a smaller weight format; the figures are for comparison only.")
    s = chosen["strategy"]
    rivals = ", ".join(f"{k.upper()} {v['predicted_tps_per_gpu']:,.0f}" + ("" if v["fits"] else " (does not fit)")
                       for k, v in alts.items())
    head = f"{pool.capitalize()}: {s.upper()} at {chosen['predicted_tps_per_gpu']:,.0f} tok/s/GPU (vs {rivals})"
    d = alts.get("dwdp") if s != "dwdp" else chosen
    if s == "dwdp":
        cause = (f"each layer's {d['compute_ms_per_layer']:.3g} ms of compute hides the {d['prefetch_ms_per_layer']:.3g} ms "
                 f"pull of the remote experts" if d["exposed_prefetch_ms_per_layer"] == 0 else
                 f"its {d['exposed_prefetch_ms_per_layer']:.3g} ms of exposed pull per layer still costs less than "
                 f"DEP's all-to-all and the sync wait that per-rank imbalance puts on every layer")
        return (f"{head}: {cause}; with L={d['experts_per_rank']} local experts and P={d['prefetch_per_peer']} "
                f"pulled from each peer it needs {d['memory_gib']['total']:.1f} of {d['memory_gib']['usable']:.1f} GiB.")
    if d["exposed_prefetch_ms_per_layer"] > 0:
        cause = (f"DWDP would pull {d['prefetch_ms_per_layer']:.3g} ms of remote experts per layer against only "
                 f"{d['compute_ms_per_layer']:.3g} ms of compute ({d['exposed_prefetch_ms_per_layer']:.3g} ms exposed)")
    else:
        cause = (f"DWDP hides its pull, but each of its ranks reads every expert's weights for its own tokens "
                 f"({d['layer_ms']:.3g} ms per MoE layer against {s.upper()}'s {chosen['layer_ms']:.3g} ms with "
                 f"its collectives)")
    if not d["fits"]:
        mem = d["memory_gib"]
        cause = (f"DWDP does not fit in memory here ({mem['total']:.1f} of {mem['usable']:.1f} GiB usable: "
                 f"experts {mem['local_experts'] + mem['prefetch_slots']:.1f}, KV {mem['kv']:.1f})")
    return f"{head}: {cause}."


def _reason(pools: dict, ranks: int, model: ModelShape, cal: Calibration) -> str:
    parts = [_why(name, p, p["alternatives"]) for name, p in pools.items()]
    if cal.sources:
        parts.append("Rates and latency floors from measurements (" + ", ".join(sorted(cal.sources)) + ")"
                     + (", some taken with ranks sharing one GPU (upper bounds)" if cal.shared_gpu else "") + ".")
    else:
        parts.append("Rates are datasheet peaks times fixed efficiencies (no --calibrate).")
    return " ".join(parts)
