"""The lock file is what set-up installs, and it satisfies what pyproject.toml asks for."""
from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from check_lock import canonical, mismatches, read_lock  # noqa: E402

LOCK = ROOT / "requirements" / f"lock-cpu-py{sys.version_info[0]}{sys.version_info[1]}.txt"


@pytest.fixture(scope="module")
def pins() -> dict[str, str]:
    assert LOCK.is_file(), f"no lock for this Python: {LOCK.name} (python3 scripts/lock.py)"
    return read_lock(str(LOCK))


def test_installed_packages_equal_the_lock(pins):
    assert mismatches(pins, skip=set()) == []


def test_every_line_carries_a_sha256_hash():
    for path in (ROOT / "requirements").glob("lock-*.txt"):
        lines = [ln for ln in path.read_text().splitlines() if ln and not ln.startswith("#")]
        assert lines, path
        for ln in lines:
            assert re.fullmatch(r"[A-Za-z0-9_.\-]+==\S+ --hash=sha256:[0-9a-f]{64}", ln), (path.name, ln)


def test_lock_satisfies_every_project_requirement(pins):
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = project["dependencies"] + project["optional-dependencies"]["dev"]
    for spec in wanted:
        req = Requirement(spec)
        if req.marker is not None and not req.marker.evaluate():
            continue
        name = canonical(req.name)
        assert name in pins, f"{req.name} is required by pyproject.toml but not in {LOCK.name}"
        version = pins[name].split("+")[0]
        assert req.specifier.contains(version, prereleases=True), (spec, pins[name])


def test_check_lock_names_a_wrong_version(tmp_path, pins):
    name = next(iter(pins))
    bad = tmp_path / "lock.txt"
    bad.write_text(f"{name}==0.0.0.dev0 --hash=sha256:{'0' * 64}\n")
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "check_lock.py"), str(bad)],
                         capture_output=True, text=True)
    assert out.returncode == 1
    assert f"{name}:" in out.stderr and "lock says 0.0.0.dev0" in out.stderr
