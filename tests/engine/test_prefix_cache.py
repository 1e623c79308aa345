"""Prefix caching: reused blocks skip compute but not correctness; LRU eviction of unused blocks.

References: an engine with enable_prefix_caching=False (computes everything; its logits match
transformers, see test_model_reference) and hand-derived block accounting for BlockManager.
"""
from __future__ import annotations

import pytest

from tests.conftest import SampleRecorder, make_engine, prompts_for, rel_err, run_requests
from dynamo_dwdp.engine.block_manager import BlockManager, chain_hash
from dynamo_dwdp.engine.sampling import SamplingParams
from dynamo_dwdp.engine.sequence import Sequence

V = 384
BS = 4


@pytest.fixture(scope="module")
def ckpt(checkpoints):
    model_dir, _ = checkpoints("engine", seed=21)
    return model_dir


def greedy(n):
    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)


def _uncached(model_dir, prompt, n, monkeypatch):
    rec = SampleRecorder(monkeypatch)
    eng = make_engine(model_dir, block_size=BS, enable_prefix_caching=False)
    p = greedy(n)
    res = run_requests(eng, [("ref", prompt, p)])["ref"]
    assert res[2].num_cached_tokens == 0 and res[2].num_computed_prompt_tokens == len(prompt)
    return res[0], rec.rows(p)


def test_shared_prefix_computes_only_new_tokens_and_matches_uncached(ckpt, monkeypatch):
    a = prompts_for(V, [14], seed=1)[0]
    extra = prompts_for(V, [5], seed=2)[0]
    eng = make_engine(ckpt, block_size=BS)
    rec = SampleRecorder(monkeypatch)
    n = 4
    pa = greedy(n)
    a_toks, _, a_last = run_requests(eng, [("a", a, pa)])["a"]
    assert (a_last.num_cached_tokens, a_last.num_computed_prompt_tokens) == (0, 14)

    cases = {
        # name: (prompt, expected cached tokens)
        "longer": (a[:12] + extra, 12),            # 3 full shared blocks
        "same": (list(a), 12),                     # 14 tokens: 3 full blocks cached, 2 computed
        "block_multiple": (a[:12], 8),             # always >= 1 block left to compute (fresh last logits)
        "diverges_in_block_2": (a[:6] + extra, 4),  # only the first full block matches
        # multi-turn: prompt + the generated tokens; the decoded tokens' KV is cached too
        # (17 computed tokens = 4 full blocks)
        "multi_turn": (a + a_toks + extra[:1], 16),
    }
    for name, (prompt, cached) in cases.items():
        p = greedy(n)
        toks, _, last = run_requests(eng, [(name, prompt, p)])[name]
        assert last.num_cached_tokens == cached, name
        assert last.num_computed_prompt_tokens == len(prompt) - cached, name
        ref_toks, ref_logits = _uncached(ckpt, prompt, n, monkeypatch)
        assert toks == ref_toks, name
        assert rel_err(rec.rows(p), ref_logits) < 1e-5, name
    assert eng.blocks.hits == 12 + 12 + 8 + 4 + 16


def test_lru_evicts_old_prefix_and_keeps_recent(ckpt, monkeypatch):
    """6 blocks of 4 tokens; 9-token prompts need 3 blocks (2 full, cacheable). A, B, C run one
    after the other: C's allocation must reuse A's (least recently freed) blocks, so A's prefix is
    evicted while B's survives."""
    eng = make_engine(ckpt, block_size=BS, num_kv_blocks=6)
    removed: list[int] = []
    eng.blocks.on_removed = removed.extend
    a, b, c = prompts_for(V, [9, 9, 9], seed=3)
    outs = {}
    for name, prompt in (("a", a), ("b", b), ("c", c)):
        outs[name] = run_requests(eng, [(name, prompt, greedy(1))])[name]
        assert outs[name][2].num_cached_tokens == 0
    a_hashes = [chain_hash(None, a[:4])]
    a_hashes.append(chain_hash(a_hashes[0], a[4:8]))
    assert sorted(removed) == sorted(a_hashes)
    b_again = run_requests(eng, [("b2", b, greedy(1))])["b2"]
    assert b_again[2].num_cached_tokens == 8
    assert b_again[0] == outs["b"][0]
    a_again = run_requests(eng, [("a2", a, greedy(1))])["a2"]
    assert a_again[2].num_cached_tokens == 0
    assert a_again[0] == outs["a"][0]


# ------------------------------------------------------------------ BlockManager alone
def _seq(rid, tokens):
    return Sequence(rid, list(tokens), SamplingParams())


