"""The fast paths against their references, on CPU (the GPU run repeats them: scripts/gpu_check.py).

- grouped-GEMM experts (torch._grouped_mm, bf16), sync-free form and host-synced form, against the
  per-expert loop in fp32 on the same (bf16-rounded) weights, with banks that cover part of the ids;
- `ForwardBatch.build` (vectorised) against a per-token construction written here;
- the rotary frequencies stay float32 when the model is cast to bfloat16;
- CUDA-graph bucket arithmetic.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dynamo_dwdp.engine.cuda_graphs import MIN_BLOCKS, batch_bucket, block_bucket
from dynamo_dwdp.model.batch import ForwardBatch
from dynamo_dwdp.model import experts
from dynamo_dwdp.model.experts import ExpertBank, routed_experts, routed_experts_grouped
from tests.conftest import run_under_triton_interpreter


def _banks(gen, E: int, H: int, I: int, cuts: list[tuple[int, int]]) -> list[ExpertBank]:
    return [ExpertBank(first, (torch.randn(n, 2 * I, H, generator=gen) * 0.2).bfloat16(),
                       (torch.randn(n, H, I, generator=gen) * 0.2).bfloat16()) for first, n in cuts]


def _rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("sync_free", [True, False])
@pytest.mark.parametrize("cuts", [[(0, 12)], [(0, 4), (4, 8)], [(8, 4), (0, 3)], [(2, 5), (9, 2)], [(0, 7)]],
                         ids=["one-bank", "two-banks", "unordered", "partial", "one-bank-subset"])
def test_grouped_experts_match_loop(monkeypatch, sync_free, cuts):
    gen = torch.Generator().manual_seed(len(cuts) * 7 + sync_free)
    E, H, I, T, k = 12, 32, 16, 37, 3
    banks = _banks(gen, E, H, I, cuts)
    x = torch.randn(T, H, generator=gen).bfloat16()
    ids = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(T)])
    w = torch.rand(T, k, generator=gen)
    monkeypatch.setattr(experts, "SYNC_FREE_MAX_ROWS", 10**9 if sync_free else 0)
    got = routed_experts_grouped(x, ids, w, banks)
    fp32 = [ExpertBank(b.first, b.w13.float(), b.w2.float()) for b in banks]
    ref = routed_experts(x.float(), ids, w, fp32)                 # the loop (CPU fp32 dispatch)
    assert ref.abs().sum() > 0
    assert _rel(got, ref) < 2e-2
    # ids that no bank holds contribute nothing: only covered pairs count
    covered = torch.zeros(E, dtype=torch.bool)
    for first, n in cuts:
        covered[first:first + n] = True
    if not covered.all():
        w_masked = w * covered[ids]
        full = _banks(torch.Generator().manual_seed(0), E, H, I, [(0, E)])[0]
        for b in fp32:
            full.w13[b.first:b.first + b.count] = b.w13.bfloat16()
            full.w2[b.first:b.first + b.count] = b.w2.bfloat16()
        ref2 = routed_experts(x.float(), ids, w_masked, [ExpertBank(0, full.w13.float(), full.w2.float())])
        assert _rel(got, ref2) < 2e-2


@pytest.mark.parametrize("count", [12, 7])
def test_one_bank_from_expert_0_needs_no_host_sync(monkeypatch, count):
    """Prefill sizes with one bank from expert 0 (all 12 experts, or a DEP-like first 7): no
    `.tolist()` host sync, same result as the per-expert fp32 loop (pairs past the bank give 0)."""
    gen = torch.Generator().manual_seed(count)
    banks = _banks(gen, 12, 32, 16, [(0, count)])
    x = torch.randn(40, 32, generator=gen).bfloat16()
    ids = torch.stack([torch.randperm(12, generator=gen)[:3] for _ in range(40)])
    w = torch.rand(40, 3, generator=gen)
    monkeypatch.setattr(experts, "SYNC_FREE_MAX_ROWS", 0)

    def no_sync(self):
        raise AssertionError("host sync on the one-bank prefill path")

    with monkeypatch.context() as m:
        m.setattr(torch.Tensor, "tolist", no_sync)
        got = routed_experts_grouped(x, ids, w, banks)
    ref = routed_experts(x.float(), ids, w, [ExpertBank(0, banks[0].w13.float(), banks[0].w2.float())])
    assert ref.abs().sum() > 0
    assert _rel(got, ref) < 2e-2


def test_grouped_experts_accumulate_into_out():
    gen = torch.Generator().manual_seed(3)
    banks = _banks(gen, 8, 16, 8, [(0, 8)])
    x = torch.randn(5, 16, generator=gen).bfloat16()
    ids = torch.stack([torch.randperm(8, generator=gen)[:2] for _ in range(5)])
    w = torch.rand(5, 2, generator=gen)
    base = torch.randn(5, 16, generator=gen).bfloat16()
    got = routed_experts_grouped(x, ids, w, banks, out=base.clone())
    fp32 = [ExpertBank(b.first, b.w13.float(), b.w2.float()) for b in banks]
    ref = routed_experts(x.float(), ids, w, fp32)                 # the fp32 loop, independent of the grouped path
    assert ref.abs().sum() > 0
    assert _rel(got.float() - base.float(), ref) < 2e-2          # out += experts(x), not out = experts(x)
    assert _rel(got, ref) > 0.1                                   # base really was kept


def _naive_batch(chunks, starts, tables, bs, want):
    ids, pos, slots, pad, rows = [], [], [], [], []
    max_q = max(len(c) for c in chunks)
    for b, (c, s, t) in enumerate(zip(chunks, starts, tables)):
        for i, tok in enumerate(c):
            p = s + i
            ids.append(tok)
            pos.append(p)
            slots.append(t[p // bs] * bs + p % bs)
            pad.append(b * max_q + i)
        if want[b] and c:
            rows.append(len(ids) - 1)
    return ids, pos, slots, pad, rows


def test_forward_batch_build_matches_per_token_construction():
    gen = torch.Generator().manual_seed(9)
    bs = 4
    chunks = [[5, 6, 7], [8], [], [9, 10, 11, 12, 13, 14, 15]]
    starts = [0, 9, 4, 2]
    tables = [[3], [1, 7, 2], [5, 6], [8, 0, 4]]
    want = [True, False, True, True]
    b = ForwardBatch.build(chunks, starts, tables, bs, want)
    ids, pos, slots, pad, rows = _naive_batch(chunks, starts, tables, bs, want)
    assert b.input_ids.tolist() == ids and b.positions.tolist() == pos and b.slot_mapping.tolist() == slots
    assert b.pad_index.tolist() == pad and b.logits_indices.tolist() == rows
    assert b.context_lens.tolist() == [3, 10, 4, 9] == b.context_lens_list
    assert b.query_lens_t.tolist() == b.query_lens == [3, 1, 0, 7]
    assert b.block_tables.tolist() == [[3, 0, 0], [1, 7, 2], [5, 6, 0], [8, 0, 4]]
    assert b.max_q == 7 and b.max_context == 10
    for _ in range(20):                                  # random shapes
        n = int(torch.randint(1, 6, (1,), generator=gen))
        q = torch.randint(0, 9, (n,), generator=gen).tolist()
        s = torch.randint(0, 20, (n,), generator=gen).tolist()
        tabs = [torch.randperm(40, generator=gen)[: (si + qi + bs - 1) // bs + 1].tolist() for si, qi in zip(s, q)]
        ch = [torch.randint(0, 99, (qi,), generator=gen).tolist() for qi in q]
        w = (torch.rand(n, generator=gen) > 0.3).tolist()
        got = ForwardBatch.build(ch, s, tabs, bs, w)
        if max(q) == 0:
            continue
        ids, pos, slots, pad, rows = _naive_batch(ch, s, tabs, bs, w)
        assert (got.input_ids.tolist(), got.positions.tolist(), got.slot_mapping.tolist(), got.pad_index.tolist(),
                got.logits_indices.tolist()) == (ids, pos, slots, pad, rows)


def test_forward_batch_rejects_a_short_block_table():
    with pytest.raises(ValueError, match="sequence 0: 9 tokens need 3 blocks"):
        ForwardBatch.build([[1] * 9], [0], [[0, 1]], 4, [True])


def test_rope_frequencies_stay_fp32_under_bf16_cast():
    from dynamo_dwdp.model.config import config_from_dict
    from dynamo_dwdp.model.rope import RotaryEmbedding

    cfg = config_from_dict({"hidden_size": 64, "num_attention_heads": 2, "qk_rope_head_dim": 16,
                                 "qk_nope_head_dim": 16, "v_head_dim": 16, "kv_lora_rank": 32,
                                 "vocab_size": 100, "num_hidden_layers": 1, "intermediate_size": 32,
                                 "moe_intermediate_size": 16, "n_routed_experts": 4, "num_experts_per_tok": 2})
    rope = RotaryEmbedding(cfg)
    before = rope.inv_freq.clone()
    rope.to(torch.bfloat16)
    assert rope.inv_freq.dtype == torch.float32 and torch.equal(rope.inv_freq, before)
    cos, _ = rope.cos_sin(torch.tensor([100000]))
    ref = torch.cos(torch.tensor(100000.0, dtype=torch.float64) * before.double())
    assert (cos[0].double() - ref).abs().max() < 1e-2


def test_graph_buckets():
    assert [batch_bucket(n, 64) for n in (1, 3, 17, 33, 64)] == [1, 4, 24, 48, 64]
    assert batch_bucket(65, 64) is None and batch_bucket(20, 20) == 20
    assert [block_bucket(n, 100) for n in (1, MIN_BLOCKS, 5, 9, 64, 65, 97, 100)] == [MIN_BLOCKS, MIN_BLOCKS, 5, 10,
                                                                                     64, 80, 100, 100]
    assert block_bucket(101, 100) is None
    for n in range(1, 5000):                 # covers n, pads by under 25% beyond the minimum
        b = block_bucket(n, 10**6)
        assert b >= n and (n <= MIN_BLOCKS or b < 1.25 * n)


def test_engine_config_rejects_unknown_attention_backend():
    from dynamo_dwdp.config.engine import EngineSettings
    from dynamo_dwdp.errors import UserError

    with pytest.raises(UserError, match="attention_backend='flash'"):
        EngineSettings(attention_backend="flash").validate()


def test_graph_static_inputs_reproduce_the_eager_decode_step(tmp_path):
    """The CUDA-graph path's static batch (padded to its bucket, padded rows writing a scratch block
    and seeing no context), run eagerly on CPU, gives the eager decode step's logits and KV."""
    from dynamo_dwdp.config.engine import EngineSettings
    from dynamo_dwdp.engine.cuda_graphs import DecodeGraphs
    from dynamo_dwdp.engine.model_runner import ModelRunner
    from dynamo_dwdp.synthetic.checkpoint import write_checkpoint
    from dynamo_dwdp.model.moe_executor import LocalExecutor

    write_checkpoint(tmp_path / "m", "tiny", num_layers=2, quiet=True, with_tokenizer=False)
    runner = ModelRunner(str(tmp_path / "m"), EngineSettings(block_size=4, num_kv_blocks=32), LocalExecutor)
    gen = torch.Generator().manual_seed(5)
    lens = [9, 3, 14]
    tables = [[4, 17, 2], [8], [30, 1, 12, 20]]
    prompts = [torch.randint(3, 200, (n,), generator=gen).tolist() for n in lens]
    runner.execute(prompts, [0, 0, 0], tables, [True] * 3)
    pool = torch.cat([runner.kv_pool.clone(), torch.full_like(runner.kv_pool[:1], 7.0)])   # + scratch block
    graphs = DecodeGraphs(runner.model, pool, scratch_block=32, block_size=4, max_batch=8, max_blocks=32,
                          device=torch.device("cpu"))
    nxt = [11, 12, 13]
    want = runner.execute([[t] for t in nxt], lens, tables, [True] * 3)
    key = graphs.stage(nxt, lens, tables)
    assert key == (4, 4)                                   # batch 3 -> bucket 4 (one padded row); 4 blocks
    got = runner.model(graphs._static_batch(*key), pool)
    assert torch.allclose(got[:3], want, rtol=1e-5, atol=1e-5)
    assert (pool[:32] - runner.kv_pool).abs().max() < 1e-5 * runner.kv_pool.abs().max()   # same KV (GEMM row count may round differently)
    assert (pool[32] == 7.0).sum() < pool[32].numel()    # the padded row wrote into the scratch block


