"""The standard engine-benchmark matrix (`dynamo-dwdp bench matrix`) and the results table (`bench table`).

Matrix: strategies {dwdp, dep, tp} x phases {prefill at each --prefill-tokens per rank, decode at each
--decode-batches over --context} x imbalance {--imbalance, default 0 and 0.2}, plus for dwdp the
contention_opt variant (every point; N > 2 only: with a single peer the executor has nothing to
interleave, so it would repeat the plain run) and the routed-only variant (decode points). Points of the same
launch setup (strategy + options) run in one group launch (the model loads once); every finished
point is appended to the JSONL and a markdown table is rewritten next to it (same name, `.md`).
Resumable: a point whose key (`engine_bench.point_key`) is already in the JSONL is not run again.
Any N >= 2 works (DWDP placement, DEP ownership and TP sharding all follow N).
`--quick`: a CPU smoke (the tiny preset written to a temporary folder unless --model is given;
QUICK shapes: 2 prefill sizes, 2 decode batches, 2 steps, unless given explicitly).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, replace
from typing import Callable

from dynamo_dwdp.bench.engine_bench import (STRATEGIES, BenchSetup, Point, _model_info, append_jsonl, check_fits,
                                            describe_load, point_key, run_points, setup_dict)
from dynamo_dwdp.config.dwdp import DwdpSettings
from dynamo_dwdp.errors import PeerError, UserError
from dynamo_dwdp.model.config import load_model_config
from dynamo_dwdp.strategies import GROUP_STRATEGIES

DEFAULT_PREFILL = (2048, 4096, 8192, 16384)
DEFAULT_DECODE = (8, 32, 64, 128)
DEFAULT_IMBALANCE = (0.0, 0.2)
DEFAULT_STRATEGIES = GROUP_STRATEGIES
STANDARD = dict(device="cuda", dtype="bfloat16", prefill_tokens=DEFAULT_PREFILL, decode_batches=DEFAULT_DECODE,
                context=4096, steps=10, warmup=3)
QUICK = dict(device="cpu", dtype="float32", prefill_tokens=(16, 32), decode_batches=(2, 4), context=8, steps=2,
             warmup=1)


@dataclass
class MatrixSpec:
    """None = the standard value (or, with quick, the QUICK value); see `resolved`."""

    model_dir: str | None
    ranks: int
    device: str | None = None
    dtype: str | None = None
    strategies: tuple[str, ...] = DEFAULT_STRATEGIES
    prefill_tokens: tuple[int, ...] | None = None
    prefill_batch: int = 1
    decode_batches: tuple[int, ...] | None = None
    context: int | None = None
    imbalance: tuple[float, ...] = DEFAULT_IMBALANCE
    steps: int | None = None
    warmup: int | None = None
    seed: int = 0
    hw: str = "h200-measured"
    expert_skew: tuple[int, float] | None = None
    out: str | None = None
    quick: bool = False
    cuda_graphs: bool = False                # decode steps from CUDA graphs (every strategy that allows it)

    def resolved(self) -> "MatrixSpec":
        """Fill the unset fields: standard GPU matrix, or the CPU smoke shapes with quick."""
        std = QUICK if self.quick else STANDARD
        return replace(self, **{k: (std[k] if getattr(self, k) is None else getattr(self, k)) for k in std})

    def validate(self) -> "MatrixSpec":
        if self.ranks < 2:
            raise UserError(f"bench matrix: --ranks must be >= 2 (dwdp/dep/tp groups), got {self.ranks}")
        bad = [s for s in self.strategies if s not in STRATEGIES]
        if bad or not self.strategies:
            raise UserError(f"--strategies {','.join(self.strategies)!r}: allowed {', '.join(STRATEGIES)}")
        if not self.prefill_tokens and not self.decode_batches:
            raise UserError("bench matrix: nothing to run (no --prefill-tokens and no --decode-batches)")
        if self.quick and self.device != "cpu":
            raise UserError("bench matrix --quick is the CPU smoke: leave out --device or use --device cpu")
        return self


def matrix_plan(spec: MatrixSpec, model_dir: str) -> list[tuple[BenchSetup, list[Point]]]:
    """[(launch setup, its points)] in run order."""
    spec = spec.resolved()
    plan = []
    base = dict(model_dir=model_dir, ranks=spec.ranks, device=spec.device, dtype=spec.dtype, hw=spec.hw,
                expert_skew=spec.expert_skew, cuda_graphs=spec.cuda_graphs)
    common = dict(steps=spec.steps, warmup=spec.warmup, seed=spec.seed)
    prefill = [Point("prefill", t, spec.prefill_batch, 0, cv, **common)
               for cv in spec.imbalance for t in spec.prefill_tokens]
    decode = [Point("decode", b, b, spec.context, cv, **common) for cv in spec.imbalance for b in spec.decode_batches]
    for strategy in spec.strategies:
        plan.append((BenchSetup(strategy=strategy, **base), prefill + decode))
        if strategy == "dwdp":
            if spec.ranks > 2:              # with one peer there is nothing to interleave: same as off
                plan.append((BenchSetup(strategy=strategy, dwdp=DwdpSettings(contention_opt=True), **base), prefill + decode))
            if decode:
                plan.append((BenchSetup(strategy=strategy, dwdp=DwdpSettings(routed_only=True), **base), decode))
    return [(s, pts) for s, pts in plan if pts]


def load_jsonl(path: str) -> list[dict]:
    """Result objects of a JSONL file; UserError naming the line that is not JSON."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such results file")
    rows = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as exc:
                raise UserError(f"{path}:{i}: not valid JSON ({exc})") from None
            if not isinstance(row, dict) or "setup" not in row or "step_ms" not in row:
                raise UserError(f"{path}:{i}: not a bench engine result (needs 'setup' and 'step_ms')")
            rows.append(row)
    return rows


