"""The host path of a step, pinned: the batched sampler against a float64 reference, stop conditions
and finish reasons of several requests in one batch, token slices, and streaming through
`AsyncEngine` against the single-threaded `EngineCore` run.

The model forward is replaced by a deterministic fake (logits that depend on each row's last token and
position), so every expected token is known without a model; everything else is the real engine.
"""
from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from dynamo_dwdp.bench.host_bench import CoreOnlyRank, FakeForwardRunner, HostShape
from dynamo_dwdp.config.engine import EngineSettings
from dynamo_dwdp.engine.async_engine import AsyncEngine
from dynamo_dwdp.engine.engine_core import EngineCore
from dynamo_dwdp.engine.sampling import SamplingParams, batched_probs, row_probs, sample_tokens
from dynamo_dwdp.engine.sequence import RequestOutput, Sequence

V = 64


# ------------------------------------------------------------------------------------------ sampler
def reference_probs(logits: np.ndarray, p: SamplingParams) -> np.ndarray:
    """float64, written from the definitions: temperature; keep logits >= the k-th largest; softmax;
    keep the most probable tokens, in order, until their mass reaches top_p (the one that crosses it
    included); renormalise."""
    x = logits.astype(np.float64) / p.temperature
    if 0 < p.top_k < x.size:
        kth = np.sort(x)[::-1][p.top_k - 1]
        x = np.where(x >= kth, x, -np.inf)
    e = np.exp(x - x.max())
    probs = e / e.sum()
    if p.top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        kept, mass = [], 0.0
        for i in order:
            if mass >= p.top_p:
                break
            kept.append(i)
            mass += probs[i]
        mask = np.zeros_like(probs)
        mask[kept] = 1.0
        probs = probs * mask
    return probs / probs.sum()


PARAMS = [SamplingParams(temperature=1.0), SamplingParams(temperature=0.7, top_k=5),
          SamplingParams(temperature=1.3, top_p=0.6), SamplingParams(temperature=0.9, top_k=12, top_p=0.8),
          SamplingParams(temperature=2.0, top_k=1), SamplingParams(temperature=0.5, top_p=0.05)]


def test_batched_probs_match_float64_reference_per_row():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(len(PARAMS), V, generator=g) * 2.5
    got = batched_probs(logits, PARAMS)
    for i, p in enumerate(PARAMS):
        ref = reference_probs(logits[i].numpy(), p)
        np.testing.assert_allclose(got[i].numpy() / got[i].sum().item(), ref, atol=2e-6)
        np.testing.assert_allclose(row_probs(logits[i], p).numpy(), got[i].numpy(), atol=1e-7)


def test_batched_sampling_frequencies_follow_the_distribution():
    """Many unseeded rows in one batch: the empirical frequencies match the reference probabilities."""
    torch.manual_seed(11)
    base = torch.tensor([2.0, 1.5, 1.0, 0.2, -1.0, 0.9, 1.4, -3.0])
    params = [SamplingParams(temperature=0.8, top_k=6, top_p=0.9)] * 3000 + [SamplingParams(temperature=1.0)] * 3000
    logits = base.repeat(len(params), 1)
    picks = sample_tokens(logits, params, [None] * len(params)).numpy()
    for sl, p in ((slice(0, 3000), params[0]), (slice(3000, 6000), params[-1])):
        freq = np.bincount(picks[sl], minlength=base.numel()) / 3000
        ref = reference_probs(base.numpy(), p)
        assert np.all(freq[ref == 0] == 0), "a token outside top-k / top-p was sampled"
        np.testing.assert_allclose(freq, ref, atol=0.035)


def test_mixed_batch_greedy_seeded_and_unseeded_rows():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(5, V, generator=g)
    seeded = SamplingParams(temperature=1.2, top_k=20, seed=42)
    params = [SamplingParams(temperature=0), seeded, SamplingParams(temperature=1.0), SamplingParams(top_k=1),
              seeded]

    def gen():
        return torch.Generator().manual_seed(42)

    picks = sample_tokens(logits, params, [None, gen(), None, None, gen()]).tolist()
    assert picks[0] == int(logits[0].argmax()) and picks[3] == int(logits[3].argmax())
    alone = [sample_tokens(logits[i:i + 1], [seeded], [gen()]).tolist()[0] for i in (1, 4)]
    assert [picks[1], picks[4]] == alone              # a seeded row does not depend on the rest of the batch
    assert sample_tokens(logits[:0], [], []).tolist() == []


