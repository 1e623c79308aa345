"""Typed, schema-checked config files.

- `graphs/*.yaml` -> `load_graph(path) -> Graph` (topology: frontend + pools; see `config.graph`).
- `configs/*.yaml` -> `load_settings(paths, overrides) -> Settings` (model, engine, dwdp, kv_transfer,
  infra, frontend, k8s, trtllm; see `config.settings`).
- `check_compatible(graph, settings)` runs the rules that need both.

Every mistake raises `dynamo_dwdp.errors.ConfigError` with one line naming the file, the dotted path
and the allowed values; the declarative validator is `config.schema`.
"""
from dynamo_dwdp.config.graph import Graph, FrontendSpec, Pool, check_compatible, load_graph
from dynamo_dwdp.config.settings import Settings, load_settings

__all__ = ["Graph", "FrontendSpec", "Pool", "Settings", "check_compatible", "load_graph", "load_settings"]