def default_out(spec: MatrixSpec) -> str:
    tag = "quick" if spec.quick else f"n{spec.ranks}-{spec.device}"
    return os.path.join("out", "bench", f"engine-matrix-{tag}.jsonl")


def run_matrix(spec: MatrixSpec, progress: Callable[[str], None] = print) -> tuple[str, str, int]:
    """Run the missing points. Returns (jsonl path, markdown path, points run now)."""
    spec = spec.resolved().validate()
    tmp = None
    model_dir = spec.model_dir
    if spec.quick:
        if model_dir is None:
            # local import: synthetic.checkpoint loads torch; only --quick writes its own model
            from dynamo_dwdp.synthetic.checkpoint import write_checkpoint

            tmp = tempfile.mkdtemp(prefix="dwdp-bench-tiny-")
            model_dir = os.path.join(tmp, "tiny")
            write_checkpoint(model_dir, "tiny", quiet=True, with_tokenizer=False)
    if model_dir is None:
        raise UserError("bench matrix: --model is required (or --quick for the tiny CPU smoke)")
    out = spec.out or default_out(spec)
    md = os.path.splitext(out)[0] + ".md"
    try:
        model = _model_info(model_dir)
        model_cfg = load_model_config(model_dir)
        done = {r["key"] for r in load_jsonl(out)} if os.path.isfile(out) else set()
        ran, failures = 0, []
        plan = matrix_plan(spec, model_dir)
        for setup, points in plan:                       # input errors stop everything before any launch
            setup.validate()
            for p in points:
                p.validate()
        for setup, points in plan:
            todo = [p for p in points if point_key(model, setup_dict(setup, p)) not in done]
            label = setup.strategy + "".join(f" +{o}" for o, on in (("contention-opt", setup.contention_opt),
                                                                    ("routed-only", setup.routed_only)) if on)
            if not todo:
                progress(f"{label}: all {len(points)} points already in {out}")
                continue
            fitting = []
            for p in todo:
                try:
                    check_fits(setup, p, model_cfg)
                    fitting.append(p)
                except UserError as exc:
                    progress(f"  skipped: {exc}")
            if not fitting:
                continue
            progress(f"{label} x{setup.ranks}: {len(fitting)} point(s) "
                     f"({len(points) - len(todo)} already done)")
            try:
                results = run_points(setup, fitting, model)
            except (UserError, PeerError) as exc:
                failures.append(f"{label}: {str(exc).splitlines()[0]}")
                progress(f"  FAILED: {failures[-1]}")
                continue
            append_jsonl(out, results)
            done.update(r["key"] for r in results)
            ran += len(results)
            for r in results:
                progress(f"  {describe_load(r['setup'])}, cv {r['setup']['imbalance_cv']:g}: "
                         f"step {r['step_ms']['mean']:.3f} ms, {r['tokens_per_s_per_gpu']:,.0f} tok/s/GPU")
            write_table(out, md)
        if os.path.isfile(out):
            write_table(out, md)
        if failures:
            raise PeerError(f"{len(failures)} matrix launch(es) failed ({ran} point(s) saved in {out}; re-run "
                            f"to retry the rest): " + "; ".join(failures))
        return out, md, ran
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


