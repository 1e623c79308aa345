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
    chunks after cached keys, one query, strided k/v views, DeepSeek dims), the paged expanded path
    vs the absorbed-form reference and the SDPA path, shape errors."""
    out = run_under_triton_interpreter(Path(__file__).with_name("mla_prefill_checks.py"))
    assert out.strip().endswith("ok 3 checks"), out


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
    with pytest.raises(UserError, match="prefill attention 'nope'"):
        prefill_attention.attend("nope", *(torch.zeros(1, 1, 16),) * 2, torch.zeros(1, 1, 16), torch.zeros(1, 16),
                                 torch.zeros(1, 1, 16), 1.0)
