"""Run by tests/model/test_prefill_attention.py in a fresh process with TRITON_INTERPRET=1. The MLA
prefill flash-attention kernel (dynamo_dwdp/model/kernels/mla_prefill.py) against a float64 softmax
reference, and the paged expanded-form path around it against the absorbed-form reference
(`paged_latent_attention`), float32, fresh random inputs every run (the interpreter's bf16 dot is
not trustworthy; bf16 is checked on the GPU by scripts/gpu_prefill.py). Prints "ok <n> checks"."""
from __future__ import annotations

import os

import torch

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"

from tests.model.check_inputs import fresh_generator  # noqa: E402
from dynamo_dwdp.model.attention import paged_latent_attention, sdpa_prefill_attention  # noqa: E402
from dynamo_dwdp.model.batch import ForwardBatch  # noqa: E402
from dynamo_dwdp.model.kernels import mla_prefill  # noqa: E402
from dynamo_dwdp.model.prefill_attention import expanded_prefill_attention  # noqa: E402

GEN = fresh_generator()   # fresh inputs every run, the seed printed


def rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def kernel_matches_float64() -> None:
    """Causal prefill (T == S, lengths that are not multiples of the tiles), chunks after cached
    keys (bottom-right causal), one query; k_nope and v as strided views of one expanded tensor, as
    the engine passes them; the DeepSeek dims (128/64/128) once."""
    for T, S, h, N, R, V, tile in ((37, 37, 2, 32, 16, 32, None), (20, 53, 3, 32, 16, 32, None),
                                   (1, 29, 2, 32, 16, 32, None),
                                   (70, 70, 1, 32, 16, 32, mla_prefill.Tile(32, 16, 4, 1)),
                                   (24, 40, 1, 128, 64, 128, None)):
        q_nope = torch.randn(T, h, N + R, generator=GEN)[..., :N]           # strided, like the engine's q view
        q_pe = torch.randn(T, h, R, generator=GEN)
        kv = torch.randn(S, h, N + V, generator=GEN)
        k_pe = torch.randn(S, R, generator=GEN)
        scale = (N + R) ** -0.5 * 1.7
        out = mla_prefill.mla_prefill_attention(q_nope, q_pe, kv[..., :N], k_pe, kv[..., N:], scale, tile=tile)
        ref = mla_prefill.reference(q_nope, q_pe, kv[..., :N], k_pe, kv[..., N:], scale)
        e = rel(out, ref)
        assert torch.isfinite(out).all() and e < 1e-5, (T, S, h, e)


def many_blocks_and_heads_match_float64() -> None:
    """The (heads, query blocks) grid, longest block first: many query blocks and heads, causal and after
    cached keys, a key block wider than the query block (as GPU_TILES' block_n128), k_pe a strided view
    of cache rows as the engine passes it."""
    for T, S, tile in ((90, 90, None), (40, 130, None), (75, 75, mla_prefill.Tile(16, 32, 4, 1)),
                       (33, 101, mla_prefill.Tile(16, 32, 4, 1))):
        h, N, R, V = 3, 32, 16, 32
        q_nope = torch.randn(T, h, N + R, generator=GEN)[..., :N]
        q_pe = torch.randn(T, h, R, generator=GEN)
        kv = torch.randn(S, h, N + V, generator=GEN)
        k_pe = torch.randn(S, 64 + R, generator=GEN)[:, 64:]
        scale = (N + R) ** -0.5
        out = mla_prefill.mla_prefill_attention(q_nope, q_pe, kv[..., :N], k_pe, kv[..., N:], scale, tile=tile)
        ref = mla_prefill.reference(q_nope, q_pe, kv[..., :N], k_pe, kv[..., N:], scale)
        e = rel(out, ref)
        assert torch.isfinite(out).all() and e < 1e-5, (T, S, tile, e)


def paged_path_matches_absorbed_reference() -> None:
    """Two sequences in one batch (one continues after 23 cached tokens, one is fresh), scattered
    block tables: the expanded path with the Triton kernel vs the absorbed-form reference and vs the
    torch SDPA expanded path."""
    h, N, R, V, C, bs = 2, 32, 16, 32, 64, 8
    cached, new = [23, 0], [17, 30]
    n_blocks = 20
    kv_layer = torch.randn(n_blocks, bs, C + R, generator=GEN)
    perm = torch.randperm(n_blocks, generator=GEN).tolist()
    tables = [perm[:5], perm[5:9]]
    batch = ForwardBatch.build([[1] * q for q in new], cached, tables, bs, [True, True])
    w_kv_b = torch.randn(h, N + V, C, generator=GEN) / C ** 0.5
    T = sum(new)
    q_nope = torch.randn(T, h, N, generator=GEN)
    q_pe = torch.randn(T, h, R, generator=GEN)
    scale = (N + R) ** -0.5
    out = expanded_prefill_attention("triton", q_nope, q_pe, batch, kv_layer, w_kv_b, scale)  # rows written in place
    w_uk, w_uv = w_kv_b[:, :N], w_kv_b[:, N:]
    q_latent = torch.einsum("thn,hnc->thc", q_nope, w_uk)
    lat = paged_latent_attention(torch.cat([q_latent, q_pe], -1), batch, kv_layer, C, scale)
    ref = torch.einsum("thc,hvc->thv", lat, w_uv)
    e = rel(out, ref)
    assert e < 1e-5, e
    e2 = rel(out, sdpa_prefill_attention(q_nope, q_pe, batch, kv_layer, w_uk, w_uv, scale))
    assert e2 < 1e-5, e2


def bad_shapes_are_refused() -> None:
    q = torch.randn(4, 2, 32)
    for args, msg in (((q, torch.randn(4, 2, 16), torch.randn(3, 2, 32), torch.randn(3, 16), torch.randn(3, 2, 32)),
                       "queries but only"),
                      ((q, torch.randn(4, 2, 16), torch.randn(5, 2, 32), torch.randn(5, 8), torch.randn(5, 2, 32)),
                       "k_pe has shape"),
                      ((torch.randn(4, 2, 24), torch.randn(4, 2, 16), torch.randn(5, 2, 24), torch.randn(5, 16),
                        torch.randn(5, 2, 32)), "power of two"),
                      ((q, torch.randn(4, 2, 16), torch.randn(5, 2, 32), torch.randn(5, 16), torch.randn(5, 2, 32),
                        -1.0),
                       "must be > 0")):
        try:
            mla_prefill.mla_prefill_attention(*(args if len(args) == 6 else (*args, 1.0)))
        except ValueError as exc:
            assert msg in str(exc), (msg, exc)
        else:
            raise AssertionError(f"accepted: {msg}")
    try:                                                    # an `out` of the wrong shape
        mla_prefill.mla_prefill_attention(q, torch.randn(4, 2, 16), torch.randn(5, 2, 32), torch.randn(5, 16),
                                          torch.randn(5, 2, 32), 1.0, out=torch.empty(4, 2, 16))
    except ValueError as exc:
        assert "out must be" in str(exc), exc
    else:
        raise AssertionError("accepted an out of the wrong shape")


if __name__ == "__main__":
    checks = (kernel_matches_float64, many_blocks_and_heads_match_float64, paged_path_matches_absorbed_reference,
              bad_shapes_are_refused)
    for check in checks:
        check()
        print(f"{check.__name__}: ok", flush=True)
    print(f"ok {len(checks)} checks")
