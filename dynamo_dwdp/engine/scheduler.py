"""Continuous batching with chunked prefill (policy only).

Each step has a token budget (max_num_batched_tokens). Running sequences go first: one token each
when decoding, or the next chunk of an unfinished prompt. Waiting sequences are then admitted FCFS
(prefix-cache match first) while the budget, max_num_seqs and free blocks allow. When a running
sequence cannot get a block, the most recently admitted other sequence is preempted (blocks freed,
back to the head of the queue, recomputed later — its hashed blocks usually come back from the cache).

`separate_prefill` (engine setting `separate_prefill_steps`): a step holds either prefill work (prompt
chunks, admissions) or decode work (one token per sequence), never both, so decode steps keep the
shape a captured CUDA graph replays; a mixed step runs eagerly. While both kinds wait they alternate
(a decode step after every prefill step), so decoding sequences wait at most one prefill step; with
nothing of one kind the other runs every step. A sequence with exactly one token left to compute is
decode work (a prompt's last token, a disaggregated decode worker's first step, recomputation aside).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from dynamo_dwdp.engine.block_manager import BlockManager
from dynamo_dwdp.engine.sequence import Sequence, Status


@dataclass
class ScheduledChunk:
    seq: Sequence
    num_tokens: int            # new tokens computed for seq this step

    @property
    def completes(self) -> bool:
        """True when this chunk reaches the end of seq's known tokens (so it samples a token)."""
        return self.seq.num_computed + self.num_tokens == self.seq.num_tokens


class Scheduler:
    def __init__(self, blocks: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 separate_prefill: bool = False):
        self.blocks = blocks
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.separate_prefill = separate_prefill
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self._last_was_prefill = False

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def remove(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.free_seq(seq)
        seq.block_hashes = []
        seq.num_computed = 0
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def _unmatch(self, seq: Sequence) -> None:
        self.blocks.free_seq(seq)
        self.blocks.hits -= seq.num_computed
        self.blocks.queries -= len(seq.prompt_ids)
        seq.block_hashes = []
        seq.num_computed = 0
        seq.num_cached_prompt = 0

    @staticmethod
    def _is_decode(seq: Sequence) -> bool:
        return seq.num_tokens - seq.num_computed == 1

    def schedule(self) -> list[ScheduledChunk]:
        if not self.separate_prefill:
            return self._schedule(None)
        decode_ready = any(self._is_decode(s) for s in self.running)
        prefill_ready = bool(self.waiting) or any(s.num_tokens - s.num_computed > 1 for s in self.running)
        kind = "prefill" if prefill_ready and not (decode_ready and self._last_was_prefill) else "decode"
        out = self._schedule(kind)
        if not out:                                   # nothing of that kind could run: the other one
            kind = "decode" if kind == "prefill" else "prefill"
            out = self._schedule(kind)
        self._last_was_prefill = kind == "prefill" and bool(out)
        return out

    def _schedule(self, kind: str | None) -> list[ScheduledChunk]:
        """One step's chunks: every kind of work (None), or only "prefill" / only "decode" work."""
        budget = self.max_num_batched_tokens
        out: list[ScheduledChunk] = []
        scheduled: set[Sequence] = set()         # the sequences in `out` (sets: O(1) per lookup; this loop
        preempted: set[Sequence] = set()         # runs for every running sequence every step)
        for seq in list(self.running):
            if budget == 0:
                break
            if seq in preempted:             # preempted by an earlier iteration
                continue
            if kind is not None and (kind == "decode") != self._is_decode(seq):
                continue
            n = min(seq.num_tokens - seq.num_computed, budget)
            if n <= 0:
                continue
            while not self.blocks.can_allocate(seq, seq.num_computed + n):
                victim = next((s for s in reversed(self.running) if s is not seq and s not in scheduled), None)
                if victim is None:
                    break
                self._preempt(victim)
                preempted.add(victim)
            if not self.blocks.can_allocate(seq, seq.num_computed + n):
                self._preempt(seq)
                preempted.add(seq)
                continue
            self.blocks.allocate(seq, seq.num_computed + n)
            out.append(ScheduledChunk(seq, n))
            scheduled.add(seq)
            budget -= n
        while kind != "decode" and self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            matched_now = not seq.block_table and seq.num_computed == 0
            if matched_now:
                seq.num_cached_prompt = self.blocks.match_prefix(seq)
            n = min(seq.num_tokens - seq.num_computed, budget)
            if not self.blocks.can_allocate(seq, seq.num_computed + n):
                if not self.running and not out:
                    # Nothing else can free blocks: shrink the chunk to what fits.
                    fit = (len(seq.block_table) + self.blocks.num_free) * self.blocks.block_size - seq.num_computed
                    if fit > 0:
                        n = min(n, fit)
                if not self.blocks.can_allocate(seq, seq.num_computed + n):
                    if matched_now:
                        # A waiting sequence must not pin cached blocks: running sequences could
                        # then never get them back (they would preempt each other forever).
                        self._unmatch(seq)
                    break
            self.waiting.popleft()
            self.blocks.allocate(seq, seq.num_computed + n)
            seq.status = Status.RUNNING
            self.running.append(seq)
            out.append(ScheduledChunk(seq, n))
            budget -= n
        return out
