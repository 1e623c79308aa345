"""scripts/gpu_perf.py's choice of benchmark setups, on the CPU: what the GPU session's command lines
make it run (one model load per setup, the points of each), and that its default run is the one its
docstring describes."""
from __future__ import annotations

import sys

import pytest

from tests.conftest import REPO

sys.path.insert(0, str(REPO / "scripts"))
import gpu_perf  # noqa: E402
import gpu_session  # noqa: E402


def _setups(argv: list[str]):
    a = gpu_perf.build_parser().parse_args(argv)
    only = set(a.only.split(",")) - {""} or set(gpu_perf.DEFAULT_STEPS)
    graph_kw = {"cuda_graphs": True, **({"async_scheduling": True} if a.async_scheduling else {})}
    return a, [(kw, [(pt.phase, pt.batch, pt.tokens_per_iter, pt.context) for pt in points], env)
               for kw, points, env in gpu_perf.bench_setups(a, only, graph_kw)]


def _session_argv(tmp_path, name: str, *extra: str) -> list[str]:
    a = gpu_session.settings(["--out", str(tmp_path), "--async-scheduling", "off", *extra])
    step = next(st for st in gpu_session.plan(a, async_ok="--async" in extra) if st.name == name)
    return step.argv[step.argv.index("scripts/gpu_perf.py") + 1:]


def test_the_sessions_bench_steps_load_the_model_once_per_format(tmp_path):
    a, setups = _setups(_session_argv(tmp_path, "decode"))
    assert a.model and a.skip_checks and not a.async_scheduling
    assert setups == [({"cuda_graphs": True}, [("decode", b, b, 1000) for b in (1, 32, 64, 128, 256)], {})]
    _, setups = _setups(_session_argv(tmp_path, "fp8"))
    assert setups == [({"cuda_graphs": True, "weights": w}, [("decode", 64, 64, 1000)], {})
                      for w in ("fp8-block", "fp8-block-a8")]               # only batch 64: graphs up to 64
    _, setups = _setups(_session_argv(tmp_path, "prefill"))
    assert setups == [({}, [("prefill", 1, n, 0) for n in (2048, 8192, 16000)], {})]
    a, _ = _setups(_session_argv(tmp_path, "checks"))
    assert a.skip_bench and set(a.only.split(",")) == {"decode_kernel", "grouped_experts", "fused_kernels", "graphs",
                                                       "fp8_engine", "fp8a8_engine"}


def test_async_scheduling_goes_to_the_decode_bench_and_to_a_second_prefill_pass(tmp_path):
    a = gpu_session.settings(["--out", str(tmp_path), "--async-scheduling", "on"])
    steps = {st.name: st for st in gpu_session.plan(a, async_ok=True)}
    argv = steps["decode"].argv
    _, setups = _setups(argv[argv.index("scripts/gpu_perf.py") + 1:])
    assert setups[0][0] == {"cuda_graphs": True, "async_scheduling": True}
    argv = steps["prefill"].argv                       # plain first, then as serving runs them (no decode graphs)
    _, setups = _setups(argv[argv.index("scripts/gpu_perf.py") + 1:])
    prompts = [("prefill", 1, n, 0) for n in (2048, 8192, 16000)]
    assert setups == [({}, prompts, {}), ({"async_scheduling": True}, prompts, {})]
    argv = steps["decode_sync"].argv
    _, setups = _setups(argv[argv.index("scripts/gpu_perf.py") + 1:])
    assert setups == [({"cuda_graphs": True}, [("decode", 1, 1, 1000), ("decode", 64, 64, 1000)], {})]


def test_the_default_run_is_the_documented_one():
    _, setups = _setups([])
    decode = [("decode", b, b, 1000) for b in (1, 8, 32, 64, 128, 256)]
    assert setups == [
        ({"cuda_graphs": True}, decode, {}),
        ({"cuda_graphs": True, "weights": "fp8-block"}, [d for d in decode if d[1] in (1, 64, 256)], {}),
        ({}, [d for d in decode if d[1] in (1, 32)] + [("prefill", 1, n, 0) for n in (2048, 8192, 16000)], {}),
        ({"cuda_graphs": True}, [d for d in decode if d[1] in (1, 64)], {"DWDP_FUSED_KERNELS": "0"})]


@pytest.mark.parametrize("argv, words", [(["--only", "bench_decode,nope"], "--only: unknown step(s) ['nope']"),
                                          (["--fp8-weights", "fp8-blok"], "--fp8-weights: ['fp8-blok']")])
def test_bad_steps_and_formats_are_one_line_errors(capsys, argv, words):
    with pytest.raises(SystemExit) as exc:
        gpu_perf.main(["--out", "unused", *argv])
    assert exc.value.code == 2 and words in capsys.readouterr().err
