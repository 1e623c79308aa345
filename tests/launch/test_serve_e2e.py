"""End to end through Dynamo's OpenAI frontend, one launch per graph (graphs/*.yaml, embedded infra).

For each graph: /v1/completions and /v1/chat/completions, streaming and not, greedy with a fixed
length (temperature 0, ignore_eos), against independent references: `dynamo-dwdp generate` on the
same prompt (completions) and on the chat-templated token ids that transformers' AutoTokenizer
builds from the model directory (chat). Disagg graphs: prefill and decode served by different
workers, each one a worker of the right pool (ids matched against every rank's /metrics labels), and
KV bytes moved (NIXL, or the same-host path for `disagg_single:local`) on the decode worker that served the request. Worker-side rejections come
back as 400 with the engine's message and the graph keeps serving. Every TCP listener of the
served process trees is on loopback (/proc/net/tcp{,6}). Nothing is left running afterwards.

The helpers here are shared with tests/launch/test_serve_failures.py and tests/launch/test_serve_etcd.py.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import PY, REPO

CONFIG = str(REPO / "configs" / "tiny-cpu.yaml")
# graph file[+async][:kv_transfer.backend]: disagg_single also runs the same-host KV path (shared memory on
# CPU); +async: engine.async_scheduling on (the customer's DWDP-decode graph runs with it, as on the GPU)
GRAPHS = ["agg", "disagg_dwdp_decode+async", "disagg_dwdp_prefill", "disagg_dep", "disagg_tp", "disagg_single:local"]
HTTP_TIMEOUT = 60.0               # every client call: seconds per socket operation
TEST_WORKER_ENV = {
    "DYN_GRACEFUL_SHUTDOWN_GRACE_PERIOD_SECS": "0",   # Dynamo's 5 s pre-drain sleep: nothing to drain here
    "DWDP_KV_HOLD_TIMEOUT": "4",
}
COMPLETION_PROMPT = "Mixture of experts models send every token to a few experts"
CHAT_MESSAGES = [{"role": "user", "content": "Why do experts need parallelism?"}]
MAX_TOKENS = 12
# >= 5 KV blocks of 16 tokens: the disaggregated hand-off moves several blocks, compared token for token
LONG_PROMPT = ("Each rank of a DWDP group runs whole requests on its own, and pulls the routed experts it "
               "lacks from its peers one layer ahead, so that no collective and no barrier ever sits in the "
               "forward pass; a slow rank therefore never stalls the others, while DEP ranks meet at every "
               "layer in an all-to-all and TP ranks reduce every projection together.")
MULTIBYTE_PROMPT = "日本語のテキスト"      # its greedy output holds characters spread over several byte tokens
MULTIBYTE_TOKENS = 48
SEEDED = {"temperature": 0.9, "seed": 1234}
CONTEXT = 1024                    # configs/tiny-cpu.yaml engine.max_model_len

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


# ------------------------------------------------------------------ HTTP client (timeouts everywhere)
def post(url: str, body: dict, timeout: float = HTTP_TIMEOUT) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        raw = e.read().decode(errors="replace")
        try:
            return e.code, json.loads(raw)
        except ValueError:
            return e.code, {"message": raw}


def stream(url: str, body: dict, timeout: float = HTTP_TIMEOUT, on_chunk=None) -> dict:
    """POST with stream=true; parse the SSE stream. Returns {status, chunks, errors, done, exception}.
    `errors` holds every SSE data object carrying "error" (Dynamo's mid-stream failure event)."""
    body = dict(body, stream=True)
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    res = {"status": None, "chunks": [], "errors": [], "done": False, "exception": None}
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            res["status"] = r.status
            for raw in r:
                line = raw.decode(errors="replace").strip()
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    res["done"] = True
                    break
                obj = json.loads(data)
                if "error" in obj:
                    res["errors"].append(obj["error"])
                    continue
                res["chunks"].append(obj)
                if on_chunk is not None:
                    on_chunk(obj)
    except urllib.error.HTTPError as e:
        res["status"] = e.code
        res["errors"].append(e.read().decode(errors="replace"))
    except (OSError, ValueError) as e:          # timeouts and dropped connections end the call too
        res["exception"] = repr(e)
    return res


def stream_text(res: dict) -> str:
    out = []
    for c in res["chunks"]:
        for ch in c.get("choices") or []:
            out.append(ch.get("text") if "text" in ch else (ch.get("delta") or {}).get("content") or "")
    return "".join(x or "" for x in out)


def stream_finish(res: dict) -> str | None:
    reasons = [ch["finish_reason"] for c in res["chunks"] for ch in c.get("choices") or [] if ch.get("finish_reason")]
    return reasons[-1] if reasons else None


def stream_worker_ids(res: dict) -> dict:
    ids = [c["nvext"]["worker_id"] for c in res["chunks"] if (c.get("nvext") or {}).get("worker_id")]
    return ids[-1] if ids else {}


def metric_samples(url: str, name: str, timeout: float = 2.0) -> list[tuple[dict, float]]:
    """Every sample of one family on a /metrics page: [(labels, value)]; [] when unreachable."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            text = r.read().decode(errors="replace")
    except OSError:
        return []
    out = []
    for line in text.splitlines():
        m = re.match(rf"^{re.escape(name)}(?:\{{(.*)\}})?\s+(\S+)$", line)
        if m:
            labels = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(1) or ""))
            out.append((labels, float(m.group(2))))
    return out


def metric_total(url: str, name: str) -> float:
    return sum(v for _, v in metric_samples(url, name))


def worker_map(handle) -> dict[int, tuple[str, str, int, str]]:
    """Dynamo worker id -> (component name, role, rank index, metrics url), from the `worker_id`
    label every rank's /metrics carries (ranks without a Dynamo endpoint, e.g. TP followers, have none)."""
    out = {}
    for c in handle.components:
        for i, port in enumerate(c.system_ports):
            url = f"http://{handle.infra.host}:{port}/metrics"
            for labels, _ in metric_samples(url, "dwdp_kv_blocks_used"):
                if "worker_id" in labels:
                    out[int(labels["worker_id"], 16)] = (c.name, c.role, i, url)
    return out


def wait_for(predicate, timeout: float, interval: float = 0.25):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


# ------------------------------------------------------------------ processes and sockets (/proc only)
def _ppid_map() -> dict[int, int]:
    out = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    stat = f.read()
                out[int(d)] = int(stat.rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    return out


def process_tree(roots: list[int]) -> set[int]:
    """roots and all their live descendants."""
    children: dict[int, list[int]] = {}
    for pid, ppid in _ppid_map().items():
        children.setdefault(ppid, []).append(pid)
    seen, todo = set(), list(roots)
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        todo += children.get(pid, [])
    return {p for p in seen if os.path.exists(f"/proc/{p}")}


def served_pids(handle) -> set[int]:
    roots = [c.proc.pid for c in handle.components] + [p.pid for _, p in handle.infra.procs]
    return process_tree(roots)


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _hex_addr(h: str) -> str:
    ip, port = h.split(":")
    raw = bytes.fromhex(ip)
    if len(raw) == 4:
        addr = socket.inet_ntop(socket.AF_INET, raw[::-1])
    else:                                        # /proc prints IPv6 as four little-endian 32-bit words
        addr = socket.inet_ntop(socket.AF_INET6, b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4)))
    return f"{addr}:{int(port, 16)}"


