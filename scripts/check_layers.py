#!/usr/bin/env python3
"""Print the package-level import graph of dynamo_dwdp and check it against the layer rules.

Every `import` of a project module counts, wherever it stands: at module level, inside a function
(marked `local`), or under `if TYPE_CHECKING:`. A package is a folder of dynamo_dwdp/; a top-level
module (errors.py, cli.py, ...) is its own node. The check fails (exit 1) when

  - the graph has a cycle (packages that import each other, directly or around a loop), or
  - an arrow is not allowed by LAYERS below (the same table as docs/design.md, "Layers").

Usage: python scripts/check_layers.py [--quiet]     (run by tests/test_layers.py)
"""
from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "dynamo_dwdp"

# Each node may import only the nodes listed for it (and itself). Read bottom to top: a node sits
# above everything it may import. `*` = anything (the command line, the demo).
LAYERS: dict[str, set[str]] = {
    "errors": set(),
    "strategies": {"errors"},
    "config": {"errors", "strategies"},
    "model": {"errors"},
    "synthetic": {"errors", "model"},
    "cuda_peer_memory": set(),
    "group": {"errors", "strategies"},
    "engine": {"errors", "config", "model"},
    "collectives": {"errors", "config", "group", "cuda_peer_memory"},
    "dwdp": {"errors", "config", "model", "collectives", "cuda_peer_memory"},
    "baselines": {"errors", "model", "engine", "collectives"},
    "rank": {"errors", "strategies", "config", "model", "engine", "group", "collectives", "dwdp", "baselines"},
    "worker": {"errors", "strategies", "config", "engine", "group", "rank"},
    "launch": {"errors", "strategies", "config", "group", "synthetic", "worker"},
    "deploy": {"errors", "strategies", "config", "launch"},
    "planner": {"errors", "strategies", "config", "model", "dwdp"},
    "ab": {"errors", "config", "launch", "planner"},
    "bench": {"errors", "strategies", "config", "model", "engine", "baselines", "rank", "planner", "synthetic"},
    "commands": {"*"},
    "cli": {"errors"},
    "demo": {"*"},
    "__main__": {"worker"},
    "__init__": set(),
}


def node_of(module: str) -> str:
    """`dynamo_dwdp.model.moe` -> `model`; `dynamo_dwdp.errors` -> `errors`; `dynamo_dwdp` -> `__init__`."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports_of(path: Path) -> list[tuple[str, int, bool]]:
    """(imported project module, line, inside a function) for every import statement of the file."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found: list[tuple[str, int, bool]] = []

    def visit(node: ast.AST, local: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = local or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend((a.name, child.lineno, local) for a in child.names if a.name.split(".")[0] == PACKAGE)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    up = package.split(".")[: len(package.split(".")) - (child.level - 1)]
                    base = ".".join(up + ([base] if base else []))
                if base.split(".")[0] == PACKAGE:
                    # `from dynamo_dwdp import errors` names a module: count the module, not the package
                    targets = [f"{base}.{a.name}" if base == PACKAGE else base for a in child.names]
                    found.extend((t, child.lineno, local) for t in targets)
            visit(child, inner)

    visit(tree, False)
    return found


def build_graph() -> tuple[dict[str, dict[str, list[str]]], int]:
    """node -> imported node -> ['path:line (local)', ...]; and the number of function-local imports."""
    graph: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    local_count = 0
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        src = node_of(module_name(path))
        graph[src]  # every node appears, also one that imports nothing
        for target, line, local in imports_of(path):
            dst = node_of(target)
            if dst == src:
                continue
            local_count += local
            where = f"{path.relative_to(ROOT)}:{line}" + (" (local)" if local else "")
            graph[src][dst].append(where)
    return graph, local_count


def find_cycles(graph: dict[str, dict[str, list[str]]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def strong(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, {}):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return out


def check(graph: dict[str, dict[str, list[str]]]) -> list[str]:
    problems = []
    for cycle in find_cycles(graph):
        problems.append("cycle: " + " <-> ".join(cycle))
    for src in sorted(graph):
        allowed = LAYERS.get(src)
        if allowed is None:
            problems.append(f"{src}: not in LAYERS (add it to scripts/check_layers.py and docs/design.md)")
            continue
        if "*" in allowed:
            continue
        for dst, where in sorted(graph[src].items()):
            if dst not in allowed:
                problems.append(f"{src} -> {dst} is not allowed (allowed: {', '.join(sorted(allowed)) or 'none'}): "
                                + ", ".join(where))
    return problems


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    graph, local_count = build_graph()
    if "--quiet" not in argv:
        print(f"package-level imports of {PACKAGE} (function-local ones included; 'n local' counts those):")
        for src in sorted(graph):
            arrows = []
            for dst, where in sorted(graph[src].items()):
                local = sum(w.endswith("(local)") for w in where)
                arrows.append(f"{dst}" + (f" ({local} local)" if local else ""))
            print(f"  {src:<11} -> {', '.join(arrows) if arrows else '-'}")
        print(f"function-local imports of project modules across packages: {local_count}")
    problems = check(graph)
    for p in problems:
        print(f"error: {p}")
    if not problems:
        print("no cycle; every arrow points down (see docs/design.md, Layers)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
