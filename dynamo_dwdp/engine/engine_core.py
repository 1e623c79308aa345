"""`EngineCore`: requests in, tokens out, one `step()` at a time (single-threaded; see async_engine
for the serving wrapper).

Disaggregation hooks:
- prefill role: `add_request(..., hold_kv=True)` keeps a finished request's blocks in `held` until
  `release(request_id)` (the decode side confirmed its read, or the hand-off timed out);
- decode role: `reserve(request_id, prompt)` allocates blocks for a prompt whose KV will be written
  by a transfer, then `add_prefilled(...)` starts decoding with all but the last prompt token already
  cached (the last one is recomputed here, so this engine samples the first output token itself).

Async scheduling (`async_scheduling`, vLLM's async scheduling, SGLang's overlap scheduler): `step()`
launches step k, then reads back step k-1's tokens while step k runs on the GPU, then books step k. A
token sampled by a step not yet read back is `PENDING` in its sequence's outputs; the next step takes it
on the device (`FedTokens`), so scheduling, staging and launching never wait for the GPU. Outputs come one
`step()` later. A sequence that stops at a token found by the read-back (EOS, a stop token) has already been
launched in step k: that row is discarded. One that reaches max_tokens or the context length is known to
stop when its step is booked and is not scheduled again. Invariants: at most one step is in flight between
calls; a PENDING token is always its sequence's last output; blocks freed while a step is in flight are
only reused by later GPU work on the same stream, except by a KV transfer into reserved blocks, so
`reserve` waits for the step in flight first.
"""
from __future__ import annotations

import collections
import logging
import time
from dataclasses import dataclass

import torch

from dynamo_dwdp.engine.block_manager import BlockManager
from dynamo_dwdp.engine.model_runner import FedTokens, ModelRunner, ReadBack
from dynamo_dwdp.engine.sampling import SamplingParams, device_tensor, sample_tokens
from dynamo_dwdp.engine.scheduler import ScheduledChunk, Scheduler
from dynamo_dwdp.engine.sequence import RequestOutput, Sequence, Status
from dynamo_dwdp.errors import RequestError

log = logging.getLogger(__name__)


PENDING = -1       # an output token sampled by a launched step that has not been read back yet


@dataclass
class _Launched:
    """One launched step: its chunks, the chunks that sample, and their tokens on their way to the host."""
    chunks: list[ScheduledChunk]
    samplers: list[ScheduledChunk]
    tokens: ReadBack
    launch_seconds: float          # host seconds of the runner's launch (goes to step_seconds with the wait)
    graph: bool = False            # replayed from a CUDA graph


