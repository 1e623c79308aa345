"""Engine behaviour: paged cache + chunked prefill + continuous batching + preemption give the same
tokens and logits as running each prompt alone; sampling and stop conditions.

Reference for batching: the same prompts run one by one on a fresh engine with a large budget (whose
logits match transformers, see test_model_reference). Sampling references are the greedy run and the
recorded logits of the step in question.
"""
from __future__ import annotations

import json
import os

import pytest
import torch

from tests.conftest import SampleRecorder, make_engine, prompts_for, rel_err, run_requests
from dynamo_dwdp.engine.sampling import SamplingParams

TOL = 1e-4
V = 384


@pytest.fixture(scope="module")
def ckpt(checkpoints):
    model_dir, _ = checkpoints("engine", seed=21)
    return model_dir


def greedy(n: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, **kw)


def one_by_one(model_dir, prompts, n, monkeypatch):
    """Reference: each prompt alone on a fresh engine, whole prompt in one step."""
    rec = SampleRecorder(monkeypatch)
    out = []
    for i, p in enumerate(prompts):
        eng = make_engine(model_dir, max_num_batched_tokens=256, enable_prefix_caching=False)
        params = greedy(n)
        res = run_requests(eng, [(f"solo{i}", p, params)])
        out.append((res[f"solo{i}"][0], rec.rows(params)))
    return out


def assert_same_as_alone(res, rec, params, ref) -> None:
    """Request r{i}'s tokens equal the one-by-one run's and its sampled logits rows match them."""
    for i in range(len(ref)):
        assert res[f"r{i}"][0] == ref[i][0], i
        got = rec.rows(params[i])
        assert got.shape == ref[i][1].shape
        assert rel_err(got, ref[i][1]) < TOL, i


def test_batched_chunked_continuous_batching_matches_one_by_one(ckpt, monkeypatch):
    prompts = prompts_for(V, [3, 7, 13, 18, 5, 10], seed=1)
    n = 5
    eng = make_engine(ckpt, block_size=4, max_num_batched_tokens=8, max_num_seqs=4)
    chunks_per_step: list[list[tuple[str, int]]] = []
    inner = eng.scheduler.schedule

    def schedule():
        out = inner()
        chunks_per_step.append([(c.seq.request_id, c.num_tokens) for c in out])
        return out

    eng.scheduler.schedule = schedule
    rec = SampleRecorder(monkeypatch)
    params = [greedy(n) for _ in prompts]
    reqs = [(f"r{i}", p, params[i]) for i, p in enumerate(prompts)]
    res = run_requests(eng, reqs[:3], add_at_step={2: reqs[3:5], 5: reqs[5:]})
    # the schedule really was chunked and batched
    assert max(sum(n for _, n in step) for step in chunks_per_step) <= 8
    assert any(len(step) >= 3 for step in chunks_per_step)               # several sequences per step
    long_chunks = [n for step in chunks_per_step for rid, n in step if rid == "r3"]
    assert sum(long_chunks[:-(n - 1)]) == 18 and len(long_chunks) - (n - 1) >= 3   # 18-token prompt in >= 3 chunks
    assert eng.blocks.num_free == eng.blocks.num_blocks                  # nothing leaked
    assert_same_as_alone(res, rec, params, one_by_one(ckpt, prompts, n, monkeypatch))


