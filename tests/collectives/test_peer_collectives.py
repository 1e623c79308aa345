"""The peer-memory protocol (collectives/protocol.py) over its CPU twin (shared memory), with 2-4
real processes: one-shot and two-shot all-reduce, the fused residual-add + RMSNorm, DEP dispatch and
combine with fixed-capacity slots, ordering under random delays, capacity limits, a dead peer.

References are independent: a float64 sum of every rank's input (regenerated from the seeds), the
RMSNorm formula in float64, and `routed_experts` over all experts in one process.
"""
from __future__ import annotations

import multiprocessing as mp
import random
import time
import traceback
from datetime import timedelta

import pytest
import torch

from dynamo_dwdp.baselines.dep import even_bounds
from dynamo_dwdp.model.experts import ExpertBank, routed_experts
from dynamo_dwdp.collectives.protocol import ArenaLayout, PeerCollectives
from dynamo_dwdp.group.rendezvous import free_port

pytestmark = pytest.mark.usefixtures("private_shm_dir")

H, I, E, K, BUCKET, ROUNDS = 16, 8, 8, 2, 6, 12
EPS = 1e-6


def _x(round_, rank, shape):
    g = torch.Generator().manual_seed(1000 * round_ + rank)
    return torch.randn(*shape, generator=g)


def _experts():
    g = torch.Generator().manual_seed(7)
    return (torch.randn(E, 2 * I, H, generator=g) / H ** 0.5, torch.randn(E, H, I, generator=g) / I ** 0.5)


def _routing(round_, rank, T):
    g = torch.Generator().manual_seed(5000 + 1000 * round_ + rank)
    scores = torch.rand(T, E, generator=g)
    if round_ % 4 == 3:                       # skew: every pair to rank 0's experts (a full slot)
        scores[:, 2:] -= 10.0
    w, ids = torch.topk(scores.softmax(-1), K, dim=-1)
    return ids, w


def _collectives(rank, size, port, timeout=30.0):
    from dynamo_dwdp.collectives.shm import ShmPeerMemory

    store = torch.distributed.TCPStore("127.0.0.1", port, size, rank == 0, timedelta(seconds=60))
    layout = ArenaLayout(size, ar_bytes=4096 * 4, dep_slot_rows=BUCKET * K, dep_hidden=H, dep_itemsize=4)
    mem = ShmPeerMemory(store, f"t{port}", rank, size, layout, timeout=timeout)
    return store, PeerCollectives(mem, two_shot_bytes=1024)


def _rank_main(rank, size, port, out):
    torch.set_num_threads(1)
    try:
        store, coll = _collectives(rank, size, port)
        jitter = random.Random(rank)
        res = {"ar_exact": True, "ar_err": 0.0, "norm_err": 0.0, "res_exact": True, "dep_err": 0.0,
               "two_shot": 0, "digests": []}
        for i in range(ROUNDS):
            time.sleep(jitter.random() * 0.003)                    # ranks race ahead of each other
            n = [37, 300, 1001][i % 3]                             # 148 B one-shot; 1.2 KB, 4 KB two-shot
            res["two_shot"] += n * 4 > coll.two_shot_bytes
            xs = [_x(i, r, (n,)) for r in range(size)]
            got = coll.all_reduce(xs[rank])
            ref32 = xs[0].clone()
            for x in xs[1:]:
                ref32 = ref32 + x
            ref64 = torch.stack([x.double() for x in xs]).sum(0)
            res["ar_exact"] &= torch.equal(got, ref32)
            res["ar_err"] = max(res["ar_err"], float((got.double() - ref64).abs().max()))
            res["digests"].append(float(got.double().sum()))

            T = 3
            parts = [_x(i, 10 + r, (T, H)) for r in range(size)]
            resid = _x(i, 99, (T, H))
            weight = 1 + 0.1 * _x(i, 98, (H,))
            new_res, normed = coll.all_reduce_add_rmsnorm(parts[rank], resid, weight, EPS)
            h64 = torch.stack([p.double() for p in parts]).sum(0) + resid.double()
            n64 = h64 / torch.sqrt(h64.pow(2).mean(-1, keepdim=True) + EPS) * weight.double()
            s32 = parts[0].clone()
            for p in parts[1:]:
                s32 = s32 + p
            res["res_exact"] &= torch.equal(new_res, s32 + resid)
            res["norm_err"] = max(res["norm_err"], float((normed.double() - n64).abs().max()))

            w13, w2 = _experts()
            bounds = even_bounds(E, size)
            lo, hi = bounds[rank], bounds[rank + 1]
            owner = torch.bucketize(torch.arange(E), torch.tensor(bounds[1:]), right=True)
            T = (BUCKET if i % 4 == 3 else (i + rank) % (BUCKET + 1))    # idle ranks (T=0) included
            x = _x(i, 20 + rank, (T, H))
            ids, w = _routing(i, rank, T)
            rows = coll.dep_rows(BUCKET, K, hi - lo)
            rx, rids, rw, state = coll.dispatch(x, ids, w, owner, E, rows, torch.float32)
            y = routed_experts(rx, rids, rw, [ExpertBank(lo, w13[lo:hi], w2[lo:hi])])
            got = coll.combine(y, state)
            ref = routed_experts(x.double(), ids, w.double(), [ExpertBank(0, w13.double(), w2.double())])
            if T:
                res["dep_err"] = max(res["dep_err"], float((got.double() - ref).abs().max()))
        try:
            coll.dep_rows(BUCKET + 1, K, 99)
            res["bucket_refused"] = False
        except ValueError:
            res["bucket_refused"] = True
        store.set(f"done/{rank}", "1")
        for r in range(size):
            store.get(f"done/{r}")
        coll.close()
        # rank 0 hosts the store: it leaves last, so no peer is still reading from a closed store
        if rank == 0:
            for r in range(1, size):
                store.get(f"left/{r}")
        else:
            store.set(f"left/{rank}", "1")
        out.put((rank, res))
    except BaseException as exc:
        out.put((rank, f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))


