"""Workload files (`configs/workloads/*.yaml`) and deterministic request generation for `dynamo-dwdp ab`.

Schema (every key; defaults in brackets)::

    name: tiny-cv20                 # label in reports (required)
    description: "..."              # one line [""]
    endpoint: completions           # completions | chat  [completions]
    prompt_format: tokens           # tokens: prompt sent as a list of token ids -> exact ISL (completions
                                    #   only; needs the model's tokenizer.json)
                                    # text: word-list text; ISL approximate, the real one is read back
                                    #   from usage.prompt_tokens  [tokens]
    isl: {mean: 64, cv: 0.2, dist: lognormal, min: 1, max: null}   # input tokens per request
    osl: {mean: 16, cv: 0.0, dist: lognormal, min: 2, max: null}   # output tokens per request
    load:
      concurrency: [1, 2, 4]        # closed loop: this many requests in flight (a sweep)
      request_rate: null            # or open loop: requests/s (a sweep); exactly one of the two
      arrival: poisson              # poisson | constant  (request_rate only)
      max_concurrency: null         # cap on in-flight requests in request_rate mode (null = none)
      scale: total                  # total | per_gpu: per_gpu multiplies each value by the graph's GPUs
    requests_per_point: 32          # measured requests per point
    requests_per_concurrency: 0     # n = max(requests_per_point, this x concurrency) (recipes use 10)
    warmup_requests: 4              # sent once per graph before the sweep, not measured
    shared_prefix_ratio: 0.0        # fraction of every prompt that is one common prefix (0 <= r < 1)
    expert_skew: null               # {hot_experts: [0, 1] or a count, bias: 2.0}; see skew_overrides()
    slo: {ttft_ms: null, tpot_ms: null}   # goodput: a request is good if it meets both (null = no bound)
    seed: 0                         # same seed => the same requests for every graph
    ignore_eos: true                # send ignore_eos + min_tokens = max_tokens, so OSL is exact
    request_timeout_s: 120          # one request may take at most this long
    point_timeout_s: 1800           # one sweep point may take at most this long
    plan_gpu: h200                  # machine model for the planner's predicted column (null = none)

Length distributions (`isl`, `osl`): `cv` is the coefficient of variation (std / mean). `cv: 0` gives
every request exactly `mean`. `dist: lognormal` draws exp(N(mu, s^2)) with s^2 = ln(1 + cv^2) and
mu = ln(mean) - s^2/2, so the *unclipped* distribution has exactly that mean and CV; `dist: normal`
draws N(mean, (cv*mean)^2). Draws are rounded to integers and clipped to [min, max] (clipping moves
the realised mean/CV slightly; the report shows the realised values).

Determinism: requests come from numpy's PCG64 seeded with `(seed, crc32(stream))`, where the stream is
the point's label (e.g. `c4`) or `warmup`. The same workload therefore sends the same prompts, in the
same order, to graph A and graph B, and different points get different (uncached) prompts. Prompts
are built from the words of the packaged corpus (`dynamo_dwdp/assets/corpus.txt`). The shared prefix
is one fixed word stream (stream `shared-prefix`); request i uses its first round(r * isl_i) tokens.
"""
from __future__ import annotations

import math
import re
import zlib
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Iterator, Protocol

import numpy as np

from dynamo_dwdp.config import schema
from dynamo_dwdp.config.schema import REQUIRED, spec
from dynamo_dwdp.config.settings import load_settings, read_yaml
from dynamo_dwdp.errors import ConfigError, UserError

NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"
NAME_TEXT = "1-64 chars of letters, digits, '.', '_' and '-'"


# ----------------------------------------------------------------------------------------- schema


@dataclass(frozen=True, kw_only=True)
class LengthDist:
    """A token-length distribution: mean, coefficient of variation, shape, clip range."""

    mean: int = spec(REQUIRED, doc="mean length in tokens", min=1, max=1_000_000)
    cv: float = spec(0.0, doc="coefficient of variation (std / mean); 0 = every request exactly `mean`",
                     min=0.0, max=3.0)
    dist: str = spec("lognormal", doc="shape of the distribution", choices=("lognormal", "normal"))
    min: int = spec(1, doc="clip: shortest length", min=1)
    max: int | None = spec(None, doc="clip: longest length (null = no upper clip)", min=1)

    def _problems(self) -> Iterator[tuple[str, str]]:
        if self.min > self.mean:
            yield "min", f"{self.min} is above mean {self.mean} (allowed: min <= mean)"
        if self.max is not None and self.max < self.mean:
            yield "max", f"{self.max} is below mean {self.mean} (allowed: max >= mean, or null)"

    def sample(self, rng: np.random.Generator, n: int) -> list[int]:
        """n integer lengths (see the module docstring for the exact law)."""
        if n <= 0:
            return []
        if self.cv == 0:
            raw = np.full(n, float(self.mean))
        elif self.dist == "lognormal":
            s2 = math.log1p(self.cv ** 2)
            raw = rng.lognormal(mean=math.log(self.mean) - s2 / 2, sigma=math.sqrt(s2), size=n)
        else:
            raw = rng.normal(loc=self.mean, scale=self.cv * self.mean, size=n)
        hi = self.max if self.max is not None else np.inf
        return [int(v) for v in np.clip(np.rint(raw), self.min, hi)]


