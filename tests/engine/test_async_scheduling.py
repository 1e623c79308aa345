"""Async scheduling (`engine.async_scheduling`): step k+1 is launched before step k's tokens are read
back, its new tokens fed on the device. References: the same prompts run one by one (test_engine's
reference, whose logits match transformers) and the synchronous engine on the same requests.
Preemption and the stop conditions run both ways in test_engine.py and test_host_path.py.
"""
from __future__ import annotations

import pytest

from dynamo_dwdp.engine import engine_core
from dynamo_dwdp.engine.sampling import SamplingParams
from tests.conftest import SampleRecorder, make_engine, prompts_for, run_requests
from tests.engine.test_engine import V, _drive, assert_same_as_alone, greedy, one_by_one
from tests.engine.test_host_path import run_all


@pytest.fixture(scope="module")
def ckpt(checkpoints):
    model_dir, _ = checkpoints("engine", seed=21)
    return model_dir


class FeedCounter:
    """Counts the tokens fed on the device and checks that at most one step is in flight between calls."""

    def __init__(self, eng, monkeypatch):
        self.fed = 0
        self.max_in_flight = 0
        inner_launch = eng._launch

        def launch(chunks):
            self.max_in_flight = max(self.max_in_flight, len(eng.in_flight))
            step = inner_launch(chunks)
            self.fed += sum(1 for c in chunks if c.seq.output_ids and c.seq.output_ids[-1] == engine_core.PENDING
                            and c.seq.num_computed + c.num_tokens == c.seq.num_tokens)
            return step

        monkeypatch.setattr(eng, "_launch", launch)


@pytest.mark.parametrize("separate", [False, True], ids=["mixed", "separate"])
def test_chunked_continuous_batching_matches_one_by_one(ckpt, monkeypatch, separate):
    prompts = prompts_for(V, [3, 7, 13, 18, 5, 10], seed=1)
    n = 5
    eng = make_engine(ckpt, block_size=4, max_num_batched_tokens=8, max_num_seqs=4, async_scheduling=True,
                      separate_prefill_steps=separate)
    feed = FeedCounter(eng, monkeypatch)
    rec = SampleRecorder(monkeypatch)
    params = [greedy(n) for _ in prompts]
    reqs = [(f"r{i}", p, params[i]) for i, p in enumerate(prompts)]
    res = run_requests(eng, reqs[:3], add_at_step={2: reqs[3:5], 5: reqs[5:]})
    # the decode tokens really came from the device (with separate steps, a prefill step between two
    # decode steps reads the pending tokens back first)
    assert feed.fed >= (n - 2 if separate else len(prompts) * (n - 2))
    assert feed.max_in_flight == 1
    assert not eng.in_flight and eng.blocks.num_free == eng.blocks.num_blocks
    assert_same_as_alone(res, rec, params, one_by_one(ckpt, prompts, n, monkeypatch))


def test_seeded_and_greedy_rows_equal_the_synchronous_engine(ckpt):
    """Seeded rows draw from their own generator and greedy rows take the argmax, so their tokens do not
    depend on when the step was launched; unseeded temperature rows only share the batch."""
    prompts = prompts_for(V, [5, 8, 11, 4], seed=3)

    def reqs():
        return [("seeded", prompts[0], SamplingParams(max_tokens=8, temperature=0.9, top_k=50, seed=123,
                                                       ignore_eos=True)),
                ("greedy", prompts[1], greedy(6)),
                ("free", prompts[2], SamplingParams(max_tokens=7, temperature=1.3, ignore_eos=True)),
                ("top-p", prompts[3], SamplingParams(max_tokens=5, temperature=1.0, top_p=0.9, seed=5,
                                                     ignore_eos=True))]

    sync = run_requests(make_engine(ckpt), reqs())
    eng = make_engine(ckpt, async_scheduling=True)
    got = run_requests(eng, reqs())
    for rid in ("seeded", "greedy", "top-p"):
        assert got[rid][0] == sync[rid][0], rid
    assert len(got["free"][0]) == 7 and got["free"][2].finish_reason == "length"
    assert eng.blocks.num_free == eng.blocks.num_blocks


