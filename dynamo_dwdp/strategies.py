"""The strategy registry: how a group of ranks splits the model. One table, read everywhere.

Graph validation (`config/graph.py`), group validation (`group/context.py`), the worker's flags,
`generate`, the engine benchmark, the planner and the rank assembly (`rank/build.py`, which keys
its executor builders by these names and checks at import that it covers every one) all read
this table; nothing else lists strategies. Pure data: no torch, so config and CLI stay light.

| name   | ranks | collectives | CUDA graphs | who runs an engine        | stepping                        |
|--------|-------|-------------|-------------|---------------------------|---------------------------------|
| single | 1     | no          | yes         | the one rank              | when it has work                |
| dp     | >= 1  | no          | yes         | every rank (replicas)     | when it has work                |
| dwdp   | >= 2  | no          | yes         | every rank                | when it has work (never waits)  |
| dep    | >= 2  | yes         | no          | every rank                | lock-step: every rank each step |
| tp     | >= 2  | yes         | no          | rank 0; the others follow | rank 0 steps, the others mirror |
"""
from __future__ import annotations

from dataclasses import dataclass

from dynamo_dwdp.errors import UserError


@dataclass(frozen=True)
class Strategy:
    name: str
    min_ranks: int
    max_ranks: int | None        # None: no upper bound
    collectives: bool            # joins a torch.distributed process group (DEP all-to-all, TP all-reduce)
    graph_capturable: bool       # decode steps may be replayed from CUDA graphs (the executor can still
                                 # decline for a device/dtype: MoEExecutor.graph_safe)
    lock_step: bool              # every rank runs a forward every iteration, work or not
    leader_only: bool            # only rank 0 runs an engine and a Dynamo endpoint; the others follow it
    splits_model: bool           # the group splits the model (a cost model exists: the planner compares these)
    replica_of: str | None       # the strategy each rank runs alone (dp = single replicated N times)
    doc: str


_TABLE = (
    Strategy("single", 1, 1, collectives=False, graph_capturable=True, lock_step=False, leader_only=False,
             splits_model=False, replica_of=None, doc="one process with all weights"),
    Strategy("dp", 1, None, collectives=False, graph_capturable=True, lock_step=False, leader_only=False,
             splits_model=False, replica_of="single", doc="independent replicated ranks"),
    Strategy("dwdp", 2, None, collectives=False, graph_capturable=True, lock_step=False, leader_only=False,
             splits_model=True, replica_of=None,
             doc="each rank its own worker; routed experts partitioned over the ranks, pulled from peers"),
    Strategy("dep", 2, None, collectives=True, graph_capturable=False, lock_step=True, leader_only=False,
             splits_model=True, replica_of=None,
             doc="attention-DP + expert-parallel all-to-all; each rank its own worker, ranks step in lockstep"),
    Strategy("tp", 2, None, collectives=True, graph_capturable=False, lock_step=False, leader_only=True,
             splits_model=True, replica_of=None, doc="tensor parallel; rank 0 is the Dynamo worker, the others follow"),
)

STRATEGIES: dict[str, Strategy] = {s.name: s for s in _TABLE}
NAMES: tuple[str, ...] = tuple(STRATEGIES)
"""Every strategy name, in the order users see them."""
GROUP_STRATEGIES: tuple[str, ...] = tuple(s.name for s in _TABLE if s.splits_model)
"""The strategies that split the model over a group (what the planner and the benchmarks compare)."""


def get_strategy(name: str) -> Strategy:
    """The registry entry of `name`; a UserError naming the allowed values otherwise."""
    try:
        return STRATEGIES[name]
    except KeyError:
        raise UserError(f"strategy {name!r} is not one of {', '.join(NAMES)}") from None
