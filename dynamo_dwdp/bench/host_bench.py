"""Host-path benchmark (`dynamo-dwdp bench host`): what a decode step costs outside the model forward.

Everything is real except the forward: `FakeForwardRunner.launch` builds the step's `ForwardBatch`
(host work of an eager step, outside the forward timer in `ModelRunner.execute` too) and returns
float32 logits of the right shape (rows of a seeded random buffer, copied); that copy is timed and
subtracted, as the worker's `dwdp_step_seconds` counter is taken around the real forward. What is
left is the host path of one step at batch B: scheduling, block accounting, batch building,
sampling, stop checks, output objects, and (at the upper levels) delivery to the streams.

Levels (each at every batch size):
- core:   `EngineCore.step()` in a loop (one thread);
- async:  `AsyncEngine` (engine thread) + one asyncio consumer per request;
- worker: the worker's `generate` async generator (Dynamo's request dict in, output chunk dicts out;
          metrics and its after-step hook included), consumed directly: no frontend, no Dynamo
          runtime, so Dynamo's own per-chunk cost (Rust bridge, request plane) is not in the figure;
- dynamo: that cost alone: B streams of `steps` one-token chunks from an echo handler (no engine)
          served by a child process through Dynamo's runtime (file discovery, TCP request plane) to
          a client in this process; "host ms per step" = the wall time to move B chunks, and
          "server cpu ms" = the CPU time (all threads) the serving process spent on them.

The core level also counts top-level tensor ops and `.item()` host syncs per decode step
(torch.profiler, on steps after the timed window): on a GPU each op is a launch and each sync a stall.

The B requests are admitted and prefilled first (untimed); the timed window is `steps` pure decode
steps with B running sequences. Requests are built as the A/B harness sends them by default
(temperature 1 unless --temperature, ignore_eos, min_tokens = max_tokens: exact output lengths).
Sampling math over the vocabulary runs on the CPU here; on a GPU it is device work, so `--vocab`
small (e.g. 1024) isolates the per-sequence Python work from the per-element math.
"""
from __future__ import annotations

import asyncio
import cProfile
import io
import pstats
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable

import torch

from dynamo_dwdp.config.engine import EngineSettings
from dynamo_dwdp.engine.async_engine import AsyncEngine
from dynamo_dwdp.engine.engine_core import EngineCore
from dynamo_dwdp.engine.sampling import SamplingParams
from dynamo_dwdp.errors import UserError, require_min_ints
from dynamo_dwdp.model.batch import ForwardBatch
from dynamo_dwdp.model.step_stats import ExecutorStats

LEVELS = ("core", "async", "worker", "dynamo")
SCHEMA = "dynamo-dwdp/bench-host/1"
OP_COUNT_STEPS = 2            # core level: decode steps after the timed window, run under torch.profiler


@dataclass
class HostShape:
    """The few model facts the engine reads (no weights are built)."""

    vocab_size: int = 102400                 # DeepSeek-V2-Lite
    max_position_embeddings: int = 163840
    eos_token_ids: tuple[int, ...] = (100001,)
    bos_token_id: int | None = 100000


class _FakeExecutor:
    strategy = "fake-forward"

    def __init__(self):
        self.stats = ExecutorStats()

    def close(self) -> None:
        pass


