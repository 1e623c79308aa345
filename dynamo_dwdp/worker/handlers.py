"""Dynamo request dict <-> engine, per role. Pure translation, no engine state.

Request (the frontend's PreprocessedRequest): token_ids, sampling_options, stop_conditions,
eos_token_ids, prefill_result (decode), ... Output chunks: {"token_ids": [new ids], "index": 0},
the last one with "finish_reason" and "completion_usage". Unsupported sampling options are refused
with a message (never silently ignored).
"""
from __future__ import annotations

from typing import Any

from dynamo_dwdp.engine.sampling import SamplingParams
from dynamo_dwdp.engine.sequence import RequestOutput
from dynamo_dwdp.errors import RequestError

# Frontend finish reasons: eos and stop both end as "stop" for the client.
FINISH_REASONS = {"eos": "eos", "stop": "stop", "length": "length", "cancelled": "cancelled", "error": "error",
                  "abort": "cancelled"}

_NEUTRAL = {"presence_penalty": 0.0, "frequency_penalty": 0.0, "repetition_penalty": 1.0, "n": 1, "best_of": 1,
            "min_p": 0.0, "use_beam_search": False}


def sampling_from_request(request: dict[str, Any], max_model_len: int) -> SamplingParams:
    so = request.get("sampling_options") or {}
    sc = request.get("stop_conditions") or {}
    for key, neutral in _NEUTRAL.items():
        value = so.get(key)
        if value is not None and value != neutral:
            raise RequestError(f"{key}={value!r} is not supported by this engine (supported: temperature, top_p, "
                               "top_k, seed, max_tokens, min_tokens, stop, stop_token_ids, ignore_eos)")
    if so.get("guided_decoding"):
        raise RequestError("guided decoding is not supported by this engine")
    oo = request.get("output_options") or {}
    for key in ("logprobs", "prompt_logprobs"):
        if oo.get(key) is not None:
            raise RequestError(f"{key}={oo[key]!r} is not supported by this engine (it returns no log-probabilities; "
                               "leave logprobs, top_logprobs and echo out)")
    prompt_len = len(request.get("token_ids") or [])
    max_tokens = sc.get("max_tokens")
    if max_tokens is None:
        max_tokens = max(1, max_model_len - prompt_len)
    elif prompt_len < max_model_len < prompt_len + int(max_tokens):
        raise RequestError(f"max_tokens={max_tokens} plus the prompt's {prompt_len} tokens exceed the context length "
                           f"{max_model_len} (allowed: max_tokens <= {max_model_len - prompt_len})")
    stop_ids: list[int] = []
    for key in ("stop_token_ids", "stop_token_ids_hidden", "stop_token_ids_visible"):
        stop_ids += list(sc.get(key) or [])
    temperature = so.get("temperature")
    top_k = so.get("top_k")
    params = SamplingParams(
        max_tokens=int(max_tokens),
        temperature=1.0 if temperature is None else float(temperature),
        top_k=0 if top_k is None else int(top_k),
        top_p=1.0 if so.get("top_p") is None else float(so["top_p"]),
        seed=so.get("seed"),
        min_tokens=int(sc.get("min_tokens") or 0),
        stop_token_ids=tuple(int(t) for t in stop_ids),
        ignore_eos=bool(sc.get("ignore_eos") or False),
        eos_token_ids=tuple(request.get("eos_token_ids") or ()),
    )
    return params


def chunk_from_output(out: RequestOutput) -> dict[str, Any]:
    chunk: dict[str, Any] = {"token_ids": list(out.new_token_ids), "index": 0}
    if out.finished:
        chunk["finish_reason"] = FINISH_REASONS.get(out.finish_reason or "", "stop")
        chunk["completion_usage"] = usage(out)
    return chunk


def usage(out: RequestOutput) -> dict[str, Any]:
    u: dict[str, Any] = {"prompt_tokens": out.num_prompt_tokens, "completion_tokens": out.num_output_tokens,
                         "total_tokens": out.num_prompt_tokens + out.num_output_tokens}
    if out.num_cached_tokens:
        u["prompt_tokens_details"] = {"cached_tokens": out.num_cached_tokens}
    return u


def prefill_params(request: dict[str, Any]) -> dict[str, Any]:
    """Decode role: the prefill worker's disaggregated_params, or a RequestError saying what is missing."""
    pr = request.get("prefill_result") or {}
    dp = pr.get("disaggregated_params")
    if not isinstance(dp, dict) or not dp:
        raise RequestError("decode worker got no prefill_result.disaggregated_params (is a prefill pool running?)")
    return dp