# ------------------------------------------------------------------------------------------- table
COLUMNS = ("strategy", "N", "load", "cv", "options", "step ms mean / p50", "compute / prefetch / sync %",
           "remote MB/step/rank", "tok/s/GPU", "TFLOP/s/GPU (% peak)", "HBM GB/s/GPU (% peak)",
           "planner ms/MoE layer: compute / prefetch / total (measured)")


def _options(st: dict) -> str:
    opts = [o for o, on in (("routed-only", st.get("dwdp_routed_only")),
                            ("contention-opt", st.get("dwdp_contention_opt"))) if on]
    if st.get("expert_skew"):
        opts.append(f"skew {st['expert_skew']}")
    return ", ".join(opts) or "-"


def _g(x: float) -> str:
    """3 significant digits, never in exponent form for large values (1,500 not 1.5e+03)."""
    return f"{x:,.0f}" if abs(x) >= 1000 else f"{x:.3g}"


def _frac(x: float | None) -> str:
    return f" ({100 * x:.1f}%)" if x is not None else ""


def table_row(r: dict) -> list[str]:
    st, sm, sp = r["setup"], r["step_ms"], r["split_pct"]
    pr = r.get("prediction") or {}
    per, meas = pr.get("per_moe_layer"), pr.get("measured_per_moe_layer") or {}
    if per:
        plan = (f"{per['t_compute_ms']:.3g} / {per['t_prefetch_ms']:.3g} / {per['t_total_ms']:.3g} "
                f"({meas.get('step_ms', 0):.3g})" + ("" if pr.get("comparable") else " *"))
    else:
        plan = "-"
    return [
        st["strategy"], str(st["ranks"]), describe_load(st).replace("prefill ", "P ").replace("decode ", "D "),
        f"{st['imbalance_cv']:g}", _options(st),
        f"{sm['mean']:.3f} / {sm['p50']:.3f}",
        f"{sp['compute']:.0f} / {sp['prefetch_wait']:.0f} / {sp['sync_wait']:.0f}",
        _g(r["remote_bytes_per_step"]["per_rank_mean"] / 1e6),
        f"{r['tokens_per_s_per_gpu']:,.0f}",
        _g(r["flops"]["achieved_per_gpu"] / 1e12) + _frac(r["flops"].get("frac_of_peak")),
        _g(r["hbm"]["achieved_per_gpu"] / 1e9) + _frac(r["hbm"].get("frac_of_peak")),
        plan,
    ]


def _sort_key(r: dict):
    st = r["setup"]
    order = {"single": 0, "dwdp": 1, "dep": 2, "tp": 3}
    load = st["tokens_per_iter"] if st["phase"] == "prefill" else st["batch"]
    return (st["phase"] != "prefill", st.get("context", 0), load, st["imbalance_cv"], order.get(st["strategy"], 9),
            _options(st), st["ranks"])


def render_results_table(rows: list[dict], markdown: bool = True) -> str:
    """Markdown (or aligned plain text) table of bench engine results, one row per result."""
    if not rows:
        return "(no results)"
    body = [table_row(r) for r in sorted(rows, key=_sort_key)]
    devices = sorted({f"{r.get('device_name', '?')} {r['setup']['dtype']}" for r in rows})
    models = sorted({r.get("model", {}).get("name", "?") for r in rows})
    head = f"engine benchmark: model {', '.join(models)}; {', '.join(devices)}"
    foot = []
    if any(row[-1].endswith(" *") for row in body):
        foot = ["", "\\* CPU: not comparable (the planner models GPUs; the measured column is the whole step "
                "divided by the MoE layers)"]
    if markdown:
        lines = [f"_{head}_", "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
        lines += ["| " + " | ".join(c.replace("|", "/") for c in row) + " |" for row in body]
        return "\n".join(lines + foot) + "\n"
    widths = [max(len(COLUMNS[i]), *(len(row[i]) for row in body)) for i in range(len(COLUMNS))]
    lines = [head, "  ".join(c.ljust(w) for c, w in zip(COLUMNS, widths)).rstrip(),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in body]
    return "\n".join(lines + [f.replace("\\*", "*") for f in foot]) + "\n"


def write_table(jsonl: str, md: str) -> None:
    text = render_results_table(load_jsonl(jsonl), markdown=True)
    with open(md, "w", encoding="utf-8") as f:
        f.write(text)
