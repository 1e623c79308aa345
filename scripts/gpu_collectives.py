"""Peer-memory collectives on GPUs: exactness and latency at decode sizes (one command).

  PYTHONPATH=. python3 scripts/gpu_collectives.py --out $OUT [--ranks 2]

Two (or --ranks) processes, one per visible GPU, or all sharing GPU 0 when there is one (then the
figures are labelled "shared GPU": the ranks time-slice one chip, so latencies include context
switches and say nothing about NVLink). Per size, rank 0 reports:
- all-reduce (bf16, hidden 7168): the protocol eager (host issues every op), the protocol captured
  in a CUDA graph (replay time per op), gloo eager (the NCCL-free torch path), NCCL eager (2+ GPUs);
  exactness: bitwise equal to the rank-order fp32 sum rounded to bf16 (computed by torch on the GPU);
- all-reduce fused with residual add + RMSNorm, captured, against the captured all-reduce followed by
  torch's add and rms_norm (bitwise comparison of both outputs);
- DEP dispatch + combine (V3 shapes: 256 experts, top-8, hidden 7168, bf16 wire), captured and eager,
  against the same exchange through gloo all-to-alls on host copies (what eager DEP does without
  NCCL); exactness: combine(dispatch) with an identity expert equals x * sum(w) per token.
Writes $OUT/gpu_collectives.json and prints a table.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time
import traceback
from datetime import timedelta

import torch

H, E, K = 7168, 256, 8


def _time_ms(fn, reps: int) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    fn()
    torch.cuda.synchronize()
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def _graph(fn, inner: int):
    """Capture `inner` calls of fn into one graph (after a warm-up); returns (graph, per-call replay)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(inner):
            out = fn()
    torch.cuda.synchronize()
    return g, out


def _barrier(store, key, rank, size):
    store.set(f"{key}/{rank}", "1")
    for r in range(size):
        store.get(f"{key}/{r}")


