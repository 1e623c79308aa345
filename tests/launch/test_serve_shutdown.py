"""Ctrl-C on `dynamo-dwdp serve`, black-box: the command a user runs, signalled as a terminal would.

- the first SIGINT drains: a stream in flight completes in full while the graph stops;
- a second SIGINT stops everything at once: a stream still in flight is cut, the command exits
  promptly, nothing is left running.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time

import pytest

from tests.conftest import PY, REPO
from tests.launch.test_serve_e2e import assert_nothing_left, stream, stream_finish, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

GRAPH = str(REPO / "graphs" / "agg.yaml")
CONFIG = str(REPO / "configs" / "tiny-cpu.yaml")


@pytest.fixture(scope="module")
def model_dir(tiny_served_model) -> str:
    return tiny_served_model


class Serve:
    """`python -m dynamo_dwdp.cli serve` in its own session, like a terminal's foreground job."""

    def __init__(self, model_dir: str, run_dir: str, *extra: str):
        cfg = os.path.join(run_dir, "model.yaml")
        os.makedirs(run_dir, exist_ok=True)
        with open(cfg, "w") as f:
            f.write(f"model:\n  path: {model_dir}\n")
        self.run_dir = os.path.join(run_dir, "logs")
        env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", DWDP_KV_HOLD_TIMEOUT="4")
        self.proc = subprocess.Popen([PY, "-m", "dynamo_dwdp.cli", "serve", GRAPH, "-f", CONFIG, "-f", cfg,
                                      "--log-dir", self.run_dir, "--status-every", "0", *extra],
                                     cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        found = wait_for(lambda: any("serving model" in line for line in self.lines) or self.proc.poll() is not None,
                         240, 0.2)
        assert found and self.proc.poll() is None, "".join(self.lines[-30:])
        self.url = re.search(r"at (http://\S+)", next(x for x in self.lines if "serving model" in x)).group(1)

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line)

    def kill(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


def _body(n: int) -> dict:
    return {"model": "tiny", "prompt": "Shut down gently, please", "max_tokens": n, "temperature": 0,
            "ignore_eos": True, "stream_options": {"include_usage": True}}


def test_ctrl_c_drains_in_flight_requests_and_a_second_stops_at_once(model_dir, tmp_path):
    """One launch: two streams in flight (400 and 1000 tokens). The first SIGINT drains: the short
    stream completes in full while the graph is stopping. The second SIGINT, while the long one still
    streams, kills everything at once: the command exits promptly, nothing is left running."""
    s = Serve(model_dir, str(tmp_path / "ctrl-c"), "--drain-timeout", "120")
    results: dict[int, dict] = {400: {"chunks": []}, 1000: {"chunks": []}}
    started = {n: threading.Event() for n in results}

    def client(n):
        results[n].update(stream(s.url + "/v1/completions", _body(n), timeout=120,
                                 on_chunk=lambda c: started[n].set()))

    threads = {n: threading.Thread(target=client, args=(n,), daemon=True) for n in results}
    try:
        for t in threads.values():
            t.start()
        assert all(e.wait(60) for e in started.values()), "the streams never started"
        os.kill(s.proc.pid, signal.SIGINT)
        threads[400].join(120)
        assert not threads[400].is_alive()
        assert threads[1000].is_alive() and s.proc.poll() is None, "nothing left in flight for the second Ctrl-C"
        os.kill(s.proc.pid, signal.SIGINT)
        t_second = time.monotonic()
        rc = s.proc.wait(timeout=60)
        stopped_after = time.monotonic() - t_second
        threads[1000].join(60)
    finally:
        s.kill()
    short, long_ = results[400], results[1000]
    assert short["status"] == 200 and short["done"] and not short["errors"], short
    usage = [c["usage"] for c in short["chunks"] if c.get("usage")]
    assert stream_finish(short) == "length" and usage[-1]["completion_tokens"] == 400   # drained in full
    assert any("draining in-flight requests" in line for line in s.lines)
    # the 120 s drain was cut short by the second Ctrl-C: killed at once, the long stream did not finish
    assert stopped_after < 30, stopped_after
    assert any("killing every process now" in line for line in s.lines), "".join(s.lines[-20:])
    assert stream_finish(long_) != "length" or not long_["done"], long_
    assert rc is not None
    assert_nothing_left(set(), s.run_dir)
    assert_nothing_left(set(), model_dir)             # every worker runs with --model-path <model_dir>
