"""The same-host KV hand-off (`worker/local_kv.py`) on CPU: shared-memory pools and the loopback channel.

References: the prefill pool's contents cloned before export (the blocks the decode must receive),
a per-block copy loop for the run coalescing, and the prefill's own hold bookkeeping (every path ends
with the request in `poll_done`: copied, declined or expired, never left held).
"""
from __future__ import annotations

import asyncio
import random
import socket
import subprocess
import sys
import time

import pytest
import torch

from dynamo_dwdp.worker.kv_transfer import KvTransferError
from dynamo_dwdp.worker.local_kv import LocalKvTransfer, block_runs
from tests.conftest import REPO

SHAPE = (12, 3, 4, 8)          # blocks, layers, block size, latent dim


def _pool(seed: int | None = None, shape=SHAPE) -> torch.Tensor:
    if seed is None:
        return torch.zeros(shape)
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def pair(tmp_path, monkeypatch):
    monkeypatch.setenv("DWDP_SHM_DIR", str(tmp_path))
    made = []

    def make(hold_timeout: float = 30.0, decode_shape=SHAPE):
        src = _pool(seed=1)
        ref = src.clone()
        prefill = LocalKvTransfer(src, name="p", hold_timeout=hold_timeout, export=True)
        decode = LocalKvTransfer(_pool(shape=decode_shape), name="d")
        made.extend([prefill, decode])
        return prefill, decode, ref

    yield make
    for t in made:
        t.close()


def test_block_runs_against_per_block_copy():
    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(0, 12)
        remote = rng.sample(range(40), n) if rng.random() < 0.5 else list(range(5, 5 + n))
        local = rng.sample(range(40), n) if rng.random() < 0.5 else list(range(9, 9 + n))
        runs = block_runs(remote, local)
        assert sum(r[2] for r in runs) == n
        expanded = [(r + k, l + k) for r, l, c in runs for k in range(c)]
        assert expanded == list(zip(remote, local))
        for (r1, l1, c1), (r2, l2, _) in zip(runs, runs[1:]):   # maximal: no two runs could merge
            assert not (r1 + c1 == r2 and l1 + c1 == l2)
    assert block_runs([3, 4, 5, 9], [0, 1, 2, 7]) == [(3, 0, 3), (9, 7, 1)]


def test_pull_copies_the_held_blocks_and_frees_them(pair):
    prefill, decode, ref = pair()
    assert torch.equal(prefill.pool, ref)                 # export moved the pool, contents kept
    params = prefill.describe("req-1", [3, 4, 5, 9], num_tokens=14)
    assert prefill.num_held == 1 and prefill.poll_done() == ([], [])
    moved = asyncio.run(decode.pull(params, [0, 1, 7, 8]))
    assert moved == 4 * ref[0].numel() * 4
    assert prefill.num_held == 1          # released, but the engine frees the blocks only at its next poll
    for r, l in zip([3, 4, 5, 9], [0, 1, 7, 8]):
        assert torch.equal(decode.pool[l], ref[r])
    untouched = [b for b in range(SHAPE[0]) if b not in (0, 1, 7, 8)]
    assert not decode.pool[untouched].any()
    assert prefill.poll_done() == (["req-1"], []) and prefill.num_held == 0


def test_writes_after_export_are_what_the_decode_reads(pair):
    prefill, decode, _ = pair()
    prefill.pool[6].fill_(7.0)                            # the engine writes into the (now shared) pool
    asyncio.run(decode.pull(prefill.describe("r", [6], 4), [2]))
    assert torch.equal(decode.pool[2], torch.full_like(decode.pool[2], 7.0))


def test_decline_frees_at_once(pair):
    prefill, decode, _ = pair()
    params = prefill.describe("req-2", [1, 2], 8)
    decode.decline(params)
    assert prefill.num_held == 1
    assert prefill.poll_done() == (["req-2"], []) and prefill.num_held == 0


def test_expired_hold_is_freed_and_a_late_pull_fails(pair):
    prefill, decode, _ = pair(hold_timeout=0.05)
    params = prefill.describe("req-3", [1], 4)
    time.sleep(0.1)
    assert prefill.poll_done() == ([], ["req-3"]) and prefill.num_held == 0
    with pytest.raises(KvTransferError, match="no longer holds"):
        asyncio.run(decode.pull(params, [0]))
    assert not decode.pool.any()


def test_layout_mismatch_is_refused_before_any_copy(pair):
    prefill, decode, _ = pair(decode_shape=(12, 3, 4, 16))
    params = prefill.describe("req-4", [1, 2], 8)
    with pytest.raises(KvTransferError, match="layout mismatch"):
        asyncio.run(decode.pull(params, [0, 1]))
    assert not decode.pool.any() and prefill.num_held == 1
    decode.decline(params)                                # what the worker does after a failed pull
    assert prefill.poll_done() == (["req-4"], [])


@pytest.mark.parametrize("change, match", [
    ({"kv": "nixl"}, "no local KV descriptor"),
    ({"block_ids": [1, 2, 3]}, "3 remote blocks for 2 local blocks"),
    ({"block_ids": [1, 99]}, "out of range"),
])
def test_bad_descriptors_fail_cleanly(pair, change, match):
    prefill, decode, _ = pair()
    params = dict(prefill.describe("req-5", [1, 2], 8), **change)
    with pytest.raises(KvTransferError, match=match):
        asyncio.run(decode.pull(params, [0, 1]))
    assert not decode.pool.any()


def test_dead_prefill_is_an_error_not_a_hang(pair):
    prefill, decode, ref = pair()
    asyncio.run(decode.pull(prefill.describe("a", [1], 4), [0]))     # peer opened and connected
    params = prefill.describe("b", [2], 4)
    prefill.close()                                       # channel gone, pool file unlinked
    with pytest.raises(KvTransferError, match="unreachable"):
        asyncio.run(decode.pull(params, [1]))
    decode.decline(params)                                # best effort: no exception, no hang


def test_prefill_in_another_process_killed(tmp_path, monkeypatch):
    """A real second process exports the pool; once it is killed, the decode's pull fails at once."""
    monkeypatch.setenv("DWDP_SHM_DIR", str(tmp_path))
    code = ("import json, sys, torch; from dynamo_dwdp.worker.local_kv import LocalKvTransfer\n"
            f"p = torch.randn({SHAPE}, generator=torch.Generator().manual_seed(1))\n"
            "t = LocalKvTransfer(p, name='x', export=True)\n"
            "print(json.dumps([t.describe('r1', [3, 4], 8), t.describe('r2', [5], 4)]), flush=True)\n"
            "sys.stdin.read()\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            cwd=str(REPO), text=True)
    decode = LocalKvTransfer(_pool(), name="d")
    try:
        import json

        first, second = json.loads(proc.stdout.readline())
        asyncio.run(decode.pull(first, [0, 1]))
        ref = _pool(seed=1)
        assert torch.equal(decode.pool[0], ref[3]) and torch.equal(decode.pool[1], ref[4])
        proc.kill()
        proc.wait(timeout=30)
        t0 = time.monotonic()
        with pytest.raises(KvTransferError, match="unreachable"):
            asyncio.run(decode.pull(second, [2]))
        assert time.monotonic() - t0 < 5
    finally:
        proc.kill()
        decode.close()


def test_channel_listens_on_loopback_only(pair):
    prefill, _, _ = pair()
    host, port = prefill._channel.server_address
    assert host == "127.0.0.1"
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"bogus x\n")
        assert s.makefile("rb").readline().startswith(b"error")
