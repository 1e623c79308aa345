"""Engine micro-benchmark (`dynamo-dwdp bench engine`): fixed-shape steps on N local ranks, measured.

Each rank builds its engine (`run_local_group` -> `build_rank_engine`) and drives `runner.execute`
directly (no scheduler, so every run has the same shapes):

- prefill: every step each rank computes a fresh batch of prompts; rank r's share of step s is
  T * (1 + cv * z[r,s]) tokens (z a seeded standard-normal draw per (rank, step); at least `batch`),
  split near-evenly into `batch` sequences. KV blocks come from a fixed pool, recycled every step.
- decode: `batch` sequences per rank (rank r at step s: round(B * (1 + cv * z[r,s])), >= 1) that
  already hold `context` tokens of KV (filled by untimed prefill forwards of <= FILL_TOKENS tokens);
  every step adds 1 token per sequence at position `context` (the context stays fixed, step after step).
- DEP: every rank runs the same number of forwards (fill chunks padded with empty forwards), so its
  all-to-all keeps the ranks in lock-step. TP: rank 0 drives the tokens of *all* ranks' shares
  (N*B sequences: the same total work as the data-parallel strategies) and the followers `follow()`.
- single with N ranks = N independent replicas of the whole model (factory strategy `dp`).
- Before the timed steps the driving ranks meet at a store barrier and start together at an agreed
  wall-clock instant (DWDP ranks then drift freely, as in serving).

Measured per rank and timed step: the wall time of `runner.execute` (batch build + forward + its
host sync; TP leader: + the input broadcast; `--async-scheduling`: the step's share of a pipeline
that launches each step before waiting for the previous one, see `_drive_async`), and the ExecutorStats deltas (forward seconds, exposed
prefetch wait, sync wait, remote bytes pulled, tokens). A TP follower's step runs from the later of
(its wait for the step's inputs, the leader's step start) to the end of its forward; the wait before
the leader started is idle, not sync. On CUDA the DWDP stall
(measured with CUDA events) is collected right after each step's host sync. Routed experts touched
per MoE layer are recorded with one `index_fill_` per layer (no host sync).

JSON (one object per run; `SCHEMA`):
  schema, key (identity for resume), created, model {dir, name, config_sha, layers, moe_layers,
  experts, top_k, hidden_size}, setup {strategy, ranks, phase, tokens_per_iter, batch, context,
  imbalance_cv, expert_skew, steps, warmup, seed, device, dtype, dwdp_routed_only,
  dwdp_contention_opt, hw}, device_name,
  step_ms {mean, p50, p90, min, max: over steps of the max over ranks (what a synchronised group
           sees); rank_mean: mean over ranks of each rank's mean; per_rank_mean [..]},
  forward_ms {rank_mean, per_rank_mean}: model forward only (ExecutorStats.step_seconds),
  split_ms {compute, prefetch_wait, sync_wait}: rank-averaged ms per step, summing to step_ms.rank_mean
           (compute = step - exposed prefetch - sync wait, clamped at 0), split_pct {same keys, %},
  per_rank [{rank, role, step_ms, forward_ms, compute_ms, prefetch_wait_ms, sync_wait_ms, tokens,
            remote_bytes_per_step, experts_touched_per_moe_layer}],
  remote_bytes_per_step {per_rank_mean, total},
  tokens {scheduled, counted, per_step}, wall_s, tokens_per_s_per_gpu (= counted / wall_s / N),
  flops {per_step, by_component {..}, achieved_per_gpu, peak_per_gpu, frac_of_peak},
  hbm {bytes_per_step_per_gpu, by_component {..}, achieved_per_gpu, peak_per_gpu, frac_of_peak},
  prediction {hw, comparable, note, per_moe_layer {...planner...}, measured_per_moe_layer {...},
              step_model {calibration, step_ms, measured_over_predicted, terms_ms}: strategy single with
              --calibrate only}
FLOP/s and HBM bytes/s divide the window's work by the sum of the group step times and by N; FLOPs
are model FLOPs (flops.py, counted once under TP); peaks are the datasheet/probe figures of --hw
(null on CPU, or for a dtype without a tensor-core entry).
"""
from __future__ import annotations

import datetime
import hashlib
import json
import math
import os
import random
import time
from dataclasses import dataclass

from dynamo_dwdp.config.dwdp import DwdpSettings
from dynamo_dwdp.config.engine import ATTENTION_BACKENDS, WEIGHT_FORMATS, EngineSettings
from dynamo_dwdp.errors import PeerError, UserError, require_min_ints
from dynamo_dwdp.model.config import load_model_config
from dynamo_dwdp.planner import flops
from dynamo_dwdp.planner.calibrate import load_calibration
from dynamo_dwdp.planner.hardware import HARDWARE, get_hardware
from dynamo_dwdp.planner.roofline import load_model_shape, plan_layer, plan_single_layer
from dynamo_dwdp.planner.step_model import predict_step
from dynamo_dwdp.strategies import STRATEGIES as STRATEGY_TABLE
from dynamo_dwdp.strategies import get_strategy

SCHEMA = "dynamo-dwdp/bench-engine/1"
STRATEGIES = tuple(n for n, s in STRATEGY_TABLE.items() if s.replica_of is None)
"""What `--strategy` takes: `single` on N ranks runs the replicas of `dp`."""
PHASES = ("prefill", "decode")
DEVICES = ("cpu", "cuda")
DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16"}
PLANNER_DTYPE = {"bfloat16": "bf16"}
FILL_TOKENS = 8192            # decode KV fill: tokens per untimed prefill forward (at least one sequence)
BARRIER_MARGIN_S = 0.3        # ranks start the timed steps together at (last arrival + this margin)
KV_MEMORY_FRACTION = 0.5      # CUDA: a point whose KV pool exceeds this share of GPU memory is refused


