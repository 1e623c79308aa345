"""DecodeGraphs.stage: the static input buffers of a decode step, against a row-by-row construction."""
import random

import torch

from dynamo_dwdp.engine.cuda_graphs import DecodeGraphs


def _graphs(max_batch: int, max_blocks: int, block_size: int, scratch: int) -> DecodeGraphs:
    g = DecodeGraphs.__new__(DecodeGraphs)          # the staging buffers only (no model, CPU)
    g.max_batch, g.max_blocks, g.bs, g.executor, g.scratch = max_batch, max_blocks, block_size, None, scratch
    g.device = torch.device("cpu")
    z = dict(dtype=torch.long)
    g.ids, g.pos, g.slots, g.ctx = (torch.full((max_batch,), -5, **z) for _ in range(4))
    g.tables = torch.full((max_batch, max_blocks), -5, **z)
    return g


def test_stage_writes_every_row_and_pads_the_bucket():
    rng = random.Random(3)
    for _ in range(200):
        bs, max_batch, max_blocks, scratch = rng.choice([1, 4, 16]), rng.choice([8, 48, 256]), rng.choice([4, 20, 70]), 901
        g = _graphs(max_batch, max_blocks, bs, scratch)
        n = rng.randint(1, max_batch)
        positions = [rng.randint(0, max_blocks * bs - 1) for _ in range(n)]
        tables = [[rng.randint(0, 500) for _ in range(p // bs + 1 + rng.randint(0, 3))] for p in positions]
        tokens = [rng.randint(0, 1000) for _ in range(n)]
        key = g.stage(tokens, positions, tables)
        assert key == g.key(n, max(positions) + 1)
        b, k = key
        for i in range(b):
            real = i < n
            assert g.ids[i] == (tokens[i] if real else 0)
            assert g.pos[i] == (positions[i] if real else 0)
            p = positions[i] if real else 0
            assert g.slots[i] == (tables[i][p // bs] * bs + p % bs if real else scratch * bs)
            assert g.ctx[i] == (p + 1 if real else 0)
            row = tables[i][:k] if real else []
            assert g.tables[i, :k].tolist() == row + [scratch] * (k - len(row))


def test_stage_refuses_a_step_past_the_buckets():
    g = _graphs(8, 4, 4, 99)
    assert g.stage([1] * 9, [0] * 9, [[0]] * 9) is None            # batch past the largest bucket
    assert g.stage([1], [4 * 4], [[0, 1, 2, 3, 4]]) is None         # context past the largest block bucket
    assert (g.ids == -5).all()                                      # nothing written
