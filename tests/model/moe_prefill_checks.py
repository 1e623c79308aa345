"""Run by tests/model/test_moe_prefill.py in a fresh process with TRITON_INTERPRET=1 (the interpreter
computes as the GPU does: tests/model/interpreter_numerics.py). The prefill-size kernels of
dynamo_dwdp/model/kernels/moe_prefill.py against float64 references, the grouped expert path with
them switched on against the per-expert fp32 loop (one bank, several banks, banks that hold only a
part of the ids; uninitialised rows poisoned with NaN), the dense MLP's prefill form, and the MLA
prep's in-place rope and the attention layer's prefill with it. Fresh random inputs every run.
Prints "ok <n> checks"."""
from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"

from tests.model import interpreter_numerics  # noqa: E402

interpreter_numerics.install()

from tests.model.check_inputs import fresh_generator  # noqa: E402
from dynamo_dwdp.model import experts  # noqa: E402
from dynamo_dwdp.model.experts import ExpertBank, routed_experts, routed_experts_grouped  # noqa: E402
from dynamo_dwdp.model.kernels import mla_prep, moe_prefill  # noqa: E402
from dynamo_dwdp.model.layers import DenseMLP  # noqa: E402
from dynamo_dwdp.model.rope import RotaryEmbedding  # noqa: E402
from dynamo_dwdp.model.tensor_parallel import TensorParallel  # noqa: E402

GEN = fresh_generator()   # fresh inputs every run, the seed printed
BF = torch.bfloat16


def rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def swiglu_matches_float64() -> None:
    """Widths that are and are not multiples of the tile, row counts past a row tile, fp32 and bf16
    (bf16: one rounding, no worse than torch's two-op form), a strided [rows, 2I] view."""
    for rows, inter in ((1, 16), (13, 48), (37, 176), (9, 300)):
        h = torch.randn(rows, 2 * inter, generator=GEN) * 3
        ref = F.silu(h[:, :inter].double()) * h[:, inter:].double()
        got = moe_prefill.swiglu(h)
        assert got.shape == (rows, inter) and rel(got, ref) < 1e-6, (rows, inter, rel(got, ref))
        hb = h.to(BF)
        ref_b = F.silu(hb[:, :inter].double()) * hb[:, inter:].double()
        torch_b = F.silu(hb[:, :inter]) * hb[:, inter:]
        e, e_torch = rel(moe_prefill.swiglu(hb), ref_b), rel(torch_b, ref_b)
        assert e < 4e-3 and e <= e_torch + 1e-4, (rows, inter, e, e_torch)
    wide = torch.randn(11, 2 * 40 + 8, generator=GEN)[:, :80]                    # row stride 88
    assert rel(moe_prefill.swiglu(wide), F.silu(wide[:, :40].double()) * wide[:, 40:].double()) < 1e-6
    try:
        moe_prefill.swiglu(torch.randn(4, 7))
        raise AssertionError("odd width accepted")
    except ValueError as exc:
        assert "[rows, 2I]" in str(exc)


def combine_matches_float64() -> None:
    """Random permutations with pairs of no bank (pos -1) over rows poisoned with NaN (never read),
    new output and accumulation into `out`, fp32 and bf16, hidden sizes off the block."""
    for T, K, hidden in ((1, 1, 8), (17, 6, 64), (9, 3, 1100)):
        rows = T * K
        y = torch.randn(rows + 5, hidden, generator=GEN)
        perm = torch.randperm(rows, generator=GEN)
        pos = perm.view(T, K).to(torch.int32)
        dropped = torch.rand(T, K, generator=GEN) < 0.25
        dropped[0, 0] = False                                                   # something to compare
        pos[dropped] = -1
        y[perm[dropped.view(-1)]] = float("nan")                                # rows no pair may read
        y[rows:] = float("nan")
        w = torch.rand(T, K, generator=GEN)
        ref = torch.zeros(T, hidden, dtype=torch.float64)
        for t in range(T):
            for j in range(K):
                if pos[t, j] >= 0:
                    ref[t] += w[t, j].double() * y[pos[t, j]].double()
        got = moe_prefill.combine(y, pos, w)
        assert torch.isfinite(got).all() and rel(got, ref) < 1e-6, (T, K, hidden)
        base = torch.randn(T, hidden, generator=GEN)
        acc = moe_prefill.combine(y, pos, w, out=base.clone())
        assert rel(acc, ref + base.double()) < 1e-6
        yb, bb = y.to(BF), base.to(BF)
        ref_b = torch.zeros(T, hidden, dtype=torch.float64)
        for t in range(T):
            for j in range(K):
                if pos[t, j] >= 0:
                    ref_b[t] += w[t, j].double() * yb[pos[t, j]].double()
        got_b = moe_prefill.combine(yb, pos, w, out=bb.clone())
        assert got_b.dtype == BF and rel(got_b, ref_b + bb.double()) < 4e-3


