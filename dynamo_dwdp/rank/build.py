"""Assemble one rank: the strategy's executor + model runner + engine + stepping rule.

Which executor a strategy runs is `EXECUTOR_BUILDERS` below, keyed by the strategy registry
(`dynamo_dwdp/strategies.py`, which says how a strategy steps and whether it joins a process
group); a module-level check makes sure every registered strategy has exactly one builder.

strategy  executor          runner
single    LocalExecutor     ModelRunner
dp        LocalExecutor     ModelRunner (each rank a replica)
dwdp      DWDPExecutor      ModelRunner
dep       DEPExecutor       ModelRunner + StepCoordinator (lock-step)
tp        TPMoEExecutor     TPModelRunner (rank 0 leads, the others follow)
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Callable

import torch

from dynamo_dwdp.baselines.dep import DEPExecutor, StepCoordinator, even_bounds
from dynamo_dwdp.baselines.tp import TPModelRunner, TPMoEExecutor
from dynamo_dwdp.config.dwdp import DwdpSettings
from dynamo_dwdp.config.engine import FP8_FORMATS, EngineSettings
from dynamo_dwdp.dwdp.executor import DWDPExecutor
from dynamo_dwdp.dwdp.placement import Placement
from dynamo_dwdp.engine.engine_core import EngineCore
from dynamo_dwdp.engine.model_runner import ModelRunner
from dynamo_dwdp.engine.sequence import RequestOutput
from dynamo_dwdp.errors import UserError
from dynamo_dwdp.group.context import GroupContext, GroupSpec
from dynamo_dwdp.model.config import ModelConfig, load_model_config
from dynamo_dwdp.model.memory_fit import check_memory_fit
from dynamo_dwdp.model.moe_executor import LocalExecutor
from dynamo_dwdp.model.tensor_parallel import TensorParallel
from dynamo_dwdp.collectives.build import build_peer_collectives
from dynamo_dwdp.strategies import STRATEGIES, get_strategy

log = logging.getLogger(__name__)


@dataclass
class ExecutorPlan:
    """What a strategy's builder returns: the executor factory the runner calls (cfg, device, dtype),
    and the runner class with its extra arguments."""

    factory: Callable
    tensor_parallel: TensorParallel | None = None
    runner_cls: type = ModelRunner
    runner_kwargs: dict = dataclasses.field(default_factory=dict)


def _local(spec: GroupSpec, group: GroupContext, model_cfg: ModelConfig, dwdp: DwdpSettings,
           engine: EngineSettings, device: torch.device) -> ExecutorPlan:
    return ExecutorPlan(LocalExecutor)


def _dwdp(spec: GroupSpec, group: GroupContext, model_cfg: ModelConfig, dwdp: DwdpSettings,
          engine: EngineSettings, device: torch.device) -> ExecutorPlan:
    placement = Placement.choose(model_cfg.n_routed_experts, spec.size, dwdp.experts_per_rank, dwdp.prefetch_per_peer)
    return ExecutorPlan(lambda cfg, dev, dtype: DWDPExecutor(cfg, dev, dtype, group=group, placement=placement,
                                                             settings=dwdp))


def _dep(spec: GroupSpec, group: GroupContext, model_cfg: ModelConfig, dwdp: DwdpSettings,
         engine: EngineSettings, device: torch.device) -> ExecutorPlan:
    bounds = even_bounds(model_cfg.n_routed_experts, spec.size)
    peer = build_peer_collectives(group, engine, model_cfg, device, dep=True,
                                  experts_per_rank=max(b - a for a, b in zip(bounds, bounds[1:])))

    def factory(cfg, dev, dtype):
        ex = DEPExecutor(cfg, dev, dtype, group=group)
        ex.peer, ex.max_batch = peer, engine.max_num_seqs
        return ex
    return ExecutorPlan(factory)


def _tp(spec: GroupSpec, group: GroupContext, model_cfg: ModelConfig, dwdp: DwdpSettings,
        engine: EngineSettings, device: torch.device) -> ExecutorPlan:
    tp = TensorParallel(spec.size, spec.rank, group.process_group)
    tp.peer = build_peer_collectives(group, engine, model_cfg, device, dep=False)

    def factory(cfg, dev, dtype):
        ex = TPMoEExecutor(cfg, dev, dtype, tp=tp)
        tp.stats = ex.stats
        return ex
    return ExecutorPlan(factory, tp, TPModelRunner, {"group": group})


EXECUTOR_BUILDERS: dict[str, Callable[..., ExecutorPlan]] = {
    "single": _local, "dp": _local, "dwdp": _dwdp, "dep": _dep, "tp": _tp,
}
if set(EXECUTOR_BUILDERS) != set(STRATEGIES):       # a strategy added to the registry needs a builder here
    raise RuntimeError(f"rank/build.py: EXECUTOR_BUILDERS {sorted(EXECUTOR_BUILDERS)} != strategies {sorted(STRATEGIES)}")


def rank_device(device: str, rank: int) -> torch.device:
    """`cuda` -> cuda:<rank mod visible GPUs>; anything explicit is kept."""
    if device == "cuda":
        n = torch.cuda.device_count()
        return torch.device("cuda", rank % max(n, 1))
    return torch.device(device)


class RankEngine:
    """One rank: its runner, its engine (None on TP followers) and the strategy's stepping rule."""

    def __init__(self, runner: ModelRunner, group: GroupContext, engine: EngineCore | None, coordinator=None):
        self.runner, self.group, self.engine, self.coordinator = runner, group, engine, coordinator
        self.strategy = group.spec.strategy
        self.leader_only = get_strategy(self.strategy).leader_only

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
        if self.leader_only and self.group.rank == 0:
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