# ----------------------------------------------------------------------------------- token slices
def test_token_slice_equals_all_ids_slices():
    seq = Sequence("s", [1, 2, 3, 4, 5], SamplingParams())
    seq.output_ids = [6, 7, 8]
    for a in range(0, 9):
        for b in range(a, 10):
            assert seq.token_slice(a, b) == seq.all_ids[a:b], (a, b)


# ---------------------------------------------------------------------------------- engine, faked
class ChainRunner(FakeForwardRunner):
    """Logits with one clear winner per row, a function of the row's last token and its position:
    f(t, pos) = (7 * t + 3 * pos + 1) % V; the runner-up is f + 1."""

    def launch(self, token_chunks, start_positions, block_tables, want_logits, fed=None):
        self.executor.stats.steps += 1
        if fed is not None:         # the chain needs the fed tokens on the host: take them from the device
            flat = [t for c in token_chunks for t in c]
            for row, value in zip(fed.rows.tolist(), fed.values.tolist()):
                flat[row] = value
            it = iter(flat)
            token_chunks = [[next(it) for _ in c] for c in token_chunks]
        rows = []
        for chunk, start, want in zip(token_chunks, start_positions, want_logits):
            if want:
                pos = start + len(chunk) - 1
                row = torch.zeros(V)
                best = (7 * chunk[-1] + 3 * pos + 1) % V
                row[best], row[(best + 1) % V] = 10.0, 5.0
                rows.append(row)
        return torch.stack(rows) if rows else torch.zeros(0, V)


def chain_engine(**kw) -> EngineCore:
    cfg = EngineSettings(block_size=4, num_kv_blocks=128, max_num_seqs=8, max_num_batched_tokens=64, **kw)
    return EngineCore(ChainRunner(cfg, HostShape(vocab_size=V, max_position_embeddings=512, eos_token_ids=(V - 1,))))


def expected_chain(prompt: list[int], n: int, banned_until: dict[int, int] | None = None) -> list[int]:
    """The tokens greedy decoding of ChainRunner gives; banned_until {token: k}: that token is masked
    while fewer than k tokens have been generated (then the runner-up is taken)."""
    out, last, pos = [], prompt[-1], len(prompt) - 1
    for _ in range(n):
        best = (7 * last + 3 * pos + 1) % V
        if banned_until and len(out) < banned_until.get(best, 0):
            best = (best + 1) % V
        out.append(best)
        last, pos = best, pos + 1
    return out


def run_all(engine: EngineCore, reqs) -> dict[str, tuple[list[int], str]]:
    for rid, prompt, p in reqs:
        engine.add_request(rid, prompt, p)
    toks: dict[str, list[int]] = {rid: [] for rid, _, _ in reqs}
    reasons: dict[str, str] = {}
    while engine.has_unfinished():
        for out in engine.step():
            toks[out.request_id] += out.new_token_ids
            if out.finished:
                reasons[out.request_id] = out.finish_reason
    return {rid: (toks[rid], reasons[rid]) for rid in toks}


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_stop_conditions_of_several_requests_in_one_batch(async_scheduling):
    """min_tokens masks each row's own stop/eos ids (one batched scatter), then those ids stop it (with
    async scheduling one step later: the row launched after a stop is discarded)."""
    prompt = [3, 9, 27]
    free = expected_chain(prompt, 12)
    stop_tok, eos_tok = free[1], free[2]
    greedy = dict(temperature=0)
    reqs = [
        ("stop", prompt, SamplingParams(max_tokens=12, stop_token_ids=(stop_tok,), ignore_eos=True, **greedy)),
        ("eos", prompt, SamplingParams(max_tokens=12, eos_token_ids=(eos_tok,), **greedy)),
        ("min-stop", prompt, SamplingParams(max_tokens=12, min_tokens=4, stop_token_ids=(stop_tok,),
                                            ignore_eos=True, **greedy)),
        ("min-eos", prompt, SamplingParams(max_tokens=12, min_tokens=5, eos_token_ids=(eos_tok,), **greedy)),
        ("length", prompt, SamplingParams(max_tokens=6, ignore_eos=True, **greedy)),
        ("ignored-eos", prompt, SamplingParams(max_tokens=5, eos_token_ids=(eos_tok,), ignore_eos=True, **greedy)),
    ]
    eng = chain_engine(async_scheduling=async_scheduling)
    got = run_all(eng, reqs)
    assert eng.blocks.num_free == eng.blocks.num_blocks and not eng.in_flight
    assert got["stop"] == (free[:2], "stop")
    assert got["eos"] == (free[:3], "eos")
    assert got["length"] == (free[:6], "length")
    assert got["ignored-eos"] == (free[:5], "length")
    for rid, tok, k, reason in (("min-stop", stop_tok, 4, "stop"), ("min-eos", eos_tok, 5, "eos")):
        assert tok in free[:k], "test has no teeth: the masked token would not come up"
        chain = expected_chain(prompt, 12, {tok: k})
        end, why = (chain.index(tok, k) + 1, reason) if tok in chain[k:] else (12, "length")
        assert got[rid] == (chain[:end], why)


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_async_engine_streams_match_the_engine_core_run(async_scheduling):
    """Several concurrent streams through the engine thread: each gets exactly its tokens, in order,
    one output per step, the last one finished with its reason; same as the single-threaded run."""
    prompts = [[i + 1, 2 * i + 5, 11] for i in range(6)]
    params = [SamplingParams(max_tokens=5 + i, temperature=0, ignore_eos=True) for i in range(6)]
    ref = run_all(chain_engine(), [(f"r{i}", p, q) for i, (p, q) in enumerate(zip(prompts, params))])
    engine = chain_engine(async_scheduling=async_scheduling)
    ae = AsyncEngine(CoreOnlyRank(engine)).start()

    async def one(i):
        outs = [o async for o in ae.generate(f"r{i}", prompts[i], params[i])]
        assert all(o.new_token_ids for o in outs) and outs[-1].finished and not any(o.finished for o in outs[:-1])
        assert outs[-1].num_output_tokens == 5 + i
        return [t for o in outs for t in o.new_token_ids], outs[-1].finish_reason

    async def main():
        return await asyncio.gather(*(one(i) for i in range(6)))

    try:
        got = asyncio.run(asyncio.wait_for(main(), 60))
    finally:
        ae.stop()
    for i, (toks, reason) in enumerate(got):
        assert (toks, reason) == ref[f"r{i}"] == (expected_chain(prompts[i], 5 + i), "length")
    assert engine.blocks.num_free == engine.blocks.num_blocks