# ------------------------------------------------------------------------------------------- inputs
@dataclass(frozen=True)
class Point:
    """One measured shape. prefill: tokens_per_iter tokens per rank per step in `batch` sequences.
    decode: `batch` sequences per rank over `context` cached tokens (tokens_per_iter == batch)."""

    phase: str
    tokens_per_iter: int
    batch: int = 1
    context: int = 0
    imbalance_cv: float = 0.0
    steps: int = 10
    warmup: int = 3
    seed: int = 0

    def validate(self) -> "Point":
        if self.phase not in PHASES:
            raise UserError(f"--phase {self.phase!r} is not one of {', '.join(PHASES)}")
        require_min_ints(self, (("tokens_per_iter", 1), ("batch", 1), ("steps", 1), ("warmup", 0), ("context", 0)))
        if self.phase == "prefill" and self.batch > self.tokens_per_iter:
            raise UserError(f"--batch {self.batch} exceeds --tokens-per-iter {self.tokens_per_iter} "
                            f"(every prefill sequence needs >= 1 token)")
        if self.phase == "decode" and self.tokens_per_iter != self.batch:
            raise UserError(f"decode: tokens per iteration ({self.tokens_per_iter}) must equal --batch "
                            f"({self.batch}): one new token per sequence")
        if not (isinstance(self.imbalance_cv, (int, float)) and 0 <= self.imbalance_cv <= 2):
            raise UserError(f"--imbalance-cv must be in [0, 2], got {self.imbalance_cv!r}")
        return self


@dataclass(frozen=True)
class BenchSetup:
    """Everything fixed for one launch of the rank group (points run one after another in it)."""

    model_dir: str
    strategy: str
    ranks: int
    device: str = "cpu"
    dtype: str = "float32"
    dwdp: DwdpSettings = DwdpSettings()               # routed_only / contention_opt variants (strategy dwdp)
    expert_skew: tuple[int, float] | None = None     # (K, bias): experts 0..K-1 get +bias at selection
    hw: str = "h200-measured"
    block_size: int = 16
    timeout: float = 1800.0
    cuda_graphs: bool = False             # decode steps from CUDA graphs (executors that allow capture)
    attention: str = "auto"               # prefill attention: auto | reference | sdpa
    weights: str = "native"               # native | fp8-block (FP8-resident experts and dense linears, CUDA)
    calibration: str | None = None        # `plan --calibrate` file: `single` points add the step model
    async_scheduling: bool = False        # steps launched one ahead, greedy tokens fed on the device

    @property
    def routed_only(self) -> bool:
        return self.dwdp.routed_only

    @property
    def contention_opt(self) -> bool:
        return self.dwdp.contention_opt

    @property
    def group_strategy(self) -> str:
        """The rank group's strategy: `single` on N > 1 ranks is N independent replicas (`dp`)."""
        if self.ranks > 1:
            return next((n for n, s in STRATEGY_TABLE.items() if s.replica_of == self.strategy), self.strategy)
        return self.strategy

    def validate(self) -> "BenchSetup":
        if self.strategy not in STRATEGIES:
            raise UserError(f"--strategy {self.strategy!r} is not one of {', '.join(STRATEGIES)}")
        if not isinstance(self.ranks, int) or self.ranks < 1:
            raise UserError(f"--ranks must be an integer >= 1, got {self.ranks!r}")
        low = get_strategy(self.strategy).min_ranks
        if self.ranks < low:
            raise UserError(f"--strategy {self.strategy} needs --ranks >= {low} (a group), got {self.ranks}")
        if self.device not in DEVICES:
            raise UserError(f"--device {self.device!r} is not one of {', '.join(DEVICES)}")
        if self.dtype not in DTYPES.values():
            raise UserError(f"--dtype {self.dtype!r} is not one of float32, bfloat16")
        if (self.routed_only or self.contention_opt) and self.strategy != "dwdp":
            flag = "--dwdp-routed-only" if self.routed_only else "--dwdp-contention-opt"
            raise UserError(f"{flag} needs --strategy dwdp (got {self.strategy})")
        if self.block_size < 1:
            raise UserError(f"block size must be >= 1, got {self.block_size}")
        if self.cuda_graphs and self.device != "cuda":
            raise UserError("--cuda-graphs needs --device cuda")
        if self.attention not in ATTENTION_BACKENDS:
            raise UserError(f"--attention {self.attention!r} is not one of {', '.join(ATTENTION_BACKENDS)}")
        if self.weights not in WEIGHT_FORMATS or (self.weights != "native" and self.device != "cuda"):
            raise UserError(f"--weights {self.weights!r}: one of {', '.join(WEIGHT_FORMATS)} (fp8 formats: --device cuda)")
        if self.hw not in HARDWARE:
            raise UserError(f"--hw {self.hw!r} is not one of {', '.join(HARDWARE)}")
        if self.async_scheduling and (get_strategy(self.strategy).lock_step or get_strategy(self.strategy).leader_only):
            raise UserError(f"--async-scheduling: strategy {self.strategy} steps its ranks together (allowed with "
                            f"{', '.join(n for n, st in STRATEGY_TABLE.items() if not st.lock_step and not st.leader_only)})")
        if self.calibration is not None:
            load_calibration(get_hardware(self.hw), self.calibration)      # a bad file fails before any rank
        return self


def parse_expert_skew(text: str | None, num_experts: int | None = None) -> tuple[int, float] | None:
    """'K:BIAS' -> (K, BIAS): the first K experts (0..K-1) get BIAS added to their selection score."""
    if text is None or text == "":
        return None
    k_s, sep, b_s = text.partition(":")
    try:
        k, bias = int(k_s), float(b_s)
    except ValueError:
        k, bias = -1, 0.0
    if not sep or k < 1 or not math.isfinite(bias):
        raise UserError(f"--expert-skew {text!r}: expected K:BIAS with K >= 1 hot experts, e.g. 4:0.5")
    if num_experts is not None and k > num_experts:
        raise UserError(f"--expert-skew {text!r}: K={k} exceeds the model's {num_experts} routed experts")
    return k, bias


# ----------------------------------------------------------------------------------------- schedule
def imbalance_z(seed: int, rank: int, step: int) -> float:
    """Deterministic standard-normal draw for (rank, step): every process computes the same value."""
    return random.Random(f"dwdp-bench:{seed}:{rank}:{step}").gauss(0.0, 1.0)


def split_even(total: int, parts: int) -> list[int]:
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


@dataclass(frozen=True)
class SeqWork:
    new: int        # tokens computed this forward
    start: int      # absolute position of the first of them
    slot: int       # decode: the sequence's fixed place in the KV pool; prefill: its order in the batch


@dataclass
class Schedule:
    """Per driving rank: the untimed fill forwards, then warmup + timed steps (lists of SeqWork).
    Non-driving ranks (TP followers) have empty lists. Every process derives the same schedule."""

    phase: str
    fill: list[list[list[SeqWork]]]
    steps: list[list[list[SeqWork]]]
    warmup: int
    kv_blocks: int
    blocks_per_seq: int = 0          # decode: fixed blocks of every sequence

    def timed(self, rank: int) -> list[list[SeqWork]]:
        return self.steps[rank][self.warmup:]

    def forwards(self, rank: int) -> int:
        return len(self.fill[rank]) + len(self.steps[rank])


