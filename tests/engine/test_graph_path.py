"""The decode-graph path of a served engine, on CPU: `DecodeGraphs` (static buffers, buckets, padding,
async token feed) with each captured graph replaced by an eager run of the same static batch, driven
through `AsyncEngine` as the worker drives it. Reference: the same requests on the plain engine.

What CUDA adds (the capture itself, replay) is checked on the GPU (scripts/gpu_perf.py, graph vs eager
bitwise); what this pins is everything around it: that decode steps reach the graphs, that their
inputs are staged and fed right, and that the tokens are those of the eager engine.
"""
from __future__ import annotations

import asyncio

import pytest
import torch

from dynamo_dwdp.bench.host_bench import CoreOnlyRank
from dynamo_dwdp.engine.async_engine import AsyncEngine
from dynamo_dwdp.engine.cuda_graphs import DecodeGraphs
from dynamo_dwdp.engine.sampling import SamplingParams
from tests.conftest import make_engine, prompts_for
from tests.engine.test_engine import V


@pytest.fixture(scope="module")
def ckpt(checkpoints):
    model_dir, _ = checkpoints("engine", seed=21)
    return model_dir


class EagerReplay:
    """A captured graph's stand-in: replay runs the model on the graph's static batch, into the shared
    logits buffer, exactly as the captured forward would."""

    def __init__(self, graphs: DecodeGraphs, key):
        self.graphs, self.key = graphs, key

    def replay(self) -> None:
        g, (b, k) = self.graphs, self.key
        g.logits_out[:b].copy_(g.model(g._static_batch(b, k), g.kv_pool))


def with_cpu_graphs(engine, max_blocks: int = 64):
    """Give a CPU engine decode graphs: the pool gains the scratch block, every key 'captured' eagerly."""
    runner = engine.runner
    cfg = runner.config
    runner.kv_pool = torch.cat([runner.kv_pool, torch.zeros_like(runner.kv_pool[:1])])
    graphs = DecodeGraphs(runner.model, runner.kv_pool, cfg.num_kv_blocks, cfg.block_size, cfg.max_num_seqs,
                          max_blocks, runner.device)

    def capture(key):
        if graphs.logits_out is None:
            graphs.logits_out = torch.empty(graphs.max_batch, runner.model_config.vocab_size)
        graphs.graphs[key] = (EagerReplay(graphs, key), graphs.logits_out[:key[0]])
        return graphs.graphs[key]

    graphs._capture = capture
    for key in graphs.all_keys():
        capture(key)
    graphs.started = True
    runner.graphs = graphs
    return graphs


def serve(engine, requests) -> dict[str, list[int]]:
    """The requests as concurrent streams through the engine thread (the worker's path)."""
    ae = AsyncEngine(CoreOnlyRank(engine)).start()

    async def one(rid, prompt, params):
        return rid, [t async for o in ae.generate(rid, prompt, params) for t in o.new_token_ids]

    async def main():
        return dict(await asyncio.gather(*(one(*r) for r in requests)))

    try:
        return asyncio.run(asyncio.wait_for(main(), 120))
    finally:
        ae.stop()


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_served_decode_steps_replay_the_graphs_with_the_eager_engines_tokens(ckpt, async_scheduling):
    prompts = prompts_for(V, [5, 17, 9, 30, 12, 3], seed=6)
    n = [7, 4, 9, 6, 5, 8]

    def requests():
        return [(f"r{i}", p, SamplingParams(max_tokens=n[i], temperature=0, ignore_eos=True))
                for i, p in enumerate(prompts)]

    ref = serve(make_engine(ckpt, block_size=4, num_kv_blocks=64, max_num_seqs=4), requests())
    eng = make_engine(ckpt, block_size=4, num_kv_blocks=64, max_num_seqs=4, separate_prefill_steps=True,
                      async_scheduling=async_scheduling)
    graphs = with_cpu_graphs(eng)
    got = serve(eng, requests())
    stats = eng.runner.executor.stats
    assert got == ref
    assert graphs.replays == stats.graph_steps > 0
    assert graphs.captures_after_start == 0
    # every decode-only step replayed: the steps that did not are the prompt steps
    assert stats.steps - stats.graph_steps <= len(prompts)
    assert eng.blocks.num_free == eng.blocks.num_blocks


def test_a_graph_step_returns_the_rows_that_want_logits(ckpt):
    """run() with some rows not sampling (want_logits False) returns only the others, in order."""
    eng = make_engine(ckpt, block_size=4, num_kv_blocks=64, max_num_seqs=4)
    graphs = with_cpu_graphs(eng)
    runner = eng.runner
    prompts = prompts_for(V, [6, 9, 5], seed=8)
    tables = [[1, 2, 3], [4, 5, 6], [7, 8]]
    runner.execute(prompts, [0, 0, 0], tables, [True] * 3)
    before = runner.kv_pool.clone()
    every = graphs.run([11, 12, 13], [6, 9, 5], tables, [True] * 3)
    runner.kv_pool.copy_(before)
    some = graphs.run([11, 12, 13], [6, 9, 5], tables, [True, False, True])
    assert some.shape[0] == 2 and torch.equal(some, every[[0, 2]])
