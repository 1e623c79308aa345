"""Run one group of N ranks as local processes (offline `generate`, tests, CPU benchmarks).

Each rank process builds its engine with `build_rank_engine` and calls `target(rank_engine, payload)`
(a picklable top-level function); results come back through a queue. A rank that dies or raises
turns into a clear error for the caller; the other ranks are terminated, nothing is left running.
"""
from __future__ import annotations

import logging
import multiprocessing as mp
import os
import queue
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable

from dynamo_dwdp.config.engine import EngineSettings
from dynamo_dwdp.engine.sampling import SamplingParams
from dynamo_dwdp.errors import PeerError, UserError
from dynamo_dwdp.config.dwdp import DwdpSettings
from dynamo_dwdp.group.context import GroupSpec
from dynamo_dwdp.group.rendezvous import free_port

log = logging.getLogger(__name__)
os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")   # spawned ranks inherit it: no c10d warning noise


@dataclass
class RankResult:
    rank: int
    value: Any = None
    error: str | None = None
    user_error: bool = False


def _rank_main(rank: int, size: int, strategy: str, model_dir: str, engine_cfg: EngineSettings, rendezvous: str,
               group_name: str, dwdp: DwdpSettings, target: Callable, payload: Any, results, spec_overrides: dict,
               threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    logging.basicConfig(level=os.environ.get("DWDP_LOG_LEVEL", "WARNING"),
                        format=f"[rank {rank}] %(levelname)s %(name)s: %(message)s")
    # local import: rank.build loads the whole model stack (seconds); only the spawned rank needs it
    from dynamo_dwdp.rank.build import build_rank_engine

    re = None
    try:
        spec = GroupSpec(strategy=strategy, size=size, rank=rank, name=group_name,
                         rendezvous=rendezvous if size > 1 else None, **spec_overrides)
        re = build_rank_engine(model_dir, engine_cfg, spec, dwdp)
        value = target(re, payload)
        results.put(RankResult(rank, value))
    except (UserError, PeerError) as exc:
        results.put(RankResult(rank, error=str(exc), user_error=True))
    except BaseException as exc:  # report, do not hang the parent
        results.put(RankResult(rank, error=f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
    finally:
        if re is not None:
            try:
                re.close()
            except Exception:
                pass


def run_local_group(model_dir: str, engine_cfg: EngineSettings, strategy: str, ranks: int, target: Callable,
                    payloads: list[Any] | None = None, dwdp: DwdpSettings | None = None, timeout: float = 600.0,
                    spec_overrides: dict | None = None, threads: int = 1,
                    on_started: Callable[[list[mp.Process]], None] | None = None) -> list[RankResult]:
    """Start `ranks` processes, wait for all results (or the first failure, or timeout)."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    rendezvous = f"tcp://127.0.0.1:{free_port()}"
    group_name = f"local-{os.getpid()}-{time.monotonic_ns() % 10**9}"
    payloads = payloads if payloads is not None else [None] * ranks
    procs = [ctx.Process(target=_rank_main, name=f"{strategy}-rank{r}", daemon=True,
                         args=(r, ranks, strategy, model_dir, engine_cfg, rendezvous, group_name, dwdp or DwdpSettings(),
                               target, payloads[r], results, spec_overrides or {}, threads))
             for r in range(ranks)]
    for p in procs:
        p.start()
    if on_started:
        on_started(procs)
    out: dict[int, RankResult] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(out) < ranks:
            try:
                res = results.get(timeout=0.2)
                out[res.rank] = res
                continue
            except queue.Empty:
                pass
            for r, p in enumerate(procs):
                if r not in out and not p.is_alive():
                    try:                                     # it may have reported just before exiting
                        res = results.get(timeout=1.0)
                        out[res.rank] = res
                        continue
                    except queue.Empty:
                        out[r] = RankResult(r, error=f"rank {r} exited with code {p.exitcode} without a result")
            if time.monotonic() > deadline:
                for r in range(ranks):
                    out.setdefault(r, RankResult(r, error=f"rank {r}: no result within {timeout:.0f}s"))
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)
    return [out[r] for r in range(ranks)]


def generate_rank(rank_engine, payload) -> list[list[int]]:
    """Target for `generate`: payload = (prompts, SamplingParams); returns output ids per prompt.
    DEP ranks keep stepping together until no rank has work; TP followers mirror rank 0."""
    prompts, params = payload
    if rank_engine.is_follower:
        rank_engine.follow()
        return []
    eng = rank_engine.engine
    ids = [f"p{i}" for i in range(len(prompts))]
    for rid, prompt in zip(ids, prompts):
        eng.add_request(rid, prompt, SamplingParams(**vars(params)))
    results: dict[str, list[int]] = {i: [] for i in ids}
    for out in rank_engine.run_until_idle():
        if out.error:
            raise PeerError(out.error)
        results[out.request_id].extend(out.new_token_ids)
    if rank_engine.leader_only:
        rank_engine.runner.stop_followers()
    return [results[i] for i in ids]
