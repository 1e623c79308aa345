"""KV-aware routing: the prefill workers' KV events reach Dynamo's router (`router_mode: kv`).

A repeated 80-token prompt (5 blocks of 16) must be routed with overlap 5 by the frontend's prefill
router (it read our `stored` events), and the prefill engine must serve 64 tokens from its prefix
cache (the last block is always recomputed, so the last prompt position gets fresh logits).
"""
from __future__ import annotations

import json
import re
import urllib.request

import pytest
import yaml

from dynamo_dwdp.launch.launcher import serve_graph

pytestmark = pytest.mark.slow


def test_prefill_kv_events_drive_the_kv_router(tmp_path):
    graph = yaml.safe_load(open("graphs/disagg_dwdp_decode.yaml"))
    graph["name"] = "kv-routing"
    graph["frontend"]["router_mode"] = "kv"
    path = tmp_path / "kv.yaml"
    path.write_text(yaml.safe_dump(graph))
    overrides = {"model.path": str(tmp_path / "model")}
    with serve_graph(str(path), ["configs/tiny-cpu.yaml"], overrides, log_dir=str(tmp_path / "run")) as h:
        body = json.dumps({"model": h.model_name, "prompt": list(range(10, 90)), "max_tokens": 2}).encode()
        usages = []
        for _ in range(3):
            req = urllib.request.Request(h.url + "/v1/completions", data=body, headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=60) as r:
                usages.append(json.loads(r.read())["usage"])
        log = re.sub(r"\x1b\[[0-9;]*m", "", open(h.component("frontend").log_path, errors="replace").read())
    assert usages[0]["prompt_tokens"] == 80
    assert not (usages[0].get("prompt_tokens_details") or {}).get("cached_tokens")
    assert [u["prompt_tokens_details"]["cached_tokens"] for u in usages[1:]] == [64, 64]
    prefill_overlaps = [int(m) for m in re.findall(r"overlap_blocks=(\d+) phase=Prefill", log)]
    assert prefill_overlaps[-2:] == [5, 5], prefill_overlaps