def _run_prefill(bm: BlockManager, seq: Sequence) -> None:
    """What the engine does for a prompt: match, allocate, compute, commit."""
    seq.num_cached_prompt = bm.match_prefix(seq)
    bm.allocate(seq, seq.num_tokens)
    seq.num_computed = seq.num_tokens
    bm.commit_computed(seq)


def test_block_manager_sharing_and_refcounts():
    bm = BlockManager(num_blocks=8, block_size=4)
    stored = []
    bm.on_stored = lambda h, parent, toks: stored.append((h, parent, list(toks)))
    s1 = _seq("s1", range(10, 20))                  # 10 tokens: 2 full blocks + 2 tokens
    _run_prefill(bm, s1)
    assert len(s1.block_table) == 3 and bm.num_free == 5
    h0 = chain_hash(None, list(range(10, 14)))
    h1 = chain_hash(h0, list(range(14, 18)))
    assert stored == [(h0, None, list(range(10, 14))), (h1, h0, list(range(14, 18)))]
    s2 = _seq("s2", list(range(10, 18)) + [99, 98, 97])
    assert bm.match_prefix(s2) == 8
    assert s2.block_table == s1.block_table[:2]
    assert [bm.ref_count[b] for b in s1.block_table] == [2, 2, 1]
    bm.allocate(s2, s2.num_tokens)
    assert bm.num_free == 4
    bm.free_seq(s1)
    assert bm.num_free == 5                          # only s1's private tail block came back
    bm.free_seq(s2)
    assert bm.num_free == 8 and all(r == 0 for r in bm.ref_count)
    # same tokens under a different parent are a different block
    assert chain_hash(None, [14, 15, 16, 17]) != h1


def test_block_manager_lru_order_and_eviction():
    bm = BlockManager(num_blocks=6, block_size=2)
    removed = []
    bm.on_removed = removed.extend
    old = _seq("old", [1, 2, 3, 4, 5])              # blocks: [1,2] [3,4] [5]
    new = _seq("new", [7, 8, 9, 10, 11])
    _run_prefill(bm, old)
    _run_prefill(bm, new)
    bm.free_seq(old)                                 # freed first -> evicted first (tail first)
    bm.free_seq(new)
    assert bm.num_free == 6
    # re-using "new"'s prefix moves its blocks out of the LRU list and back to its end afterwards
    again = _seq("again", [7, 8, 9, 10, 6])
    assert bm.match_prefix(again) == 4
    bm.allocate(again, again.num_tokens)
    bm.free_seq(again)
    # take 3 blocks: exactly the 3 blocks of "old" are reused, its 2 hashed blocks are evicted
    filler = _seq("filler", [50, 51, 52, 53, 54, 55])
    bm.allocate(filler, filler.num_tokens)
    h_old0 = chain_hash(None, [1, 2])
    assert sorted(removed) == sorted([h_old0, chain_hash(h_old0, [3, 4])])
    assert bm.match_prefix(_seq("old2", [1, 2, 3, 4, 5])) == 0
    probe = _seq("new2", [7, 8, 9, 10, 11])
    assert bm.match_prefix(probe) == 4
    bm.free_seq(probe)


def test_block_manager_capacity_and_clear_cache():
    bm = BlockManager(num_blocks=3, block_size=4)
    s = _seq("s", range(8))
    assert bm.can_allocate(s, 12) and not bm.can_allocate(s, 13)
    with pytest.raises(RuntimeError):
        bm.allocate(s, 13)
    _run_prefill(bm, s)
    assert bm.clear_cache() == []                   # blocks still referenced: nothing to drop
    bm.free_seq(s)
    assert bm.match_prefix(_seq("p", list(range(8)) + [1])) == 8
    bm.free_seq(bm_probe := _seq("q", []))          # freeing an empty sequence is harmless
    assert not bm_probe.block_table


def test_block_manager_clear_cache_forgets_free_blocks():
    bm = BlockManager(num_blocks=3, block_size=4)
    removed = []
    bm.on_removed = removed.extend
    t = _seq("t", range(8))
    _run_prefill(bm, t)
    bm.free_seq(t)
    dropped = bm.clear_cache()
    assert len(dropped) == 2 and sorted(removed) == sorted(dropped)
    assert bm.match_prefix(_seq("u", list(range(8)) + [1])) == 0


def test_block_manager_without_prefix_caching():
    bm = BlockManager(num_blocks=4, block_size=2, prefix_caching=False)
    s = _seq("s", [1, 2, 3, 4, 5])
    _run_prefill(bm, s)
    assert all(h is None for h in bm.block_hash)
    bm.free_seq(s)
    assert bm.match_prefix(_seq("s2", [1, 2, 3, 4, 5])) == 0