def test_separate_prefill_steps_never_mix_and_keep_outputs_identical(ckpt, monkeypatch):
    """separate_prefill_steps: every step is all prompt chunks or all single decode tokens; while both
    kinds wait they alternate; tokens and logits equal the one-by-one reference."""
    prompts = prompts_for(V, [3, 7, 13, 18, 5, 10], seed=1)
    n = 5
    eng = make_engine(ckpt, block_size=4, max_num_batched_tokens=8, max_num_seqs=4, separate_prefill_steps=True)
    steps: list[tuple[list[bool], bool, bool]] = []        # (chunk is decode work, decode waited, prefill waited)
    inner = eng.scheduler.schedule

    def schedule():
        running = list(eng.scheduler.running)
        decode_waits = any(s.num_tokens - s.num_computed == 1 for s in running)
        prefill_waits = bool(eng.scheduler.waiting) or any(s.num_tokens - s.num_computed > 1 for s in running)
        out = inner()
        steps.append(([c.num_tokens == 1 and c.seq.num_tokens - c.seq.num_computed == 1 for c in out],
                      decode_waits, prefill_waits))
        return out

    eng.scheduler.schedule = schedule
    rec = SampleRecorder(monkeypatch)
    params = [greedy(n) for _ in prompts]
    reqs = [(f"r{i}", p, params[i]) for i, p in enumerate(prompts)]
    res = run_requests(eng, reqs[:3], add_at_step={2: reqs[3:5], 5: reqs[5:]})
    kinds = [all(d) if d else None for d, _, _ in steps]
    assert all(not d or all(d) or not any(d) for d, _, _ in steps)           # no step mixes the two kinds
    both = [i for i, (_, dw, pw) in enumerate(steps) if dw and pw]
    assert both, "the schedule never had both kinds waiting"
    assert all(not (kinds[i] is False and i + 1 < len(kinds) and kinds[i + 1] is False and steps[i + 1][1])
               for i in range(len(kinds)))                                   # no two prefill steps while decode waits
    assert eng.blocks.num_free == eng.blocks.num_blocks
    assert_same_as_alone(res, rec, params, one_by_one(ckpt, prompts, n, monkeypatch))


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_preemption_keeps_outputs_identical(ckpt, monkeypatch, async_scheduling):
    prompts = prompts_for(V, [6, 9, 12, 7], seed=2)
    n = 10
    eng = make_engine(ckpt, block_size=4, num_kv_blocks=8, max_num_batched_tokens=16,
                      async_scheduling=async_scheduling)
    rec = SampleRecorder(monkeypatch)
    params = [greedy(n) for _ in prompts]
    res = run_requests(eng, [(f"r{i}", p, params[i]) for i, p in enumerate(prompts)])
    assert eng.scheduler.num_preemptions > 0
    assert eng.blocks.num_free == eng.blocks.num_blocks
    assert_same_as_alone(res, rec, params, one_by_one(ckpt, prompts, n, monkeypatch))


