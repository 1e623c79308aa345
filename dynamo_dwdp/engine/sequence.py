"""`Sequence`: one request inside the engine (tokens, blocks, progress, stop state)."""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from dynamo_dwdp.engine.sampling import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)          # identity: two requests are never "equal"; hashable, so sets of sequences work
class Sequence:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    hold_kv: bool = False                    # prefill role: keep the blocks after finishing (for transfer)
    output_ids: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)   # chained hashes of the full blocks so far
    num_computed: int = 0                    # tokens whose KV is in the cache
    num_cached_prompt: int = 0               # prompt tokens served from the prefix cache / a remote prefill
    num_computed_prompt: int = 0             # prompt tokens this engine actually computed
    finish_reason: str | None = None
    generator: torch.Generator | None = None
    arrival: float = field(default_factory=time.monotonic)
    first_scheduled: float | None = None
    first_token_at: float | None = None
    pending_row: int = 0                     # async scheduling: the row of the PENDING output in its step

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    def token_slice(self, start: int, end: int) -> list[int]:
        """all_ids[start:end] without building all_ids (per step work stays O(end - start))."""
        n = len(self.prompt_ids)
        if start >= n:
            return self.output_ids[start - n:end - n]
        if end <= n:
            return self.prompt_ids[start:end]
        return self.prompt_ids[start:] + self.output_ids[:end - n]

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def finished(self) -> bool:
        return self.status == Status.FINISHED


@dataclass
class RequestOutput:
    request_id: str
    new_token_ids: list[int]
    finished: bool
    finish_reason: str | None
    num_prompt_tokens: int
    num_output_tokens: int
    num_cached_tokens: int
    num_computed_prompt_tokens: int
    error: str | None = None
