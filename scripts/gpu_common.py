"""What the GPU scripts share: the progress line, the timers, the machine's ceilings, the random
v2-lite-shape models, and an engine (`ModelRunner`) set up for one decode or prefill step.

Every GPU script measured with these before they were gathered here (each script had its own copy);
the measurements are unchanged: CUDA-event medians (`median_ms`), graph-replayed kernel times
(`graph_us`, launch gaps excluded), host wall time around `execute` with a device sync (`wall_ms`),
and back-to-back replays of one captured decode graph (`graph_replay_ms`).
"""
from __future__ import annotations

import os
import statistics
import time

import torch

T0 = time.perf_counter()
BLOCK = 16                                                  # KV block size of every engine set up here


def say(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", flush=True)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative error ||a - b|| / ||b|| in fp32."""
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


# ------------------------------------------------------------------------------------------- timers
def median_ms(fn, reps: int = 20) -> float:
    """Median milliseconds of one call of `fn` between CUDA events, after 3 untimed calls."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def graph_us(fn, reps: int = 50, calls: int = 10) -> float:
    """Median microseconds of one call of `fn`, replayed from a CUDA graph of `calls` calls (launch gaps
    excluded)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(calls):
            fn()
    return median_ms(g.replay, reps) * 1e3 / calls


def rotating(fn, x, ids, wt, sets: list, which: int):
    """A call of `fn(x, ids, wt, banks)` with the next of `sets` each time (`sets[i][which]`: the banks),
    so that the weights of the call before are not still in L2 when timed."""
    i = [0]

    def call():
        i[0] = (i[0] + 1) % len(sets)
        return fn(x, ids, wt, sets[i[0]][which])
    return call


def wall_ms(runner, step, reps: int, warmup: int = 0) -> float:
    """Median host wall milliseconds of `runner.execute(*step)` with a device sync after each call
    (staging the inputs, the replay or the eager forward, the sync), after `warmup` untimed calls."""
    for _ in range(warmup):
        runner.execute(*step)
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        runner.execute(*step)
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def graph_replay_ms(runner, batch: int, context: int, reps: int) -> float | None:
    """Mean milliseconds of the captured decode graph of (batch, context + 1) replayed back to back,
    no host work between (None: no such graph was captured)."""
    entry = runner.graphs.graphs.get(runner.graphs.key(batch, context + 1)) if runner.graphs is not None else None
    if entry is None:
        return None
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(reps):
        entry[0].replay()
    e.record()
    torch.cuda.synchronize()
    return s.elapsed_time(e) / reps


# ----------------------------------------------------------------------------------------- ceilings
def ceilings() -> dict:
    """HBM device-to-device copy (bytes read + written, 1 GiB bf16) and bf16 GEMM 8192^3, CUDA events."""
    n = 1 << 29                                             # 1 GiB of bf16
    src = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src))
    hbm = 2 * src.numel() * 2 / (ms / 1e3)
    del src, dst
    m = 8192
    a = torch.randn(m, m, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(m, m, device="cuda", dtype=torch.bfloat16)
    ms_mm = median_ms(lambda: a @ b, reps=10)
    flops = 2 * m ** 3 / (ms_mm / 1e3)
    del a, b
    torch.cuda.empty_cache()
    return {"hbm_copy_bytes_per_s": hbm, "bf16_gemm_flops": flops, "copy_ms_1GiB": ms, "gemm_ms_8192": ms_mm}


# ------------------------------------------------------------------------------------------- models
def write_v2lite(tmp: str, layers: int) -> str:
    """The v2-lite-shape random model (bf16, `layers` deep), generated on the GPU, under tmp/v2-lite."""
    from dynamo_dwdp.synthetic.checkpoint import write_checkpoint   # local import: torch-side writer

    model = os.path.join(tmp, "v2-lite")
    t = time.perf_counter()
    write_checkpoint(model, "v2-lite-shape", seed=0, dtype="bf16", num_layers=layers, quiet=True, device="cuda",
                     with_tokenizer=False)
    say(f"v2-lite-shape {layers} layers written in {time.perf_counter() - t:.1f}s")
    return model


def lite3(tmp: str) -> str:
    """The 3-layer v2-lite-shape model of the checks under tmp/lite3, written on first use."""
    from dynamo_dwdp.synthetic.checkpoint import write_checkpoint   # local import: torch-side writer

    path = os.path.join(tmp, "lite3")
    if not os.path.isfile(os.path.join(path, "config.json")):
        write_checkpoint(path, "v2-lite-shape", seed=0, dtype="bf16", num_layers=3, quiet=True, device="cuda",
                         with_tokenizer=False)
    return path


def block_tables(lens: list[int], extra: int) -> tuple[list[list[int]], int]:
    """Disjoint block tables for sequences of `lens` tokens plus `extra` more each; and the blocks used."""
    tables, nxt = [], 0
    for n in lens:
        need = (n + extra + BLOCK - 1) // BLOCK
        tables.append(list(range(nxt, nxt + need)))
        nxt += need
    return tables, nxt


# ------------------------------------------------------------------------------------------ engines
def decode_runner(model: str, batch: int, context: int, weight_format: str = "native", cuda_graphs: bool = True):
    """A one-rank `ModelRunner` with `batch` sequences of `context` random prompt tokens prefilled (in
    chunks of 8), and the next decode step's arguments for `execute`. With `cuda_graphs` the step's
    graph is captured on its first call (not at start-up)."""
    from dynamo_dwdp.config.engine import EngineSettings         # local import: engine after torch's CUDA set-up
    from dynamo_dwdp.engine.model_runner import ModelRunner
    from dynamo_dwdp.model.moe_executor import LocalExecutor

    per = (context + 1 + BLOCK - 1) // BLOCK
    extra = dict(cuda_graphs=True, capture_graphs_at_start=False, weight_format=weight_format) if cuda_graphs else {}
    cfg = EngineSettings(block_size=BLOCK, num_kv_blocks=batch * per + 1, device="cuda", dtype="bfloat16",
                         max_num_seqs=batch, max_num_batched_tokens=8192, **extra)
    r = ModelRunner(model, cfg, LocalExecutor)
    g = torch.Generator().manual_seed(2)
    tables = [list(range(i * per, (i + 1) * per)) for i in range(batch)]
    for i in range(0, batch, 8):
        chunk = list(range(i, min(batch, i + 8)))
        r.execute([torch.randint(5, 1000, (context,), generator=g).tolist() for _ in chunk], [0] * len(chunk),
                  [tables[j] for j in chunk], [True] * len(chunk))
    step = ([[int(t)] for t in torch.randint(5, 1000, (batch,), generator=g)], [context] * batch, tables,
            [True] * batch)
    return r, step


def prefill_runner(model: str, tokens: int):
    """A one-rank eager `ModelRunner` sized for one `tokens`-token prompt, and that prompt's `execute` arguments."""
    from dynamo_dwdp.config.engine import EngineSettings         # local import: engine after torch's CUDA set-up
    from dynamo_dwdp.engine.model_runner import ModelRunner
    from dynamo_dwdp.model.moe_executor import LocalExecutor

    blocks = (tokens + BLOCK - 1) // BLOCK
    r = ModelRunner(model, EngineSettings(block_size=BLOCK, num_kv_blocks=blocks + 1, device="cuda", dtype="bfloat16",
                                          max_num_batched_tokens=tokens), LocalExecutor)
    prompt = torch.randint(5, 1000, (tokens,), generator=torch.Generator().manual_seed(3)).tolist()
    return r, ([prompt], [0], [list(range(blocks))], [True])


def fp8_engine_logits(lite: str, formats: tuple[str, ...]) -> dict:
    """Prefill and decode-graph logits of the 3-layer model for each weight format: "round-trip" is the
    bf16 model with its weights rounded through FP8 (the dequantized model, the reference); the others
    are `weight_format` values. Returns {format: (prefill logits, decode logits, runner.fp8 stats)}."""
    from dynamo_dwdp.config.engine import EngineSettings         # local import: engine after torch's CUDA set-up
    from dynamo_dwdp.engine.model_runner import ModelRunner
    from dynamo_dwdp.model.fp8_weights import round_trip_fp8
    from dynamo_dwdp.model.moe_executor import LocalExecutor

    gen = torch.Generator().manual_seed(4)
    lens = [300, 77, 1000, 5]
    prompts = [torch.randint(5, 1000, (n,), generator=gen).tolist() for n in lens]
    tables, used = block_tables(lens, 2)
    nxt_tok = torch.randint(5, 1000, (len(lens),), generator=gen).tolist()
    out = {}
    for fmt in formats:
        cfg = EngineSettings(block_size=BLOCK, num_kv_blocks=used + 1, device="cuda", dtype="bfloat16",
                             cuda_graphs=True, max_num_seqs=4, max_num_batched_tokens=4096, max_model_len=1100,
                             weight_format="native" if fmt == "round-trip" else fmt, capture_graphs_at_start=False)
        r = ModelRunner(lite, cfg, LocalExecutor)
        if fmt == "round-trip":
            round_trip_fp8(r.model, r.executor)
        pre = r.execute(prompts, [0] * len(lens), tables, [True] * len(lens)).float()
        dec = r.execute([[t] for t in nxt_tok], lens, tables, [True] * len(lens)).float()
        out[fmt] = (pre, dec, r.fp8)
        del r
        torch.cuda.empty_cache()
    return out
