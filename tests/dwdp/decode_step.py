"""A repeatable decode step for the DWDP rank tests: the prompts prefilled once, then every call runs the
same one-token step for each (tokens 7, 9, ...) from a copy of the KV the prefill left, through the model's
forward directly (no engine, no graph), and returns its logits."""
from __future__ import annotations


def prefilled_decode(runner, prompts: list[list[int]]):
    """`decode()` for `prompts` on `runner` (a ModelRunner); the prompts are prefilled here."""
    from dynamo_dwdp.model.batch import ForwardBatch

    tables = [[2 * i, 2 * i + 1, 40 + i] for i in range(len(prompts))]
    runner.execute(prompts, [0] * len(prompts), tables, [True] * len(prompts))
    saved = runner.kv_pool.clone()
    tokens = [[7 + 2 * i] for i in range(len(prompts))]
    starts = [len(p) for p in prompts]

    def decode():
        runner.kv_pool.copy_(saved)
        batch = ForwardBatch.build(tokens, starts, tables, runner.config.block_size, [True] * len(prompts))
        return runner.model(batch, runner.kv_pool).clone()

    return decode