def rank_main(rank, size, port, signals, sizes, out_q):
    try:
        ngpu = torch.cuda.device_count()
        dev = torch.device("cuda", rank % ngpu)
        torch.cuda.set_device(dev)
        import torch.distributed as dist

        from dynamo_dwdp.collectives.cuda_ipc import CudaIpcPeerMemory
        from dynamo_dwdp.collectives.protocol import ArenaLayout, PeerCollectives

        store = dist.TCPStore("127.0.0.1", port, size, rank == 0, timedelta(seconds=120))
        dist.init_process_group("gloo", store=dist.PrefixStore("gloo", store), rank=rank, world_size=size)
        nccl = None
        if ngpu >= size:
            nccl = dist.new_group(backend="nccl")
        maxT = max(sizes)
        layout = ArenaLayout(size, ar_bytes=maxT * H * 2, dep_slot_rows=maxT * K, dep_hidden=H, dep_itemsize=2)
        mem = CudaIpcPeerMemory(store, "coll", rank, size, layout, dev, signals=signals)
        coll = PeerCollectives(mem, two_shot_bytes=1 << 30)      # one-shot at every decode size here
        rows_out = []
        bf = torch.bfloat16
        g = torch.Generator(device=dev)

        def randn(*shape, seed):
            g.manual_seed(seed)
            return torch.randn(*shape, generator=g, device=dev).to(bf)

        for T in sizes:
            nbytes = T * H * 2
            xs = [randn(T, H, seed=100 * T + r) for r in range(size)]
            x = xs[rank].clone()
            ref = xs[0].float()
            for other in xs[1:]:
                ref = ref + other.float()
            ref = ref.to(bf)
            row = {"op": "all_reduce", "tokens": T, "bytes": nbytes}
            got = coll.all_reduce(x)
            row["exact_eager"] = bool(torch.equal(got, ref))
            _barrier(store, f"a{T}", rank, size)
            row["eager_ms"] = _time_ms(lambda: coll.all_reduce(x), 20)
            inner = 20
            gr, gout = _graph(lambda: coll.all_reduce(x), inner)
            gr.replay()
            torch.cuda.synchronize()
            row["exact_captured"] = bool(torch.equal(gout, ref))
            _barrier(store, f"b{T}", rank, size)
            row["captured_ms"] = _time_ms(gr.replay, 10) / inner
            y = x.clone()
            _barrier(store, f"c{T}", rank, size)
            row["gloo_ms"] = _time_ms(lambda: dist.all_reduce(y), 5)
            if nccl is not None:
                row["nccl_ms"] = _time_ms(lambda: dist.all_reduce(y, group=nccl), 20)
            del gr
            rows_out.append(row)

            resid, w = randn(T, H, seed=7), randn(H, seed=8)
            eps = 1e-6
            fused = lambda: coll.all_reduce_add_rmsnorm(x, resid, w, eps)

            def unfused():
                h = coll.all_reduce(x) + resid
                return h, torch.nn.functional.rms_norm(h, (H,), w, eps)
            row = {"op": "all_reduce+add+rmsnorm", "tokens": T, "bytes": nbytes}
            gf, (fres, fnorm) = _graph(fused, inner)
            gu, (ures, unorm) = _graph(unfused, inner)
            gf.replay()
            gu.replay()
            torch.cuda.synchronize()
            row["residual_equal"] = bool(torch.equal(fres, ures))
            row["norm_max_abs_diff"] = float((fnorm.float() - unorm.float()).abs().max())
            _barrier(store, f"d{T}", rank, size)
            row["captured_ms"] = _time_ms(gf.replay, 10) / inner
            _barrier(store, f"e{T}", rank, size)
            row["unfused_captured_ms"] = _time_ms(gu.replay, 10) / inner
            del gf, gu
            rows_out.append(row)

            # DEP dispatch + combine, identity expert: result must be x * sum_k(w)
            owner = torch.arange(E, device=dev) // (E // size)
            g.manual_seed(1000 + 10 * T + rank)
            ids = torch.rand(T, E, generator=g, device=dev).topk(K, dim=-1).indices
            wts = torch.rand(T, K, generator=g, device=dev)
            xd = randn(T, H, seed=500 + T + rank)
            rows = coll.dep_rows(T, K, E // size)

            def dep():
                rx, rids, rw, st = coll.dispatch(xd, ids, wts, owner, E, rows, bf)
                yv = torch.where(rids < E, rx.float() * rw, 0.0).to(bf)
                return coll.combine(yv, st)
            expect = (xd.float().unsqueeze(1) * wts.to(bf).float().unsqueeze(2)).to(bf).float().sum(1).to(bf)
            row = {"op": "dep_dispatch+combine", "tokens": T, "bytes": T * K * (H + 2) * 2}
            row["exact_eager"] = bool(torch.equal(dep(), expect))
            _barrier(store, f"f{T}", rank, size)
            row["eager_ms"] = _time_ms(dep, 10)
            gd, dout = _graph(dep, 5)
            gd.replay()
            torch.cuda.synchronize()
            row["exact_captured"] = bool(torch.equal(dout, expect))
            _barrier(store, f"g{T}", rank, size)
            row["captured_ms"] = _time_ms(gd.replay, 10) / 5
            del gd

            def gloo_dep():                  # the existing DEP exchange (counts, dispatch, combine) over gloo
                dest = owner[ids.reshape(-1)]
                order = torch.argsort(dest, stable=True)
                sc = torch.bincount(dest, minlength=size).cpu()
                rc = torch.empty_like(sc)
                dist.all_to_all_single(rc, sc)
                payload = torch.cat([xd[order // K], ids.reshape(-1)[order, None].to(bf),
                                     wts.reshape(-1)[order, None].to(bf)], 1).cpu()
                recv = payload.new_empty(int(rc.sum()), H + 2)
                dist.all_to_all_single(recv, payload, rc.tolist(), sc.tolist())
                rv = recv.to(dev)
                back = (rv[:, :H].float() * rv[:, H + 1:].float()).to(bf).cpu()
                ret = payload.new_empty(T * K, H)
                dist.all_to_all_single(ret, back, sc.tolist(), rc.tolist())
                return ret.to(dev)
            _barrier(store, f"h{T}", rank, size)
            row["gloo_ms"] = _time_ms(gloo_dep, 5)
            rows_out.append(row)
        _barrier(store, "end", rank, size)
        coll.close()
        out_q.put((rank, rows_out))
        dist.destroy_process_group()
    except BaseException as exc:
        out_q.put((rank, f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=".")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--signals", default="memops", choices=["memops", "triton"])
    p.add_argument("--tokens", default="1,8,32,128")
    p.add_argument("--timeout", type=float, default=240.0)
    a = p.parse_args()
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    sizes = [int(t) for t in a.tokens.split(",")]
    ngpu = torch.cuda.device_count()
    label = f"{a.ranks} ranks on {min(ngpu, a.ranks)} GPU(s)" + (" (shared GPU)" if ngpu < a.ranks else "")
    print(f"{label}: {torch.cuda.get_device_name(0)}; torch {torch.__version__}; signals {a.signals}", flush=True)
    from dynamo_dwdp.group.rendezvous import free_port

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=rank_main, args=(r, a.ranks, port, a.signals, sizes, q)) for r in range(a.ranks)]
    for pr in procs:
        pr.start()
    results = {}
    deadline = time.monotonic() + a.timeout
    while len(results) < a.ranks and time.monotonic() < deadline:
        try:
            r, v = q.get(timeout=2)
            results[r] = v
            if isinstance(v, str):             # a failed rank leaves its peers waiting: stop now
                break
        except Exception:
            if all(not pr.is_alive() for pr in procs):
                break
    for pr in procs:
        pr.join(timeout=5)
        if pr.is_alive():
            pr.kill()
    if len(results) < a.ranks or any(isinstance(v, str) for v in results.values()):
        for r, v in sorted(results.items()):
            if isinstance(v, str):
                print(f"rank {r} failed: {v}")
        print(f"FAILED: ranks answered {sorted(results)} of {a.ranks} (timeout {a.timeout:.0f}s)")
        return 1
    rows = results[0]
    shared = ngpu < a.ranks
    with open(os.path.join(a.out, "calibration.jsonl"), "a") as f:   # for `dynamo-dwdp plan --calibrate`
        for r in rows:
            op = {"all_reduce": "all_reduce", "dep_dispatch+combine": "dispatch_combine"}.get(r["op"])
            if op:
                f.write(json.dumps({"measure": "collective", "op": op, "bytes": r["bytes"],
                                    "seconds": r["captured_ms"] / 1e3, "shared_gpu": shared,
                                    "source": f"scripts/gpu_collectives.py, captured, {label}"}) + "\n")
    with open(os.path.join(a.out, "gpu_collectives.json"), "w") as f:
        json.dump({"label": label, "signals": a.signals, "device": torch.cuda.get_device_name(0),
                   "torch": torch.__version__, "ranks": results}, f, indent=1)
    print(f"\n{'op':<24}{'T':>5}{'KB':>8}{'eager ms':>10}{'graph ms':>10}{'gloo ms':>9}{'nccl ms':>9}"
          f"{'unfused ms':>11}  exact")
    for r in rows:
        ex = {k: v for k, v in r.items() if k.startswith(("exact", "residual_equal", "norm_max"))}
        print(f"{r['op']:<24}{r['tokens']:>5}{r['bytes'] / 1024:>8.0f}{r.get('eager_ms', float('nan')):>10.4f}"
              f"{r['captured_ms']:>10.4f}{r.get('gloo_ms', float('nan')):>9.3f}{r.get('nccl_ms', float('nan')):>9.4f}"
              f"{r.get('unfused_captured_ms', float('nan')):>11.4f}  {ex}")
    ok = all(v is True or (isinstance(v, float) and v <= 0.0625) for r in rows for k, v in r.items()
             if k.startswith(("exact", "residual_equal", "norm_max")))
    print("ALL EXACT" if ok else "NOT EXACT (see rows)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