@pytest.mark.parametrize("interval", [3, 16])
def test_stream_interval_streams_the_same_tokens_in_fewer_chunks(interval):
    """engine.stream_interval: every request's tokens and finish as with interval 1 (the single-threaded
    run), every chunk but the first and the last carrying at least `interval` tokens."""
    prompts = [[i + 1, 3 * i + 2, 9] for i in range(4)]
    lengths = [1, 2, 11, 40]
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in lengths]
    ref = run_all(chain_engine(), [(f"r{i}", p, q) for i, (p, q) in enumerate(zip(prompts, params))])
    engine = chain_engine(stream_interval=interval)
    ae = AsyncEngine(CoreOnlyRank(engine)).start()

    async def main():
        async def one(i):
            return [o async for o in ae.generate(f"r{i}", prompts[i], params[i])]
        return await asyncio.gather(*(one(i) for i in range(len(prompts))))

    try:
        got = asyncio.run(asyncio.wait_for(main(), 60))
    finally:
        ae.stop()
    for i, outs in enumerate(got):
        assert ([t for o in outs for t in o.new_token_ids], outs[-1].finish_reason) == ref[f"r{i}"]
        assert outs[-1].finished and not any(o.finished for o in outs[:-1])
        assert all(len(o.new_token_ids) >= interval for o in outs[1:-1])
        assert len(outs) <= 2 + (lengths[i] - 1) // interval
    assert engine.blocks.num_free == engine.blocks.num_blocks and not ae._held
    st = engine.runner.executor.stats                # the serving loop's busy time, over its stepping iterations
    assert 0 < st.loop_cpu_seconds <= st.loop_seconds * 1.05 + 1e-4 and st.launch_seconds < st.loop_seconds


def test_stream_interval_sends_the_first_token_at_once_and_holds_the_next_ones():
    """The engine thread's delivery, step by step: the first output goes out alone, later ones wait
    until `interval` tokens are held, the finishing one carries what is left, an error is not held."""
    ae = AsyncEngine(CoreOnlyRank(chain_engine(stream_interval=4)))     # not started: deliveries by hand
    loop = asyncio.new_event_loop()
    try:
        q: asyncio.Queue = asyncio.Queue()
        ae._streams.update({"r": (loop, q), "e": (loop, q)})

        def out(rid, token, n, finished=False, error=None):
            return RequestOutput(rid, [token], finished, "length" if finished else None, 3, n, 0, 3, error)

        sent = []
        for n in range(1, 8):                        # tokens 1..7 of "r"; "e" fails at its second
            ae._deliver([out("r", 100 + n, n)] + ([out("e", 200 + n, n, finished=n == 2, error="boom" if n == 2
                                                                                             else None)]
                                                    if n <= 2 else []))
            loop.run_until_complete(asyncio.sleep(0))
            while not q.empty():
                o = q.get_nowait()
                sent.append((n, o.request_id, o.new_token_ids, o.finished, o.error))
        ae._deliver([out("r", 108, 8, finished=True)])
        loop.run_until_complete(asyncio.sleep(0))
        sent += [(8, o.request_id, o.new_token_ids, o.finished, o.error) for o in [q.get_nowait()]]
    finally:
        loop.close()
    assert sent == [(1, "r", [101], False, None), (1, "e", [201], False, None), (2, "e", [202], True, "boom"),
                    (5, "r", [102, 103, 104, 105], False, None), (8, "r", [106, 107, 108], True, None)]
    assert not ae._held and not ae._streams


