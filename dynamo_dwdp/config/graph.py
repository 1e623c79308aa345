"""Serving-graph files (`graphs/*.yaml`): the frontend and the pools behind it.

A graph is the OpenAI frontend + router in front of either one `agg` pool, or a `prefill` pool and a
`decode` pool joined by KV transfer. Each pool runs `replicas` groups of `ranks` processes (one GPU
each); the ranks of a group must share one NVLink domain. The strategy says how a group splits the
model (the strategies and their rank limits are the registry in `dynamo_dwdp/strategies.py`).

`engine: trtllm` pools are rendered for real clusters only (stock `python3 -m dynamo.trtllm`); see
`dynamo_dwdp/deploy/trtllm.py`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

from dynamo_dwdp.config import schema
from dynamo_dwdp.config.schema import DNS_LABEL, DNS_LABEL_TEXT, REQUIRED, internal, spec
from dynamo_dwdp.config.settings import POOL_OVERRIDE_SECTIONS, Settings, read_yaml
from dynamo_dwdp.errors import ConfigError
from dynamo_dwdp.strategies import STRATEGIES, get_strategy

ROLES = ("agg", "prefill", "decode")
ENGINES = ("native", "trtllm")
ROUTER_MODES = ("round-robin", "random", "kv", "least-loaded")
COMPONENT_TYPES = {"agg": "worker", "prefill": "prefill", "decode": "decode"}
"""Pool role -> DynamoGraphDeployment component `type`."""


@dataclass(frozen=True, kw_only=True)
class FrontendSpec:
    """The stock Dynamo frontend (OpenAI HTTP + router)."""

    router_mode: str = spec("round-robin", doc="how requests pick a worker", choices=ROUTER_MODES)
    migration_limit: int = spec(0, doc="times a request may move to another worker when one dies; 0 = off",
                                min=0, max=100)


@dataclass(frozen=True, kw_only=True)
class Pool:
    """A pool of `replicas` groups of `ranks` processes serving one role with one strategy."""

    name: str = spec(REQUIRED, doc="pool (and DGD component) name", pattern=DNS_LABEL, pattern_text=DNS_LABEL_TEXT)
    role: str = spec(REQUIRED, doc="what the pool serves", choices=ROLES)
    strategy: str = spec(REQUIRED, doc="how a group splits the model", choices=tuple(STRATEGIES))
    ranks: int = spec(1, doc="processes (GPUs) per group; they share one NVLink domain", min=1, max=72)
    replicas: int = spec(1, doc="groups in the pool (k8s: pods; the autoscaler changes this)", min=1, max=1024)
    engine: str = spec("native", doc="native = this project's engine; trtllm = stock dynamo.trtllm (k8s only)",
                       choices=ENGINES)
    overrides: dict[str, Any] = spec({}, doc="partial override of the settings' engine/dwdp/trtllm sections "
                                             "for this pool")
    index: int = internal(0)
    source: str = internal("")

    def _problems(self) -> Iterator[tuple[str, str]]:
        strategy = get_strategy(self.strategy)
        low = strategy.min_ranks
        if strategy.max_ranks == low and self.ranks != low:
            yield "ranks", f"{self.ranks} ranks for strategy {self.strategy} (allowed: {low})"
        elif self.ranks < low:
            yield "ranks", f"{self.ranks} is below the minimum {low} for strategy {self.strategy} (allowed: >= {low})"
        if self.engine == "trtllm":
            if self.role not in ("prefill", "decode"):
                yield "engine", f"trtllm is only for roles prefill and decode (role is {self.role!r}; allowed: native)"
            elif self.strategy == "dp":
                yield "strategy", ("dp with engine trtllm: use strategy single and raise replicas "
                                   "(allowed with trtllm: single, dwdp, dep, tp)")
            elif self.strategy == "dwdp" and self.role != "prefill":
                yield "strategy", ("dwdp with engine trtllm is a prefill (context) feature in TensorRT-LLM "
                                   "(allowed for a trtllm decode pool: single, dep, tp)")

    @property
    def component_type(self) -> str:
        """The DynamoGraphDeployment component type of this pool."""
        return COMPONENT_TYPES[self.role]

    @property
    def processes(self) -> int:
        """Rank processes of the whole pool (= GPUs with one GPU per rank)."""
        return self.ranks * self.replicas

    def group_name(self, graph_name: str, group_index: int | str) -> str:
        """`<graph>-<pool>-g<index>`: the name of one group (rendezvous, logs, metrics)."""
        return f"{graph_name}-{self.name}-g{group_index}"


@dataclass(frozen=True, kw_only=True)
class Graph:
    """A serving graph: frontend + pools."""

    name: str = spec(REQUIRED, doc="graph name (DGD metadata.name)", pattern=DNS_LABEL, pattern_text=DNS_LABEL_TEXT)
    description: str = spec("", doc="one line for humans")
    frontend: FrontendSpec = spec(factory=FrontendSpec, doc="frontend + router")
    pools: list[Pool] = spec(REQUIRED, doc="the worker pools")
    source: str = internal("")

    def _problems(self) -> Iterator[tuple[str, str]]:
        if not self.pools:
            yield "pools", "needs at least one pool (allowed: one agg pool, or prefill + decode pools)"
            return
        seen: dict[str, int] = {}
        for i, pool in enumerate(self.pools):
            if pool.name in seen:
                yield f"pools[{i}].name", f"{pool.name!r} is already the name of pools[{seen[pool.name]}]"
            seen[pool.name] = i
            if pool.name == "frontend":
                yield f"pools[{i}].name", "'frontend' is the frontend component's name (allowed: any other DNS label)"
        roles = [p.role for p in self.pools]
        if "agg" in roles:
            if len(self.pools) != 1:
                i = roles.index("agg")
                yield f"pools[{i}].role", ("an agg graph has exactly one pool, role agg "
                                           f"(this graph has {len(self.pools)} pools)")
        else:
            if "prefill" not in roles:
                yield f"pools[{roles.index('decode')}].role", "a decode pool needs a prefill pool (none in this graph)"
            if "decode" not in roles:
                yield f"pools[{roles.index('prefill')}].role", "a prefill pool needs a decode pool (none in this graph)"
        engines = {p.engine for p in self.pools}
        if len(engines) > 1:
            i = next(i for i, p in enumerate(self.pools) if p.engine != self.pools[0].engine)
            yield f"pools[{i}].engine", (f"{self.pools[i].engine!r} differs from pools[0] "
                                         f"({self.pools[0].engine!r}); prefill and decode must use the same engine "
                                         "(their KV formats differ)")
        for i, pool in enumerate(self.pools):
            for section in pool.overrides:
                if section not in POOL_OVERRIDE_SECTIONS:
                    yield f"pools[{i}].overrides.{section}", (f"unknown key '{section}' (allowed: "
                                                              f"{', '.join(POOL_OVERRIDE_SECTIONS)})")

    # -- lookups

    def pool(self, name: str) -> Pool:
        for p in self.pools:
            if p.name == name:
                return p
        raise ConfigError(f"{self.source or self.name}: no pool named {name!r} "
                          f"(allowed: {', '.join(p.name for p in self.pools)})")

    def pools_with_role(self, role: str) -> list[Pool]:
        return [p for p in self.pools if p.role == role]

    @property
    def disaggregated(self) -> bool:
        return any(p.role != "agg" for p in self.pools)

    @property
    def engine(self) -> str:
        """`native` or `trtllm` (all pools use the same engine)."""
        return self.pools[0].engine

    @property
    def processes(self) -> int:
        """Rank processes of all pools (the frontend not counted)."""
        return sum(p.processes for p in self.pools)


def load_graph(path: str) -> Graph:
    """Read and validate one graph file; errors name the file, the dotted path and what is allowed."""
    label = str(path)
    data = read_yaml(path)
    graph = schema.build(Graph, data, where=label)
    sections = {name: tp for name, (tp, _s, _f) in schema.fields_of(Settings).items()
                if name in POOL_OVERRIDE_SECTIONS}
    for i, pool in enumerate(graph.pools):
        object.__setattr__(pool, "index", i)
        object.__setattr__(pool, "source", label)
        for section, value in pool.overrides.items():
            schema.check_partial(sections[section], value, where=label, path=f"pools[{i}].overrides.{section}")
    object.__setattr__(graph, "source", label)
    return graph


def check_compatible(graph: Graph, settings: Settings) -> None:
    """Rules that need both the graph and the settings (run by the launcher and the k8s renderer).

    Builds every pool's effective settings (so a bad per-pool override surfaces here), and checks the
    TensorRT-LLM constraints of trtllm pools (DWDP: CUTEDSL MoE backend, L and P set, no EPLB).
    """
    label = graph.source or graph.name
    for i, pool in enumerate(graph.pools):
        eff = settings.for_pool(pool)
        where = f"pools[{i}]"
        if pool.engine == "trtllm" and pool.strategy == "dwdp":
            role = eff.trtllm.prefill
            if role.moe_backend != "CUTEDSL":
                raise ConfigError(f"{label}: {where}: trtllm DWDP needs trtllm.prefill.moe_backend CUTEDSL "
                                  f"(got {role.moe_backend!r})")
            if role.eplb_slots:
                raise ConfigError(f"{label}: {where}: trtllm DWDP cannot be combined with EPLB "
                                  f"(trtllm.prefill.eplb_slots is {role.eplb_slots}; allowed: 0)")
            if eff.dwdp.experts_per_rank is None:
                raise ConfigError(f"{label}: {where}: trtllm DWDP needs dwdp.experts_per_rank and "
                                  "dwdp.prefetch_per_peer set (allowed: integers, e.g. 64 and 64 for 256 experts "
                                  "over 4 ranks)")
    if settings.kv_transfer.backend == "local":
        devices = {settings.for_pool(p).engine.device for p in graph.pools if p.role != "agg" and p.engine == "native"}
        if len(devices) > 1:
            raise ConfigError(f"{label}: kv_transfer.backend local copies between pools of one device kind; the "
                              f"pools use {', '.join(sorted(devices))} (allowed: one engine.device for prefill "
                              "and decode pools, or kv_transfer.backend nixl)")