@dataclass(frozen=True, kw_only=True)
class LoadSpec:
    """The sweep: closed-loop concurrency values or open-loop request rates."""

    concurrency: list[int] | None = spec(None, doc="in-flight requests per point (a sweep)", min=1, max=100_000)
    request_rate: list[float] | None = spec(None, doc="requests per second per point (a sweep)", min=1e-6)
    arrival: str = spec("poisson", doc="inter-arrival law in request_rate mode", choices=("poisson", "constant"))
    max_concurrency: int | None = spec(None, doc="request_rate mode: most requests in flight (null = no cap)",
                                       min=1)
    scale: str = spec("total", doc="total = values as written; per_gpu = value x the graph's GPUs",
                      choices=("total", "per_gpu"))

    def _problems(self) -> Iterator[tuple[str, str]]:
        if (self.concurrency is None) == (self.request_rate is None):
            yield "", "set exactly one of concurrency and request_rate (allowed: a non-empty list for one of them)"
        for key in ("concurrency", "request_rate"):
            values = getattr(self, key)
            if values is not None and not values:
                yield key, "must not be empty (allowed: a non-empty list)"
            elif values is not None and len(set(values)) != len(values):
                yield key, f"{values} repeats a value (allowed: distinct values)"


@dataclass(frozen=True, kw_only=True)
class ExpertSkew:
    """Routing skew for random models: a selection bias added to the router scores of hot experts."""

    hot_experts: Any = spec(REQUIRED, doc="expert ids (a list), or a count n = experts 0..n-1")
    bias: float = spec(REQUIRED, doc="added to the hot experts' selection scores (0 = no skew)", min=-100, max=100)

    def _problems(self) -> Iterator[tuple[str, str]]:
        h = self.hot_experts
        if isinstance(h, bool) or not (isinstance(h, int) or (isinstance(h, list) and all(
                isinstance(e, int) and not isinstance(e, bool) for e in h))):
            yield "hot_experts", f"{h!r} is not a list of expert ids or a count (allowed: e.g. [0, 3] or 2)"
        elif isinstance(h, int) and h < 0:
            yield "hot_experts", f"{h} is negative (allowed: a count >= 0)"
        elif isinstance(h, list) and (any(e < 0 for e in h) or len(set(h)) != len(h)):
            yield "hot_experts", f"{h} has negative or repeated ids (allowed: distinct ids >= 0)"

    def expert_ids(self, n_experts: int | None = None) -> list[int]:
        """The hot expert ids; a count means experts 0..count-1 (all in the first EP shard: DEP's worst
        case). With `n_experts` known, ids must be below it."""
        ids = list(range(self.hot_experts)) if isinstance(self.hot_experts, int) else list(self.hot_experts)
        if n_experts is not None and any(e >= n_experts for e in ids):
            raise ConfigError(f"expert_skew.hot_experts: {ids} names an expert >= n_routed_experts = {n_experts} "
                              f"(allowed: ids 0..{n_experts - 1})")
        return ids


@dataclass(frozen=True, kw_only=True)
class Slo:
    """Service-level objectives for goodput (DistServe): both must hold for a request to count."""

    ttft_ms: float | None = spec(None, doc="time to first token bound, ms (null = no bound)", min=0)
    tpot_ms: float | None = spec(None, doc="time per output token bound, ms (null = no bound)", min=0)


