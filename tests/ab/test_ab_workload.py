"""Workload files and deterministic request generation.

References: the distributions' definitions (sample mean/CV of many draws against the configured
values), equality of independently generated request lists, the real offline tokenizer (exact ISL
re-counted by encoding), and the one-line error contract of dynamo_dwdp.errors.
"""
from __future__ import annotations

import math
import statistics
from pathlib import Path

import numpy as np
import pytest

from dynamo_dwdp.ab.workload import (HFTokenizer, LengthDist, corpus_words, generate_requests, load_workload,
                                        skew_overrides, workload_from_dict)
from dynamo_dwdp.errors import ConfigError, UserError
from dynamo_dwdp.synthetic.tokenizer import write_tokenizer_files

REPO = Path(__file__).resolve().parents[2]
WORKLOADS = sorted((REPO / "configs" / "workloads").glob("*.yaml"))


def wl(**kw):
    data = {"name": "t", "isl": {"mean": 40}, "osl": {"mean": 8}, "load": {"concurrency": [1, 4]}}
    data.update(kw)
    return workload_from_dict(data)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    write_tokenizer_files(d, 1024, 2048)
    return HFTokenizer(d / "tokenizer.json")


def test_shipped_workloads_load():
    names = {p.stem for p in WORKLOADS}
    assert {"tiny-cv0", "tiny-cv10", "tiny-cv20", "tiny-cv30", "ci-smoke", "gpu-isl8k"} <= names
    for p in WORKLOADS:
        w = load_workload(p)
        assert w.name == p.stem
        assert w.points(2)
    cvs = {p.stem: load_workload(p).isl.cv for p in WORKLOADS if p.stem.startswith("tiny-cv")}
    assert cvs == {"tiny-cv0": 0.0, "tiny-cv10": 0.1, "tiny-cv20": 0.2, "tiny-cv30": 0.3}


@pytest.mark.parametrize("patch, match", [
    ({"isl": {"mean": 40, "cvv": 0.1}}, r"isl\.cvv: unknown key 'cvv' \(did you mean 'cv'\?"),
    ({"load": {"concurrency": [1], "request_rate": [2.0]}}, "exactly one of concurrency and request_rate"),
    ({"load": {}}, "exactly one of concurrency and request_rate"),
    ({"load": {"concurrency": []}}, r"load\.concurrency: must not be empty"),
    ({"load": {"concurrency": [2, 2]}}, "repeats a value"),
    ({"load": {"concurrency": [0]}}, r"load\.concurrency\[0\]: 0 is out of range"),
    ({"endpoint": "chat"}, "prompt_format: tokens needs endpoint completions"),
    ({"isl": {"mean": 40, "min": 50}}, r"isl\.min: 50 is above mean 40"),
    ({"osl": {"mean": 8, "max": 4}}, r"osl\.max: 4 is below mean 8"),
    ({"isl": {"mean": 40, "dist": "gamma"}}, r"isl\.dist: 'gamma' is not one of lognormal, normal"),
    ({"expert_skew": {"hot_experts": "many", "bias": 1.0}}, r"expert_skew\.hot_experts: 'many' is not a list"),
    ({"expert_skew": {"hot_experts": [1, 1], "bias": 1.0}}, "negative or repeated ids"),
    ({"shared_prefix_ratio": 1.0}, "shared_prefix_ratio: 1.0 is out of range"),
])
def test_schema_errors_are_one_clear_line(patch, match):
    with pytest.raises(ConfigError, match=match) as e:
        wl(**patch)
    assert "\n" not in str(e.value) and str(e.value).startswith("workload: ")


def test_bad_file_names_the_file(tmp_path):
    p = tmp_path / "w.yaml"
    p.write_text("name: x\nisl: {mean: 4}\nosl: {mean: 2}\nload: {concurrency: [1]}\nseed: -1\n")
    with pytest.raises(ConfigError, match=rf"{p}: seed: -1 is out of range"):
        load_workload(p)


def test_points_and_per_gpu_scaling():
    w = wl(load={"concurrency": [1, 4], "scale": "per_gpu"}, requests_per_point=5, requests_per_concurrency=3)
    pts = w.points(num_gpus=3)
    assert [(p.label, p.concurrency, p.num_requests) for p in pts] == [("c1pg", 3, 9), ("c4pg", 12, 36)]
    r = wl(load={"request_rate": [0.5, 2.0], "max_concurrency": 4}).points(7)
    assert [(p.label, p.request_rate, p.concurrency) for p in r] == [("r0.5", 0.5, 4), ("r2", 2.0, 4)]


