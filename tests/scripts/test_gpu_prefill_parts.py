"""scripts/gpu_prefill_parts.py on the CPU: the idle-gap accounting of its kernel profile (events stand in
for the profiler's, two streams overlapping) and that its bench command is one gpu_perf.py accepts."""
from __future__ import annotations

import sys
from types import SimpleNamespace

from tests.conftest import REPO

sys.path.insert(0, str(REPO / "scripts"))
import gpu_perf  # noqa: E402
import gpu_prefill_parts  # noqa: E402


def _event(name: str, start: float, end: float):
    return SimpleNamespace(name=name, time_range=SimpleNamespace(start=start, end=end))


def test_idle_gaps_are_the_holes_in_the_union_of_kernels(monkeypatch):
    """a [0,10], gap 2, b [12,20] overlapping c [15,30] (another stream), gap 5 (after c, which ends last),
    a [35,40], gap 1, b [41,44] overlapping d [42,50], gap 3, c [53,60]: idle = the uncovered time, each
    gap charged to the kernel that ended last before it and the one after it, pairs summed (ties: more
    gaps first); events arrive in any order."""
    events = [_event("a", 0, 10), _event("b", 12, 20), _event("c", 15, 30), _event("a", 35, 40),
              _event("b", 41, 44), _event("d", 42, 50), _event("c", 53, 60)]
    monkeypatch.setattr(gpu_prefill_parts, "kernel_events", lambda prof: list(reversed(events)))
    out = gpu_prefill_parts.gaps(None)
    assert out["idle_between_kernels_us"] == 2 + 5 + 1 + 3
    assert out["first_to_last_kernel_us"] == 60
    assert [(g["before"], g["after"], g["us"], g["count"]) for g in out["top_gaps"]] == [
        ("c", "a", 5, 1), ("a", "b", 3, 2), ("d", "c", 3, 1)]


def test_bench_command_is_one_gpu_perf_accepts(monkeypatch, tmp_path):
    """The bench step's command line parses under gpu_perf.py's own parser and runs bench_prefill only,
    at the lengths given."""
    seen = {}

    def fake_run(cmd, **kwargs):
        seen["cmd"] = cmd
        return SimpleNamespace(returncode=0, stdout="", stderr="")

    monkeypatch.setattr(gpu_prefill_parts.subprocess, "run", fake_run)
    a = gpu_prefill_parts.build_parser().parse_args(["--out", str(tmp_path), "--tokens", "8192,16000"])
    res = gpu_prefill_parts.bench(a, "MODEL")
    assert res == {"rc": 0, "bench": [], "ceilings": None}
    argv = seen["cmd"][seen["cmd"].index("scripts/gpu_perf.py") + 1:]
    parsed = gpu_perf.build_parser().parse_args(argv)
    assert parsed.only == "bench_prefill" and parsed.prefill == "8192,16000" and parsed.model == "MODEL"
