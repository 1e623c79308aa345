"""scripts/check_layers.py: the package-level import graph has no cycle and every arrow is allowed.

The checker itself is tested against hand-made graphs (a loop, an upward arrow, a function-local
import), so a green run means the package really is layered, not that the checker sees nothing.
"""
from __future__ import annotations

import importlib.util
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "check_layers.py"


def _load():
    spec = importlib.util.spec_from_file_location("check_layers", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_the_package_has_no_cycle_and_only_allowed_arrows():
    r = subprocess.run([sys.executable, str(SCRIPT)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "no cycle" in r.stdout
    # the graph is printed: the model sits at the bottom, the rank assembly above the strategies
    lines = {line.split("->")[0].strip(): line.split("->")[1] for line in r.stdout.splitlines() if "->" in line}
    assert lines["model"].strip() == "errors"
    assert "dwdp" in lines["rank"] and "baselines" in lines["rank"]


def test_every_package_is_in_the_layer_table_and_in_the_design_doc():
    mod = _load()
    graph, _ = mod.build_graph()
    assert set(graph) <= set(mod.LAYERS)
    design = (ROOT / "docs" / "design.md").read_text()
    for node in mod.LAYERS:
        if node not in ("__init__", "__main__"):
            assert f"`{node}" in design, f"docs/design.md does not name `{node}`"


def test_the_checker_finds_a_cycle_and_an_upward_arrow():
    mod = _load()
    loop = {"model": {"rank": ["a.py:1 (local)"]}, "rank": {"model": ["b.py:2"]}}
    assert mod.find_cycles(loop) == [["model", "rank"]]
    problems = mod.check(loop)
    assert any(p.startswith("cycle: model <-> rank") for p in problems)
    assert any(p.startswith("model -> rank is not allowed") for p in problems)
    assert mod.check({"rank": {"model": ["b.py:2"]}, "model": {}}) == []


def test_function_local_and_relative_imports_are_seen(tmp_path, monkeypatch):
    mod = _load()
    pkg = tmp_path / "dynamo_dwdp"
    (pkg / "model").mkdir(parents=True)
    (pkg / "rank").mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "model" / "__init__.py").write_text("")
    (pkg / "rank" / "__init__.py").write_text("")
    (pkg / "rank" / "build.py").write_text("")
    (pkg / "model" / "moe.py").write_text(textwrap.dedent("""
        def f():
            from dynamo_dwdp.rank.build import x   # hidden upward import
        from ..rank import build                  # relative, module level
    """))
    monkeypatch.setattr(mod, "ROOT", tmp_path)
    graph, local = mod.build_graph()
    assert [w.endswith("(local)") for w in graph["model"]["rank"]] == [True, False]
    assert local == 1
    assert any(p.startswith("model -> rank is not allowed") for p in mod.check(graph))


def test_the_checker_finds_a_local_import_that_gives_no_reason(tmp_path, monkeypatch):
    mod = _load()
    pkg = tmp_path / "dynamo_dwdp"
    for sub in ("model", "rank"):
        (pkg / sub).mkdir(parents=True)
        (pkg / sub / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    source = textwrap.dedent("""
        from dynamo_dwdp.model import kernels              # module level: needs no reason


        def bare():
            from dynamo_dwdp.model import layers    # <- caught


        def same_line():
            from dynamo_dwdp.model import layers    # local import: triton is optional (GPU only)


        def line_above():
            # local import: triton is optional (GPU only)
            from dynamo_dwdp.model import layers
            from dynamo_dwdp.model.kernels import (moe_gemm,
                                                   router)  # a run of imports under one comment


        def run_ends_at_a_blank_line():
            # local import: triton is optional (GPU only)
            from dynamo_dwdp.model import layers

            from ..rank import build                # <- caught


        def empty_reason():
            # the next line is caught: its reason is empty
            from dynamo_dwdp.model import layers    # local import:


        def plain_comment_above():
            # triton is optional
            from dynamo_dwdp.model import layers    # <- caught
    """)
    (pkg / "model" / "moe.py").write_text(source)
    lines = source.splitlines()
    caught = [f"dynamo_dwdp/model/moe.py:{n}" for n, line in enumerate(lines, 1)
              if "<- caught" in line or "next line is caught" in lines[n - 2]]
    (pkg / "rank" / "build.py").write_text("def f():\n    from dynamo_dwdp.model import moe\n")
    (pkg / "rank" / "clean.py").write_text("def f():\n    from dynamo_dwdp.model import moe   # local import: loads torch\n")
    monkeypatch.setattr(mod, "ROOT", tmp_path)
    monkeypatch.setattr(mod, "PENDING", {"dynamo_dwdp/rank/build.py"})
    found = mod.unexplained_local_imports()
    assert len(caught) == 4 and [f.split(": ")[0] for f in found] == caught
    assert "function-local import of dynamo_dwdp.model gives no reason" in found[0]
    assert "of dynamo_dwdp.rank gives no reason" in found[1]             # relative import, resolved
    # a PENDING file is skipped while it still needs to be; once clean, the entry itself is reported
    monkeypatch.setattr(mod, "PENDING", {"dynamo_dwdp/rank/build.py", "dynamo_dwdp/rank/clean.py"})
    assert mod.unexplained_local_imports()[-1].startswith("dynamo_dwdp/rank/clean.py: in PENDING, but every")
    graph, _ = mod.build_graph()
    assert [p for p in mod.check(graph, found) if "gives no reason" in p] == found
    assert mod.main(["--quiet"]) == 1


def test_the_package_has_no_unexplained_local_import_and_pending_names_real_files():
    mod = _load()
    assert mod.unexplained_local_imports() == []
    for rel in mod.PENDING:
        assert (ROOT / rel).is_file(), rel