def build_schedule(point: Point, strategy: str, ranks: int, block_size: int) -> Schedule:
    n = point.warmup + point.steps
    cv, seed = point.imbalance_cv, point.seed
    per_rank: list[list[list[SeqWork]]] = []
    for r in range(ranks):
        steps = []
        for s in range(n):
            f = 1.0 + cv * imbalance_z(seed, r, s)
            if point.phase == "prefill":
                share = max(point.batch, int(round(point.tokens_per_iter * f)))
                steps.append([SeqWork(q, 0, i) for i, q in enumerate(split_even(share, point.batch))])
            else:
                b = max(1, int(round(point.batch * f)))
                steps.append([SeqWork(1, point.context, j) for j in range(b)])
        per_rank.append(steps)
    if get_strategy(strategy).leader_only:      # one leader runs every rank's share in one batch
        merged = []
        for s in range(n):
            seqs = [w for r in range(ranks) for w in per_rank[r][s]]
            if point.phase == "prefill":
                seqs = [SeqWork(w.new, w.start, i) for i, w in enumerate(seqs)]
            else:
                seqs = [SeqWork(1, point.context, j) for j in range(len(seqs))]
            merged.append(seqs)
        per_rank = [merged] + [[] for _ in range(ranks - 1)]
    fill: list[list[list[SeqWork]]] = [[] for _ in range(ranks)]
    if point.phase == "prefill":
        kv = max((sum(-(-w.new // block_size) for w in seqs) for steps in per_rank for seqs in steps), default=1)
        return Schedule("prefill", fill, per_rank, point.warmup, max(kv, 1))
    per_seq = -(-(point.context + 1) // block_size)
    most = [max((len(seqs) for seqs in steps), default=0) for steps in per_rank]
    if point.context > 0:
        chunk = max(1, FILL_TOKENS // point.context)
        for r in range(ranks):
            fill[r] = [[SeqWork(point.context, 0, j) for j in range(lo, min(lo + chunk, most[r]))]
                       for lo in range(0, most[r], chunk)]
        if get_strategy(strategy).lock_step:    # lock-step: every rank runs as many fill forwards
            longest = max(len(f) for f in fill)
            for f in fill:
                f.extend([] for _ in range(longest - len(f)))
    return Schedule("decode", fill, per_rank, point.warmup, max(1, max(most) * per_seq), per_seq)


def block_tables(schedule: Schedule, seqs: list[SeqWork], block_size: int) -> list[list[int]]:
    """Prefill: blocks handed out from 0 in batch order (recycled every step). Decode: fixed per slot."""
    if schedule.phase == "decode":
        per = schedule.blocks_per_seq
        return [list(range(w.slot * per, (w.slot + 1) * per)) for w in seqs]
    tables, nxt = [], 0
    for w in seqs:
        nb = -(-(w.start + w.new) // block_size)
        tables.append(list(range(nxt, nxt + nb)))
        nxt += nb
    return tables


def attention_form(setup: BenchSetup, seqs: list[SeqWork]) -> str:
    """The attention form the model ran for one step (model/attention.py `use_sdpa`): expanded when
    a prefill chunk (> 1 new token) met the SDPA backend (sdpa, or auto on cuda), else absorbed."""
    multi = max((w.new for w in seqs), default=0) > 1
    sdpa = setup.attention == "sdpa" or (setup.attention == "auto" and setup.device == "cuda")
    return "expanded" if multi and sdpa else "absorbed"


def seq_shapes(seqs: list[SeqWork]) -> list[tuple[int, int]]:
    """(new tokens, context after the step) per sequence: the input of planner.flops."""
    return [(w.new, w.start + w.new) for w in seqs]


# ------------------------------------------------------------------------------------- rank side
def _snapshot(stats) -> tuple[float, float, float, int, int]:
    return (stats.step_seconds, stats.prefetch_wait_s, stats.sync_wait_s, stats.tokens,
            sum(stats.bytes_pulled.values()))


class _Probe:
    """Hooks one rank's executor: counts forwards (begin_step) and marks the routed experts each MoE
    layer touched in `live` [moe, E] (device bool; zeroed at the start of every forward). The hooks
    are device ops only, so a captured CUDA graph replays them too; the driver copies `live` out
    after each timed forward (no host sync)."""

    def __init__(self, runner):
        self.executor = runner.executor
        self.stats = self.executor.stats
        cfg = runner.model_config
        self.moe_index = {layer: i for i, layer in enumerate(cfg.moe_layers)}
        import torch

        self.live = torch.zeros(len(self.moe_index), cfg.n_routed_experts, dtype=torch.bool, device=runner.device)
        self.on_begin = None
        ex = self.executor
        inner_forward, inner_begin = ex.forward, ex.begin_step

        def forward(layer, x, topk_ids, topk_weights):
            self.live[self.moe_index[layer]].index_fill_(0, topk_ids.reshape(-1), True)
            return inner_forward(layer, x, topk_ids, topk_weights)

        if getattr(ex, "folds_shared", False):
            inner_folded, k = ex.forward_folded, cfg.num_experts_per_tok

            def forward_folded(layer, x, topk_ids, topk_weights, shared):
                """A folded layer (shared experts in the routed call): its routed columns only."""
                self.live[self.moe_index[layer]].index_fill_(0, topk_ids[:, :k].reshape(-1), True)
                return inner_folded(layer, x, topk_ids, topk_weights, shared)

            ex.forward_folded = forward_folded

        def begin_step():
            if self.on_begin is not None:
                self.on_begin()
            self.live.zero_()
            inner_begin()

        ex.forward = forward
        ex.begin_step = begin_step

    def flush_stalls(self) -> None:
        """CUDA: move the stall of the step that just synchronised into the stats now (the executor
        would otherwise collect it at the next begin_step, i.e. in the next step)."""
        collect = getattr(getattr(self.executor, "copy", None), "collect_stall_seconds", None)
        if collect is not None:
            self.stats.prefetch_wait_s += collect()


def _hits_masks(hits) -> list[list[int]]:
    """[steps, moe, E] bool -> per step, per MoE layer, the touched experts as an int bit mask."""
    rows = hits.cpu().tolist()
    return [[sum(1 << e for e, on in enumerate(layer) if on) for layer in step] for step in rows]


def _barrier(group, tag: str, timeout: float = 600.0) -> None:
    """All ranks arrive, then start together at an agreed wall-clock instant (same host)."""
    store = group.store
    if store is None or group.size < 2:
        return
    store.set(f"bench/{tag}/{group.rank}", "1")
    if group.rank == 0:
        store.wait_all(f"bench/{tag}", timeout)
        go = time.time() + BARRIER_MARGIN_S
        store.set(f"bench/{tag}/go", repr(go))
    else:
        go = float(store.get(f"bench/{tag}/go", timeout))
    delay = go - time.time()
    if delay > 0:
        time.sleep(delay)


def _device_name(runner) -> str:
    dev = runner.device
    if dev.type == "cuda":
        import torch

        return torch.cuda.get_device_name(dev)
    return "cpu"


def _random_tokens(gen, vocab: int, n: int) -> list[int]:
    import torch

    return torch.randint(3, vocab, (n,), generator=gen).tolist() if n else []


def _inputs(schedule: Schedule, seqs: list[SeqWork], gen, vocab: int, block_size: int):
    chunks = [_random_tokens(gen, vocab, w.new) for w in seqs]
    return chunks, [w.start for w in seqs], block_tables(schedule, seqs, block_size), [True] * len(seqs)


def _drive_point(rank_engine, probe: _Probe, setup: BenchSetup, point: Point, index: int) -> dict:
    import torch

    runner = rank_engine.runner
    rank = rank_engine.group.rank
    cfg = runner.model_config
    bs = runner.config.block_size
    sched = build_schedule(point, setup.strategy, setup.ranks, bs)
    gen = torch.Generator().manual_seed(point.seed * 7919 + rank * 104729 + index)
    vocab = cfg.vocab_size
    for seqs in sched.fill[rank]:
        runner.execute(*_inputs(sched, seqs, gen, vocab, bs))
    warm = [_inputs(sched, seqs, gen, vocab, bs) for seqs in sched.steps[rank][:point.warmup]]
    if setup.async_scheduling and warm:      # the pipeline's own first uses (pinned buffers) out of the timing
        _drive_async(runner, probe, warm, torch.zeros(len(warm), *probe.live.shape, dtype=torch.bool,
                                                      device=runner.device),
                     _new_record(), point.phase == "decode")
    else:
        for args in warm:
            runner.execute(*args)
    probe.flush_stalls()
    timed = [_inputs(sched, seqs, gen, vocab, bs) for seqs in sched.timed(rank)]
    hits = torch.zeros(point.steps, len(probe.moe_index), cfg.n_routed_experts, dtype=torch.bool,
                       device=runner.device)
    if not get_strategy(setup.strategy).leader_only:
        _barrier(rank_engine.group, f"p{index}")
    rec = _new_record()
    t_start = time.time()
    if setup.async_scheduling:
        _drive_async(runner, probe, timed, hits, rec, point.phase == "decode")
        return {"rank": rank, "role": "rank", **rec, "t_start": t_start, "t_end": time.time(),
                "hits": _hits_masks(hits), "device_name": _device_name(runner)}
    for s, args in enumerate(timed):
        before = _snapshot(probe.stats)
        rec["t0_abs"].append(time.time())
        t0 = time.perf_counter()
        runner.execute(*args)
        probe.flush_stalls()
        t1 = time.perf_counter()
        hits[s].copy_(probe.live)
        after = _snapshot(probe.stats)
        _append(rec, t1 - t0, before, after)
    t_end = time.time()
    role = "leader" if get_strategy(setup.strategy).leader_only else "rank"
    return {"rank": rank, "role": role, **rec, "t_start": t_start, "t_end": t_end, "hits": _hits_masks(hits),
            "device_name": _device_name(runner)}


def _drive_async(runner, probe: _Probe, timed: list, hits, rec: dict, decode: bool) -> None:
    """The timed steps as the engine runs them with async scheduling: step s is launched (decode: its
    tokens fed on the device from step s-1's greedy tokens), its argmax sampled and copied back without
    a sync, and only then is step s-1 waited for. A step's time runs from the end of the previous
    iteration to the end of its own, the last one including the drain, so the times sum to the wall time
    of all timed steps."""
    # local import: the engine's device mechanics (bench sits above the engine package)
    from dynamo_dwdp.engine.model_runner import FedTokens, ReadBack

    prev = None
    t_prev = time.perf_counter()
    for s, (chunks, starts, tables, want) in enumerate(timed):
        before = _snapshot(probe.stats)
        rec["t0_abs"].append(time.time())
        rows = list(range(len(chunks)))
        fed = FedTokens(rows, prev.device_tokens, rows) if decode and prev is not None else None
        logits = runner.launch(chunks, starts, tables, want, fed)
        hits[s].copy_(probe.live)
        tokens = ReadBack(logits.argmax(dim=-1), runner.device)
        t_wait = time.perf_counter()
        for done in ([prev] if prev is not None else []) + ([tokens] if s == len(timed) - 1 else []):
            done.wait()
        probe.flush_stalls()
        t1 = time.perf_counter()
        probe.stats.step_seconds += runner.last_launch_seconds + t1 - t_wait
        _append(rec, t1 - t_prev, before, _snapshot(probe.stats))
        prev, t_prev = tokens, t1


def _new_record() -> dict[str, list]:
    """Per-step lists of one rank's timed steps (`_append` fills them)."""
    return {k: [] for k in ("step_s", "forward_s", "prefetch_s", "sync_s", "tokens", "remote_bytes", "t0_abs")}


def _append(rec: dict, step_s: float, before, after) -> None:
    rec["step_s"].append(step_s)
    rec["forward_s"].append(after[0] - before[0])
    rec["prefetch_s"].append(after[1] - before[1])
    rec["sync_s"].append(after[2] - before[2])
    rec["tokens"].append(after[3] - before[3])
    rec["remote_bytes"].append(after[4] - before[4])


def _follow_points(rank_engine, probe: _Probe, setup: BenchSetup, points: list[Point]) -> list[dict]:
    """TP follower: mirror the leader's forwards (forward i of the leader is forward i here).

    A mark (wall clock, stats) is taken when the follower starts waiting for forward i's inputs; the
    previous forward is complete then. Forward i thus lies in [mark i, mark i+1]; the parent trims the
    part before the leader's own step start (`_follower_steps`)."""
    import torch

    runner = rank_engine.runner
    cfg = runner.model_config
    bs = runner.config.block_size
    windows, hits, offset = [], [], 0
    for p in points:
        sched = build_schedule(p, "tp", setup.ranks, bs)
        first = offset + len(sched.fill[0]) + p.warmup
        windows.append((first, first + p.steps))
        hits.append(torch.zeros(p.steps, len(probe.moe_index), cfg.n_routed_experts, dtype=torch.bool,
                                device=runner.device))
        offset += sched.forwards(0)
    marks: list[tuple[float, tuple]] = []
    begun = [0]
    inner_broadcast = runner._broadcast

    def broadcast(message):
        marks.append((time.time(), _snapshot(probe.stats)))
        return inner_broadcast(message)

    def keep_hits(i: int) -> None:
        """`live` holds forward i's experts until forward i+1 begins."""
        for w, (a, b) in enumerate(windows):
            if a <= i < b:
                hits[w][i - a].copy_(probe.live)

    def on_begin():
        keep_hits(begun[0] - 1)
        begun[0] += 1

    runner._broadcast = broadcast
    probe.on_begin = on_begin
    try:
        rank_engine.follow()
    finally:
        keep_hits(begun[0] - 1)
        probe.on_begin = None
        runner._broadcast = inner_broadcast
    if len(marks) < offset + 1:
        raise PeerError(f"tp follower {rank_engine.group.rank}: the leader stopped after {len(marks) - 1} of "
                        f"{offset} forwards")
    return [{"rank": rank_engine.group.rank, "role": "follower", "marks": marks[a:b + 1],
             "hits": _hits_masks(hits[w]), "device_name": _device_name(runner)}
            for w, (a, b) in enumerate(windows)]


def _follower_steps(raw: dict, leader: dict) -> dict:
    """Per-step record of a TP follower: step s runs from max(its wait start, the leader's step start)
    to the start of its next wait; the idle wait before the leader started is not sync time."""
    rec: dict[str, list] = {k: [] for k in ("step_s", "forward_s", "prefetch_s", "sync_s", "tokens", "remote_bytes")}
    marks = raw["marks"]
    for s, t_lead in enumerate(leader["t0_abs"]):
        (t0, before), (t1, after) = marks[s], marks[s + 1]
        idle = max(0.0, t_lead - t0)
        _append(rec, max(0.0, t1 - max(t0, t_lead)), before, after)
        rec["sync_s"][-1] = max(0.0, rec["sync_s"][-1] - idle)
    return {**{k: v for k, v in raw.items() if k != "marks"}, **rec, "t_start": None, "t_end": None}


def bench_rank(rank_engine, payload) -> list[dict]:
    """run_local_group target: payload = (BenchSetup, [Point]); one raw record per point."""
    setup, points = payload
    runner = rank_engine.runner
    probe = _Probe(runner)
    # the start-up capture, after the probe (its device ops are in the graphs); lock-step strategies (DEP)
    # capture lazily, after the first step's agreement, as in serving
    if runner.graphs is not None and not runner.graphs.started and not get_strategy(setup.strategy).lock_step:
        runner.graphs.capture_all()
    if setup.expert_skew:
        k, bias = setup.expert_skew
        runner.set_expert_skew(list(range(k)), bias)
    if rank_engine.is_follower:
        return _follow_points(rank_engine, probe, setup, points)
    try:
        recs = [_drive_point(rank_engine, probe, setup, p, i) for i, p in enumerate(points)]
        graphs = runner.graphs
        for r in recs:                    # start-up capture cost (engine/cuda_graphs.py: capture_all)
            r["graphs"] = None if graphs is None else {
                "count": len(graphs.graphs), "capture_s": graphs.capture_seconds,
                "capture_bytes": graphs.capture_bytes, "captures_after_start": graphs.captures_after_start}
        return recs
    finally:
        if get_strategy(setup.strategy).leader_only:
            runner.stop_followers()


# ------------------------------------------------------------------------------------- parent side
def _model_info(model_dir: str) -> dict:
    cfg = load_model_config(model_dir)
    with open(os.path.join(model_dir, "config.json"), "rb") as f:
        sha = hashlib.sha256(f.read()).hexdigest()[:12]
    return {"dir": model_dir, "name": os.path.basename(os.path.normpath(model_dir)), "config_sha": sha,
            "layers": cfg.num_hidden_layers, "moe_layers": len(cfg.moe_layers), "experts": cfg.n_routed_experts,
            "top_k": cfg.num_experts_per_tok, "hidden_size": cfg.hidden_size}


def setup_dict(setup: BenchSetup, point: Point) -> dict:
    return {
        "strategy": setup.strategy, "ranks": setup.ranks, "phase": point.phase,
        "tokens_per_iter": point.tokens_per_iter, "batch": point.batch,
        "context": point.context if point.phase == "decode" else 0,
        "imbalance_cv": float(point.imbalance_cv),
        "expert_skew": f"{setup.expert_skew[0]}:{setup.expert_skew[1]:g}" if setup.expert_skew else None,
        "steps": point.steps, "warmup": point.warmup, "seed": point.seed, "device": setup.device,
        "dtype": setup.dtype, "dwdp_routed_only": setup.routed_only, "dwdp_contention_opt": setup.contention_opt,
        "hw": setup.hw, "cuda_graphs": setup.cuda_graphs, "attention": setup.attention,
        **({"weights": setup.weights} if setup.weights != "native" else {}),
        **({"async_scheduling": True} if setup.async_scheduling else {}),
    }


def point_key(model: dict, setup: dict) -> str:
    """Identity of a measured point (resume): the model's name + config hash and every setup field."""
    return json.dumps({"model": model["name"], "config_sha": model["config_sha"], **setup}, sort_keys=True)


def _pct(xs: list[float], q: float) -> float:
    """q-th percentile with linear interpolation between closest ranks (numpy's default)."""
    ys = sorted(xs)
    pos = (len(ys) - 1) * q / 100.0
    lo = int(math.floor(pos))
    hi = min(lo + 1, len(ys) - 1)
    return ys[lo] + (ys[hi] - ys[lo]) * (pos - lo)


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else 0.0


def _popcount(x: int) -> int:
    return bin(x).count("1")


def _touched(strategy: str, ranks: int, records: list[dict], num_experts: int) -> list[list[list[int]]]:
    """[rank][step][moe layer] -> routed experts whose weights that rank read (whole experts)."""
    steps = len(records[0]["hits"])
    n_moe = len(records[0]["hits"][0]) if steps else 0
    if strategy == "tp":                         # every rank reads a slice of every expert rank 0's tokens hit
        lead = records[0]["hits"]
        return [[[_popcount(lead[s][m]) for m in range(n_moe)] for s in range(steps)] for _ in records]
    if strategy == "dep":                        # owners read their experts hit by anyone's tokens
        from dynamo_dwdp.baselines.dep import even_bounds   # local import: baselines.dep loads torch

        bounds = even_bounds(num_experts, ranks)
        owned = [sum(1 << e for e in range(bounds[r], bounds[r + 1])) for r in range(ranks)]
        union = [[0] * n_moe for _ in range(steps)]
        for rec in records:
            for s in range(steps):
                for m in range(n_moe):
                    union[s][m] |= rec["hits"][s][m]
        return [[[_popcount(union[s][m] & owned[r]) for m in range(n_moe)] for s in range(steps)]
                for r in range(ranks)]
    return [[[_popcount(x) for x in step] for step in rec["hits"]] for rec in records]


def summarize(setup: BenchSetup, point: Point, records: list[dict], model: dict | None = None) -> dict:
    """Turn the ranks' raw records of one point into the result object (module docstring)."""
    cfg = load_model_config(setup.model_dir)
    model = model or _model_info(setup.model_dir)
    n = setup.ranks
    records = [_follower_steps(r, records[0]) if r.get("role") == "follower" else r for r in records]
    sched = build_schedule(point, setup.strategy, n, setup.block_size)
    drivers = [0] if get_strategy(setup.strategy).leader_only else list(range(n))
    steps = point.steps
    group_step = [max(rec["step_s"][s] for rec in records) for s in range(steps)]
    per_rank, split_acc = [], {"compute": [], "prefetch_wait": [], "sync_wait": []}
    touched = _touched(setup.strategy, n, records, cfg.n_routed_experts)
    elem = 2 if setup.dtype == "bfloat16" else 4
    weight_bytes = flops.FP8_BLOCK_BYTES if setup.weights != "native" else None     # FP8-resident formats
    tp = n if get_strategy(setup.strategy).leader_only else 1
    hbm_by: dict[str, float] = {}
    for r, rec in enumerate(records):
        comp = [max(0.0, st - pf - sy) for st, pf, sy in zip(rec["step_s"], rec["prefetch_s"], rec["sync_s"])]
        split_acc["compute"].append(_mean(comp))
        split_acc["prefetch_wait"].append(_mean(rec["prefetch_s"]))
        split_acc["sync_wait"].append(_mean(rec["sync_s"]))
        src = 0 if get_strategy(setup.strategy).leader_only else r
        for s, seqs in enumerate(sched.timed(src)):
            b = flops.forward_hbm_bytes(cfg, seq_shapes(seqs), elem, touched[r][s], tp=tp, weight_bytes=weight_bytes)
            for k, v in b.items():
                hbm_by[k] = hbm_by.get(k, 0.0) + v
        t_layers = [_mean([touched[r][s][m] for s in range(steps)]) for m in range(len(cfg.moe_layers))]
        per_rank.append({
            "rank": rec["rank"], "role": rec["role"],
            "step_ms": _mean(rec["step_s"]) * 1e3, "forward_ms": _mean(rec["forward_s"]) * 1e3,
            "compute_ms": _mean(comp) * 1e3, "prefetch_wait_ms": _mean(rec["prefetch_s"]) * 1e3,
            "sync_wait_ms": _mean(rec["sync_s"]) * 1e3, "tokens": sum(rec["tokens"]),
            "remote_bytes_per_step": _mean(rec["remote_bytes"]),
            "experts_touched_per_moe_layer": round(_mean(t_layers), 3),
        })
    split_ms = {k: _mean(v) * 1e3 for k, v in split_acc.items()}
    split_sum = sum(split_ms.values())
    split_pct = {k: (100.0 * v / split_sum if split_sum > 0 else 0.0) for k, v in split_ms.items()}
    scheduled = sum(w.new for r in drivers for seqs in sched.timed(r) for w in seqs)
    counted = sum(sum(records[r]["tokens"]) for r in drivers)
    starts = [records[r]["t_start"] for r in drivers]
    ends = [records[r]["t_end"] for r in drivers]
    wall = max(ends) - min(starts)
    flops_by: dict[str, float] = {}
    for r in drivers:
        for seqs in sched.timed(r):
            for k, v in flops.forward_flops(cfg, seq_shapes(seqs), form=attention_form(setup, seqs)).items():
                flops_by[k] = flops_by.get(k, 0.0) + v
    busy = sum(group_step)
    hw = get_hardware(setup.hw)
    on_gpu = setup.device == "cuda"
    pdtype = PLANNER_DTYPE.get(setup.dtype)
    flops_peak = hw.dense_tflops.get(pdtype) * 1e12 if (on_gpu and pdtype in hw.dense_tflops) else None
    hbm_peak = hw.hbm_tbps * 1e12 if on_gpu else None
    flops_ach = flops_by.get("total", 0.0) / busy / n if busy > 0 else 0.0
    hbm_ach = hbm_by.get("total", 0.0) / busy / n if busy > 0 else 0.0
    remote_rank = [_mean(rec["remote_bytes"]) for rec in records]
    result = {
        "schema": SCHEMA,
        "key": None,
        "created": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "model": model,
        "setup": setup_dict(setup, point),
        "device_name": records[0].get("device_name", setup.device),
        "step_ms": {
            "mean": _mean(group_step) * 1e3, "p50": _pct(group_step, 50) * 1e3, "p90": _pct(group_step, 90) * 1e3,
            "min": min(group_step) * 1e3, "max": max(group_step) * 1e3,
            "rank_mean": _mean([p["step_ms"] for p in per_rank]),
            "per_rank_mean": [p["step_ms"] for p in per_rank],
        },
        "forward_ms": {"rank_mean": _mean([p["forward_ms"] for p in per_rank]),
                       "per_rank_mean": [p["forward_ms"] for p in per_rank]},
        "split_ms": split_ms,
        "split_pct": split_pct,
        "per_rank": per_rank,
        "remote_bytes_per_step": {"per_rank_mean": _mean(remote_rank), "total": sum(remote_rank)},
        "tokens": {"scheduled": scheduled, "counted": counted, "per_step": scheduled / steps},
        "wall_s": wall,
        "tokens_per_s_per_gpu": counted / wall / n if wall > 0 else 0.0,
        "flops": {
            "per_step": flops_by.get("total", 0.0) / steps,
            "by_component": {k: v / steps for k, v in flops_by.items() if k != "total"},
            "achieved_per_gpu": flops_ach, "peak_per_gpu": flops_peak,
            "frac_of_peak": flops_ach / flops_peak if flops_peak else None,
        },
        "hbm": {
            "bytes_per_step_per_gpu": hbm_by.get("total", 0.0) / steps / n,
            "by_component": {k: v / steps / n for k, v in hbm_by.items() if k != "total"},
            "achieved_per_gpu": hbm_ach, "peak_per_gpu": hbm_peak,
            "frac_of_peak": hbm_ach / hbm_peak if hbm_peak else None,
        },
        "prediction": prediction(setup, point, split_ms, _mean(group_step) * 1e3, len(cfg.moe_layers),
                                 experts_touched=_mean([p["experts_touched_per_moe_layer"] for p in per_rank])),
        "graphs": records[0].get("graphs"),
    }
    result["key"] = point_key(model, result["setup"])
    return result


def prediction(setup: BenchSetup, point: Point, split_ms: dict, step_ms: float, n_moe: int,
               experts_touched: float | None = None) -> dict:
    """The roofline planner's per-MoE-layer numbers for the same point, next to the measured step
    divided by the MoE layers (which also carries the dense layers, embeddings and lm_head).
    `single` with a calibration file (`setup.calibration`) also gets `step_model`: the whole step
    predicted term by term (planner/step_model.py; decode with the routed experts touched as measured)
    against the measured step."""
    notes = []
    comparable = setup.device == "cuda"
    if not comparable:
        notes.append("CPU: not comparable")
    if setup.dtype != "bfloat16":
        notes.append(f"planner assumes bf16 weights, the run used {setup.dtype}")
    measured = {"step_ms": step_ms / n_moe, "compute_ms": split_ms["compute"] / n_moe,
                "prefetch_wait_ms": split_ms["prefetch_wait"] / n_moe, "sync_wait_ms": split_ms["sync_wait"] / n_moe}
    out = {"hw": setup.hw, "comparable": comparable, "note": "; ".join(notes), "per_moe_layer": None,
           "measured_per_moe_layer": measured}
    if setup.strategy == "single":
        try:
            shape = load_model_shape(setup.model_dir)
            one = plan_single_layer(shape, get_hardware(setup.hw), point.tokens_per_iter, point.batch,
                                    phase=point.phase, context=point.context, weight_dtype="bf16")
            if setup.calibration is not None:
                out["step_model"] = step_model_prediction(setup, point, shape, step_ms, experts_touched)
        except UserError as exc:
            out["note"] = "; ".join(notes + [f"planner: {exc}"])
            return out
        out["note"] = "; ".join(notes)
        out["per_moe_layer"] = {"t_compute_ms": one["t_compute_ms"], "t_total_ms": one["t_compute_ms"],
                                "t_prefetch_ms": 0.0, "t_exposed_ms": 0.0, "t_prefetch_routed_ms": 0.0}
        out["step_ms_moe_layers"] = one["t_compute_ms"] * n_moe
        return out
    try:
        shape = load_model_shape(setup.model_dir)
        hw = get_hardware(setup.hw)
        if point.phase == "prefill":
            p = plan_layer(shape, hw, setup.ranks, point.tokens_per_iter, point.batch, "bf16", phase="prefill",
                           imbalance_cv=point.imbalance_cv)
        else:
            p = plan_layer(shape, hw, setup.ranks, point.batch, 1, "bf16", phase="decode", context=point.context,
                           imbalance_cv=point.imbalance_cv)
    except UserError as exc:
        out["note"] = "; ".join(notes + [f"planner: {exc}"])
        return out
    cost = {"dwdp": p.dwdp, "dep": p.dep, "tp": p.tp}[setup.strategy]
    per = {"t_compute_ms": cost.t_compute_ms, "t_total_ms": cost.t_total_ms,
           "t_prefetch_ms": p.t_prefetch_ms, "t_exposed_ms": p.dwdp.extra["t_exposed_ms"],
           "t_prefetch_routed_ms": p.dwdp.extra["t_prefetch_routed_ms"]}
    for k in ("t_all_to_all_ms", "t_sync_ms", "t_all_reduce_ms"):
        if k in cost.extra:
            per[k] = cost.extra[k]
    out["per_moe_layer"] = per
    out["step_ms_moe_layers"] = cost.t_total_ms * n_moe
    return out


def step_model_prediction(setup: BenchSetup, point: Point, shape, step_ms: float,
                          experts_touched: float | None) -> dict:
    """One GPU's whole step from the calibration file's records, next to the measured step."""
    hw, cal = load_calibration(get_hardware(setup.hw), setup.calibration)
    weight = "fp8" if setup.weights == "fp8-block" else "bf16"
    if point.phase == "decode":
        pred = predict_step(shape, hw, cal, phase="decode", tokens=point.batch, context=point.context,
                            weight_dtype=weight, dense_dtype=weight, kv_dtype="bf16",
                            experts_touched=experts_touched, overlap_host=setup.async_scheduling)
    else:
        pred = predict_step(shape, hw, cal, phase="prefill", tokens=point.tokens_per_iter, batch=point.batch,
                            weight_dtype=weight, dense_dtype=weight, kv_dtype="bf16")
    return {"calibration": setup.calibration, "step_ms": pred.total_ms,
            "measured_over_predicted": step_ms / pred.total_ms if pred.total_ms > 0 else None,
            "terms_ms": {t.name: t.ms for t in pred.terms}}


def kv_pool_bytes(setup: BenchSetup, point: Point, cfg) -> int:
    """Bytes of the KV pool one rank allocates for `point` (TP: every rank holds the whole batch)."""
    blocks = build_schedule(point, setup.strategy, setup.ranks, setup.block_size).kv_blocks + 1
    elem = 2 if setup.dtype == "bfloat16" else 4
    return blocks * cfg.num_hidden_layers * setup.block_size * cfg.kv_cache_dim * elem


def check_fits(setup: BenchSetup, point: Point, cfg) -> None:
    """CUDA: refuse a point whose KV pool alone would take more than KV_MEMORY_FRACTION of --hw memory."""
    if setup.device != "cuda":
        return
    hw = get_hardware(setup.hw)
    need = kv_pool_bytes(setup, point, cfg)
    if need > KV_MEMORY_FRACTION * hw.memory_bytes:
        raise UserError(f"{setup.strategy} x{setup.ranks}, {describe_load(setup_dict(setup, point))}, cv "
                        f"{point.imbalance_cv:g}: the KV pool needs {need / 2**30:.1f} GiB per rank, more than "
                        f"{KV_MEMORY_FRACTION:.0%} of the {hw.memory_gib:g} GiB of --hw {hw.name}; "
                        f"lower --batch or --context")


def check_environment(setup: BenchSetup) -> None:
    """Fail before spawning anything when the machine cannot run the setup."""
    if setup.device != "cuda":
        return
    import torch

    if not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is visible (use --device cpu)")
    # dep/tp with more ranks than GPUs: the ranks share GPUs, gloo replaces NCCL and the peer-memory
    # collectives (CUDA IPC) carry the decode steps (collectives/build.py)


def run_points(setup: BenchSetup, points: list[Point], model: dict | None = None) -> list[dict]:
    """Launch the group once and measure every point in order; one result object per point."""
    from dynamo_dwdp.rank.local_group import run_local_group   # local import: loads torch; planning and `bench table` do not

    setup.validate()
    model = model or _model_info(setup.model_dir)
    if setup.expert_skew:
        parse_expert_skew(f"{setup.expert_skew[0]}:{setup.expert_skew[1]}", model["experts"])
    points = [p.validate() for p in points]
    if not points:
        return []
    model_cfg = load_model_config(setup.model_dir)
    for p in points:
        check_fits(setup, p, model_cfg)
    check_environment(setup)
    kv = max(build_schedule(p, setup.strategy, setup.ranks, setup.block_size).kv_blocks for p in points)
    most_tokens = max(p.tokens_per_iter * (setup.ranks if get_strategy(setup.strategy).leader_only else 1) for p in points)
    # the longest sequence any point makes (sizes the decode graphs captured at start-up)
    longest = max(p.context + p.warmup + p.steps if p.phase == "decode" else p.tokens_per_iter for p in points) + 16
    cfg = EngineSettings(block_size=setup.block_size, num_kv_blocks=kv + 1, max_num_seqs=max(1, most_tokens),
                         max_num_batched_tokens=max(1, most_tokens), device=setup.device, dtype=setup.dtype,
                         enable_prefix_caching=False, cuda_graphs=setup.cuda_graphs,
                         attention_backend=setup.attention, weight_format=setup.weights,
                         capture_graphs_at_start=False,      # bench_rank captures once its probe is installed
                         max_model_len=min(longest, model_cfg.max_position_embeddings))
    dwdp = setup.dwdp
    results = run_local_group(setup.model_dir, cfg, setup.group_strategy, setup.ranks, bench_rank,
                              [(setup, points)] * setup.ranks, dwdp=dwdp, timeout=setup.timeout)
    failed = [r for r in results if r.error]
    if failed:
        first = next((r for r in failed if r.user_error), failed[0])
        if first.user_error:
            raise UserError(first.error.splitlines()[0])
        raise PeerError(f"bench rank {first.rank} failed: {first.error}")
    return [summarize(setup, p, [results[r].value[i] for r in range(setup.ranks)], model)
            for i, p in enumerate(points)]


def run_engine_bench(setup: BenchSetup, point: Point) -> dict:
    return run_points(setup, [point])[0]


# ------------------------------------------------------------------------------------------ output
def _si(x: float | None, unit: str) -> str:
    if x is None:
        return "-"
    for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.3g} {prefix}{unit}"
    return f"{x:.3g} {unit}"


def describe_load(setup: dict) -> str:
    if setup["phase"] == "prefill":
        return f"prefill {setup['tokens_per_iter']} tok/rank in {setup['batch']} seq"
    return f"decode {setup['batch']} seq/rank @ ctx {setup['context']}"


def render_text(res: dict) -> str:
    """A short human-readable block for one result."""
    st, sm, sp, pr = res["setup"], res["split_ms"], res["split_pct"], res["prediction"]
    opts = [o for o, on in (("routed-only", st["dwdp_routed_only"]), ("contention-opt", st["dwdp_contention_opt"]),
                            ("cuda-graphs", st.get("cuda_graphs"))) if on]
    opts += [f"skew {st['expert_skew']}"] if st["expert_skew"] else []
    opts += [f"attention {st['attention']}"] if st.get("attention", "auto") != "auto" else []
    frac = (lambda f: f" ({100 * f:.1f}% of peak)" if f is not None else "")
    lines = [
        f"bench engine: {st['strategy']} x{st['ranks']}, {describe_load(st)}, cv {st['imbalance_cv']:g}"
        + (f", {', '.join(opts)}" if opts else "")
        + f"; {res['device_name']} {st['dtype']}; {st['steps']} steps after {st['warmup']} warmup",
        f"  step ms      mean {res['step_ms']['mean']:.3f}  p50 {res['step_ms']['p50']:.3f}  "
        f"per rank {', '.join(f'{x:.3f}' for x in res['step_ms']['per_rank_mean'])}",
        f"  split        compute {sm['compute']:.3f} ms ({sp['compute']:.0f}%)  exposed prefetch "
        f"{sm['prefetch_wait']:.3f} ms ({sp['prefetch_wait']:.0f}%)  sync wait {sm['sync_wait']:.3f} ms "
        f"({sp['sync_wait']:.0f}%)",
        f"  remote       {_si(res['remote_bytes_per_step']['per_rank_mean'], 'B')}/step/rank",
        f"  throughput   {res['tokens_per_s_per_gpu']:,.1f} tokens/s per GPU "
        f"({res['tokens']['counted']} tokens in {res['wall_s']:.3f} s)",
        f"  compute      {_si(res['flops']['achieved_per_gpu'], 'FLOP/s')} per GPU{frac(res['flops']['frac_of_peak'])}",
        f"  memory       {_si(res['hbm']['achieved_per_gpu'], 'B/s')} per GPU{frac(res['hbm']['frac_of_peak'])}",
    ]
    per = pr.get("per_moe_layer")
    meas = pr["measured_per_moe_layer"]
    if per:
        lines.append(f"  planner      {pr['hw']}: t_compute {per['t_compute_ms']:.4g} ms, t_prefetch "
                     f"{per['t_prefetch_ms']:.4g} ms, {st['strategy']} total {per['t_total_ms']:.4g} ms per MoE layer; "
                     f"measured {meas['step_ms']:.4g} ms (compute {meas['compute_ms']:.4g})"
                     + (f"  [{pr['note']}]" if pr["note"] else ""))
    elif pr["note"]:
        lines.append(f"  planner      [{pr['note']}]")
    return "\n".join(lines)


def append_jsonl(path: str, results: list[dict]) -> None:
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        for r in results:
            f.write(json.dumps(r, sort_keys=True) + "\n")

