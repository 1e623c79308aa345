"""The tiny model the serving modules serve (`make-model --preset tiny --seed 0 --dtype fp32`), made once per
session. Read-only: a module that changes its files (test_serve_e2e's EOS token) serves a copy."""
from __future__ import annotations

import pytest

from tests.launch.test_serve_e2e import make_model


@pytest.fixture(scope="session")
def tiny_served_model(tmp_path_factory) -> str:
    return make_model(tmp_path_factory.mktemp("serve-model") / "tiny")
