"""W8A8 routed experts (`weight_format: fp8-block-a8`): the kernels under Triton's CPU interpreter
against torch references, and the setting's contracts on CPU."""
from __future__ import annotations

from pathlib import Path

import pytest

from dynamo_dwdp.config.engine import EngineSettings
from dynamo_dwdp.errors import UserError
from tests.conftest import run_under_triton_interpreter


def test_fp8a8_kernels_under_the_interpreter():
    """tests/model/fp8a8_checks.py in a fresh process: the activation quantizer byte-exact against
    model.fp8.quantize_act_fp8; the W8A8 experts within 1e-4 of a torch emulation of the same
    quantization and within 8e-2 of the dequantized model, over four tilings, bf16 too."""
    out = run_under_triton_interpreter(Path(__file__).with_name("fp8a8_checks.py"))
    assert out.strip().endswith("ok fp8a8 3 checks"), out


def test_fp8_block_a8_needs_cuda():
    with pytest.raises(UserError, match="weight_format=fp8-block-a8 needs device=cuda"):
        EngineSettings(weight_format="fp8-block-a8", device="cpu").validate()
    assert EngineSettings(weight_format="fp8-block-a8", device="cuda").validate().weight_format == "fp8-block-a8"
