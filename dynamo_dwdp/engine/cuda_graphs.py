"""Decode steps replayed from CUDA graphs (mechanism; the model runner decides when to use them).

A decode step (every sequence adds exactly one token) has shapes that depend only on the batch size
B and the longest context. Graphs are keyed by (batch bucket, block bucket): B is padded up to the
next batch bucket, the block tables up to the next block bucket, so one captured
graph serves every step that fits it (the context bucket keeps padded KV reads under 25%).
`capture_all` captures every key the engine can use while it starts (the model runner calls it for
the local executors), so no capture happens on a request's path; a key still missing (graphs dropped
after an executor change) is captured the first time it is needed, and counted
(`captures_after_start`). All graphs share one memory pool and write their logits into one static
buffer, so the pool holds the largest graph's intermediates once, not one set per graph.

Invariants:
- the graph reads its inputs from static device buffers that `run` overwrites in place;
- padded rows write their KV into a scratch block that the block manager never hands out (the last
  block of the pool) and see no context (context_len 0: their attention output is 0);
- the forward must be free of host syncs (the sync-free expert path, no `.item()`/`.tolist()`), and
  the executor must say it can be captured (`graph_safe`): LocalExecutor (bf16), DWDP in
  all-remote mode over CUDA IPC (bf16), and DEP and TP (bf16) when their collectives run on the
  peer-memory protocol (`collectives/`); DEP agrees on the batch bucket once per step on the host
  (`agree_step`, `graph_batch`) and captures lazily, after that agreement;
- the executor's graph protocol brackets every capture (`prepare_capture`/`end_capture`) and replay
  (`before_replay`/`after_replay`); when its `graph_epoch()` changes (a DWDP peer died) every graph
  is dropped and the next steps capture afresh (or run eagerly, if capture fails).
"""
from __future__ import annotations

import logging
import time
from itertools import chain

import numpy as np
import torch

from dynamo_dwdp.engine.sampling import device_tensor
from dynamo_dwdp.model.batch import ForwardBatch

log = logging.getLogger(__name__)

BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
MIN_BLOCKS = 4


def batch_bucket(n: int, max_batch: int) -> int | None:
    """Smallest bucket >= n (buckets above max_batch are replaced by max_batch itself)."""
    if n > max_batch:
        return None
    for b in BATCH_BUCKETS:
        if b >= n:
            return min(b, max_batch)
    return max_batch


