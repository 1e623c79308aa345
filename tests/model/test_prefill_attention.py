"""MLA prefill attention: the Triton flash-attention kernel under Triton's CPU interpreter, and the
implementation switch (model/prefill_attention.py)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dynamo_dwdp.errors import UserError
from dynamo_dwdp.model import prefill_attention
from dynamo_dwdp.model.kernels import mla_prefill
from tests.conftest import run_under_triton_interpreter


def test_prefill_kernel_under_the_interpreter():
    """tests/model/mla_prefill_checks.py in a fresh process: the kernel vs a float64 softmax (causal,
    chunks after cached keys, one query, strided k/v views, DeepSeek dims), many query blocks and heads,
    the paged expanded path vs the absorbed-form reference and the SDPA path, shape errors."""
    out = run_under_triton_interpreter(Path(__file__).with_name("mla_prefill_checks.py"))
    assert out.strip().endswith("ok 4 checks"), out


def test_sdpa_attend_matches_float64_on_cpu():
    """The SDPA form of `attend` (query/key concatenation, k_pe broadcast over heads, bottom-right
    causal for a chunk after cached keys) vs the float64 reference of the kernel's contract."""
    g = torch.Generator().manual_seed(3)
    for T, S in ((19, 19), (7, 31)):
        q_nope, q_pe = torch.randn(T, 3, 32, generator=g), torch.randn(T, 3, 16, generator=g)
        kv, k_pe = torch.randn(S, 3, 64, generator=g), torch.randn(S, 16, generator=g)
        out = prefill_attention.attend("sdpa", q_nope, q_pe, kv[..., :32], k_pe, kv[..., 32:], 0.2)
        ref = mla_prefill.reference(q_nope, q_pe, kv[..., :32], k_pe, kv[..., 32:], 0.2)
        assert ((out.double() - ref).norm() / ref.norm()).item() < 1e-5


def test_implementation_switch(monkeypatch):
    x = torch.zeros(1)
    monkeypatch.setenv(prefill_attention.ENV, "flash3")
    with pytest.raises(UserError, match="DWDP_PREFILL_ATTENTION='flash3' is not one of"):
        prefill_attention.impl_for(x)
    monkeypatch.setenv(prefill_attention.ENV, "triton")
    assert prefill_attention.impl_for(x) == "sdpa"          # off CUDA the torch path runs whatever is asked
    on_cuda = type("CudaTensor", (), {"is_cuda": True, "dtype": torch.bfloat16})()   # device and dtype looked at
    assert prefill_attention.impl_for(on_cuda) == "triton"
    monkeypatch.delenv(prefill_attention.ENV)                # CUDA's default: the kernel with Triton, else SDPA
    assert prefill_attention.impl_for(on_cuda) == "triton"
    on_cuda.dtype = torch.float32                            # fp32: SDPA's exact math path stays the default
    assert prefill_attention.impl_for(on_cuda) == "sdpa"
    on_cuda.dtype = torch.bfloat16
    monkeypatch.setattr(prefill_attention.fused_kernels, "available", lambda: False)   # no Triton here
    assert prefill_attention.impl_for(on_cuda) == "sdpa"
    with pytest.raises(UserError, match="prefill attention 'nope'"):
        prefill_attention.attend("nope", *(torch.zeros(1, 1, 16),) * 2, torch.zeros(1, 1, 16), torch.zeros(1, 16),
                                 torch.zeros(1, 1, 16), 1.0)


