"""Paged KV blocks with prefix caching (policy only: block ids and hashes, no tensors).

Invariants:
- a block is either referenced (ref_count > 0, owned by >= 1 sequence) or in `free` (LRU order:
  the first entry is evicted first); never both;
- a *full* block whose KV has been computed gets a content hash chained over its prefix
  (h_i = H(h_{i-1}, tokens of block i)); hashed blocks stay findable while free until evicted;
- evicting (reusing) a hashed free block drops its hash and reports it through `on_removed`.
Sequences free their blocks tail-first, so a shared prefix outlives the tails that hang off it.
"""
from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict
from typing import Callable

from dynamo_dwdp.engine.sequence import Sequence


def chain_hash(parent: int | None, tokens: list[int]) -> int:
    """63-bit content hash of a block given its parent's hash (stable across processes)."""
    h = hashlib.blake2b(digest_size=8)
    h.update(struct.pack("<q", parent if parent is not None else -1))
    h.update(struct.pack(f"<{len(tokens)}q", *tokens))
    return int.from_bytes(h.digest(), "little") & 0x7FFF_FFFF_FFFF_FFFF


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self.ref_count = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        self.hash_to_block: dict[int, int] = {}
        self.free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
        # Hooks for KV events (KV-aware routing): stored(block_hash, parent_hash, tokens), removed(hashes)
        self.on_stored: Callable[[int, int | None, list[int]], None] | None = None
        self.on_removed: Callable[[list[int]], None] | None = None
        self.hits = 0          # prompt tokens served from cache
        self.queries = 0       # prompt tokens looked up

    # ------------------------------------------------------------------ accounting
    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self.free)

    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        return max(0, -(-num_tokens // self.block_size) - len(seq.block_table))

    def can_allocate(self, seq: Sequence, num_tokens: int) -> bool:
        return self.blocks_needed(seq, num_tokens) <= len(self.free)

    # ------------------------------------------------------------------ prefix cache
    def match_prefix(self, seq: Sequence) -> int:
        """Attach the longest cached prefix of seq's prompt (full blocks only). At least one block's
        worth of tokens is always left to compute, so the last prompt position gets fresh logits and
        no shared block is ever written again. Returns the number of prompt tokens matched."""
        assert not seq.block_table and seq.num_computed == 0
        bs = self.block_size
        n_full = len(seq.prompt_ids) // bs
        if len(seq.prompt_ids) % bs == 0:
            n_full -= 1
        self.queries += len(seq.prompt_ids)
        if not self.prefix_caching or n_full <= 0:
            return 0
        parent: int | None = None
        matched: list[tuple[int, int]] = []
        for i in range(n_full):
            h = chain_hash(parent, seq.prompt_ids[i * bs:(i + 1) * bs])
            block = self.hash_to_block.get(h)
            if block is None:
                break
            matched.append((block, h))
            parent = h
        for block, h in matched:
            self._ref(block)
            seq.block_table.append(block)
            seq.block_hashes.append(h)
        seq.num_computed = len(matched) * bs
        self.hits += seq.num_computed
        return seq.num_computed

    def _ref(self, block: int) -> None:
        if self.ref_count[block] == 0:
            del self.free[block]
        self.ref_count[block] += 1

    # ------------------------------------------------------------------ allocation
    def allocate(self, seq: Sequence, num_tokens: int) -> None:
        """Grow seq's block table to hold num_tokens. Caller checked can_allocate."""
        need = self.blocks_needed(seq, num_tokens)
        if need > len(self.free):
            raise RuntimeError("allocate() without capacity")
        evicted: list[int] = []
        for _ in range(need):
            block, _ = self.free.popitem(last=False)
            old = self.block_hash[block]
            if old is not None:
                self.block_hash[block] = None
                if self.hash_to_block.get(old) == block:
                    del self.hash_to_block[old]
                    evicted.append(old)
            self.ref_count[block] = 1
            seq.block_table.append(block)
        if evicted and self.on_removed:
            self.on_removed(evicted)

    def commit_computed(self, seq: Sequence) -> None:
        """Hash the blocks that became full and computed; publish them as stored."""
        if not self.prefix_caching:
            return
        bs = self.block_size
        while len(seq.block_hashes) < seq.num_computed // bs:
            i = len(seq.block_hashes)
            parent = seq.block_hashes[-1] if seq.block_hashes else None
            chunk = seq.token_slice(i * bs, (i + 1) * bs)
            h = chain_hash(parent, chunk)
            seq.block_hashes.append(h)
            block = seq.block_table[i]
            if h not in self.hash_to_block and self.block_hash[block] is None:
                self.block_hash[block] = h
                self.hash_to_block[h] = block
                if self.on_stored:
                    self.on_stored(h, parent, chunk)

    def free_seq(self, seq: Sequence) -> None:
        for block in reversed(seq.block_table):
            self.ref_count[block] -= 1
            if self.ref_count[block] == 0:
                self.free[block] = None
        seq.block_table = []

    def clear_cache(self) -> list[int]:
        """Forget every cached hash of free blocks (e.g. after weights change)."""
        dropped = []
        for block in self.free:
            h = self.block_hash[block]
            if h is not None:
                self.block_hash[block] = None
                self.hash_to_block.pop(h, None)
                dropped.append(h)
        if dropped and self.on_removed:
            self.on_removed(dropped)
        return dropped