def block_bucket(n: int, max_blocks: int) -> int | None:
    """Blocks a graph gathers for a longest context of n blocks: at least MIN_BLOCKS, then four steps
    per power of two (n rounded up to a multiple of next_pow2(n)/8: under 25% padded reads), capped
    at max_blocks."""
    if n > max_blocks:
        return None
    if n <= MIN_BLOCKS:
        return min(MIN_BLOCKS, max_blocks)
    step = max(1, (1 << (n - 1).bit_length()) // 8)
    return min(-(-n // step) * step, max_blocks)


class _CaptureFailed(Exception):
    pass


class DecodeGraphs:
    def __init__(self, model, kv_pool: torch.Tensor, scratch_block: int, block_size: int, max_batch: int,
                 max_blocks: int, device: torch.device):
        self.model = model
        self.executor = model.executor
        self.epoch = self.executor.graph_epoch() if self.executor is not None else 0
        self.kv_pool = kv_pool
        self.scratch = scratch_block
        self.bs = block_size
        self.max_batch = max_batch
        self.max_blocks = max_blocks
        self.device = device
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}   # key -> (graph, logits view)
        self.pool = None                                  # one memory pool for all graphs (first capture)
        self.side: torch.cuda.Stream | None = None        # the warm-up stream of every capture (first capture)
        self.replays = 0
        self.failed: str | None = None                    # set when a capture failed: eager from then on
        self.started = False                              # capture_all ran
        self.captures_after_start = 0
        self.capture_seconds = 0.0                        # capture_all: wall time
        self.capture_bytes = 0                            # capture_all: device memory reserved by the graphs
        self.logits_out: torch.Tensor | None = None       # [max_batch, vocab] float32, written by every graph
        n, L = max_batch, max_blocks
        z = dict(dtype=torch.long, device=device)
        self.ids = torch.zeros(n, **z)
        self.pos = torch.zeros(n, **z)
        self.slots = torch.full((n,), scratch_block * block_size, **z)
        self.ctx = torch.zeros(n, **z)
        self.tables = torch.full((n, L), scratch_block, **z)
        self.ones = torch.ones(n, **z)
        self.rows = torch.arange(n, **z)

    def all_keys(self) -> list[tuple[int, int]]:
        """Every (batch bucket, block bucket) a decode step of this engine can map to, largest first."""
        batches = {batch_bucket(n, self.max_batch) for n in range(1, self.max_batch + 1)}
        blocks = {block_bucket(n, self.max_blocks) for n in range(1, self.max_blocks + 1)}
        return sorted(((b, k) for b in batches for k in blocks), reverse=True)

    def capture_all(self) -> dict:
        """Capture every key now (engine start-up); returns {graphs, seconds, bytes}. A failed capture
        leaves `failed` set (decode then runs eagerly), as in `run`."""
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()                          # cached free blocks out of the baseline
        t0, mem0 = time.perf_counter(), torch.cuda.memory_reserved(self.device)
        for key in self.all_keys():
            if key not in self.graphs:
                try:
                    self._capture(key)
                except _CaptureFailed:
                    break
        torch.cuda.synchronize(self.device)
        self.capture_seconds = time.perf_counter() - t0
        torch.cuda.empty_cache()                          # what stays reserved now is held by the graphs
        self.capture_bytes = torch.cuda.memory_reserved(self.device) - mem0
        self.started = True
        log.info("captured %d decode CUDA graphs at start-up in %.1fs, %.1f MiB of graph memory", len(self.graphs),
                 self.capture_seconds, self.capture_bytes / 2**20)
        return {"graphs": len(self.graphs), "seconds": self.capture_seconds, "bytes": self.capture_bytes}

    def key(self, batch_size: int, longest_context: int) -> tuple[int, int] | None:
        if self.executor is not None:
            batch_size = self.executor.graph_batch(batch_size)
        b = batch_bucket(batch_size, self.max_batch)
        k = block_bucket((longest_context + self.bs - 1) // self.bs, self.max_blocks)
        return None if b is None or k is None else (b, k)

    def _static_batch(self, b: int, k: int) -> ForwardBatch:
        return ForwardBatch(
            input_ids=self.ids[:b], positions=self.pos[:b], slot_mapping=self.slots[:b],
            block_tables=self.tables[:b, :k], context_lens=self.ctx[:b], query_lens=[1] * b,
            pad_index=self.rows[:b], logits_indices=self.rows[:b], max_q=1, max_context=k * self.bs,
            query_lens_t=self.ones[:b], context_lens_list=[k * self.bs] * b,
        )

    def _capture(self, key: tuple[int, int]):
        b, k = key
        t0 = time.perf_counter()
        self._reset_inputs()
        batch = self._static_batch(b, k)
        if self.side is None:
            # one warm-up stream for every capture: torch keeps a cuBLAS workspace per (handle, stream),
            # so a fresh stream per key (torch recycles 32) held up to 32 workspaces for good
            self.side = torch.cuda.Stream(self.device)
        side = self.side
        side.wait_stream(torch.cuda.current_stream(self.device))
        ex = self.executor
        if ex is not None:
            ex.begin_warmup()
        try:
            with torch.cuda.stream(side):             # warm-up outside the graph (allocator, handles, JIT)
                for _ in range(2):
                    warm = self.model(batch, self.kv_pool)
        finally:
            if ex is not None:
                ex.end_warmup()
        if self.logits_out is None:
            self.logits_out = torch.empty(self.max_batch, warm.shape[-1], dtype=warm.dtype, device=self.device)
        del warm
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        try:
            if ex is not None:
                ex.prepare_capture()
            with torch.cuda.graph(graph, pool=self.pool):
                self.logits_out[:b].copy_(self.model(batch, self.kv_pool))
            torch.cuda.synchronize(self.device)
        except RuntimeError as exc:
            self.failed = str(exc).splitlines()[0]
            log.warning("decode CUDA graph capture failed (%s); decode steps run eagerly from now on", self.failed)
            raise _CaptureFailed() from exc
        finally:
            if ex is not None:
                ex.end_capture()
        self.graphs[key] = (graph, self.logits_out[:b])
        if self.started:
            self.captures_after_start += 1
        dt = time.perf_counter() - t0
        log.info("captured decode CUDA graph batch %d x %d blocks in %.2fs (%d graphs)", b, k, dt, len(self.graphs))
        return self.graphs[key]

    def _reset_inputs(self) -> None:
        self.ids.zero_()
        self.pos.zero_()
        self.slots.fill_(self.scratch * self.bs)
        self.ctx.zero_()
        self.tables.fill_(self.scratch)

    def run(self, tokens: list[int], positions: list[int], block_tables: list[list[int]],
            want_logits: list[bool], feed=None) -> torch.Tensor | None:
        """One decode step (token i of sequence i at absolute position positions[i]). Returns the
        float32 logits of the sequences with want_logits, in order (a fresh tensor), or None when the
        step fits no graph or the graph could not be captured (`failed` is set); the caller then runs
        the step eagerly. `feed(input_ids)`, when given, overwrites tokens on the device after staging
        (tokens another step samples: async scheduling). No host sync."""
        if self.failed:
            return None
        ex = self.executor
        if ex is not None and ex.graph_epoch() != self.epoch:
            log.warning("decode CUDA graphs dropped: the executor's state changed (%s -> %s)", self.epoch,
                        ex.graph_epoch())
            self.graphs.clear()
            self.epoch = ex.graph_epoch()
        key = self.stage(tokens, positions, block_tables)
        if key is None:
            return None
        try:
            graph, logits = self.graphs.get(key) or self._capture_and_restage(key, tokens, positions, block_tables)
        except _CaptureFailed:
            return None
        if feed is not None:
            feed(self.ids)
        if ex is not None:
            ex.before_replay()
        graph.replay()
        if ex is not None:
            ex.after_replay()
        self.replays += 1
        out = logits[:len(tokens)]
        if all(want_logits):
            return out.clone()
        return out.index_select(0, device_tensor([i for i, w in enumerate(want_logits) if w], torch.long, out.device))

    def _capture_and_restage(self, key, tokens, positions, block_tables):
        entry = self._capture(key)                  # capture overwrote the static inputs with dummies
        self.stage(tokens, positions, block_tables)
        return entry

    def stage(self, tokens: list[int], positions: list[int], block_tables: list[list[int]]) -> tuple[int, int] | None:
        """Write one decode step into the static input buffers (one host-to-device copy); returns the
        graph key, or None (nothing written) when the step fits no graph. Rows B..bucket-1 are
        padding: scratch slot, scratch blocks, no context.

        The host buffer is built with numpy (the block tables flattened in one `fromiter` pass and
        scattered into a [bucket, k] array), not as a Python list of bucket x k ints: the replay waits
        for this work, and its cost grows with batch x blocks (scripts/gpu_profile.py reports the step's
        wall time next to the replay's)."""
        B = len(tokens)
        key = self.key(B, max(positions) + 1)
        if key is None:
            return None
        b, k = key
        bs, scratch = self.bs, self.scratch
        rows = [t[:k] for t in block_tables]
        lens = np.fromiter(map(len, rows), dtype=np.int64, count=B)
        pos = np.asarray(positions, dtype=np.int64)
        host = np.zeros(4 * b + b * k, dtype=np.int64)
        host[:B] = tokens
        host[b:b + B] = pos
        host[2 * b:3 * b] = scratch * bs
        host[2 * b:2 * b + B] = [t[p // bs] for t, p in zip(block_tables, positions)]
        host[2 * b:2 * b + B] *= bs
        host[2 * b:2 * b + B] += pos % bs
        host[3 * b:3 * b + B] = pos + 1
        table = host[4 * b:].reshape(b, k)
        table.fill(scratch)
        flat = np.fromiter(chain.from_iterable(rows), dtype=np.int64, count=int(lens.sum()))
        if B and int(lens.min()) == k:
            table[:B] = flat.reshape(B, k)
        else:
            table[:B][np.arange(k) < lens[:, None]] = flat
        host = torch.from_numpy(host)
        if self.device.type == "cuda":
            host = host.pin_memory()
        dev = host.to(self.device, non_blocking=True)
        self.ids[:b].copy_(dev[:b])
        self.pos[:b].copy_(dev[b:2 * b])
        self.slots[:b].copy_(dev[2 * b:3 * b])
        self.ctx[:b].copy_(dev[3 * b:4 * b])
        self.tables[:b, :k].copy_(dev[4 * b:].view(b, k))
        return key