class EngineCore:
    def __init__(self, runner: ModelRunner, async_scheduling: bool | None = None):
        """`async_scheduling`: None = the engine setting; a lock-step rank (dep, tp) passes False."""
        self.runner = runner
        cfg = runner.config
        mc = runner.model_config
        self.block_size = cfg.block_size
        self.max_model_len = min(cfg.max_model_len or mc.max_position_embeddings, mc.max_position_embeddings)
        self.blocks = BlockManager(cfg.num_kv_blocks, cfg.block_size, cfg.enable_prefix_caching)
        self.kv_capacity = cfg.num_kv_blocks * cfg.block_size
        self.scheduler = Scheduler(self.blocks, cfg.max_num_seqs, cfg.max_num_batched_tokens,
                                   cfg.separate_prefill_steps)
        self.requests: dict[str, Sequence] = {}
        self.held: dict[str, Sequence] = {}
        self.default_eos = tuple(mc.eos_token_ids)
        self.vocab_size = mc.vocab_size
        # (queue seconds, compute seconds) of recently finished requests: the autoscaling signal
        self.finished_timings: collections.deque = collections.deque(maxlen=256)
        self.async_scheduling = cfg.async_scheduling if async_scheduling is None else async_scheduling
        self.in_flight: collections.deque[_Launched] = collections.deque()

    # ------------------------------------------------------------------ requests
    def _make_seq(self, request_id: str, prompt_ids: list[int], params: SamplingParams, hold_kv: bool) -> Sequence:
        if request_id in self.requests or request_id in self.held:
            raise RequestError(f"request id {request_id!r} is already in use")
        if not prompt_ids:
            raise RequestError("prompt is empty: at least one token is needed")
        bad = next((t for t in prompt_ids if not isinstance(t, int) or not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise RequestError(f"prompt token id {bad!r} is outside the vocabulary [0, {self.vocab_size})")
        if len(prompt_ids) >= self.max_model_len:
            raise RequestError(f"prompt has {len(prompt_ids)} tokens; the context length is {self.max_model_len} "
                               f"(prompt + at least 1 generated token must fit)")
        if -(-(len(prompt_ids) + 1) // self.block_size) > self.blocks.num_blocks:
            raise RequestError(f"prompt has {len(prompt_ids)} tokens; the KV cache holds only "
                               f"{self.blocks.num_blocks * self.block_size}")
        params.validate(self.vocab_size)
        if not params.eos_token_ids:
            params.eos_token_ids = self.default_eos
        seq = Sequence(request_id, list(prompt_ids), params, hold_kv=hold_kv)
        if params.seed is not None and not params.greedy:
            seq.generator = torch.Generator(device=self.runner.device).manual_seed(params.seed)
        return seq

    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                    hold_kv: bool = False) -> None:
        seq = self._make_seq(request_id, prompt_ids, params, hold_kv)
        self.requests[request_id] = seq
        self.scheduler.add(seq)

    def reserve(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> list[int]:
        """Decode role: allocate blocks for a prompt whose KV arrives by transfer. Returns the block
        ids (in order). Raises RequestError if the request cannot fit right now."""
        seq = self._make_seq(request_id, prompt_ids, params, hold_kv=False)
        self._wait_in_flight()          # a transfer writes these blocks outside the step's stream
        n = len(prompt_ids)
        if not self.blocks.can_allocate(seq, n):
            raise RequestError(f"no free KV blocks for a {n}-token prompt (free {self.blocks.num_free})")
        self.blocks.allocate(seq, n)
        self.held[request_id] = seq       # not schedulable until add_prefilled
        return list(seq.block_table)

    def add_prefilled(self, request_id: str, cached_tokens: int = 0) -> None:
        """Start decoding a reserved request whose prompt KV has been written into its blocks.
        `cached_tokens` is what the prefill side served from its prefix cache (reported in usage)."""
        seq = self.held.pop(request_id)
        seq.num_computed = len(seq.prompt_ids) - 1
        seq.num_cached_prompt = cached_tokens
        self.blocks.commit_computed(seq)
        self.requests[request_id] = seq
        self.scheduler.add(seq)

    def abort(self, request_id: str, reason: str = "cancelled") -> bool:
        seq = self.requests.pop(request_id, None)
        if seq is not None:
            self.scheduler.remove(seq)
            self._finish(seq, reason, keep=False)
            return True
        return self.release(request_id)

    def release(self, request_id: str) -> bool:
        """Free the blocks of a held request (prefill after transfer, or a reserved decode slot)."""
        seq = self.held.pop(request_id, None)
        if seq is None:
            return False
        self.blocks.free_seq(seq)
        return True

    def held_blocks(self, request_id: str) -> list[int]:
        return list(self.held[request_id].block_table)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work() or bool(self.in_flight)

    # ------------------------------------------------------------------ stepping
    def _finish(self, seq: Sequence, reason: str, keep: bool) -> None:
        seq.status = Status.FINISHED
        seq.finish_reason = reason
        if seq.first_scheduled is not None:
            now = time.monotonic()
            self.finished_timings.append((seq.first_scheduled - seq.arrival, now - seq.first_scheduled))
        if keep:
            self.held[seq.request_id] = seq
        else:
            self.blocks.free_seq(seq)

    def _stop_reason(self, seq: Sequence, token: int) -> str | None:
        p = seq.params
        if len(seq.output_ids) >= p.min_tokens:
            if token in p.stop_token_ids:
                return "stop"
            if not p.ignore_eos and token in p.eos_token_ids:
                return "eos"
        return "length" if self._length_reached(seq) else None

    def _length_reached(self, seq: Sequence) -> bool:
        """max_tokens or the context length reached. The whole KV pool is the hard limit too: a sequence
        that outgrows it alone could never be scheduled again (it would preempt itself forever)."""
        return (len(seq.output_ids) >= seq.params.max_tokens or seq.num_tokens >= self.max_model_len
                or seq.num_tokens > self.kv_capacity)

    def step(self, allow_empty: bool = False) -> list[RequestOutput]:
        """Schedule and launch one forward; returns the outputs of the step read back in this call (this
        step's, or with async scheduling the previous one's). With allow_empty (DEP lock-step), run the
        model even when this rank has nothing to compute, so that its collectives match its peers'."""
        chunks = self.scheduler.schedule()
        if not chunks and not allow_empty:
            return self._read_back() if self.in_flight else []
        t0, cpu0 = time.perf_counter(), time.thread_time()
        self.in_flight.append(self._launch(chunks))
        stats = self.runner.executor.stats
        wall, cpu = time.perf_counter() - t0, time.thread_time() - cpu0
        stats.launch_seconds += wall
        stats.launch_cpu_seconds += cpu
        if self.in_flight[-1].graph:
            stats.graph_launch_seconds += wall
            stats.graph_launch_cpu_seconds += cpu
        outputs = self._read_back() if len(self.in_flight) > 1 else []
        self._book(self.in_flight[-1])
        if not self.async_scheduling:
            outputs += self._read_back()
        return outputs

    def _launch(self, chunks: list[ScheduledChunk]) -> _Launched:
        """Launch the forward and the sampling of `chunks` (no host sync on CUDA)."""
        now = time.monotonic()
        start = None
        if self.runner.device.type == "cuda":       # the step's device time (stats.device_seconds)
            start = torch.cuda.Event(enable_timing=True)
            start.record()
        token_chunks, fed_rows, fed_from = [], [], []
        flat = 0
        for c in chunks:
            seq = c.seq
            if seq.first_scheduled is None:
                seq.first_scheduled = now
            tokens = seq.token_slice(seq.num_computed, seq.num_computed + c.num_tokens)
            if tokens and tokens[-1] == PENDING:       # sampled by the step in flight: taken on the device
                tokens[-1] = 0
                fed_rows.append(flat + len(tokens) - 1)
                fed_from.append(seq.pending_row)
            token_chunks.append(tokens)
            flat += len(tokens)
        fed = FedTokens(fed_rows, self.in_flight[-1].tokens.device_tokens, fed_from) if fed_rows else None
        stats = self.runner.executor.stats
        graph_steps = stats.graph_steps
        logits = self.runner.launch(token_chunks, [c.seq.num_computed for c in chunks],
                                    [c.seq.block_table for c in chunks], [c.completes for c in chunks], fed)
        launch_s, graph = self.runner.last_launch_seconds, stats.graph_steps > graph_steps
        samplers = [c for c in chunks if c.completes]
        if not samplers:
            return _Launched(chunks, samplers, ReadBack(None, self.runner.device, start), launch_s, graph)
        ban_rows: list[int] = []
        ban_cols: list[int] = []
        for row, c in enumerate(samplers):
            p = c.seq.params
            if len(c.seq.output_ids) < p.min_tokens:
                banned = list(p.stop_token_ids) + ([] if p.ignore_eos else list(p.eos_token_ids))
                ban_rows += [row] * len(banned)
                ban_cols += banned
        if ban_rows:              # one scatter for the whole batch (not one indexed write per row)
            with torch.inference_mode():     # logits is an inference tensor (model forward)
                idx = device_tensor([ban_rows, ban_cols], torch.long, logits.device)
                logits[idx[0], idx[1]] = float("-inf")
        tokens = sample_tokens(logits, [c.seq.params for c in samplers], [c.seq.generator for c in samplers])
        return _Launched(chunks, samplers, ReadBack(tokens, self.runner.device, start), launch_s, graph)

    def _book(self, step: _Launched) -> None:
        """Advance the launched step's sequences: computed tokens, full blocks hashed, a PENDING output per
        sampling sequence. A sequence stopped by the read-back just before (async) is skipped; one that
        reaches max_tokens or the context length with this token leaves the schedule now."""
        for c in step.chunks:
            seq = c.seq
            if seq.finished:
                continue
            prompt_left = max(0, len(seq.prompt_ids) - seq.num_computed)
            seq.num_computed_prompt += min(prompt_left, c.num_tokens)
            seq.num_computed += c.num_tokens
            self.blocks.commit_computed(seq)
        for row, c in enumerate(step.samplers):
            seq = c.seq
            if seq.finished:
                continue
            seq.output_ids.append(PENDING)
            seq.pending_row = row
            if self._length_reached(seq):
                self.scheduler.remove(seq)

    def _read_back(self) -> list[RequestOutput]:
        """Wait for the oldest launched step's tokens and deliver them (stop checks, outputs)."""
        step = self.in_flight.popleft()
        t0 = time.perf_counter()
        tokens = step.tokens.result()
        seconds = step.launch_seconds + time.perf_counter() - t0
        stats = self.runner.executor.stats
        stats.step_seconds += seconds
        if step.graph:
            stats.graph_step_seconds += seconds
        device_s = step.tokens.device_seconds()
        if device_s is not None:
            stats.device_steps += 1
            stats.device_seconds += device_s
            if step.graph:
                stats.graph_device_seconds += device_s
        outputs: list[RequestOutput] = []
        now = time.monotonic()
        for c, tok in zip(step.samplers, tokens):
            seq = c.seq
            if seq.finished or not seq.output_ids or seq.output_ids[-1] != PENDING:
                continue                            # stopped or aborted after this step was launched
            seq.output_ids[-1] = tok
            if seq.first_token_at is None:
                seq.first_token_at = now
            reason = self._stop_reason(seq, tok)
            if reason is not None:
                self.scheduler.remove(seq)
                self.requests.pop(seq.request_id, None)
                self._finish(seq, reason, keep=seq.hold_kv)
            outputs.append(self._output(seq, [tok]))
        return outputs

    def _wait_in_flight(self) -> None:
        for step in self.in_flight:
            step.tokens.wait()

    def fail_all(self, error: str) -> list[RequestOutput]:
        """Fail every request this engine holds (dead peer, broken step): no request is left hanging."""
        self.in_flight.clear()           # their tokens are not delivered; the GPU work is stream-ordered
        outs = []
        for seq in list(self.requests.values()):
            self.scheduler.remove(seq)
            self._finish(seq, "error", keep=False)
            out = self._output(seq, [])
            out.error = error
            outs.append(out)
        self.requests.clear()
        return outs

    @staticmethod
    def _output(seq: Sequence, new: list[int]) -> RequestOutput:
        return RequestOutput(seq.request_id, new, seq.finished, seq.finish_reason, len(seq.prompt_ids),
                             len(seq.output_ids), seq.num_cached_prompt, seq.num_computed_prompt)

    # ------------------------------------------------------------------ offline helper
    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]) -> list[list[int]]:
        """Run prompts to completion (continuous batching); returns the output ids per prompt."""
        plist = params if isinstance(params, list) else [SamplingParams(**vars(params)) for _ in prompts]
        ids = [f"offline-{i}-{time.monotonic_ns()}" for i in range(len(prompts))]
        results: dict[str, list[int]] = {i: [] for i in ids}
        for rid, prompt, p in zip(ids, prompts, plist):
            self.add_request(rid, prompt, p)
        while self.has_unfinished():
            for out in self.step():
                results[out.request_id].extend(out.new_token_ids)
        return [results[i] for i in ids]