def test_triton_mla_decode_kernel_under_the_interpreter():
    """tests/model/triton_interpreter_checks.py in a fresh process (TRITON_INTERPRET must be set before
    triton is first imported): the kernel against an fp64 reference and against the torch path."""
    out = run_under_triton_interpreter(Path(__file__).with_name("triton_interpreter_checks.py"), timeout=300)
    assert out.strip().endswith("ok 2 checks"), out


def test_decode_split_count():
    from dynamo_dwdp.model.mla_decode import DecodeConfig, decode_config, num_splits

    BLOCK_N = DecodeConfig().block_n
    assert num_splits(1, 1, 100_000, sms=132) == 256          # one sequence: fill the GPU
    assert num_splits(512, 1, 4096, sms=132) == 1             # many sequences: no split
    assert num_splits(8, 1, 2 * BLOCK_N, sms=132) == 1        # short contexts: >= 4 tiles per split
    assert num_splits(8, 1, 2 * BLOCK_N, sms=132, min_tiles=1) == 2
    # small batches get twice the programs per SM (the H200 sweep), 64 the default; from 132 sequences
    # on one split (no merge kernel), below that still two
    assert decode_config(32, 1).waves > decode_config(64, 1).waves == DecodeConfig().waves
    cfg = decode_config(256, 1)
    assert num_splits(256, 1, 1000, 132, cfg.waves, cfg.block_n, cfg.min_tiles) == 1
    cfg = decode_config(128, 1)
    assert num_splits(128, 1, 1000, 132, cfg.waves, cfg.block_n, cfg.min_tiles) == 2
    for b in (1, 3, 32, 100):
        s = num_splits(b, 2, 5000, sms=132)
        assert s & (s - 1) == 0 and s >= 1


