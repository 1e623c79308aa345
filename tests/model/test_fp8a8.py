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
    model.fp8.quantize_act_fp8; stage by stage against a torch emulation of the same quantization (h's
    e4m3 values equal but for <= 0.2% one-step flips, scales to 1e-5, the down stage to 1e-5); end to
    end within 3e-3 of the emulation and 8e-2 of the dequantized model, over four tilings, bf16 too;
    experts.routed_experts takes the W8A8 kernels exactly for banks marked fp8_activations."""
    out = run_under_triton_interpreter(Path(__file__).with_name("fp8a8_checks.py"))
    assert out.strip().endswith("ok fp8a8 5 checks"), out


def test_fp8_block_a8_needs_cuda():
    with pytest.raises(UserError, match="weight_format=fp8-block-a8 needs device=cuda"):
        EngineSettings(weight_format="fp8-block-a8", device="cpu").validate()
    assert EngineSettings(weight_format="fp8-block-a8", device="cuda").validate().weight_format == "fp8-block-a8"