# ------------------------------------------------------------------ sampling
def _run_one(model_dir, prompt, params, others=()):
    eng = make_engine(model_dir)
    res = run_requests(eng, [*others[: len(others) // 2], ("target", prompt, params), *others[len(others) // 2:]])
    return res["target"]


@pytest.fixture(scope="module")
def greedy_ref(ckpt):
    prompts = prompts_for(V, [5, 8, 11, 4], seed=3)
    eng = make_engine(ckpt)
    res = run_requests(eng, [(f"g{i}", p, greedy(12)) for i, p in enumerate(prompts)])
    return prompts, [res[f"g{i}"][0] for i in range(len(prompts))]


def test_seeded_sampling_is_reproducible_and_independent_of_the_batch(ckpt, greedy_ref):
    prompts, _ = greedy_ref

    def params(seed):
        return SamplingParams(max_tokens=8, temperature=0.9, top_k=50, seed=seed, ignore_eos=True)

    alone = _run_one(ckpt, prompts[0], params(123))[0]
    again = _run_one(ckpt, prompts[0], params(123))[0]
    others = [(f"o{i}", p, SamplingParams(max_tokens=3 + i, temperature=1.3, seed=i, ignore_eos=True))
              for i, p in enumerate(prompts[1:])] + [("og", prompts[2], greedy(6))]
    crowded = _run_one(ckpt, prompts[0], params(123), others)[0]
    assert alone == again == crowded
    assert any(_run_one(ckpt, prompts[0], params(s))[0] != alone for s in (1, 2, 3))


def test_top_k_1_is_greedy(ckpt, greedy_ref):
    prompts, ref = greedy_ref
    for p, r in zip(prompts, ref):
        got = _run_one(ckpt, p, SamplingParams(max_tokens=12, temperature=1.0, top_k=1, ignore_eos=True))[0]
        assert got == r


def test_tiny_top_p_is_greedy(ckpt, greedy_ref):
    prompts, ref = greedy_ref
    for i, (p, r) in enumerate(zip(prompts, ref)):
        got = _run_one(ckpt, p, SamplingParams(max_tokens=12, temperature=1.0, top_p=1e-6, seed=i,
                                               ignore_eos=True))[0]
        assert got == r


def test_temperature_sampling_differs_from_greedy(ckpt, greedy_ref):
    prompts, ref = greedy_ref
    sampled = [_run_one(ckpt, p, SamplingParams(max_tokens=12, temperature=1.5, seed=7 + i, ignore_eos=True))[0]
               for i, p in enumerate(prompts)]
    assert all(len(s) == 12 for s in sampled)
    assert any(s != r for s, r in zip(sampled, ref))


def test_max_tokens_stops_with_length(ckpt, greedy_ref):
    prompts, ref = greedy_ref
    toks, first, last = _run_one(ckpt, prompts[1], greedy(4))
    assert toks == ref[1][:4]
    assert last.finished and last.finish_reason == "length" and last.num_output_tokens == 4
    assert not first.finished


def _first_new(tokens: list[int], start: int = 1) -> int:
    """Index of the first token (at or after `start`) that did not occur before it."""
    return next(j for j in range(start, len(tokens)) if tokens[j] not in tokens[:j])


def test_stop_token_ids(ckpt, greedy_ref):
    prompts, ref = greedy_ref
    g = ref[2]
    j = _first_new(g, 2)
    toks, _, last = _run_one(ckpt, prompts[2], greedy(12, stop_token_ids=(g[j],)))
    assert toks == g[:j + 1]
    assert last.finish_reason == "stop"


@pytest.fixture(scope="module")
def eos_model(ckpt, greedy_ref, tmp_path_factory):
    """The same weights, with config.json's eos_token_id set to a token greedy decoding emits."""
    _, ref = greedy_ref
    g = ref[0]
    j = _first_new(g, 2)
    d = tmp_path_factory.mktemp("eos")
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["eos_token_id"] = g[j]
    (d / "config.json").write_text(json.dumps(cfg))
    for name in os.listdir(ckpt):
        if name.endswith(".safetensors"):
            os.symlink(ckpt / name, d / name)
    return d, j


def test_eos_from_config_and_ignore_eos(eos_model, greedy_ref):
    d, j = eos_model
    prompts, ref = greedy_ref
    toks, _, last = _run_one(d, prompts[0], SamplingParams(max_tokens=12, temperature=0))
    assert toks == ref[0][:j + 1] and last.finish_reason == "eos"
    toks, _, last = _run_one(d, prompts[0], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    assert toks == ref[0] and last.finish_reason == "length"


def test_min_tokens_suppresses_eos_until_reached(ckpt, greedy_ref, monkeypatch):
    prompts, ref = greedy_ref
    eos = ref[3][0]                                          # greedy's very first token
    p = SamplingParams(max_tokens=8, temperature=0, eos_token_ids=(eos,))
    toks, _, last = _run_one(ckpt, prompts[3], p)
    assert toks == [eos] and last.finish_reason == "eos"     # teeth: without min_tokens it stops at once

    rec = SampleRecorder(monkeypatch)
    p = SamplingParams(max_tokens=8, min_tokens=3, temperature=0, eos_token_ids=(eos,))
    toks, _, last = _run_one(ckpt, prompts[3], p)
    assert len(toks) >= 3 and eos not in toks[:3]
    first_logits = rec.rows(p)[0]
    unmasked = make_engine(ckpt)                             # the first step's logits, unmasked
    rec2 = SampleRecorder(monkeypatch)
    p2 = greedy(1)
    run_requests(unmasked, [("x", prompts[3], p2)])
    raw = rec2.rows(p2)[0]
    assert int(raw.argmax()) == eos
    expected_first = int(raw.clone().index_fill_(0, torch.tensor([eos]), float("-inf")).argmax())
    assert toks[0] == expected_first
    assert first_logits[eos] == float("-inf")
    if eos in toks:                                          # after min_tokens EOS ends the request again
        assert toks.index(eos) == len(toks) - 1 and last.finish_reason == "eos"


def test_abort_frees_blocks(ckpt):
    eng = make_engine(ckpt, num_kv_blocks=32, max_num_batched_tokens=8)
    prompts = prompts_for(V, [10, 14], seed=9)
    eng.add_request("a", prompts[0], greedy(20))
    eng.add_request("b", prompts[1], greedy(20))
    for _ in range(3):
        eng.step()
    used = eng.blocks.num_used
    assert used > 0
    assert eng.abort("a")
    assert eng.blocks.num_used < used
    assert eng.abort("b")
    assert eng.blocks.num_free == eng.blocks.num_blocks
    assert not eng.has_unfinished()
    assert eng.step() == []
    assert not eng.abort("a") and not eng.abort("never-added")


def _drive(eng, limit=500):
    """Step until idle (at most `limit` steps: a livelock fails the test instead of hanging it)."""
    toks, last = {}, {}
    for _ in range(limit):
        if not eng.has_unfinished():
            return toks, last
        for o in eng.step():
            toks.setdefault(o.request_id, []).extend(o.new_token_ids)
            last[o.request_id] = o
    raise AssertionError(f"engine still busy after {limit} steps ({eng.scheduler.num_preemptions} preemptions)")


def test_sequence_outgrowing_the_whole_kv_pool_stops_with_length(ckpt):
    """6 blocks x 4 tokens: a 4-token prompt asking for 30 tokens can never fit; it must end with
    'length' once the pool is full (not preempt itself forever)."""
    eng = make_engine(ckpt, block_size=4, num_kv_blocks=6)
    prompt = prompts_for(V, [4], seed=11)[0]
    eng.add_request("a", prompt, greedy(30))
    toks, last = _drive(eng)
    assert last["a"].finish_reason == "length"
    assert len(prompt) + len(toks["a"]) == 6 * 4 + 1            # the last token needs no KV slot
    big = make_engine(ckpt)
    assert toks["a"] == big.generate([prompt], greedy(30))[0][:len(toks["a"])]
    assert eng.blocks.num_free == 6


def test_waiting_request_does_not_pin_cached_blocks(ckpt):
    """B waits behind A with a cached prefix; A needs those blocks to finish. B must not keep them
    referenced while it waits (that livelocked: A preempting itself forever)."""
    eng = make_engine(ckpt, block_size=4, num_kv_blocks=6, max_num_batched_tokens=32)
    x = prompts_for(V, [8], seed=12)[0]
    run_requests(eng, [("x", x, greedy(1))])                     # caches 2 blocks of x
    a = prompts_for(V, [16], seed=13)[0]
    b = x + [99]
    eng.add_request("A", a, greedy(6))
    eng.add_request("B", b, greedy(2))
    toks, last = _drive(eng)
    ref = make_engine(ckpt)
    assert toks["A"] == ref.generate([a], greedy(6))[0]
    assert toks["B"] == ref.generate([b], greedy(2))[0]
    assert last["B"].num_cached_tokens + last["B"].num_computed_prompt_tokens == len(b)
    assert eng.blocks.num_free == 6


def test_exact_fp32_turns_tf32_off():
    """What an fp32 engine on CUDA does first: cuBLAS and cuDNN may not use TF32 (torch turns cuDNN's on
    by default)."""
    from dynamo_dwdp.engine.model_runner import exact_fp32

    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        exact_fp32()
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old
