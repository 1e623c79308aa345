"""`dynamo-dwdp generate --strategy X --ranks N --json` prints exactly the JSON that the single-process
run prints (subprocesses, on a `make-model --preset tiny` checkpoint with its tokenizer)."""
from __future__ import annotations

import json

import pytest

from tests.conftest import cli

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("private_shm_dir")]

PROMPT = "def add(a, b): return"
GREEDY = ("--max-tokens", "6", "--ignore-eos")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "tiny"
    proc = cli("make-model", str(out), "--preset", "tiny", "--seed", "5", "-q")
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.fixture(scope="module")
def single(tiny):
    return _generate(tiny, "single", 1)


def _generate(model_dir, strategy, ranks):
    proc = cli("generate", "--model", str(model_dir), "--prompt", PROMPT, *GREEDY, "--strategy", strategy,
               "--ranks", str(ranks), "--block-size", "4", "--json")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 1, proc.stdout                   # --json: one object and nothing else
    return lines[0]


def test_single_json_is_well_formed(tiny, single):
    from tokenizers import Tokenizer

    out = json.loads(single)
    assert set(out) == {"token_ids", "text"}
    assert len(out["token_ids"]) == 6
    assert out["text"] == Tokenizer.from_file(str(tiny / "tokenizer.json")).decode(out["token_ids"],
                                                                                  skip_special_tokens=False)


@pytest.mark.parametrize("strategy,ranks", [("dwdp", 2), ("dep", 3), ("tp", 2), ("dp", 2)])
def test_strategy_prints_the_single_json(tiny, single, strategy, ranks):
    assert _generate(tiny, strategy, ranks) == single
