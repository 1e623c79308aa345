"""`bench engine --calibrate`: a `single` point records the step model's whole-step prediction next to
the measured step (the planner's own tests check the model; this checks the bench hands it the point)."""
from __future__ import annotations

from pathlib import Path

import pytest

from dynamo_dwdp.bench.engine_bench import BenchSetup, Point, prediction
from dynamo_dwdp.errors import UserError
from dynamo_dwdp.planner.calibrate import load_calibration
from dynamo_dwdp.planner.hardware import get_hardware
from dynamo_dwdp.planner.roofline import load_model_shape
from dynamo_dwdp.planner.step_model import predict_step

REPO = Path(__file__).resolve().parents[2]
V2_LITE = str(REPO / "tests" / "fixtures" / "deepseek-v2-lite")
CALIBRATION = str(REPO / "docs" / "results" / "calibration_h200_2026-12-01.jsonl")
SPLIT = {"compute": 10.0, "prefetch_wait": 0.0, "sync_wait": 0.0}


@pytest.mark.parametrize("point,touched", [(Point("decode", 64, 64, 1000), 52.1), (Point("prefill", 8192, 1), 64.0)])
def test_single_point_gets_the_step_model(point, touched):
    setup = BenchSetup(model_dir=V2_LITE, strategy="single", ranks=1, device="cuda", dtype="bfloat16",
                       hw="h200-measured", calibration=CALIBRATION).validate()
    out = prediction(setup, point, SPLIT, 10.0, 26, experts_touched=touched)
    sm = out["step_model"]
    hw, cal = load_calibration(get_hardware("h200-measured"), CALIBRATION)
    kw = (dict(phase="decode", tokens=64, context=1000, experts_touched=touched) if point.phase == "decode"
          else dict(phase="prefill", tokens=8192, batch=1))
    want = predict_step(load_model_shape(V2_LITE), hw, cal, kv_dtype="bf16", **kw)
    assert sm["step_ms"] == pytest.approx(want.total_ms)
    assert sm["measured_over_predicted"] == pytest.approx(10.0 / want.total_ms)
    assert sum(sm["terms_ms"].values()) == pytest.approx(sm["step_ms"])
    assert out["per_moe_layer"]["t_compute_ms"] > 0                  # the roofline figures stay


def test_no_calibration_no_step_model_and_bad_file_refused(tmp_path):
    setup = BenchSetup(model_dir=V2_LITE, strategy="single", ranks=1, device="cuda", dtype="bfloat16").validate()
    assert "step_model" not in prediction(setup, Point("decode", 8, 8, 100), SPLIT, 10.0, 26)
    bad = tmp_path / "cal.jsonl"
    bad.write_text('{"measure": "host_step", "phase": "decode", "tokens": 8}\n')
    with pytest.raises(UserError, match=r"cal.jsonl:1: field 'seconds'"):
        BenchSetup(model_dir=V2_LITE, strategy="single", ranks=1, calibration=str(bad)).validate()