def _banks(E: int, H: int, inter: int, cuts) -> list[ExpertBank]:
    return [ExpertBank(first, (torch.randn(n, 2 * inter, H, generator=GEN) * 0.2).to(BF),
                       (torch.randn(n, H, inter, generator=GEN) * 0.2).to(BF)) for first, n in cuts]


def grouped_experts_with_kernels_match_loop() -> None:
    """routed_experts_grouped with the prefill kernels (as on CUDA) vs the per-expert fp32 loop on the
    same bf16 weights, with the rows of no bank: one bank, two banks, unordered, partial cover, one
    bank holding a subset from expert 0; sync-free and host-synced forms. y_sorted's uninitialised
    rows are NaN (torch.empty_like poisoned): the combine must never read them."""
    experts.use_prefill_kernels = lambda x: True
    real_empty_like = torch.empty_like

    def poisoned_empty_like(t, *args, **kwargs):
        out = real_empty_like(t, *args, **kwargs)
        return out.fill_(float("nan")) if out.is_floating_point() else out

    E, H, inter, T, k = 12, 32, 48, 29, 3
    for cuts in ([(0, 12)], [(0, 4), (4, 8)], [(8, 4), (0, 3)], [(2, 5), (9, 2)], [(0, 7)]):
        banks = _banks(E, H, inter, cuts)
        fp32 = [ExpertBank(b.first, b.w13.float(), b.w2.float()) for b in banks]
        x = torch.randn(T, H, generator=GEN).to(BF)
        ids = torch.stack([torch.randperm(E, generator=GEN)[:k] for _ in range(T)])
        w = torch.rand(T, k, generator=GEN)
        ref = routed_experts(x.float(), ids, w, fp32)
        assert ref.abs().sum() > 0
        for sync_free in (True, False):
            experts.SYNC_FREE_MAX_ROWS = 10**9 if sync_free else 0
            torch.empty_like = poisoned_empty_like
            try:
                got = routed_experts_grouped(x, ids, w, banks)
                base = torch.randn(T, H, generator=GEN).to(BF)
                acc = routed_experts_grouped(x, ids, w, banks, out=base.clone())
            finally:
                torch.empty_like = real_empty_like
            assert torch.isfinite(got).all() and rel(got, ref) < 1e-2, (cuts, sync_free, rel(got, ref))
            assert rel(acc.float() - base.float(), ref) < 2e-2, (cuts, sync_free)


def dense_mlp_prefill_form_matches() -> None:
    """The dense MLP's prefill form (one GEMM over the fused [gate; up], then swiglu) vs its plain
    form and an fp64 reference, bf16."""
    tp = TensorParallel()
    for H, inter, T in ((64, 48, 70), (32, 176, 5)):
        mlp = DenseMLP(H, inter, tp)
        for lin in (mlp.gate_proj, mlp.up_proj, mlp.down_proj):
            lin.weight.data = (torch.randn(lin.weight.shape, generator=GEN) / lin.weight.shape[1] ** 0.5).to(BF)
        x = torch.randn(T, H, generator=GEN).to(BF)
        plain = mlp(x)
        assert mlp.fuse_gate_up()
        fused = mlp.down_proj(moe_prefill.swiglu(F.linear(x, mlp.gate_up)))
        g = x.double() @ mlp.gate_proj.weight.double().T
        u = x.double() @ mlp.up_proj.weight.double().T
        ref = (F.silu(g) * u) @ mlp.down_proj.weight.double().T
        e, e_plain = rel(fused, ref), rel(plain, ref)
        assert e < 1e-2 and e <= 2 * e_plain + 2e-3, (H, inter, e, e_plain)


