"""`SamplingParams` (validated, OpenAI/vLLM meanings) and the sampler.

temperature 0 -> greedy; top_k <= 0 -> off; top_p 1 -> off; seed -> a per-request generator, so a
seeded request samples the same tokens whatever else is in the batch.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from dynamo_dwdp.errors import RequestError


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    min_tokens: int = 0
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    eos_token_ids: tuple[int, ...] = field(default=())

    def validate(self, vocab_size: int | None = None) -> "SamplingParams":
        def bad(name: str, value, why: str):
            raise RequestError(f"{name}={value!r}: {why}")

        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            bad("max_tokens", self.max_tokens, "must be an integer >= 1")
        if not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            bad("min_tokens", self.min_tokens, "must be an integer >= 0")
        if self.min_tokens > self.max_tokens:
            bad("min_tokens", self.min_tokens, f"must be <= max_tokens ({self.max_tokens})")
        if not (isinstance(self.temperature, (int, float)) and 0 <= self.temperature <= 100):
            bad("temperature", self.temperature, "must be in [0, 100]")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            bad("top_p", self.top_p, "must be in (0, 1]")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            bad("top_k", self.top_k, "must be an integer >= -1 (0 or -1 = off)")
        if self.seed is not None and not isinstance(self.seed, int):
            bad("seed", self.seed, "must be an integer")
        for t in self.stop_token_ids:
            if not isinstance(t, int) or t < 0 or (vocab_size is not None and t >= vocab_size):
                bad("stop_token_ids", t, f"must be token ids in [0, {vocab_size})")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


def device_tensor(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """`torch.tensor(values, device=device)` without a host sync: on CUDA a copy from pageable memory
    waits for the stream to drain, which would stall the host behind a step already launched
    (async scheduling); a pinned buffer copied with non_blocking does not."""
    t = torch.tensor(values, dtype=dtype)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def sample_tokens(logits: torch.Tensor, params: list[SamplingParams],
                  generators: list[torch.Generator | None]) -> torch.Tensor:
    """logits [S, V] float32 -> one token id per row, a long tensor on the logits' device. No host sync
    (so a launched step can sample before the previous one is read back).

    Greedy rows take the argmax. Seeded rows sample row by row with their own generator (their
    tokens must not depend on the batch; the generator lives on the logits' device). All other rows
    are sampled in one batched pass (temperature, top-k and top-p per row, one multinomial over the
    default generator). A step therefore costs a fixed number of tensor ops whatever its batch size
    (row by row, a GPU would see a few kernel launches per sequence per step)."""
    if logits.shape[0] == 0:
        return torch.zeros(0, dtype=torch.long, device=logits.device)
    batched = [i for i, p in enumerate(params) if not p.greedy and generators[i] is None]
    if len(batched) == len(params):                  # the usual case: no argmax, no row copy
        return torch.multinomial(batched_probs(logits, params), 1).squeeze(1)
    picks = logits.argmax(dim=-1)
    if batched:
        rows = device_tensor(batched, torch.long, logits.device)
        probs = batched_probs(logits.index_select(0, rows), [params[i] for i in batched])
        picks.index_copy_(0, rows, torch.multinomial(probs, 1).squeeze(1))
    for i, p in enumerate(params):
        if not p.greedy and generators[i] is not None:
            picks[i] = torch.multinomial(row_probs(logits[i], p), 1, generator=generators[i])[0]
    return picks


def row_probs(row: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """Sampling distribution of one row [V] (temperature, then top-k on logits, then top-p on probs)."""
    row = row / p.temperature
    if 0 < p.top_k < row.shape[-1]:
        kth = torch.topk(row, p.top_k).values[-1]
        row = row.masked_fill(row < kth, float("-inf"))
    probs = torch.softmax(row, dim=-1)
    if p.top_p < 1.0:
        sp, si = torch.sort(probs, descending=True)
        cum = torch.cumsum(sp, dim=-1)
        drop = cum - sp > p.top_p           # keep the smallest prefix whose mass reaches top_p
        sp = sp.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(0, si, sp)
    return probs


def batched_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """`row_probs` for every row of logits [S, V] at once (same rules per row, vectorised)."""
    dev, vocab = logits.device, logits.shape[-1]
    temps = device_tensor([float(p.temperature) for p in params], logits.dtype, dev)
    x = logits / temps.unsqueeze(1)
    ks = [p.top_k if 0 < p.top_k < vocab else 0 for p in params]
    if any(ks):
        k = device_tensor(ks, torch.long, dev)
        top = torch.topk(x, max(ks), dim=-1).values
        kth = top.gather(1, (k - 1).clamp(min=0).unsqueeze(1))
        kth = torch.where(k.unsqueeze(1) > 0, kth, torch.full_like(kth, float("-inf")))
        x = x.masked_fill(x < kth, float("-inf"))
    probs = torch.softmax(x, dim=-1)
    nucleus = [i for i, p in enumerate(params) if p.top_p < 1.0]
    if nucleus:
        rows = device_tensor(nucleus, torch.long, dev)
        top_p = device_tensor([float(params[i].top_p) for i in nucleus], probs.dtype, dev)
        sp, si = torch.sort(probs.index_select(0, rows), dim=-1, descending=True)
        cum = torch.cumsum(sp, dim=-1)
        sp = sp.masked_fill(cum - sp > top_p.unsqueeze(1), 0.0)
        probs = probs.index_copy(0, rows, torch.zeros_like(sp).scatter_(1, si, sp))
    return probs
