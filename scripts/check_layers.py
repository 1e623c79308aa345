#!/usr/bin/env python3
"""Print the package-level import graph of dynamo_dwdp and check it against the layer rules.

Every `import` of a project module counts, wherever it stands: at module level, inside a function
(marked `local`), or under `if TYPE_CHECKING:`. A package is a folder of dynamo_dwdp/; a top-level
module (errors.py, cli.py, ...) is its own node. The check fails (exit 1) when

  - the graph has a cycle (packages that import each other, directly or around a loop), or
  - an arrow is not allowed by LAYERS below (the same table as docs/design.md, "Layers"), or
  - a function-local import of a project module (same package or not) gives no reason: a local
    import is kept only where module level would not do (a heavy optional dependency such as torch
    or triton on a path that must stay free of it, a real module cycle), and says so in one line,
    `# local import: <reason>`, at the end of the import or on the comment line directly above it
    (a run of consecutive imports under that comment shares it). Files listed in PENDING are not
    checked yet; a PENDING file whose local imports all say why is itself an error (drop it).

Usage: python scripts/check_layers.py [--quiet]     (run by tests/test_layers.py)
"""
from __future__ import annotations

import ast
import re
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
    "worker": {"errors", "strategies", "config", "engine", "group", "rank", "cuda_peer_memory"},
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


# Files exempt from the reason rule while their modules are reworked (none today; keep it exact).
PENDING: set[str] = set()

REASON = re.compile(r"#\s*local import:\s*\S")
FUNCTIONS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)


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


def _targets(node: ast.Import | ast.ImportFrom, package: str) -> list[str]:
    """The project modules one import statement names (relative imports resolved against `package`)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] == PACKAGE]
    base = node.module or ""
    if node.level:
        up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
        base = ".".join(up + ([base] if base else []))
    if base.split(".")[0] != PACKAGE:
        return []
    # `from dynamo_dwdp import errors` names a module: count the module, not the package
    return [f"{base}.{a.name}" if base == PACKAGE else base for a in node.names]


def imports_of(path: Path) -> list[tuple[str, int, bool, bool]]:
    """(imported project module, line, inside a function, says why) for every import statement of the
    file; "says why" is True for a module-level import, else whether it carries `# local import: ...`."""
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines()
    tree = ast.parse(text, filename=str(path))
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found: list[tuple[str, int, bool, bool]] = []

    def has_reason(stmt: ast.stmt, run_above: bool) -> bool:
        own = lines[stmt.lineno - 1: stmt.end_lineno]
        above = lines[stmt.lineno - 2].strip() if stmt.lineno > 1 else ""
        return (any(REASON.search(line) for line in own) or (above.startswith("#") and bool(REASON.match(above)))
                or run_above)

    def visit(node: ast.AST, local: bool) -> None:
        for _, value in ast.iter_fields(node):
            prev: tuple[int, bool] | None = None     # (last line, says why) of the import just before
            for child in value if isinstance(value, list) else [value]:
                if not isinstance(child, ast.AST):
                    continue
                if isinstance(child, (ast.Import, ast.ImportFrom)):
                    why = not local or has_reason(child, prev is not None and prev[0] == child.lineno - 1 and prev[1])
                    found.extend((t, child.lineno, local, why) for t in _targets(child, package))
                    prev = (child.end_lineno, why)
                else:
                    prev = None
                visit(child, local or isinstance(child, FUNCTIONS))

    visit(tree, False)
    return found


def build_graph() -> tuple[dict[str, dict[str, list[str]]], int]:
    """node -> imported node -> ['path:line (local)', ...]; and the number of function-local imports."""
    graph: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    local_count = 0
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        src = node_of(module_name(path))
        graph[src]  # every node appears, also one that imports nothing
        for target, line, local, _ in imports_of(path):
            dst = node_of(target)
            if dst == src:
                continue
            local_count += local
            where = f"{path.relative_to(ROOT)}:{line}" + (" (local)" if local else "")
            graph[src][dst].append(where)
    return graph, local_count


def unexplained_local_imports() -> list[str]:
    """One line per function-local import of a project module that gives no reason (outside PENDING),
    and one per PENDING file that no longer needs to be there."""
    out = []
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        bare = [f"{rel}:{line}: function-local import of {target} gives no reason (say why with "
                f"'# local import: <reason>', or import it at module level)"
                for target, line, local, why in imports_of(path) if local and not why]
        bare = list(dict.fromkeys(bare))            # `from m import a, b`: one statement, one line
        if rel in PENDING:
            if not bare:
                out.append(f"{rel}: in PENDING, but every local import says why (remove it from PENDING)")
            continue
        out.extend(bare)
    return out


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


def check(graph: dict[str, dict[str, list[str]]], unexplained: list[str] = ()) -> list[str]:
    problems = list(unexplained)
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
    problems = check(graph, unexplained_local_imports())
    for p in problems:
        print(f"error: {p}")
    if not problems:
        print("no cycle; every arrow points down (see docs/design.md, Layers); "
              f"every function-local import says why ({len(PENDING)} file(s) pending)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