class FakeForwardRunner:
    """Stands in for `ModelRunner`: `launch` returns logits [rows wanted, vocab] (float32) and reports
    its own time as `last_launch_seconds` (the engine adds it to `executor.stats.step_seconds`), so
    callers can subtract it."""

    device = torch.device("cpu")

    def __init__(self, config: EngineSettings, shape: HostShape, seed: int = 0):
        self.config = config.validate()
        self.model_config = shape
        self.executor = _FakeExecutor()
        self.last_launch_seconds = 0.0
        g = torch.Generator().manual_seed(seed)
        self._rows = max(1, config.max_num_seqs)
        self._logits = torch.randn(self._rows, shape.vocab_size, generator=g) * 3.0

    def launch(self, token_chunks, start_positions, block_tables, want_logits, fed=None) -> torch.Tensor:
        # host work of an eager step, outside the worker's forward timer as in ModelRunner.launch
        batch = ForwardBatch.build(token_chunks, start_positions, block_tables, self.config.block_size, want_logits)
        if fed is not None:
            fed.apply(batch.input_ids)
        t0 = time.perf_counter()
        n = sum(1 for w in want_logits if w)
        reps = -(-n // self._rows) if n else 0
        logits = (self._logits.repeat(reps, 1) if reps > 1 else self._logits)[:n].clone()
        stats = self.executor.stats
        self.last_launch_seconds = time.perf_counter() - t0
        stats.steps += 1
        stats.tokens += sum(len(c) for c in token_chunks)
        return logits

    def close(self) -> None:
        pass


class CoreOnlyRank:
    """A one-rank `RankEngine` stand-in (no group, no coordinator) for `AsyncEngine`."""

    coordinator = None
    group = None

    def __init__(self, engine: EngineCore):
        self.engine = engine
        self.runner = engine.runner

    @property
    def stats(self) -> ExecutorStats:
        return self.runner.executor.stats

    def step(self):
        if not self.engine.has_unfinished():
            return False, []
        return True, self.engine.step()

    def close(self) -> None:
        pass


@dataclass(frozen=True)
class HostPoint:
    batch: int
    prompt_len: int = 1024
    steps: int = 32
    warmup: int = 4
    vocab: int = 102400
    temperature: float = 1.0
    top_p: float = 1.0
    block_size: int = 16

    def validate(self) -> "HostPoint":
        require_min_ints(self, (("batch", 1), ("prompt_len", 1), ("steps", 1), ("warmup", 0), ("vocab", 2),
                          ("block_size", 1)))
        if not 0 <= self.temperature <= 100:
            raise UserError(f"--temperature must be in [0, 100], got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise UserError(f"--top-p must be in (0, 1], got {self.top_p!r}")
        return self

    @property
    def max_tokens(self) -> int:
        return self.warmup + self.steps + 1 + OP_COUNT_STEPS    # + the prefill step's token, + counted steps

    def engine_settings(self) -> EngineSettings:
        per_seq = -(-(self.prompt_len + self.max_tokens + 1) // self.block_size)
        return EngineSettings(block_size=self.block_size, num_kv_blocks=self.batch * per_seq + 1,
                              max_num_seqs=self.batch, max_num_batched_tokens=self.batch * (self.prompt_len + 1),
                              max_model_len=self.prompt_len + self.max_tokens + 8)

    def prompts(self) -> list[list[int]]:
        g = torch.Generator().manual_seed(1234)
        ids = torch.randint(0, self.vocab - 2, (self.batch, self.prompt_len), generator=g)
        return ids.tolist()

    def request(self, prompt: list[int]) -> dict[str, Any]:
        """The PreprocessedRequest the A/B harness's default body turns into (ignore_eos, exact length)."""
        return {"token_ids": prompt, "eos_token_ids": [],
                "stop_conditions": {"max_tokens": self.max_tokens, "min_tokens": self.max_tokens, "ignore_eos": True},
                "sampling_options": {"temperature": self.temperature, "top_p": self.top_p}}

    def params(self) -> SamplingParams:
        return SamplingParams(max_tokens=self.max_tokens, min_tokens=self.max_tokens, ignore_eos=True,
                              temperature=self.temperature, top_p=self.top_p)


def make_engine(point: HostPoint) -> EngineCore:
    shape = HostShape(vocab_size=point.vocab, eos_token_ids=(point.vocab - 1,), bos_token_id=point.vocab - 2)
    return EngineCore(FakeForwardRunner(point.engine_settings(), shape))


@dataclass
class Window:
    """Timed decode steps: wall seconds over them and the fake forward's share."""

    steps: int = 0
    wall_s: float = 0.0
    forward_s: float = 0.0
    profile: str | None = None
    ops_per_step: float | None = None        # core level only (count_ops)
    syncs_per_step: float | None = None
    server_cpu_s: float | None = None        # dynamo level: CPU seconds of the serving process

    def host_ms(self) -> float:
        return (self.wall_s - self.forward_s) / max(1, self.steps) * 1e3


def run_core(point: HostPoint, profile: bool = False) -> Window:
    engine = make_engine(point)
    for i, prompt in enumerate(point.prompts()):
        engine.add_request(f"r{i}", prompt, point.params())
    stats = engine.runner.executor.stats
    while any(len(s.output_ids) == 0 for s in engine.requests.values()):        # prefill (untimed)
        engine.step()
    for _ in range(point.warmup):
        engine.step()
    prof = cProfile.Profile() if profile else None
    f0, t0 = stats.step_seconds, time.perf_counter()
    if prof:
        prof.enable()
    n = 0
    while n < point.steps and engine.has_unfinished():
        outs = engine.step()
        assert len(outs) == point.batch, f"decode step produced {len(outs)} outputs at batch {point.batch}"
        n += 1
    if prof:
        prof.disable()
    w = Window(n, time.perf_counter() - t0, stats.step_seconds - f0)
    if prof:
        w.profile = _profile_text(prof)
    w.ops_per_step, w.syncs_per_step = count_ops(engine, OP_COUNT_STEPS)
    return w


def count_ops(engine: EngineCore, steps: int) -> tuple[float, float]:
    """Top-level tensor ops (on a GPU: kernel launches or host-side tensor work) and `.item()` host
    syncs per decode step, counted with torch.profiler over `steps` untimed steps."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            engine.step()
    ops = [e.name for e in prof.events() if e.cpu_parent is None and e.name.startswith("aten::")]
    syncs = sum(1 for n in ops if n in ("aten::item", "aten::_local_scalar_dense"))
    return len(ops) / steps, syncs / steps


StreamFactory = Callable[[AsyncEngine, str, dict, HostPoint], AsyncIterator]
"""(async engine, request id, request dict, point) -> async iterator of chunks (the worker level)."""


def _engine_stream(ae: AsyncEngine, rid: str, request: dict, point: HostPoint) -> AsyncIterator:
    return ae.generate(rid, request["token_ids"], point.params())


def run_async(point: HostPoint, stream: StreamFactory | None = None, profile: bool = False,
              on_engine: Callable[[AsyncEngine], None] | None = None) -> Window:
    """Serve B requests through `AsyncEngine` (and `stream`, the worker level, if given); time the
    steps from the first timed decode step until every stream has received its last chunk."""
    engine = make_engine(point)
    rank = CoreOnlyRank(engine)
    ae = AsyncEngine(rank)
    if on_engine is not None:
        on_engine(ae)
    stats = engine.runner.executor.stats
    mark: dict[str, float] = {}
    first_decode_step = [None]

    def watch() -> None:                  # engine thread, after every iteration
        if first_decode_step[0] is None and engine.requests and \
                all(len(s.output_ids) >= 1 + point.warmup for s in engine.requests.values()):
            first_decode_step[0] = stats.steps
            mark["t0"], mark["f0"] = time.perf_counter(), stats.step_seconds

    ae.on_step.insert(0, watch)
    ae.start()
    open_streams = stream or _engine_stream
    prof = cProfile.Profile() if profile else None

    async def consume(i: int, prompt: list[int]) -> int:
        n = 0                                       # tokens (a chunk may carry several)
        async for out in open_streams(ae, f"r{i}", point.request(prompt), point):
            n += len(out["token_ids"] if isinstance(out, dict) else out.new_token_ids)
        return n

    async def main() -> None:
        counts = await asyncio.gather(*(consume(i, p) for i, p in enumerate(point.prompts())))
        mark["t1"] = time.perf_counter()
        if any(c < point.max_tokens for c in counts):
            raise RuntimeError(f"streams ended early: {sorted(counts)[:4]}... tokens (expected {point.max_tokens})")

    try:
        if prof:
            prof.enable()
        asyncio.run(main())
        if prof:
            prof.disable()
    finally:
        ae.stop()
    steps = stats.steps - (first_decode_step[0] or 0)
    w = Window(steps, mark["t1"] - mark["t0"], stats.step_seconds - mark["f0"])
    if prof:
        w.profile = _profile_text(prof)
    return w


def _profile_text(prof: cProfile.Profile, top: int = 25) -> str:
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(top)
    return s.getvalue()


@dataclass
class HostResult:
    point: HostPoint
    level: str
    window: Window
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        p = self.point
        return {"schema": SCHEMA, "level": self.level, "batch": p.batch, "prompt_len": p.prompt_len,
                "vocab": p.vocab, "temperature": p.temperature, "top_p": p.top_p, "steps": self.window.steps,
                "host_ms_per_step": round(self.window.host_ms(), 4),
                "host_us_per_seq_step": round(self.window.host_ms() * 1e3 / p.batch, 2),
                "fake_forward_ms_per_step": round(self.window.forward_s / max(1, self.window.steps) * 1e3, 4),
                "tensor_ops_per_step": self.window.ops_per_step, "item_syncs_per_step": self.window.syncs_per_step,
                "server_cpu_ms_per_step": None if self.window.server_cpu_s is None
                else round(self.window.server_cpu_s / max(1, self.window.steps) * 1e3, 4)}


def run_point(point: HostPoint, level: str, worker_stream: StreamFactory | None = None,
              worker_setup: Callable[[AsyncEngine], None] | None = None, profile: bool = False,
              dynamo_chunks: Callable[[int, int], tuple[float, float]] | None = None) -> HostResult:
    """`dynamo_chunks(streams, chunks_per_stream) -> (wall s, serving process CPU s)` is the dynamo
    level's measurement (worker/host_path.py: Dynamo's request plane alone, no engine)."""
    point.validate()
    if level == "core":
        w = run_core(point, profile)
    elif level == "async":
        w = run_async(point, None, profile)
    elif level == "worker":
        if worker_stream is None:
            raise UserError("bench host: the worker level needs the worker's stream (run it from the CLI)")
        w = run_async(point, worker_stream, profile, worker_setup)
    elif level == "dynamo":
        if dynamo_chunks is None:
            raise UserError("bench host: the dynamo level needs Dynamo's runtime (run it from the CLI)")
        wall, cpu = dynamo_chunks(point.batch, point.steps)
        w = Window(point.steps, wall, 0.0, server_cpu_s=cpu)
    else:
        raise UserError(f"--levels: {level!r} is not one of {', '.join(LEVELS)}")
    return HostResult(point, level, w)


def render(results: list[HostResult]) -> str:
    lines = [f"{'level':<7} {'batch':>5} {'host ms/step':>13} {'us/seq/step':>12} {'fake fwd ms':>12} "
             f"{'ops/step':>9} {'syncs/step':>10} {'server cpu ms':>13}"]
    for r in results:
        d = r.as_dict()
        ops = "" if d["tensor_ops_per_step"] is None else f"{d['tensor_ops_per_step']:.0f}"
        syncs = "" if d["item_syncs_per_step"] is None else f"{d['item_syncs_per_step']:.0f}"
        cpu = "" if d["server_cpu_ms_per_step"] is None else f"{d['server_cpu_ms_per_step']:.3f}"
        lines.append(f"{r.level:<7} {r.point.batch:>5} {d['host_ms_per_step']:>13.3f} "
                     f"{d['host_us_per_seq_step']:>12.1f} {d['fake_forward_ms_per_step']:>12.3f} "
                     f"{ops:>9} {syncs:>10} {cpu:>13}")
    return "\n".join(lines)