@dataclass(frozen=True, kw_only=True)
class Workload:
    """One benchmark workload: request shapes, the load sweep, SLOs and the seed."""

    name: str = spec(REQUIRED, doc="label in reports", pattern=NAME_PATTERN, pattern_text=NAME_TEXT)
    description: str = spec("", doc="one line for humans")
    endpoint: str = spec("completions", doc="OpenAI route", choices=("completions", "chat"))
    prompt_format: str = spec("tokens", doc="tokens = token-id prompt (exact ISL, completions only); "
                                            "text = word-list text (ISL approximate)", choices=("tokens", "text"))
    isl: LengthDist = spec(REQUIRED, doc="input length distribution (tokens)")
    osl: LengthDist = spec(REQUIRED, doc="output length distribution (tokens)")
    load: LoadSpec = spec(REQUIRED, doc="the sweep")
    requests_per_point: int = spec(32, doc="measured requests per point", min=1, max=10_000_000)
    requests_per_concurrency: int = spec(0, doc="n = max(requests_per_point, this x concurrency)", min=0)
    warmup_requests: int = spec(4, doc="requests sent once per graph before the sweep (not measured)", min=0)
    shared_prefix_ratio: float = spec(0.0, doc="fraction of each prompt that is a common prefix", min=0.0,
                                      max=0.95)
    expert_skew: ExpertSkew | None = spec(None, doc="expert-routing skew passed to the graph's engines")
    slo: Slo = spec(factory=Slo, doc="goodput SLOs")
    seed: int = spec(0, doc="request generation seed", min=0, max=2**32 - 1)
    ignore_eos: bool = spec(True, doc="ignore EOS and force min_tokens = max_tokens (exact OSL)")
    request_timeout_s: float = spec(120.0, doc="per-request wall-clock limit, s", min=0.001)
    point_timeout_s: float = spec(1800.0, doc="per-point wall-clock limit, s", min=0.001)
    plan_gpu: str | None = spec("h200", doc="machine model of the planner's predicted column (null = none)")
    source: str = schema.internal("")

    def _problems(self) -> Iterator[tuple[str, str]]:
        if self.prompt_format == "tokens" and self.endpoint != "completions":
            yield "prompt_format", ("tokens needs endpoint completions (chat applies a template to text; "
                                    "allowed with chat: text)")
        if self.load.request_rate is not None and self.requests_per_concurrency:
            yield "requests_per_concurrency", "only applies to load.concurrency (allowed here: 0)"

    @property
    def mode(self) -> str:
        """`concurrency` or `request_rate`."""
        return "concurrency" if self.load.concurrency is not None else "request_rate"

    def to_dict(self) -> dict:
        return schema.to_dict(self)

    def points(self, num_gpus: int = 1) -> list["LoadPoint"]:
        """The sweep points for a graph with `num_gpus` GPUs (only `scale: per_gpu` uses it)."""
        k = max(1, int(num_gpus)) if self.load.scale == "per_gpu" else 1
        suffix = "pg" if self.load.scale == "per_gpu" else ""
        out = []
        if self.load.concurrency is not None:
            for c in self.load.concurrency:
                conc = c * k
                n = max(self.requests_per_point, self.requests_per_concurrency * conc)
                out.append(LoadPoint(label=f"c{c}{suffix}", value=float(c), concurrency=conc, request_rate=None,
                                     num_requests=n))
        else:
            for r in self.load.request_rate:
                out.append(LoadPoint(label=f"r{r:g}{suffix}", value=float(r), concurrency=self.load.max_concurrency,
                                     request_rate=r * k, num_requests=self.requests_per_point))
        return out


@dataclass(frozen=True)
class LoadPoint:
    """One point of the sweep. `label` names it in files and reports and seeds its requests."""

    label: str
    value: float  # the value as written in the workload (before per_gpu scaling)
    concurrency: int | None  # closed-loop in-flight requests, or the cap in request_rate mode
    request_rate: float | None  # open-loop requests/s (already scaled)
    num_requests: int


def load_workload(path: str | Path) -> Workload:
    """Read and validate a workload file; errors name the file, the key and what is allowed."""
    label = str(path)
    data = read_yaml(path)
    wl = schema.build(Workload, data, where=label)
    object.__setattr__(wl, "source", label)
    return wl


def workload_from_dict(data: dict, label: str = "workload") -> Workload:
    wl = schema.build(Workload, data, where=label)
    object.__setattr__(wl, "source", label)
    return wl


def skew_overrides(workload: Workload, n_experts: int | None = None) -> dict | None:
    """The launch override that carries the workload's expert skew to every engine of the graph.

    `{"expert_skew": {"hot_experts": [ids], "bias": b}}`: the launcher (`serve_graph`) turns it into
    the workers' `DWDP_EXPERT_SKEW=e1,e2,...:bias`, which the engine applies with
    `ModelRunner.set_expert_skew` (a selection bias of the random router). None when the workload
    has no skew (or a zero bias), so graphs launch with their own settings.
    """
    skew = workload.expert_skew
    if skew is None or skew.bias == 0:
        return None
    ids = skew.expert_ids(n_experts)
    if not ids:
        return None
    return {"expert_skew": {"hot_experts": ids, "bias": float(skew.bias)}}