def test_a_consumer_that_falls_behind_gets_the_queued_tokens_as_one_output():
    """Outputs queued while the consumer was away come as one: same tokens, in order, final state."""
    engine = chain_engine()
    ae = AsyncEngine(CoreOnlyRank(engine)).start()
    prompt, n = [4, 8, 15], 9

    async def main():
        stream = ae.generate("slow", prompt, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))
        first = await stream.__anext__()
        while await ae.call(lambda e: "slow" in e.requests):      # the engine finishes meanwhile
            await asyncio.sleep(0.01)
        rest = [o async for o in stream]
        return first, rest

    try:
        first, rest = asyncio.run(asyncio.wait_for(main(), 60))
    finally:
        ae.stop()
    outs = [first] + rest                    # `first` may already hold several tokens on a slow machine
    assert len(outs) <= 2, "queued outputs were not merged"
    assert [t for o in outs for t in o.new_token_ids] == expected_chain(prompt, n)
    assert outs[-1].finished and outs[-1].finish_reason == "length" and outs[-1].num_output_tokens == n
    assert not any(o.finished for o in outs[:-1])


def test_async_engine_abort_ends_the_stream_and_frees_blocks():
    engine = chain_engine()
    ae = AsyncEngine(CoreOnlyRank(engine)).start()

    async def main():
        outs = []
        async for o in ae.generate("a", [1, 2, 3], SamplingParams(max_tokens=400, temperature=0, ignore_eos=True)):
            outs.append(o)
            if len(outs) == 3:
                ae.abort("a")
        return outs

    try:
        outs = asyncio.run(asyncio.wait_for(main(), 60))
        done = asyncio.run(asyncio.wait_for(_settle(ae), 30))
    finally:
        ae.stop()
    assert outs[-1].finished and outs[-1].finish_reason == "cancelled" and len(outs) < 400
    assert done == engine.blocks.num_blocks


async def _settle(ae: AsyncEngine) -> int:
    return await ae.call(lambda engine: engine.blocks.num_free)


@pytest.mark.parametrize("level", ["core", "async"])
def test_host_bench_runs_and_reports_a_host_time(level):
    from dynamo_dwdp.bench.host_bench import HostPoint, run_point

    r = run_point(HostPoint(batch=3, prompt_len=8, steps=3, warmup=1, vocab=32), level).as_dict()
    assert r["steps"] >= 3 and r["host_ms_per_step"] > 0 and r["batch"] == 3


class FailingRank(CoreOnlyRank):
    """Its 5th iteration raises, like a step whose collective failed."""

    def step(self):
        if self.runner.executor.stats.steps >= 4:
            raise RuntimeError("peer 1 is gone")
        return super().step()


def test_an_error_is_not_merged_into_the_queued_tokens():
    """A consumer that fell behind gets its queued tokens as one output and the error as its own."""
    engine = chain_engine()
    ae = AsyncEngine(FailingRank(engine)).start()
    prompt = [5, 6, 7]

    async def main():
        stream = ae.generate("f", prompt, SamplingParams(max_tokens=50, temperature=0, ignore_eos=True))
        first = await stream.__anext__()
        while ae.broken is None:
            await asyncio.sleep(0.01)
        return [first] + [o async for o in stream]

    try:
        outs = asyncio.run(asyncio.wait_for(main(), 60))
    finally:
        ae.stop()
    assert outs[-1].error and "peer 1 is gone" in outs[-1].error and outs[-1].new_token_ids == []
    assert outs[-1].finished and outs[-1].finish_reason == "error"
    tokens = [t for o in outs[:-1] for t in o.new_token_ids]
    assert len(outs) <= 3 and len(tokens) == 4 and tokens == expected_chain(prompt, 4)
    assert not any(o.error or o.finished for o in outs[:-1])
