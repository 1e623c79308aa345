#!/usr/bin/env python3
"""Check that the installed packages are exactly the lock's versions (run by scripts/setup.sh).

    python scripts/check_lock.py requirements/lock-cpu-py311.txt [--skip NAME ...]

Exit 0 and one line when every `name==version` of the lock is what `importlib.metadata` sees;
exit 1 listing each package that is missing or at another version.
"""
from __future__ import annotations

import argparse
import importlib.metadata as metadata
import re
import sys


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(path: str) -> dict[str, str]:
    """canonical name -> exact version, from `name==version --hash=...` lines."""
    pins = {}
    with open(path, encoding="utf-8") as f:
        for raw in f:
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            spec = line.split()[0]
            name, _, version = spec.partition("==")
            if not version:
                raise SystemExit(f"{path}: '{spec}' is not pinned with ==")
            pins[canonical(name)] = version
    return pins


def mismatches(pins: dict[str, str], skip: set[str]) -> list[str]:
    out = []
    for name, want in sorted(pins.items()):
        if name in skip:
            continue
        try:
            have = metadata.version(name)
        except metadata.PackageNotFoundError:
            out.append(f"{name}: not installed (lock: {want})")
            continue
        if have != want:
            out.append(f"{name}: {have} installed, lock says {want}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("lock")
    ap.add_argument("--skip", nargs="*", default=[], help="package names not to check (e.g. torch)")
    args = ap.parse_args()
    pins = read_lock(args.lock)
    bad = mismatches(pins, {canonical(s) for s in args.skip})
    if bad:
        print(f"{args.lock}: installed packages differ from the lock:", *bad, sep="\n  ", file=sys.stderr)
        sys.exit(1)
    print(f"[setup] installed packages match {args.lock} ({len(pins)} pinned)")


if __name__ == "__main__":
    main()
