"""`make demo`: the main job on a laptop-sized CPU machine.

Makes the tiny random DeepSeek-V3 model (if missing), serves the customer's reference graph
(graphs/disagg_dwdp_decode.yaml: a standard prefill worker, a DWDP decode group of 2 ranks) with
Dynamo's OpenAI frontend on 127.0.0.1, sends one real chat request through it, shows which workers
served it and what moved (KV bytes over NIXL, expert bytes pulled by the DWDP ranks), and stops.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import urllib.request

from dynamo_dwdp.ab.server_metrics import scrape_total
from dynamo_dwdp.errors import UserError
from dynamo_dwdp.launch.launcher import serve_graph


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


def _metric(urls: list[str], name: str) -> float:
    return sum(scrape_total(u, name) for u in urls)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dynamo_dwdp.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--graph", default="graphs/disagg_dwdp_decode.yaml")
    p.add_argument("-f", "--config", action="append", default=None)
    p.add_argument("--prompt", default="Explain in one sentence why mixture-of-experts models need expert parallelism.")
    p.add_argument("--max-tokens", type=int, default=24)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)

    try:
        with serve_graph(args.graph, args.config or ["configs/tiny-cpu.yaml"]) as h:
            print(f"\n== serving '{h.model_name}' at {h.url} (graph {h.graph.name}; logs {h.run_dir})")
            body = {"model": h.model_name, "messages": [{"role": "user", "content": args.prompt}],
                    "max_tokens": args.max_tokens, "temperature": 0,
                    "nvext": {"extra_fields": ["worker_id", "timing"]}}
            print(f"== POST /v1/chat/completions  {json.dumps(body['messages'])}")
            resp = _post(h.url + "/v1/chat/completions", body)
            choice = resp["choices"][0]
            print(f"== reply ({choice['finish_reason']}, {resp['usage']['completion_tokens']} tokens; a random "
                  f"model, so the words are noise): {choice['message']['content']!r}")
            nv = resp.get("nvext", {})
            print(f"== workers: {json.dumps(nv.get('worker_id'))}")
            if "timing" in nv:
                print(f"== timing: ttft {nv['timing'].get('ttft_ms', 0):.1f} ms, total {nv['timing'].get('total_time_ms', 0):.1f} ms")
            urls = h.worker_metrics_urls
            decode = [u for name, us in urls.items() if name.startswith("decode") for u in us]
            print(f"== KV bytes moved prefill -> decode over NIXL: {int(_metric(decode, 'dwdp_kv_transfer_bytes_total'))}")
            print(f"== expert bytes pulled by the DWDP decode ranks from their peers: "
                  f"{int(_metric(decode, 'dwdp_remote_bytes_total'))}")
            print(f"== step time split on decode: compute {_metric(decode, 'dwdp_step_compute_seconds_total'):.3f}s, "
                  f"exposed prefetch {_metric(decode, 'dwdp_step_prefetch_wait_seconds_total'):.3f}s, "
                  f"sync {_metric(decode, 'dwdp_step_sync_wait_seconds_total'):.3f}s")
            print("== stopping (frontend, decode, prefill, infra)")
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print("== done: nothing left running")
    return 0


if __name__ == "__main__":
    sys.exit(main())