def test_fused_input_projections_give_the_two_gemms_results(tmp_path):
    """MLAttention.fuse_input_projections: q and kv_a weights are views of one tensor; a decode step
    through the one GEMM gives the two GEMMs' logits and KV, a weight reload keeps the fused tensor in
    step with the views; q-LoRA models (V3 layout) fuse q_a_proj, the others (V2-Lite) q_proj."""
    from dynamo_dwdp.config.engine import EngineSettings
    from dynamo_dwdp.engine.model_runner import ModelRunner
    from dynamo_dwdp.model.attention import MLAttention
    from dynamo_dwdp.model.loader import load_weights
    from dynamo_dwdp.model.moe_executor import LocalExecutor
    from dynamo_dwdp.synthetic.checkpoint import write_checkpoint

    from dynamo_dwdp.synthetic.presets import preset_config

    no_lora = dict(preset_config("tiny"), q_lora_rank=None)
    for preset, spec in (("tiny", "tiny"), ("no-q-lora", no_lora)):
        write_checkpoint(tmp_path / preset, spec, num_layers=2, quiet=True, with_tokenizer=False)
        runner = ModelRunner(str(tmp_path / preset), EngineSettings(block_size=4, num_kv_blocks=32), LocalExecutor)
        attns = [m for m in runner.model.modules() if isinstance(m, MLAttention)]
        first = "q_proj" if attns[0].cfg.q_lora_rank is None else "q_a_proj"
        assert all(a.in_proj is not None for a in attns), preset
        a = attns[0]
        assert getattr(a, first).weight.data_ptr() == a.in_proj.data_ptr()
        assert a.kv_a_proj_with_mqa.weight.data_ptr() > a.in_proj.data_ptr()
        gen = torch.Generator().manual_seed(7)
        prompts = [torch.randint(3, 200, (n,), generator=gen).tolist() for n in (6, 11)]
        tables = [[3, 9, 1], [5, 2, 8, 20]]
        runner.execute(prompts, [0, 0], tables, [True] * 2)
        kv0 = runner.kv_pool.clone()
        fused = runner.execute([[17], [23]], [6, 11], tables, [True] * 2)
        kv_fused = runner.kv_pool.clone()
        runner.kv_pool.copy_(kv0)
        saved = [(m.in_proj, m.in_proj_scale) for m in attns]
        for m in attns:
            m.in_proj = None                                   # the two GEMMs
        plain = runner.execute([[17], [23]], [6, 11], tables, [True] * 2)
        assert torch.allclose(fused, plain, rtol=1e-5, atol=1e-5), preset
        assert torch.allclose(kv_fused, runner.kv_pool, rtol=1e-5, atol=1e-6), preset
        for m, (w, sc) in zip(attns, saved):
            m.in_proj, m.in_proj_scale = w, sc
        load_weights(runner.model, str(tmp_path / preset), progress_bar=False)
        for m in attns:
            assert torch.equal(m.in_proj, torch.cat([getattr(m, first).weight, m.kv_a_proj_with_mqa.weight]))
            assert getattr(m, first).weight.data_ptr() == m.in_proj.data_ptr()
