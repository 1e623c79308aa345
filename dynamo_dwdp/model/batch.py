"""`ForwardBatch`: everything one forward step needs, built by the engine's model runner.

Tokens of all sequences are flattened into one dimension T (no padding in the MLPs); attention
regroups them per sequence through `pad_index`. Invariants:
- sequence b owns rows query_start[b] : query_start[b+1] of the flattened tokens;
- its new tokens sit at absolute positions context_lens[b]-q_len[b] ... context_lens[b]-1;
- slot_mapping[t] = block_id * block_size + offset is where token t's KV is written;
- block_tables[b, :ceil(context_lens[b]/block_size)] are valid block ids (the rest is padding).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ForwardBatch:
    input_ids: torch.Tensor          # [T] long
    positions: torch.Tensor          # [T] long
    slot_mapping: torch.Tensor       # [T] long
    block_tables: torch.Tensor       # [B, max_blocks] long
    context_lens: torch.Tensor       # [B] long: tokens in the cache after this step
    query_lens: list[int]            # [B] new tokens per sequence (python, for shapes)
    pad_index: torch.Tensor          # [T] long: row of token t in a [B * max_q] padded layout
    logits_indices: torch.Tensor     # [S] long: rows whose logits are wanted (S <= B)
    max_q: int
    max_context: int

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens)

    @staticmethod
    def build(
        token_chunks: list[list[int]],
        start_positions: list[int],
        block_tables: list[list[int]],
        block_size: int,
        want_logits: list[bool],
        device: torch.device | str = "cpu",
    ) -> "ForwardBatch":
        """Build from per-sequence new tokens, their first absolute position and block table."""
        ids: list[int] = []
        pos: list[int] = []
        slots: list[int] = []
        pad: list[int] = []
        logits_rows: list[int] = []
        q_lens = [len(c) for c in token_chunks]
        max_q = max(q_lens) if q_lens else 0
        ctx = [s + q for s, q in zip(start_positions, q_lens)]
        for b, (chunk, start, table) in enumerate(zip(token_chunks, start_positions, block_tables)):
            for i, tok in enumerate(chunk):
                p = start + i
                ids.append(tok)
                pos.append(p)
                slots.append(table[p // block_size] * block_size + p % block_size)
                pad.append(b * max_q + i)
            if want_logits[b] and chunk:
                logits_rows.append(len(ids) - 1)
        max_blocks = max((len(t) for t in block_tables), default=0)
        tables = [t + [0] * (max_blocks - len(t)) for t in block_tables]

        def lt(x: list[int] | list[list[int]]) -> torch.Tensor:
            return torch.tensor(x, dtype=torch.long, device=device)

        return ForwardBatch(
            input_ids=lt(ids), positions=lt(pos), slot_mapping=lt(slots),
            block_tables=lt(tables) if tables else torch.zeros((0, 0), dtype=torch.long, device=device),
            context_lens=lt(ctx), query_lens=q_lens, pad_index=lt(pad), logits_indices=lt(logits_rows),
            max_q=max_q, max_context=max(ctx, default=0),
        )
