"""Run by tests/model/test_kernels.py in a fresh process with TRITON_INTERPRET=1 (Triton's CPU interpreter
must be chosen before triton is first imported). Prints "ok 2 checks" when both pass."""
from __future__ import annotations

import os
import sys

import torch

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"

from dynamo_dwdp.model import mla_decode  # noqa: E402
from dynamo_dwdp.model.attention import paged_latent_attention  # noqa: E402
from dynamo_dwdp.model.batch import ForwardBatch  # noqa: E402


def rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def kernel_matches_fp64_reference() -> None:
    """Split-K paged decode attention (fp32) against an fp64 softmax over each sequence's gathered
    cache: scattered block tables, tiles crossing blocks, one empty sequence (output 0), a context
    spread over several splits (the interpreter's 8 "SMs" give 2 splits at B=5), two head groups
    (h=40 > 32) with a partial second group."""
    gen = torch.Generator().manual_seed(11)
    C, R, h, bs, nblk = 32, 16, 40, 4, 100
    D = C + R
    pool = torch.randn(nblk, 3, bs, D, generator=gen)
    layer = pool[:, 1]                                       # a strided layer view, as in the model
    ctxs = [1, 7, 40, 0, 300]
    tables = [torch.randperm(nblk, generator=gen)[: (c + bs - 1) // bs].tolist() for c in ctxs]
    width = max(len(t) for t in tables)
    q = torch.randn(len(ctxs), h, D, generator=gen)
    assert mla_decode.num_splits(len(ctxs), 2, max(ctxs), sms=8) > 1
    out = mla_decode.mla_decode_attention(q, layer, torch.tensor([t + [0] * (width - len(t)) for t in tables]),
                                          torch.tensor(ctxs), C, 0.3, max(ctxs))
    assert out.shape == (len(ctxs), h, C)
    for b, c in enumerate(ctxs):
        if c == 0:
            assert torch.equal(out[b], torch.zeros(h, C)), "empty context must give 0"
            continue
        keys = layer[tables[b]].reshape(-1, D)[:c].double()
        ref = torch.softmax(q[b].double() @ keys.T * 0.3, -1) @ keys[:, :C]
        assert rel(out[b], ref) < 1e-5, (b, rel(out[b], ref))


def kernel_agrees_with_torch_decode_path() -> None:
    gen = torch.Generator().manual_seed(12)
    C, R, h, bs = 64, 16, 4, 8
    pool = torch.randn(30, 2, bs, C + R, generator=gen)
    lens = [5, 33, 17]
    tables = [[3, 9], [1, 2, 4, 6, 8], [20, 0, 7]]
    batch = ForwardBatch.build([[1]] * 3, [n - 1 for n in lens], tables, bs, [True] * 3)
    q = torch.randn(3, h, C + R, generator=gen)
    ref = paged_latent_attention(q, batch, pool[:, 0], C, 0.2)
    got = mla_decode.mla_decode_attention(q, pool[:, 0], batch.block_tables, batch.context_lens, C, 0.2,
                                          batch.max_context)
    assert rel(got, ref) < 1e-5, rel(got, ref)


if __name__ == "__main__":
    kernel_matches_fp64_reference()
    kernel_agrees_with_torch_decode_path()
    print("ok 2 checks")
    sys.exit(0)