def mla_prep_rotates_q_in_place() -> None:
    """mla_prep with q_pe_out = q's own rope part: the rope part equals the separate-output result,
    the nope part and the cache row are untouched by the choice; interleaved and half layouts."""
    from types import SimpleNamespace

    T, h, N, R, C, bs = 7, 3, 16, 16, 32, 4
    for interleave in (True, False):
        cfg = SimpleNamespace(qk_rope_head_dim=R, rope=SimpleNamespace(kind="default", theta=10000.0,
                                                                       interleave=interleave))
        rope = RotaryEmbedding(cfg)
        q = torch.randn(T, h, N + R, generator=GEN).to(BF)
        kv = torch.randn(T, C + R, generator=GEN).to(BF)
        w = (torch.rand(C, generator=GEN) + 0.5).to(BF)
        cos, sin = rope.cos_sin(torch.randint(0, 100, (T,), generator=GEN))
        slots = torch.randperm(4 * bs, generator=GEN)[:T]
        pool_a, pool_b = torch.zeros(4, bs, C + R, dtype=BF), torch.zeros(4, bs, C + R, dtype=BF)
        q_pe = mla_prep.mla_prep(q, kv, w, 1e-6, cos, sin, slots, pool_a, N, interleave)
        q_in = q.clone()
        ret = mla_prep.mla_prep(q_in, kv, w, 1e-6, cos, sin, slots, pool_b, N, interleave, q_pe_out=q_in[..., N:])
        assert ret.data_ptr() == q_in[..., N:].data_ptr()
        assert torch.equal(q_in[..., N:], q_pe) and torch.equal(q_in[..., :N], q[..., :N])
        assert torch.equal(pool_a, pool_b)
        assert rel(q_pe, rope.apply(q[..., N:], cos, sin)) < 1e-2


def attention_prefill_with_q_in_place_matches_reference() -> None:
    """MLAttention.forward (tiny preset, fp32) with the fused prep and the SDPA prefill switched on as
    on CUDA (rope rotated into q in place, q read whole, k built without a concatenation) vs the same
    layer with backend "reference" (torch prep, absorbed-form paged attention): two sequences, one of
    them a chunk after cached tokens; outputs and the written cache rows agree."""
    from dynamo_dwdp.model import attention
    from dynamo_dwdp.model.attention import MLAttention
    from dynamo_dwdp.model.batch import ForwardBatch
    from dynamo_dwdp.model.config import config_from_dict
    from dynamo_dwdp.synthetic.presets import preset_config

    cfg = config_from_dict(preset_config("tiny", num_layers=1))
    layer = MLAttention(cfg, TensorParallel())
    for p in layer.parameters():
        p.data = torch.randn(p.shape, generator=GEN) / max(1, p.shape[-1]) ** 0.5 if p.dim() > 1 else 1 + 0.1 * \
            torch.randn(p.shape, generator=GEN)
    rope = RotaryEmbedding(cfg)
    bs, width = 4, cfg.kv_lora_rank + cfg.qk_rope_head_dim
    cached, new = [5, 0], [7, 9]
    tables = [[3, 0, 6], [1, 4, 7]]
    batch = ForwardBatch.build([[1] * n for n in new], cached, tables, bs, [True, True])
    x = torch.randn(sum(new), cfg.hidden_size, generator=GEN)
    cos, sin = rope.cos_sin(batch.positions)
    pool = torch.randn(8, bs, width, generator=GEN)
    outs, pools = [], []
    real = (MLAttention.use_fused_prep, MLAttention.use_sdpa)
    for fused in (True, False):
        kv = pool.clone()
        if fused:
            MLAttention.use_fused_prep = lambda self, x: True
            MLAttention.use_sdpa = lambda self, x, b: b.max_q > 1
        layer.backend = "auto" if fused else "reference"
        try:
            outs.append(layer(x, batch, kv, rope, cos, sin))
        finally:
            MLAttention.use_fused_prep, MLAttention.use_sdpa = real
        pools.append(kv)
    assert attention.prefill_attention.impl_for(x) == "sdpa"
    assert rel(outs[0], outs[1]) < 1e-5, rel(outs[0], outs[1])
    assert rel(pools[0], pools[1]) < 1e-6


if __name__ == "__main__":
    checks = [swiglu_matches_float64, combine_matches_float64, grouped_experts_with_kernels_match_loop,
              dense_mlp_prefill_form_matches, mla_prep_rotates_q_in_place,
              attention_prefill_with_q_in_place_matches_reference]
    for c in checks:
        c()
        print("passed", c.__name__, flush=True)
    print(f"ok {len(checks)} checks")
    sys.exit(0)