def test_a_kernel_that_does_not_build_leaves_sdpa_as_the_default(monkeypatch, caplog):
    """warm_up: the kernel's build fails (here: raised by a stand-in) -> a warning, False, SDPA by default
    from then on; an explicit DWDP_PREFILL_ATTENTION=triton is refused with the reason."""
    monkeypatch.delenv(prefill_attention.ENV, raising=False)
    monkeypatch.setattr(prefill_attention, "_triton_failed", None)
    monkeypatch.setattr(prefill_attention.fused_kernels, "available", lambda: True)
    on_cuda = type("CudaTensor", (), {"is_cuda": True, "dtype": torch.bfloat16})()
    assert prefill_attention.impl_for(on_cuda) == "triton"

    def no_build(*args, **kwargs):
        raise RuntimeError("out of resource: shared memory, required: 245760, hardware limit: 232448")

    with monkeypatch.context() as m:                 # warm_up on this CPU machine, as if on a GPU
        m.setattr(prefill_attention, "impl_for", lambda x: "triton")
        m.setattr(prefill_attention.mla_prefill, "mla_prefill_attention", no_build)
        with caplog.at_level("WARNING"):
            assert prefill_attention.warm_up(2, 32, 16, 32, 64, torch.bfloat16, torch.device("cpu")) is False
    assert "did not build" in caplog.text and "shared memory" in caplog.text
    assert prefill_attention.impl_for(on_cuda) == "sdpa"
    monkeypatch.setenv(prefill_attention.ENV, "triton")
    with pytest.raises(UserError, match="did not build on this GPU"):
        prefill_attention.impl_for(on_cuda)


@pytest.mark.parametrize("cached,new", [([0], [29]), ([23, 0], [17, 30])], ids=["one-sequence", "two-sequences"])
def test_sdpa_path_without_concatenation_matches_absorbed_reference(cached, new):
    """sdpa_prefill_attention with the whole query given (`q_whole`, as the fused prep leaves it) and
    without (q_nope/q_pe concatenated): both equal the absorbed-form paged reference (fp32); the
    key's nope part written by the GEMM into its slot of the [ctx, h, N+R] buffer, k_pe broadcast."""
    from dynamo_dwdp.model.attention import paged_latent_attention, sdpa_prefill_attention
    from dynamo_dwdp.model.batch import ForwardBatch

    g = torch.Generator().manual_seed(sum(new))
    h, N, R, V, C, bs = 3, 32, 16, 32, 64, 8
    kv_layer = torch.randn(20, bs, C + R, generator=g)
    perm = torch.randperm(20, generator=g).tolist()
    tables = [perm[:5], perm[5:9]][:len(new)]
    batch = ForwardBatch.build([[1] * q for q in new], cached, tables, bs, [True] * len(new))
    w = torch.randn(h, N + V, C, generator=g) / C ** 0.5
    w_uk, w_uv = w[:, :N], w[:, N:]
    T = sum(new)
    q = torch.randn(T, h, N + R, generator=g)
    q_nope, q_pe = q[..., :N], q[..., N:]
    scale = (N + R) ** -0.5
    lat = paged_latent_attention(torch.cat([torch.einsum("thn,hnc->thc", q_nope, w_uk), q_pe], -1), batch,
                                 kv_layer, C, scale)
    ref = torch.einsum("thc,hvc->thv", lat, w_uv).double()
    for q_whole in (q, None):
        out = sdpa_prefill_attention(q_nope, q_pe, batch, kv_layer, w_uk, w_uv, scale, q_whole=q_whole)
        assert out.shape == (T, h, V)
        assert ((out.double() - ref).norm() / ref.norm()).item() < 1e-5


def test_tile_switch(monkeypatch):
    """$DWDP_PREFILL_TILE picks one of the kernel's GPU tiles; a wrong name is one clear error."""
    on_cuda = type("CudaTensor", (), {"is_cuda": True, "dtype": torch.bfloat16})()
    monkeypatch.setattr(prefill_attention.fused_kernels, "available", lambda: True)
    monkeypatch.setattr(prefill_attention, "_triton_failed", None)
    monkeypatch.delenv(prefill_attention.ENV, raising=False)
    monkeypatch.delenv(mla_prefill.TILE_ENV, raising=False)
    assert mla_prefill.gpu_tile() == mla_prefill.GPU_TILES[mla_prefill.GPU_TILE]
    name = next(n for n in mla_prefill.GPU_TILES if n != mla_prefill.GPU_TILE)
    monkeypatch.setenv(mla_prefill.TILE_ENV, name)
    assert mla_prefill.gpu_tile() == mla_prefill.GPU_TILES[name]
    monkeypatch.setenv(mla_prefill.TILE_ENV, "huge")
    with pytest.raises(UserError, match="DWDP_PREFILL_TILE='huge' is not one of"):
        prefill_attention.impl_for(on_cuda)