@pytest.mark.parametrize("dist", ["lognormal", "normal"])
@pytest.mark.parametrize("cv", [0.1, 0.2, 0.3])
def test_length_distribution_mean_and_cv(dist, cv):
    d = LengthDist(mean=1000, cv=cv, dist=dist, min=1, max=None)
    xs = d.sample(np.random.default_rng(1), 20000)
    m = statistics.fmean(xs)
    s = statistics.pstdev(xs)
    # 20000 draws: the sample mean is within ~4 standard errors (cv*mean/sqrt(n) ~ 2); the CV within 4%
    assert abs(m - 1000) < 4 * cv * 1000 / math.sqrt(len(xs)) + 1
    assert abs(s / m - cv) < 0.04 * cv + 0.002
    if dist == "lognormal":
        assert min(xs) > 0 and statistics.median(xs) < m  # right-skewed


def test_cv_zero_and_clipping():
    assert LengthDist(mean=17).sample(np.random.default_rng(0), 5) == [17] * 5
    xs = LengthDist(mean=100, cv=1.0, min=60, max=130).sample(np.random.default_rng(0), 2000)
    assert min(xs) == 60 and max(xs) == 130 and all(isinstance(x, int) for x in xs)


def test_same_seed_same_requests_for_every_graph(tokenizer):
    w = wl(isl={"mean": 40, "cv": 0.3}, osl={"mean": 8, "cv": 0.2}, shared_prefix_ratio=0.5)
    a = generate_requests(w, 20, "c4", tokenizer)
    b = generate_requests(w, 20, "c4", tokenizer)
    assert a == b
    assert generate_requests(w, 20, "c1", tokenizer) != a  # another point: other prompts (no cache reuse)
    assert generate_requests(wl(seed=1, isl={"mean": 40, "cv": 0.3}, osl={"mean": 8, "cv": 0.2},
                                shared_prefix_ratio=0.5), 20, "c4", tokenizer) != a
    # a longer list of the same stream starts with the same lengths (per_gpu graphs differ only in n)
    assert [r.isl for r in generate_requests(w, 30, "c4", tokenizer)][:20] == [r.isl for r in a]


def test_token_prompts_have_exact_isl_and_the_shared_prefix(tokenizer):
    w = wl(isl={"mean": 50, "cv": 0.3, "min": 10}, shared_prefix_ratio=0.4)
    reqs = generate_requests(w, 25, "c1", tokenizer)
    longest = max(r.prefix_len for r in reqs)
    for r in reqs:
        assert isinstance(r.prompt, list) and len(r.prompt) == r.isl
        assert r.prefix_len == round(0.4 * r.isl)
        assert all(0 <= t < 1024 for t in r.prompt)
    # every prompt starts with the same prefix (the first prefix_len ids of one common sequence)
    ref = next(r for r in reqs if r.prefix_len == longest).prompt[:longest]
    for r in reqs:
        assert r.prompt[:r.prefix_len] == ref[:r.prefix_len]
    # and the unique tails differ
    tails = {tuple(r.prompt[r.prefix_len:r.prefix_len + 5]) for r in reqs}
    assert len(tails) == len(reqs)


def test_text_prompts_with_and_without_tokenizer(tokenizer):
    w = wl(prompt_format="text", endpoint="chat", isl={"mean": 60})
    with_tok = generate_requests(w, 5, "c1", tokenizer)
    for r in with_tok:
        assert isinstance(r.prompt, str)
        assert abs(len(tokenizer.encode(r.prompt)) - r.isl) <= 0.15 * r.isl  # approximate after decoding
    no_tok = generate_requests(w, 5, "c1", None)
    vocab = set(corpus_words())
    for r in no_tok:
        words = r.prompt.split()
        assert len(words) == r.isl and set(words) <= vocab


def test_tokens_without_a_tokenizer_is_a_user_error():
    with pytest.raises(UserError, match="tokenizer.json"):
        generate_requests(wl(), 2, "c1", None)


def test_skew_overrides():
    assert skew_overrides(wl()) is None
    assert skew_overrides(wl(expert_skew={"hot_experts": [3, 1], "bias": 0.0})) is None
    assert skew_overrides(wl(expert_skew={"hot_experts": 3, "bias": 2.0})) == \
        {"expert_skew": {"hot_experts": [0, 1, 2], "bias": 2.0}}
    assert skew_overrides(wl(expert_skew={"hot_experts": [5, 9], "bias": -1})) == \
        {"expert_skew": {"hot_experts": [5, 9], "bias": -1.0}}
    with pytest.raises(ConfigError, match="n_routed_experts = 8"):
        skew_overrides(wl(expert_skew={"hot_experts": [9], "bias": 1.0}), n_experts=8)
