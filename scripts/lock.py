#!/usr/bin/env python3
"""Regenerate the lock files that `scripts/setup.sh` installs from (exact versions + sha256).

    python3 scripts/lock.py                      # both flavours
    python3 scripts/lock.py --flavour cpu        # requirements/lock-cpu-py311.txt only

Flavours (one file each, named `requirements/lock-<flavour>-py<XY>.txt`):
- `cpu`: developer machines and CI (Python 3.11): CPU torch 2.13.0, the project's dependencies and its
  `dev` extra (tests), the three packages setup installs without their dependencies (ai-dynamo,
  whose `aisimulate` pin only resolves on NVIDIA's index, and NIXL's meta package + its CUDA 12 build),
  and the build tools (setuptools, wheel) so sdists build without a registry-fresh backend.
- `image`: the worker image (Python 3.12, see Dockerfile): the same runtime dependencies, without
  torch and what only torch needs (the base image's CUDA torch is used), without the test extra.

How: a throwaway venv of the target Python resolves the project's ranges with
`pip install --dry-run --ignore-installed --report`; the report's exact versions and file hashes are
written out. Lower or raise a range in pyproject.toml, run this, run the suite, commit both files.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCH = "torch==2.13.0"
NO_DEPS = ["ai-dynamo==1.6.1", "nixl==1.5.1", "nixl-cu12==1.5.1"]
BUILD_TOOLS = ["setuptools", "wheel"]
FLAVOURS = {
    # name: (python version, requirements to resolve, roots to leave out with what only they need)
    "cpu": ("3.11", [TORCH, ".[dev]", *BUILD_TOOLS], []),
    "image": ("3.12", [".", *BUILD_TOOLS], ["torch"]),
}
PROJECT = "dynamo-dwdp"


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def find_python(version: str) -> str:
    pyenv = sorted(glob.glob(os.path.expanduser(f"~/.pyenv/versions/{version}.*/bin/python")))
    for cand in (f"python{version}", *pyenv):
        path = shutil.which(cand) or (cand if os.path.isfile(cand) else None)
        if path:
            out = subprocess.run([path, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                                 capture_output=True, text=True)
            if out.stdout.strip() == version:
                return path
    sys.exit(f"lock: no Python {version} interpreter found (needed for that flavour's lock)")


def resolve(python: str, reqs: list[str], no_deps: bool) -> list[dict]:
    """pip's install report for `reqs` resolved from scratch by `python`."""
    with tempfile.TemporaryDirectory() as tmp:
        venv = os.path.join(tmp, "venv")
        subprocess.run([python, "-m", "venv", venv], check=True)
        report = os.path.join(tmp, "report.json")
        cmd = [os.path.join(venv, "bin", "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check",
               "--dry-run", "--ignore-installed", "--report", report, *(["--no-deps"] if no_deps else []), *reqs]
        subprocess.run(cmd, check=True, cwd=ROOT)
        with open(report, encoding="utf-8") as f:
            return json.load(f)["install"]


def requires(item: dict) -> list[str]:
    """Names an installed item depends on unconditionally (extras and other platforms ignored)."""
    out = []
    for spec in item["metadata"].get("requires_dist", []) or []:
        if ";" in spec and "extra" in spec.split(";", 1)[1]:
            continue
        out.append(canonical(re.split(r"[ ;<>=!~\[(]", spec.strip(), maxsplit=1)[0]))
    return out


def prune(items: list[dict], drop_roots: list[str]) -> list[dict]:
    """Leave out `drop_roots` and every package reachable only through them."""
    if not drop_roots:
        return items
    by_name = {canonical(i["metadata"]["name"]): i for i in items}
    dropped = {canonical(r) for r in drop_roots}
    keep: set[str] = set()
    todo = [canonical(PROJECT), *(n for n in by_name if n in map(canonical, BUILD_TOOLS))]
    while todo:
        name = todo.pop()
        if name in keep or name in dropped or name not in by_name:
            continue
        keep.add(name)
        todo.extend(requires(by_name[name]))
    return [i for n, i in by_name.items() if n in keep]


def line(item: dict) -> str:
    info = item["download_info"]
    digest = info.get("archive_info", {}).get("hashes", {}).get("sha256")
    if not digest:
        sys.exit(f"lock: no sha256 for {item['metadata']['name']} ({info.get('url')})")
    return f"{item['metadata']['name']}=={item['metadata']['version']} --hash=sha256:{digest}"


def write(flavour: str) -> str:
    version, reqs, drop = FLAVOURS[flavour]
    python = find_python(version)
    items = prune(resolve(python, reqs, no_deps=False), drop)
    items += resolve(python, NO_DEPS, no_deps=True)
    items = [i for i in items if canonical(i["metadata"]["name"]) != canonical(PROJECT)]
    path = os.path.join(ROOT, "requirements", f"lock-{flavour}-py{version.replace('.', '')}.txt")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    body = sorted((line(i) for i in items), key=str.lower)
    with open(path, "w", encoding="utf-8") as f:
        f.write(f"# {flavour} lock for Python {version}: generated by `python3 scripts/lock.py --flavour "
                f"{flavour}`; installed by scripts/setup.sh with --no-deps --require-hashes. Do not edit.\n")
        f.write("\n".join(body) + "\n")
    return f"{os.path.relpath(path, ROOT)}: {len(body)} packages"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--flavour", choices=sorted(FLAVOURS), action="append",
                    help="which lock to regenerate (repeatable; default: all)")
    args = ap.parse_args()
    for flavour in args.flavour or sorted(FLAVOURS):
        print(write(flavour), flush=True)


if __name__ == "__main__":
    main()