# ------------------------------------------------------------------------------------- requests


class Tokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class HFTokenizer:
    """A `tokenizer.json` (HF `tokenizers`) without special tokens: what the frontend would count."""

    def __init__(self, path: str | Path):
        from tokenizers import Tokenizer as _Tok

        self.path = str(path)
        try:
            self._tok = _Tok.from_file(self.path)
        except Exception as e:  # noqa: BLE001 - any parse failure is a user-facing file problem
            raise UserError(f"{path}: cannot load tokenizer ({e.__class__.__name__}: {e})") from None

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)


def load_tokenizer(model_dir: str | Path) -> HFTokenizer | None:
    """The model directory's tokenizer.json, or None when there is none."""
    p = Path(model_dir) / "tokenizer.json"
    return HFTokenizer(p) if p.is_file() else None


@dataclass(frozen=True)
class Request:
    """One generated request. `prompt` is a token-id list (prompt_format tokens) or text."""

    index: int
    prompt: list[int] | str
    isl: int  # target input length (exact for token prompts)
    osl: int  # max_tokens (and min_tokens when ignore_eos)
    prefix_len: int  # tokens (or words, text without tokenizer) of the shared prefix


@lru_cache(maxsize=1)
def corpus_words() -> tuple[str, ...]:
    """Distinct lower-case words of the packaged corpus, in first-seen order (the prompt vocabulary)."""
    text = resources.files("dynamo_dwdp").joinpath("assets/corpus.txt").read_text(encoding="utf-8")
    seen: dict[str, None] = {}
    for w in re.findall(r"[a-z]+", text.lower()):
        seen.setdefault(w, None)
    return tuple(seen)


def stream_rng(seed: int, stream: str) -> np.random.Generator:
    """The generator of one named stream of a workload (independent of every other stream)."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), zlib.crc32(stream.encode())])))


def _words(rng: np.random.Generator, n: int) -> list[str]:
    vocab = corpus_words()
    return [vocab[i] for i in rng.integers(0, len(vocab), size=n)]


def _token_run(rng: np.random.Generator, n: int, tokenizer: Tokenizer) -> list[int]:
    """Exactly n token ids of random corpus words (extended until long enough, then cut)."""
    if n <= 0:
        return []
    ids: list[int] = []
    while len(ids) < n:
        need = n - len(ids)
        ids.extend(tokenizer.encode(" " + " ".join(_words(rng, need))))
    return ids[:n]


def generate_requests(workload: Workload, count: int, stream: str,
                      tokenizer: Tokenizer | None = None) -> list[Request]:
    """`count` requests of one stream (a point label or `warmup`); same inputs => same requests.

    prompt_format tokens: each prompt is exactly `isl` token ids, its first round(r * isl) ids
    taken from the shared prefix. text: with a tokenizer the same ids are decoded to text (ISL then
    approximate after re-tokenisation); without one each word stands for one token.
    """
    if workload.prompt_format == "tokens" and tokenizer is None:
        raise UserError(f"{workload.source or workload.name}: prompt_format tokens needs the model's "
                        "tokenizer.json (allowed without one: prompt_format text)")
    rng = stream_rng(workload.seed, stream)
    isls = workload.isl.sample(rng, count)
    osls = workload.osl.sample(rng, count)
    ratio = workload.shared_prefix_ratio
    prefix_lens = [int(round(ratio * n)) for n in isls]
    longest_prefix = max(prefix_lens, default=0)
    prefix_rng = stream_rng(workload.seed, "shared-prefix")
    if tokenizer is not None:
        prefix = _token_run(prefix_rng, longest_prefix, tokenizer)
    else:
        prefix = _words(prefix_rng, longest_prefix)
    out = []
    for i, (isl, osl, k) in enumerate(zip(isls, osls, prefix_lens)):
        if tokenizer is not None:
            ids = prefix[:k] + _token_run(rng, isl - k, tokenizer)
            prompt: list[int] | str = ids if workload.prompt_format == "tokens" else tokenizer.decode(ids)
        else:
            prompt = " ".join(list(prefix[:k]) + _words(rng, isl - k))
        out.append(Request(index=i, prompt=prompt, isl=isl, osl=osl, prefix_len=k))
    return out


def model_dir_from_configs(config_paths: list[str]) -> Path | None:
    """`model.path` of the merged settings files (None when they cannot be read)."""
    if not config_paths:
        return None
    return Path(load_settings(list(config_paths)).model.path)
