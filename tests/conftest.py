"""Shared fixtures: tiny random DeepSeek-V3 checkpoints written by transformers (the independent
reference), cached once per test session, plus small helpers to run this project's engine in-process.

Random init (chosen so that fp32 comparisons are meaningful and greedy argmax is not a coin toss):
norm weights 1 + N(0, 0.05); embeddings N(0, 1); every projection N(0, 1/fan_in);
`e_score_correction_bias` N(0, 0.1) (so the noaux_tc bias really changes the routing);
lm_head N(0, 4/H) (logit std ~2, so top-1/top-2 gaps are far above fp32 rounding noise).
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)
os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")

REPO = Path(__file__).resolve().parents[1]
PY = str(REPO / ".venv" / "bin" / "python") if (REPO / ".venv" / "bin" / "python").exists() else sys.executable

# A small base config (transformers DeepseekV3Config keyword arguments). Tests override fields.
BASE = dict(
    vocab_size=384, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
    num_hidden_layers=3, first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4,
    n_routed_experts=16, num_experts_per_tok=4, n_shared_experts=1, n_group=4, topk_group=2,
    routed_scaling_factor=2.5, norm_topk_prob=True,
    q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
    max_position_embeddings=256, bos_token_id=0, eos_token_id=1, pad_token_id=2,
    num_mtp_layers=0, tie_word_embeddings=False,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
)

# Configs used by the strategy tests: heads, dense and expert widths divisible by 2 and 3 (tp2/tp3),
# 16 experts (uneven on 3 ranks), 3 MoE layers (so DWDP's two prefetch slots wrap around).
STRATEGY_CFG = dict(BASE, hidden_size=48, num_attention_heads=6, num_key_value_heads=6, intermediate_size=96,
                    moe_intermediate_size=24, num_hidden_layers=4, q_lora_rank=24, kv_lora_rank=24)


def hf_config(**overrides):
    from transformers import DeepseekV3Config

    kw = dict(BASE)
    kw.update(overrides)
    return DeepseekV3Config(**kw)


@torch.no_grad()
def randomize(model, seed: int) -> None:
    """Deterministic, well-conditioned random weights (see module docstring)."""
    g = torch.Generator().manual_seed(seed)
    H = model.config.hidden_size
    for name, p in sorted(model.named_parameters()) + sorted(model.named_buffers()):
        if not p.is_floating_point() or p.numel() == 0 or "rotary_emb" in name:
            continue
        noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
        if name.endswith("e_score_correction_bias"):
            val = 0.1 * noise
        elif p.dim() == 1:                                   # RMSNorm weights
            val = 1.0 + 0.05 * noise
        elif name.endswith("embed_tokens.weight"):
            val = noise
        elif name.endswith("lm_head.weight"):
            val = noise * (2.0 / math.sqrt(H))
        else:                                                # [.., out, in] projections (fused experts too)
            val = noise / math.sqrt(p.shape[-1])
        p.copy_(val.to(p.dtype))


def build_hf_model(seed: int = 0, **overrides):
    from transformers import DeepseekV3ForCausalLM

    cfg = hf_config(**overrides)
    torch.manual_seed(seed)
    model = DeepseekV3ForCausalLM(cfg).eval().float()
    randomize(model, seed)
    return model


class CheckpointFactory:
    """Writes (once per session) and returns model directories; keeps the HF reference models."""

    def __init__(self, root: Path):
        self.root = root
        self._cache: dict[str, tuple[Path, object]] = {}
        self._lock = threading.Lock()

    def __call__(self, name: str, seed: int = 0, fused: bool = False, **overrides) -> tuple[Path, object]:
        key = json.dumps([name, seed, fused, overrides], sort_keys=True, default=str)
        with self._lock:
            if key not in self._cache:
                model = build_hf_model(seed, **overrides)
                out = self.root / name
                kwargs = {"save_original_format": False} if fused else {}
                model.save_pretrained(out, **kwargs)
                self._cache[key] = (out, model)
            return self._cache[key]


@pytest.fixture(scope="module")
def private_shm_dir(tmp_path_factory):
    """DWDP shards of this module's groups (and those a killed rank leaves behind) go under pytest's
    tmp instead of /dev/shm. Rank processes and CLI subprocesses inherit the variable."""
    old = os.environ.get("DWDP_SHM_DIR")
    os.environ["DWDP_SHM_DIR"] = str(tmp_path_factory.mktemp("shm"))
    yield os.environ["DWDP_SHM_DIR"]
    if old is None:
        os.environ.pop("DWDP_SHM_DIR", None)
    else:
        os.environ["DWDP_SHM_DIR"] = old


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> CheckpointFactory:
    return CheckpointFactory(tmp_path_factory.mktemp("ckpt"))


@pytest.fixture(scope="session")
def strategy_ckpt(checkpoints):
    """The checkpoint every multi-rank test uses (see STRATEGY_CFG)."""
    overrides = {k: v for k, v in STRATEGY_CFG.items() if BASE.get(k) != v}
    return checkpoints("strategy", seed=11, **overrides)


# ------------------------------------------------------------------ in-process engine helpers
def make_engine(model_dir, **engine_kw):
    """A single-process EngineCore (LocalExecutor: all experts local)."""
    from dynamo_dwdp.config.engine import EngineSettings
    from dynamo_dwdp.engine.engine_core import EngineCore
    from dynamo_dwdp.engine.model_runner import ModelRunner
    from dynamo_dwdp.model.moe_executor import LocalExecutor

    kw = dict(block_size=4, num_kv_blocks=64, max_num_batched_tokens=16)
    kw.update(engine_kw)
    return EngineCore(ModelRunner(str(model_dir), EngineSettings(**kw), LocalExecutor))


class LogitRecorder:
    """Wraps runner.launch (the engine's forward) and keeps a copy of every non-empty logits tensor it
    returns (before the engine masks or samples from it)."""

    def __init__(self, engine):
        self.steps: list[torch.Tensor] = []
        runner = engine.runner
        inner = runner.launch

        def launch(*args, **kwargs):
            logits = inner(*args, **kwargs)
            if logits.numel():
                self.steps.append(logits.detach().clone())
            return logits

        runner.launch = launch


def run_requests(engine, requests, add_at_step: dict[int, list] | None = None):
    """requests: list of (rid, prompt, SamplingParams). Returns {rid: (tokens, last RequestOutput)}.
    add_at_step {step_index: [requests]} adds more while running (continuous batching)."""
    tokens: dict[str, list[int]] = {}
    last: dict[str, object] = {}
    first: dict[str, object] = {}
    for rid, prompt, params in requests:
        engine.add_request(rid, prompt, params)
        tokens[rid] = []
    step = 0
    pending = dict(add_at_step or {})
    while engine.has_unfinished() or pending:
        for rid, prompt, params in pending.pop(step, []):
            engine.add_request(rid, prompt, params)
            tokens[rid] = []
        for out in engine.step():
            assert out.error is None, out.error
            tokens[out.request_id].extend(out.new_token_ids)
            first.setdefault(out.request_id, out)
            last[out.request_id] = out
        step += 1
        assert step < 10_000
    return {rid: (tokens[rid], first.get(rid), last.get(rid)) for rid in tokens}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a - b).abs().max() / b.abs().max())


@torch.no_grad()
def hf_logits(model, ids: list[int]) -> torch.Tensor:
    """[len(ids), V] float32 logits of the HF reference for one sequence (no cache)."""
    return model(torch.tensor([ids])).logits[0].float()


@torch.no_grad()
def hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    """transformers' own `generate` (greedy, KV cache, EOS disabled)."""
    out = model.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                         eos_token_id=None, pad_token_id=0, attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    return out[0, len(prompt):].tolist()


def prompts_for(vocab: int, lengths: list[int], seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


def cli(*args: str, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([PY, "-m", "dynamo_dwdp.cli", *args], cwd=REPO, env=full_env, capture_output=True,
                          text=True, timeout=timeout)


class SampleRecorder:
    """Records, per request, the logits rows the engine samples from (wraps engine_core.sample_tokens).
    Requests are identified by their SamplingParams object: give each request its own instance."""

    def __init__(self, monkeypatch):
        import dynamo_dwdp.engine.engine_core as engine_core

        self.by_params: dict[int, list[torch.Tensor]] = {}
        self._alive: list = []
        inner = engine_core.sample_tokens

        def sample(logits, params, generators):
            for i, p in enumerate(params):
                self._alive.append(p)                # keep it alive: ids must not be reused
                self.by_params.setdefault(id(p), []).append(logits[i].detach().clone())
            return inner(logits, params, generators)

        monkeypatch.setattr(engine_core, "sample_tokens", sample)

    def rows(self, params) -> torch.Tensor:
        return torch.stack(self.by_params[id(params)])


# ------------------------------------------------------------------ multi-rank helpers
# Engine config shared by the rank processes and the single-process reference: identical knobs give
# an identical schedule, so the lists of per-step logits line up one to one.
GROUP_ENGINE = dict(block_size=4, num_kv_blocks=64, max_num_batched_tokens=16)


def group_engine_config(**kw):
    from dynamo_dwdp.config.engine import EngineSettings

    return EngineSettings(**{**GROUP_ENGINE, **kw})


def capture_rank(rank_engine, payload):
    """run_local_group target: generate like `generate_rank`, and also return every non-empty logits
    tensor this rank's model produced (numpy, so nothing shares memory with a dead process) plus
    the executor stats."""
    from dynamo_dwdp.engine.sampling import SamplingParams
    from dynamo_dwdp.rank.local_group import generate_rank

    prompts, params_kw = payload
    if rank_engine.is_follower:
        rank_engine.follow()
        return None
    steps = []
    runner = rank_engine.runner
    inner = runner.launch

    def launch(*args, **kwargs):
        logits = inner(*args, **kwargs)
        if logits.numel():
            steps.append(logits.detach().clone().numpy())
        return logits

    runner.launch = launch
    tokens = generate_rank(rank_engine, (prompts, SamplingParams(**params_kw)))
    stats = rank_engine.stats
    return {"tokens": tokens, "logits": steps, "bytes_pulled": dict(stats.bytes_pulled), "steps": stats.steps}


def single_reference(model_dir, prompts, params_kw, **engine_kw):
    """The single-process engine on the same prompts: (tokens per prompt, per-step logits)."""
    from dynamo_dwdp.engine.sampling import SamplingParams

    eng = make_engine(model_dir, **{**GROUP_ENGINE, **engine_kw})
    rec = LogitRecorder(eng)
    res = run_requests(eng, [(f"p{i}", p, SamplingParams(**params_kw)) for i, p in enumerate(prompts)])
    return [res[f"p{i}"][0] for i in range(len(prompts))], rec.steps


def rank_pid(supervisor_pid: int, rank: int) -> int:
    """The rank process (a child of the group supervisor) started with `--group-rank <rank>`."""
    out = subprocess.run(["pgrep", "-P", str(supervisor_pid)], capture_output=True, text=True, timeout=10).stdout
    for pid in map(int, out.split()):
        argv = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
        if b"--group-rank" in argv and argv[argv.index(b"--group-rank") + 1] == str(rank).encode():
            return pid
    raise AssertionError(f"no rank {rank} under supervisor {supervisor_pid}: children {out.split()}")


def run_under_triton_interpreter(script: Path | str, timeout: float = 600) -> str:
    """Run a check script in a fresh process with TRITON_INTERPRET=1 (it must be set before triton is
    first imported) and this checkout on the path; its stdout, after asserting it exited 0."""
    pytest.importorskip("triton", reason="Triton kernels are tested under Triton's CPU interpreter")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO)}
    res = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, res.stdout + res.stderr
    return res.stdout
