"""Build one rank's engine for a strategy: executor + runner + stepping rule.

strategy  executor          process group  Dynamo workers per group   stepping
single    LocalExecutor     -              1                          when it has work
dp        LocalExecutor     -              N (independent replicas)   when it has work
dwdp      DWDPExecutor      -              N (one per rank)           when it has work (never waits)
dep       DEPExecutor       gloo/nccl      N (one per rank)           lock-step: every rank every step
tp        TPMoEExecutor     gloo/nccl      1 (rank 0 leads)           rank 0 steps, others follow
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

from dynamo_dwdp.engine.config import EngineConfig
from dynamo_dwdp.engine.llm_engine import LLMEngine
from dynamo_dwdp.engine.model_runner import ModelRunner
from dynamo_dwdp.engine.sequence import RequestOutput
from dynamo_dwdp.model.config import load_model_config
from dynamo_dwdp.parallel.context import TensorParallel
from dynamo_dwdp.parallel.executor import LocalExecutor
from dynamo_dwdp.parallel.group import GroupContext, GroupSpec

log = logging.getLogger(__name__)


@dataclass
class DWDPOptions:
    experts_per_rank: int | None = None     # L
    prefetch_per_peer: int | None = None    # P
    contention_opt: bool = False
    routed_only: bool = False
    transport: str = "auto"                 # auto | shm | cuda_ipc
    slice_bytes: int = 2 << 20              # contention_opt: bytes per interleaved slice


def rank_device(device: str, rank: int) -> torch.device:
    """`cuda` -> cuda:<rank mod visible GPUs>; anything explicit is kept."""
    if device == "cuda":
        n = torch.cuda.device_count()
        return torch.device("cuda", rank % max(n, 1))
    return torch.device(device)


class RankEngine:
    """One rank: its runner, its engine (None on TP followers) and the strategy's stepping rule."""

    def __init__(self, runner: ModelRunner, group: GroupContext, engine: LLMEngine | None, coordinator=None):
        self.runner, self.group, self.engine, self.coordinator = runner, group, engine, coordinator
        self.strategy = group.spec.strategy

    @property
    def is_follower(self) -> bool:
        return self.engine is None

    @property
    def stats(self):
        return self.runner.executor.stats

    def step(self) -> tuple[bool, list[RequestOutput]]:
        """One iteration. Returns (ran_a_forward, outputs)."""
        if self.coordinator is not None:
            if not self.coordinator.any_work(self.engine.has_unfinished()):
                return False, []
            return True, self.engine.step(allow_empty=True)
        if not self.engine.has_unfinished():
            return False, []
        return True, self.engine.step()

    def run_until_idle(self) -> list[RequestOutput]:
        outs: list[RequestOutput] = []
        while True:
            ran, o = self.step()
            outs.extend(o)
            if not ran:
                return outs

    def follow(self) -> None:
        self.runner.follow()

    def close(self) -> None:
        if self.strategy == "tp" and self.group.rank == 0:
            try:
                self.runner.stop_followers()
            except Exception:
                pass
        # Finish this rank's own weight pulls, then leave the group (its drain waits until every live
        # peer is done), and only then free the shards: a DWDP shard must outlive its readers (a peer
        # still loading would otherwise find the shard gone when it opens it).
        quiesce = getattr(self.runner.executor, "quiesce", None)
        if quiesce is not None:
            quiesce()
        try:
            self.group.close()
        finally:
            self.runner.close()


def build_rank_engine(model_dir: str, engine_cfg: EngineConfig, spec: GroupSpec,
                      dwdp: DWDPOptions | None = None, nats_url: str | None = None) -> RankEngine:
    spec.validate()
    dwdp = dwdp or DWDPOptions()
    device = rank_device(engine_cfg.device, spec.rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    engine_cfg.device = str(device)
    model_cfg = load_model_config(model_dir)
    group = GroupContext.join(spec, device=device, nats_url=nats_url)
    try:
        tp = None
        runner_cls = ModelRunner
        runner_kwargs = {}
        if spec.strategy in ("single", "dp"):
            factory = LocalExecutor
        elif spec.strategy == "dwdp":
            from dynamo_dwdp.dwdp.executor import DWDPExecutor
            from dynamo_dwdp.dwdp.placement import Placement

            placement = Placement.choose(model_cfg.n_routed_experts, spec.size, dwdp.experts_per_rank,
                                         dwdp.prefetch_per_peer)

            def factory(cfg, dev, dtype):
                return DWDPExecutor(cfg, dev, dtype, group=group, placement=placement, routed_only=dwdp.routed_only,
                                    contention_opt=dwdp.contention_opt, transport=dwdp.transport,
                                    slice_bytes=dwdp.slice_bytes)
        elif spec.strategy == "dep":
            from dynamo_dwdp.parallel.dep import DEPExecutor

            def factory(cfg, dev, dtype):
                return DEPExecutor(cfg, dev, dtype, group=group)
        else:  # tp
            from dynamo_dwdp.parallel.tp import TPModelRunner, TPMoEExecutor

            tp = TensorParallel(spec.size, spec.rank, group.process_group)

            def factory(cfg, dev, dtype):
                ex = TPMoEExecutor(cfg, dev, dtype, tp=tp)
                tp.stats = ex.stats
                return ex
            runner_cls, runner_kwargs = TPModelRunner, {"group": group}
        runner = runner_cls(model_dir, engine_cfg, factory, tp=tp, model_config=model_cfg, **runner_kwargs)
        skew = os.environ.get("DWDP_EXPERT_SKEW")
        if skew:                                      # benchmark knob: "e1,e2,...:bias"
            hot, _, bias = skew.partition(":")
            runner.set_expert_skew([int(e) for e in hot.split(",") if e.strip()], float(bias or 0.0))
        engine = None if (spec.strategy == "tp" and spec.rank != 0) else LLMEngine(runner)
        coordinator = None
        if spec.strategy == "dep":
            from dynamo_dwdp.parallel.dep import StepCoordinator

            coordinator = StepCoordinator(group, runner.executor.stats, device)
        return RankEngine(runner, group, engine, coordinator)
    except BaseException:
        group.close()
        raise