def test_abort_while_a_step_is_in_flight(ckpt):
    eng = make_engine(ckpt, num_kv_blocks=32, max_num_batched_tokens=8, async_scheduling=True)
    prompts = prompts_for(V, [10, 14], seed=9)
    eng.add_request("a", prompts[0], greedy(20))
    eng.add_request("b", prompts[1], greedy(20))
    seen = []
    for _ in range(5):
        seen += eng.step()
    assert eng.in_flight                                  # a's next token is on its way
    assert eng.abort("a")
    rest, last = _drive(eng)
    assert "a" not in rest                                # nothing for a after its abort
    assert last["b"].finish_reason == "length" and last["b"].num_output_tokens == 20
    ref = make_engine(ckpt, num_kv_blocks=32).generate([prompts[1]], greedy(20))[0]
    assert [t for o in seen if o.request_id == "b" for t in o.new_token_ids] + rest["b"] == ref
    assert eng.blocks.num_free == eng.blocks.num_blocks and not eng.has_unfinished()


def test_sequence_outgrowing_the_kv_pool_stops_with_length(ckpt):
    eng = make_engine(ckpt, block_size=4, num_kv_blocks=6, async_scheduling=True)
    prompt = prompts_for(V, [4], seed=11)[0]
    eng.add_request("a", prompt, greedy(30))
    toks, last = _drive(eng)
    assert last["a"].finish_reason == "length"
    assert len(prompt) + len(toks["a"]) == 6 * 4 + 1
    assert toks["a"] == make_engine(ckpt).generate([prompt], greedy(30))[0][:len(toks["a"])]
    assert eng.blocks.num_free == 6


def test_reserve_waits_for_the_step_in_flight(ckpt, monkeypatch):
    """Decode role: blocks handed to a KV transfer are written outside the step's stream, so `reserve`
    first waits for the step in flight (on CUDA an event; here the wait is counted)."""
    eng = make_engine(ckpt, async_scheduling=True)
    eng.add_request("a", prompts_for(V, [6], seed=4)[0], greedy(8))
    for _ in range(3):
        eng.step()
    assert eng.in_flight
    waits = []
    step = eng.in_flight[-1]
    monkeypatch.setattr(step.tokens, "wait", lambda: waits.append(step))
    blocks = eng.reserve("d", prompts_for(V, [9], seed=5)[0], greedy(4))
    assert waits == [step] and blocks
    eng.release("d")
    _drive(eng)
    assert eng.blocks.num_free == eng.blocks.num_blocks


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_graph_steps_carry_their_share_of_the_step_seconds(async_scheduling):
    """The engine books a step's seconds (launch + wait) to graph_step_seconds when the runner replayed it
    from a graph (here: a runner that counts its decode-only steps as graph steps)."""
    from tests.engine.test_host_path import ChainRunner, HostShape
    from dynamo_dwdp.config.engine import EngineSettings
    from dynamo_dwdp.engine.engine_core import EngineCore

    class GraphCountingRunner(ChainRunner):
        def launch(self, token_chunks, *args, **kwargs):
            if token_chunks and all(len(c) == 1 for c in token_chunks):
                self.executor.stats.graph_steps += 1
            return super().launch(token_chunks, *args, **kwargs)

    cfg = EngineSettings(block_size=4, num_kv_blocks=64, max_num_seqs=4, max_num_batched_tokens=64,
                         async_scheduling=async_scheduling)
    eng = EngineCore(GraphCountingRunner(cfg, HostShape(vocab_size=64, max_position_embeddings=512,
                                                        eos_token_ids=(63,))))
    run_all(eng, [(f"r{i}", [3, 9, 27 + i], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
                  for i in range(3)])
    st = eng.runner.executor.stats
    assert st.graph_steps == 5 and st.steps == 6                 # one prompt step, five decode steps
    assert 0 < st.graph_step_seconds < st.step_seconds
    assert 0 < st.launch_cpu_seconds <= st.launch_seconds * 1.05 + 1e-4   # this thread's CPU, within its wall
    assert 0 < st.graph_launch_seconds < st.launch_seconds and st.graph_launch_cpu_seconds < st.launch_cpu_seconds
    assert st.device_steps == 0 and st.device_seconds == 0.0      # device time is CUDA's (events)