def tcp_listeners() -> dict[int, str]:
    """socket inode -> 'address:port' of every listening TCP socket (v4 and v6) in this netns."""
    out = {}
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(path).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if f[3] == "0A":                     # TCP_LISTEN
                out[int(f[9])] = _hex_addr(f[1])
    return out


def listeners_of(pids: set[int]) -> list[tuple[int, str]]:
    """(pid, 'address:port') of every TCP listener owned by one of pids."""
    table = tcp_listeners()
    out = []
    for pid in sorted(pids):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        inodes = set()
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(int(target[8:-1]))
        out += [(pid, table[i]) for i in inodes if i in table]
    return out


def is_loopback(addr: str) -> bool:
    host = addr.rsplit(":", 1)[0]
    return host.startswith("127.") or host in ("::1", "::ffff:127.0.0.1") or host.startswith("::ffff:127.")


def pgrep(pattern: str) -> list[int]:
    r = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True, timeout=10)
    return [int(x) for x in r.stdout.split() if int(x) != os.getpid()]


def assert_nothing_left(pids: set[int], marker: str) -> None:
    """Every process we saw (and anything whose command line names this module's tmp dir) is gone."""
    left = wait_for(lambda: not [p for p in pids if alive(p)] and not pgrep(marker), 15.0) or None
    if left is None:
        still = [(p, Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\0", b" ")[:120]) for p in pids if alive(p)]
        raise AssertionError(f"processes left after the graph stopped: {still} / pgrep {marker}: {pgrep(marker)}")


# ------------------------------------------------------------------ references and launching
def chat_prompt_ids(model_dir: str, messages: list[dict]) -> list[int]:
    """The chat-templated prompt, built by transformers from the model directory (independent of Dynamo)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    return [int(t) for t in ids]


class References:
    """`dynamo-dwdp generate --json` for the completion prompt and the chat token ids (extended: also the
    long prompt, seeded sampling, the multi-byte prompt), started at once in the background."""

    def __init__(self, model_dir: str, max_tokens: int = MAX_TOKENS, extended: bool = False):
        self.chat_ids = chat_prompt_ids(model_dir, CHAT_MESSAGES)
        base = [PY, "-m", "dynamo_dwdp.cli", "generate", "--model", model_dir, "--max-tokens", str(max_tokens),
                "--ignore-eos", "--json"]
        env = dict(os.environ, OMP_NUM_THREADS="1")
        def start(*args):
            return subprocess.Popen(base + list(args), cwd=REPO, env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)

        self._procs = {
            "completion": start("--prompt", COMPLETION_PROMPT),
            "chat": start("--token-ids", ",".join(map(str, self.chat_ids))),
        }
        if extended:
            self._procs.update({
                "long": start("--prompt", LONG_PROMPT),
                "seeded": start("--prompt", COMPLETION_PROMPT, "--temperature", str(SEEDED["temperature"]),
                                "--seed", str(SEEDED["seed"])),
                "multibyte": start("--prompt", MULTIBYTE_PROMPT, "--max-tokens", str(MULTIBYTE_TOKENS)),
            })
        self._out: dict[str, dict] = {}

    def __getitem__(self, key: str) -> dict:
        if key not in self._out:
            proc = self._procs[key]
            out, err = proc.communicate(timeout=180)
            assert proc.returncode == 0, err[-2000:]
            self._out[key] = json.loads(out)
        return self._out[key]

    def close(self) -> None:
        for p in self._procs.values():
            if p.poll() is None:
                p.kill()
            p.communicate()


def make_model(model_dir: Path) -> str:
    r = subprocess.run([PY, "-m", "dynamo_dwdp.cli", "make-model", str(model_dir), "--preset", "tiny", "--seed", "0",
                        "--dtype", "fp32"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return str(model_dir)


class Served:
    """A running graph plus what the tests share: pids seen while serving, cached responses."""

    def __init__(self, handle):
        self.h = handle
        self.workers = worker_map(handle)
        self.pids = served_pids(handle)
        self._cache: dict[str, object] = {}

    def cached(self, name: str, fn):
        if name not in self._cache:
            self._cache[name] = fn()
        return self._cache[name]

    @property
    def disagg(self) -> bool:
        return any(p.role == "prefill" for p in self.h.graph.pools)


def completion_body(model: str, **kw) -> dict:
    return dict({"model": model, "prompt": COMPLETION_PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0,
                 "ignore_eos": True, "nvext": {"extra_fields": ["worker_id"]}}, **kw)


def chat_body(model: str, **kw) -> dict:
    return dict({"model": model, "messages": CHAT_MESSAGES, "max_tokens": MAX_TOKENS, "temperature": 0,
                 "ignore_eos": True, "nvext": {"extra_fields": ["worker_id"]}}, **kw)


@pytest.fixture(scope="module")
def model_dir(tiny_served_model, tmp_path_factory) -> str:
    """This module's copy of the session's tiny model (eos_at changes its generation_config.json)."""
    out = tmp_path_factory.mktemp("e2e-model") / "tiny"
    shutil.copytree(tiny_served_model, out)
    return str(out)


@pytest.fixture(scope="module")
def refs(model_dir):
    r = References(model_dir, extended=True)
    yield r
    r.close()


def add_eos_token(model_dir: str, token: int) -> None:
    """Make `token` an EOS token of the model too (generation_config.json, which the frontend reads),
    so that a random model ends a request by EOS at a known place."""
    path = os.path.join(model_dir, "generation_config.json")
    with open(path) as f:
        cfg = json.load(f)
    eos = cfg.get("eos_token_id")
    eos = eos if isinstance(eos, list) else [eos]
    cfg["eos_token_id"] = sorted({*eos, int(token)})
    with open(path + ".tmp", "w") as f:
        json.dump(cfg, f)
    os.replace(path + ".tmp", path)


@pytest.fixture(scope="module")
def eos_at(model_dir, refs) -> int:
    """Index in the completion reference of the first occurrence of the token made an EOS token."""
    ids = refs["completion"]["token_ids"]
    index = next(i for i in range(3, len(ids)) if ids[i] not in ids[:i])
    add_eos_token(model_dir, ids[index])
    return index


@pytest.fixture(scope="module", params=GRAPHS)
def served(request, model_dir, refs, eos_at, tmp_path_factory):
    from dynamo_dwdp.launch.launcher import serve_graph

    graph, _, kv = request.param.partition(":")
    graph, _, variant = graph.partition("+")
    run_dir = tmp_path_factory.mktemp(f"run-{graph}-{kv or 'default'}")
    pids: set[int] = set()
    overrides = {"model.path": model_dir, **({"kv_transfer.backend": kv} if kv else {}),
                 **({"engine.async_scheduling": True} if variant == "async" else {})}
    with serve_graph(str(REPO / "graphs" / f"{graph}.yaml"), [CONFIG], overrides=overrides,
                     log_dir=str(run_dir), http_port=0, worker_env=TEST_WORKER_ENV) as h:
        s = Served(h)
        pids = s.pids
        yield s
        pids |= served_pids(h)
    assert_nothing_left(pids, str(run_dir))
    assert_nothing_left(set(), model_dir)


# ------------------------------------------------------------------ tests
def _completion(s: Served) -> dict:
    def run():
        status, body = post(s.h.url + "/v1/completions", completion_body(s.h.model_name))
        assert status == 200, body
        return body
    return s.cached("completion", run)


def _completion_stream(s: Served) -> dict:
    return s.cached("completion_stream", lambda: stream(
        s.h.url + "/v1/completions", completion_body(s.h.model_name, stream_options={"include_usage": True})))


def _chat(s: Served) -> dict:
    def run():
        status, body = post(s.h.url + "/v1/chat/completions", chat_body(s.h.model_name))
        assert status == 200, body
        return body
    return s.cached("chat", run)


def _chat_stream(s: Served) -> dict:
    return s.cached("chat_stream", lambda: stream(s.h.url + "/v1/chat/completions", chat_body(s.h.model_name)))


def test_completions_match_generate(served, refs):
    body = _completion(served)
    choice = body["choices"][0]
    assert choice["text"] == refs["completion"]["text"]
    assert choice["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == MAX_TOKENS == len(refs["completion"]["token_ids"])


def test_completions_streaming_matches_generate(served, refs):
    res = _completion_stream(served)
    assert res["status"] == 200 and res["done"] and not res["errors"] and res["exception"] is None, res
    assert stream_text(res) == refs["completion"]["text"]
    assert stream_finish(res) == "length"
    usage = [c["usage"] for c in res["chunks"] if c.get("usage")]
    assert usage and usage[-1]["completion_tokens"] == MAX_TOKENS


def test_chat_matches_generate_on_templated_ids(served, refs):
    body = _chat(served)
    choice = body["choices"][0]
    assert body["usage"]["prompt_tokens"] == len(refs.chat_ids)     # the frontend templated as transformers did
    assert choice["message"]["content"] == refs["chat"]["text"]
    assert choice["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == MAX_TOKENS


def test_chat_streaming_equals_non_streaming(served, refs):
    res = _chat_stream(served)
    assert res["status"] == 200 and res["done"] and not res["errors"] and res["exception"] is None, res
    assert stream_text(res) == _chat(served)["choices"][0]["message"]["content"] == refs["chat"]["text"]
    assert stream_finish(res) == "length"


def test_workers_of_the_right_pools_served_each_request(served):
    """nvext worker_id: every request went to workers of this graph, prefill and decode to different
    workers of the prefill and decode pools (disagg), or to the agg worker."""
    seen = [_completion(served)["nvext"]["worker_id"], _chat(served)["nvext"]["worker_id"],
            stream_worker_ids(_completion_stream(served)), stream_worker_ids(_chat_stream(served))]
    for ids in seen:
        assert ids.get("decode_worker_id") in served.workers, (ids, served.workers)
        decode = served.workers[ids["decode_worker_id"]]
        if served.disagg:
            assert ids.get("prefill_worker_id") in served.workers, (ids, served.workers)
            prefill = served.workers[ids["prefill_worker_id"]]
            assert ids["prefill_worker_id"] != ids["decode_worker_id"]
            assert (prefill[1], decode[1]) == ("prefill", "decode")
        else:
            assert decode[1] == "agg"
            assert ids.get("prefill_worker_id") in (None, ids["decode_worker_id"])


def test_kv_bytes_moved_by_nixl_to_the_serving_decode_worker(served):
    if not served.disagg:
        pytest.skip("agg graph: no KV transfer")
    _completion(served)
    _chat(served)
    for ids in (_completion(served)["nvext"]["worker_id"], _chat(served)["nvext"]["worker_id"]):
        url = served.workers[ids["decode_worker_id"]][3]
        assert metric_total(url, "dwdp_kv_transfer_bytes_total") > 0, url
    decode_urls = [w[3] for w in served.workers.values() if w[1] == "decode"]
    assert sum(metric_total(u, "dwdp_kv_transfer_bytes_total") for u in decode_urls) > 0
    assert sum(metric_total(u, "dwdp_kv_transfer_failures_total") for u in decode_urls) == 0


def test_worker_side_rejections_are_400_and_the_graph_keeps_serving(served):
    """Checks only the engine does (the frontend passes them on): its InvalidArgument must reach the
    client as 400 with the engine's message, from whichever role saw the request first."""
    m, url = served.h.model_name, served.h.url + "/v1/completions"
    urls = [w[3] for w in served.workers.values()]
    t0 = time.monotonic()
    status, body = post(url, {"model": m, "prompt": "hello", "max_tokens": 5000})
    assert status == 400 and "max_tokens=5000" in body["message"] and "context length" in body["message"], body
    # nothing stays allocated for it: a decode that refuses a request frees the prefill's blocks at
    # once (well before DWDP_KV_HOLD_TIMEOUT)
    hold = float(TEST_WORKER_ENV["DWDP_KV_HOLD_TIMEOUT"])
    assert wait_for(lambda: all(metric_total(u, "dwdp_kv_blocks_used") == 0 for u in urls), 1.5), \
        {u: metric_total(u, "dwdp_kv_blocks_used") for u in urls}
    assert time.monotonic() - t0 < hold
    status, body = post(url, {"model": m, "prompt": "hello", "max_tokens": 3, "repetition_penalty": 1.3})
    assert status == 400 and "repetition_penalty" in body["message"], body
    status, body = post(url, completion_body(m))
    assert status == 200 and body["choices"][0]["text"] == _completion(served)["choices"][0]["text"]


def ss_listeners(pids: set[int]) -> set[tuple[int, str]]:
    """(pid, 'address:port') of the TCP listeners of pids as `ss -ltnp` reports them."""
    out = subprocess.run(["ss", "-Hltnp"], capture_output=True, text=True, timeout=10).stdout
    found = set()
    for line in out.splitlines():
        fields = line.split()
        addr = fields[3].replace("[", "").replace("]", "").replace("*:", "0.0.0.0:")
        found |= {(int(pid), addr) for pid in re.findall(r"pid=(\d+)", line) if int(pid) in pids}
    return found


def test_every_listener_of_the_graph_is_on_loopback(served):
    pids = served_pids(served.h) | served.pids
    socks = listeners_of(pids)
    port = int(served.h.url.rsplit(":", 1)[1])
    frontend = served.h.component("frontend").proc.pid
    assert (frontend, f"127.0.0.1:{port}") in socks            # the scan does see our sockets
    system = {p for c in served.h.components for p in c.system_ports[: c.registers]}
    assert system <= {int(a.rsplit(":", 1)[1]) for _, a in socks}
    wide = [(pid, addr, Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")[:100])
            for pid, addr in socks if not is_loopback(addr)]
    assert not wide, wide
    if shutil.which("ss"):                                    # the same picture through ss -ltnp
        seen = ss_listeners(pids)
        assert (frontend, f"127.0.0.1:{port}") in seen
        assert all(is_loopback(addr) for _, addr in seen), seen


# ------------------------------------------------------------------ serving behaviours, per graph
def _ok(s: Served, path: str, body: dict) -> dict:
    status, resp = post(s.h.url + path, body)
    assert status == 200, resp
    return resp


def _text(resp: dict) -> str:
    choice = resp["choices"][0]
    return choice["text"] if "text" in choice else choice["message"]["content"]


def test_multi_block_prompt_matches_generate_token_for_token(served, refs):
    """A prompt of >= 5 KV blocks gives exactly the single-process tokens in every graph (so aggregated
    and disaggregated graphs agree token for token); in a disaggregated graph its KV moves from the
    prefill to the decode worker block for block: the bytes are exactly n_blocks x one block's."""
    m = served.h.model_name
    block = served.h.settings.engine.block_size
    decode = {wid: w[3] for wid, w in served.workers.items() if w[1] == "decode"}

    def moved(body: dict) -> tuple[dict, float]:
        before = {wid: metric_total(u, "dwdp_kv_transfer_bytes_total") for wid, u in decode.items()}
        resp = _ok(served, "/v1/completions", body)
        wid = resp["nvext"]["worker_id"]["decode_worker_id"]
        return resp, (metric_total(decode[wid], "dwdp_kv_transfer_bytes_total") - before[wid]) if decode else 0.0

    one, one_bytes = moved(completion_body(m, prompt="one block of kv", max_tokens=2))
    assert one["usage"]["prompt_tokens"] <= block
    resp, long_bytes = moved(completion_body(m, prompt=LONG_PROMPT))
    n_tokens = resp["usage"]["prompt_tokens"]
    assert n_tokens >= 5 * block, n_tokens
    assert _text(resp) == refs["long"]["text"]
    assert resp["usage"]["completion_tokens"] == MAX_TOKENS == len(refs["long"]["token_ids"])
    if served.disagg:
        assert one_bytes > 0
        assert long_bytes == one_bytes * -(-n_tokens // block), (long_bytes, one_bytes, n_tokens)


def test_seeded_sampling_equals_generate(served, refs):
    """temperature > 0 with a seed: the same tokens as the single-process engine, whatever the strategy."""
    resp = _ok(served, "/v1/completions", completion_body(served.h.model_name, **SEEDED))
    assert _text(resp) == refs["seeded"]["text"]
    greedy = refs["completion"]["text"]
    assert refs["seeded"]["text"] != greedy            # sampling really happened


def test_eos_ends_the_request(served, refs, eos_at):
    """The model's EOS token (made one in generation_config.json) ends the request through the server."""
    body = completion_body(served.h.model_name)
    body.pop("ignore_eos")
    resp = _ok(served, "/v1/completions", body)
    assert resp["choices"][0]["finish_reason"] == "stop", resp
    assert resp["usage"]["completion_tokens"] in (eos_at, eos_at + 1), (resp["usage"], eos_at)
    text = _text(resp)
    assert text and refs["completion"]["text"].startswith(text) and len(text) < len(refs["completion"]["text"])


def _stop_string(text: str) -> tuple[str, int]:
    """A 2-character stop string first occurring at k >= 1 of `text` (past its middle when it can), and k."""
    for k in [*range(len(text) // 2, len(text) - 1), *range(1, len(text) // 2)]:
        if text.find(text[k:k + 2]) == k and "\ufffd" not in text[k:k + 2]:
            return text[k:k + 2], k
    raise AssertionError(f"no usable stop string in {text!r}")


def test_stop_strings_are_honoured(served, refs):
    """A stop string ends the request before it, streaming or not. (Dynamo 1.6.1's frontend drops stop
    strings from a request with ignore_eos=true before any worker sees it, so the test leaves EOS on.)"""
    m = served.h.model_name
    body = completion_body(m)
    body.pop("ignore_eos")
    until_eos = _text(_ok(served, "/v1/completions", body))       # the text up to the model's EOS
    stop, k = _stop_string(until_eos)
    assert refs["completion"]["text"].startswith(until_eos)
    resp = _ok(served, "/v1/completions", dict(body, stop=[stop]))
    assert resp["choices"][0]["finish_reason"] == "stop" and _text(resp) == until_eos[:k], (stop, resp)
    res = stream(served.h.url + "/v1/completions", dict(body, stop=[stop]))
    assert res["status"] == 200 and res["done"] and not res["errors"], res
    assert stream_text(res) == until_eos[:k] and stream_finish(res) == "stop"


def test_no_max_tokens_and_max_tokens_exactly_filling_the_context(served):
    m, url = served.h.model_name, served.h.url + "/v1/completions"
    prompt = [(37 * i) % 250 + 5 for i in range(1000)]
    body = {"model": m, "prompt": prompt, "temperature": 0, "ignore_eos": True}
    unbounded = _ok(served, "/v1/completions", body)               # no max_tokens: up to the context
    n_prompt = unbounded["usage"]["prompt_tokens"]
    assert n_prompt >= 1000
    room = CONTEXT - n_prompt
    assert unbounded["choices"][0]["finish_reason"] == "length"
    assert unbounded["usage"]["completion_tokens"] == room
    exact = _ok(served, "/v1/completions", dict(body, max_tokens=room))
    assert exact["usage"]["completion_tokens"] == room and _text(exact) == _text(unbounded)
    status, err = post(url, dict(body, max_tokens=room + 1))
    assert status == 400 and f"max_tokens={room + 1}" in err["message"] and "context length" in err["message"], err


def test_streaming_over_the_context_is_an_error(served):
    """Not an empty 200 stream: an HTTP 400, or an SSE error event with code 400 and the reason."""
    m = served.h.model_name
    for path, body in (("/v1/completions", {"model": m, "prompt": "x " * 1500, "max_tokens": 4}),
                       ("/v1/chat/completions", {"model": m, "max_tokens": 4,
                                                 "messages": [{"role": "user", "content": "x " * 1500}]})):
        res = stream(served.h.url + path, body, timeout=30)
        assert res["exception"] is None, res
        assert res["errors"], f"{path}: no error for a prompt over the context: {res}"
        err = res["errors"][0]
        if res["status"] == 200:
            assert err.get("code") == 400 and "context length is 1024" in err.get("message", ""), res
        else:
            assert res["status"] == 400, res
        assert not [c for c in res["chunks"] if any(ch.get("text") or (ch.get("delta") or {}).get("content")
                                                    for ch in c.get("choices") or [])], res


def test_multibyte_text_split_across_streamed_chunks(served, refs):
    """Characters whose UTF-8 bytes come in several tokens stream intact: the chunks joined equal the
    non-streaming text and `dynamo-dwdp generate`'s one-shot decode."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(os.path.join(served.h.settings.model.path, "tokenizer.json"))
    ids = refs["multibyte"]["token_ids"]
    split = [j for j in range(len(ids) - 1) if "\ufffd" in tok.decode(ids[j:j + 1]) and any(
        ord(c) > 127 and c != "\ufffd" for c in tok.decode(ids[j:j + 3]))]
    assert split, "the reference output has no multi-token character: pick another MULTIBYTE_PROMPT"
    body = completion_body(served.h.model_name, prompt=MULTIBYTE_PROMPT, max_tokens=MULTIBYTE_TOKENS)
    whole = _text(_ok(served, "/v1/completions", body))
    res = stream(served.h.url + "/v1/completions", body)
    assert res["status"] == 200 and res["done"] and not res["errors"], res
    assert len(res["chunks"]) > 10                      # really streamed in pieces
    assert stream_text(res) == whole == refs["multibyte"]["text"]


def test_client_disconnect_frees_kv_blocks(served):
    """A client that drops its stream: the request is cancelled and every worker's KV gauge returns
    to idle (0 blocks), prefill holds included; the graph answers the next request."""
    import http.client

    h = served.h
    urls = [w[3] for w in served.workers.values()]
    assert wait_for(lambda: all(metric_total(u, "dwdp_kv_blocks_used") == 0 for u in urls), 10)
    generated0 = sum(metric_total(u, "dwdp_generated_tokens_total") for u in urls)
    conn = http.client.HTTPConnection(h.url.split("//")[1], timeout=60)
    conn.request("POST", "/v1/completions", body=json.dumps(
        {"model": h.model_name, "prompt": LONG_PROMPT + " disconnect", "max_tokens": 900, "temperature": 0,
         "ignore_eos": True, "stream": True}), headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    chunks = 0
    for line in resp:
        chunks += line.startswith(b"data:")
        if chunks >= 3:
            break
    # the gauges refresh every 50 ms of engine steps: wait for them (the request runs for 900 tokens)
    in_use = wait_for(lambda: sum(metric_total(u, "dwdp_kv_blocks_used") for u in urls), 10, 0.05)
    conn.sock.close()
    conn.close()
    assert in_use > 0                                   # the request held blocks while it streamed
    assert wait_for(lambda: all(metric_total(u, "dwdp_kv_blocks_used") == 0 and
                                metric_total(u, "dwdp_running_requests") == 0 for u in urls), 20, 0.2), \
        {u: metric_total(u, "dwdp_kv_blocks_used") for u in urls}
    assert sum(metric_total(u, "dwdp_generated_tokens_total") for u in urls) - generated0 < 900   # cut short
    status, body = post(h.url + "/v1/completions", completion_body(h.model_name))
    assert status == 200 and _text(body) == _completion(served)["choices"][0]["text"]


def test_a_killed_dep_or_tp_rank_restarts_its_group_and_serving_resumes(served):
    """Last test of each graph (it replaces the decode group's processes). DEP and TP need all their
    ranks: a killed rank (the TP follower, a DEP peer) ends the requests in flight with an error, no
    hang; the group supervisor restarts the whole group, which re-forms through the rendezvous, and
    requests succeed again within 60 s; the new ranks report the time to recovery."""
    pool = next((p for p in served.h.graph.pools if p.role == "decode"), None)
    if pool is None or pool.strategy not in ("dep", "tp"):
        pytest.skip("no DEP/TP group in this graph (DWDP groups: tests/launch/test_serve_recovery.py)")
    h = served.h
    comp = h.component("decode-g0")
    out = subprocess.run(["pgrep", "-P", str(comp.proc.pid)], capture_output=True, text=True, timeout=10).stdout
    victim = next(pid for pid in map(int, out.split())
                  if open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")[-3:-1] == [b"--group-rank", b"1"])
    res: dict = {}
    started = threading.Event()
    body = completion_body(h.model_name, max_tokens=900)
    t = threading.Thread(target=lambda: res.update(stream(h.url + "/v1/completions", body, timeout=60,
                                                          on_chunk=lambda c: started.set())), daemon=True)
    t.start()
    assert started.wait(60)
    os.kill(victim, signal.SIGKILL)
    t_kill = time.monotonic()
    t.join(90)
    assert not t.is_alive(), "the in-flight request hung"
    assert res["errors"] or res["exception"] or stream_finish(res) != "length", res

    def serves() -> bool:
        status, body = post(h.url + "/v1/completions", completion_body(h.model_name), timeout=30)
        return status == 200 and body["choices"][0]["text"] == _completion(served)["choices"][0]["text"]

    assert wait_for(lambda: all(serves() for _ in range(3)), 60, 0.5), "no recovery within 60 s"
    assert time.monotonic() - t_kill < 70
    assert comp.alive and not h.dead_components()
    log = Path(comp.log_path).read_text(errors="replace")
    assert "restarting all 2 ranks" in log
    rank0 = f"http://{h.infra.host}:{comp.system_ports[0]}/metrics"
    seconds = metric_samples(rank0, "dwdp_group_recovery_seconds")
    assert seconds and 0 < seconds[0][1] < 60, seconds