def build_rank_engine(model_dir: str, engine: EngineSettings, spec: GroupSpec, dwdp: DwdpSettings | None = None,
                      nats_url: str | None = None,
                      expert_skew: tuple[list[int], float] | None = None) -> RankEngine:
    """Join the group and build this rank's runner and engine. `engine` and `dwdp` are passed whole.
    `expert_skew` (hot expert ids, bias) is a benchmark hook: the A/B harness skews the random router."""
    spec.validate()
    strategy = get_strategy(spec.strategy)
    if engine.weight_format in FP8_FORMATS and strategy.name not in ("single", "dp"):
        raise UserError(f"engine weight_format={engine.weight_format} runs with strategy single or dp (local experts), "
                        f"not {spec.strategy}")
    dwdp = dwdp or DwdpSettings()
    device = rank_device(engine.device, spec.rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    engine = dataclasses.replace(engine, device=str(device))
    model_cfg = load_model_config(model_dir)
    check_memory_fit(model_cfg, spec.strategy, spec.size, engine.torch_dtype, engine.num_kv_blocks,
                     engine.block_size, device, dwdp.experts_per_rank)
    group = GroupContext.join(spec, device=device, nats_url=nats_url)
    try:
        plan = EXECUTOR_BUILDERS[spec.strategy](spec, group, model_cfg, dwdp, engine, device)
        runner = plan.runner_cls(model_dir, engine, plan.factory, tp=plan.tensor_parallel, model_config=model_cfg,
                                 **plan.runner_kwargs)
        if expert_skew is not None:
            runner.set_expert_skew(*expert_skew)
        lock_step = strategy.lock_step or strategy.leader_only     # peers step together: no step runs ahead
        llm = None if (strategy.leader_only and spec.rank != 0) else EngineCore(
            runner, async_scheduling=engine.async_scheduling and not lock_step)
        coordinator = StepCoordinator(group, runner.executor.stats, device) if strategy.lock_step else None
        return RankEngine(runner, group, llm, coordinator)
    except BaseException:
        group.close()
        raise
