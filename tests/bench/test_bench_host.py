"""`dynamo-dwdp bench host` from the command line: one JSON object per (level, batch), every level runs
the real request path (the worker level through the worker's own generate), bad input is one line."""
from __future__ import annotations

import json

from tests.conftest import cli

SMALL = ("--prompt-len", "8", "--steps", "2", "--warmup", "1", "--vocab", "32")


def test_bench_host_json_every_level():
    proc = cli("bench", "host", "--batch", "1,3", *SMALL, "--json", timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    levels = ("core", "async", "worker", "dynamo")
    assert [(r["level"], r["batch"]) for r in rows] == [(lv, b) for lv in levels for b in (1, 3)]
    for r in rows:
        assert r["schema"] == "dynamo-dwdp/bench-host/1" and r["steps"] >= 2
        if r["level"] == "dynamo":        # a difference of two waves: may round to 0 at 2 chunks
            assert r["host_ms_per_step"] >= 0 and r["server_cpu_ms_per_step"] >= 0
            continue
        assert r["host_ms_per_step"] > 0
        assert (r["tensor_ops_per_step"] is not None) == (r["level"] == "core")
        per_seq = r["host_ms_per_step"] * 1e3 / r["batch"]
        assert abs(r["host_us_per_seq_step"] - per_seq) < 0.01 + 1e-3 * per_seq


def _error_line(proc, *needles):
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])


def test_bench_host_bad_input_is_one_line():
    _error_line(cli("bench", "host", "--levels", "core,gpu", *SMALL), "--levels", "gpu")
    _error_line(cli("bench", "host", "--batch", "0", *SMALL), "--batch")
    _error_line(cli("bench", "host", "--batch", "2", "--top-p", "0", *SMALL[:-2]), "--top-p")


def test_bench_host_dynamo_level_beside_an_engine_like_thread():
    """--engine-busy-ms / --switch-interval-ms reach the echo's serving process (its argv round trip) and
    the level runs with them; bad values are one line."""
    from dynamo_dwdp.worker.host_path import echo_argv, parse_echo_argv

    assert parse_echo_argv(echo_argv(2.5, 0.0005)) == (2.5, 0.0005)
    assert parse_echo_argv(echo_argv()) == (0.0, None)
    proc = cli("bench", "host", "--levels", "dynamo", "--batch", "2", "--steps", "4", "--json", "--engine-busy-ms", "2",
               "--switch-interval-ms", "0.5", timeout=300)
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout.splitlines()[-1])
    assert r["level"] == "dynamo" and r["batch"] == 2
    _error_line(cli("bench", "host", "--levels", "dynamo", "--engine-busy-ms", "-1", *SMALL), "--engine-busy-ms")
    _error_line(cli("bench", "host", "--levels", "dynamo", "--switch-interval-ms", "0", *SMALL),
                "--switch-interval-ms")