def _run(target, size, timeout=180.0, extra=()):
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=target, args=(r, size, port, out, *extra)) for r in range(size)]
    for p in procs:
        p.start()
    results = {}
    try:
        deadline = time.monotonic() + timeout
        while len(results) < size and time.monotonic() < deadline:
            try:
                rank, value = out.get(timeout=1.0)
                results[rank] = value
            except Exception:
                if all(not p.is_alive() for p in procs) and out.empty():
                    break
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
    assert len(results) == size, f"ranks answered: {sorted(results)}"
    return results


@pytest.mark.parametrize("size", [2, 3, 4])
def test_protocol_matches_references(size):
    results = _run(_rank_main, size)
    for rank, res in results.items():
        assert isinstance(res, dict), res
        assert res["ar_exact"], f"rank {rank}: all-reduce differs from the rank-order fp32 sum"
        assert res["ar_err"] < 1e-5
        assert res["two_shot"] > 0
        assert res["res_exact"] and res["norm_err"] < 1e-5
        assert res["dep_err"] < 1e-5, f"rank {rank}: DEP result off by {res['dep_err']}"
        assert res["bucket_refused"]
    digests = [results[r]["digests"] for r in range(size)]
    assert all(d == digests[0] for d in digests)                  # every rank the same bits


def _dead_peer_main(rank, size, port, out):
    torch.set_num_threads(1)
    try:
        store, coll = _collectives(rank, size, port, timeout=2.0)
        if rank == 1:                                # set up, then never take part
            out.put((rank, "left"))
            time.sleep(4)
            return
        t0 = time.monotonic()
        try:
            coll.all_reduce(torch.ones(8))
            out.put((rank, "no error"))
        except Exception as exc:
            out.put((rank, (type(exc).__name__, str(exc), time.monotonic() - t0)))
    except BaseException as exc:
        out.put((rank, f"{type(exc).__name__}: {exc}"))


def test_silent_peer_is_an_error_not_a_hang():
    results = _run(_dead_peer_main, 2, timeout=60)
    name, msg, waited = results[0]
    assert name == "PeerError" and "rank 1" in msg
    assert waited < 10


def test_batch_over_the_slot_is_refused_not_dropped():
    """One process, group of one: a batch whose pairs exceed the slot raises (the caller falls back)."""
    from dynamo_dwdp.collectives.protocol import PeerMemory

    layout = ArenaLayout(1, ar_bytes=256, dep_slot_rows=4, dep_hidden=H, dep_itemsize=4)
    mem = PeerMemory()
    mem.rank, mem.size, mem.layout, mem.device = 0, 1, layout, torch.device("cpu")
    mem.arenas = [torch.zeros(layout.total_bytes, dtype=torch.uint8)]
    mem.flags = [mem.arenas[0][:layout.flag_count * 4].view(torch.int32)]
    coll = PeerCollectives(mem)
    x = torch.randn(3, H)
    ids = torch.tensor([[0, 1], [2, 3], [4, 5]])
    with pytest.raises(ValueError, match="exceed the DEP slot"):
        coll.dispatch(x, ids, torch.ones(3, 2), torch.zeros(E, dtype=torch.long), E, 4, torch.float32)
    with pytest.raises(ValueError, match="dep_slot_rows"):
        coll.dep_rows(3, 2, 8)
