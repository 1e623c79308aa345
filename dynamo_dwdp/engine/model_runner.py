"""`ModelRunner`: owns the model, its executor and the KV pool; turns scheduled chunks into one
forward pass: `launch` enqueues it and returns its logits without waiting (the engine reads its sampled
tokens back through a `ReadBack`; with async scheduling the next step is launched first), `execute`
waits for it. The KV pool layout is block-major, [num_blocks, num_layers, block_size, kv_dim], so
one block of one sequence (all layers) is one contiguous region — a single descriptor for KV transfer.

With `cuda_graphs` (CUDA, and an executor that is `graph_safe`) decode steps replay captured graphs
(`engine/cuda_graphs.py`); the pool then carries one extra scratch block, past the block manager's
range, for the padded rows of a graph.
"""
from __future__ import annotations

import logging
import time

import torch

from dynamo_dwdp.config.engine import FP8_FORMATS, EngineSettings
from dynamo_dwdp.engine.cuda_graphs import DecodeGraphs
from dynamo_dwdp.engine.sampling import device_tensor
from dynamo_dwdp.model import kernels as fused_kernels
from dynamo_dwdp.model.batch import ForwardBatch
from dynamo_dwdp.model.config import ModelConfig, load_model_config
from dynamo_dwdp.model.deepseek_v3 import DeepseekV3ForCausalLM
from dynamo_dwdp.model.fp8_weights import make_fp8_resident
from dynamo_dwdp.model.loader import load_weights
from dynamo_dwdp.model.moe_executor import LocalExecutor
from dynamo_dwdp.model.tensor_parallel import TensorParallel

log = logging.getLogger(__name__)


def exact_fp32() -> None:
    """An fp32 engine computes in fp32: TF32 (10-bit mantissas in the tensor cores) off for cuBLAS and
    cuDNN in this process (torch's default leaves cuDNN's on). The Triton kernels ask for IEEE dots
    themselves for fp32 operands."""
    if torch.backends.cuda.matmul.allow_tf32 or torch.backends.cudnn.allow_tf32:
        log.info("fp32 engine: TF32 turned off for this process")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


class FedTokens:
    """Input tokens of a step that come from an earlier step's sampled tokens, on the device:
    `input_ids[rows[i]] = source[source_rows[i]]` (rows index the step's flattened tokens). Built with
    one pinned copy, applied with one gather + one scatter on the step's stream, so the host never
    waits for the earlier step."""

    def __init__(self, rows: list[int], source: torch.Tensor, source_rows: list[int]):
        idx = device_tensor([rows, source_rows], torch.long, source.device)
        self.rows, self.values = idx[0], source.index_select(0, idx[1])

    def apply(self, input_ids: torch.Tensor) -> None:
        input_ids.index_copy_(0, self.rows, self.values)


class ReadBack:
    """A launched step's end and its sampled tokens (if any) on their way to the host, without a host
    sync: one non_blocking copy into pinned memory and an event (a `.tolist()` would wait for every step
    launched after this one)."""

    def __init__(self, device_tokens: torch.Tensor | None, device: torch.device,
                 start: torch.cuda.Event | None = None):
        self.device_tokens = device_tokens
        self.host = device_tokens
        self.event = None
        self.start = start
        if device.type == "cuda":
            if device_tokens is not None:
                self.host = torch.empty(device_tokens.shape, dtype=device_tokens.dtype, pin_memory=True)
                self.host.copy_(device_tokens, non_blocking=True)
            self.event = torch.cuda.Event(enable_timing=start is not None)
            self.event.record()

    def wait(self) -> None:
        if self.event is not None:
            self.event.synchronize()

    def device_seconds(self) -> float | None:
        """After `wait`: the step's device time, from `start` (recorded before its first kernel) to its
        end; None off CUDA or without a start event."""
        if self.event is None or self.start is None:
            return None
        return self.start.elapsed_time(self.event) / 1e3

    def result(self) -> list[int]:
        self.wait()
        return [] if self.host is None else self.host.tolist()


class ModelRunner:
    def __init__(self, model_dir: str, config: EngineSettings, executor_factory, tp: TensorParallel | None = None,
                 model_config: ModelConfig | None = None):
        self.config = config.validate()
        self.model_dir = model_dir
        self.model_config = model_config or load_model_config(model_dir)
        self.device = torch.device(config.device)
        dtype = config.torch_dtype
        torch.manual_seed(config.seed)
        if self.device.type == "cuda" and dtype == torch.float32:
            exact_fp32()
        executor = executor_factory(self.model_config, self.device, dtype)
        t0 = time.perf_counter()
        with torch.device(self.device):
            model = DeepseekV3ForCausalLM(self.model_config, tp=tp, executor=executor)
        model.to(dtype=dtype)
        for layer in model.model.layers:                       # the router works in fp32
            if hasattr(layer.mlp, "gate"):
                layer.mlp.gate.float()
            layer.self_attn.backend = config.attention_backend
        self.load_report = load_weights(model, model_dir)
        self.fp8 = None
        if config.weight_format in FP8_FORMATS:
            self.fp8 = make_fp8_resident(model, executor, config.weight_format)
            log.info("FP8-resident weights: %d linears + %d expert banks, %.2f -> %.2f GB",
                     self.fp8["linears"], self.fp8["expert_banks"], self.fp8["bytes_before"] / 1e9,
                     self.fp8["bytes_after"] / 1e9)
        model.fuse_weights(gate_up=self.device.type == "cuda" and fused_kernels.available())
        self.model = model.eval()
        self.executor = executor
        self.load_seconds = time.perf_counter() - t0
        if model.model.layers and model.model.layers[0].self_attn.warm_up_prefill(self.device, dtype):
            log.info("prefill attention kernel compiled in %.1fs", time.perf_counter() - t0 - self.load_seconds)
        cfg = self.model_config
        use_graphs = config.cuda_graphs and self.device.type == "cuda" and getattr(executor, "graph_safe", False)
        if config.cuda_graphs and not use_graphs:
            log.warning("cuda_graphs: not used (%s); decode steps run eagerly",
                        "device is not cuda" if self.device.type != "cuda"
                        else f"the {executor.strategy} executor's steps cannot be captured with dtype {dtype}")
        self.kv_pool = torch.zeros(config.num_kv_blocks + (1 if use_graphs else 0), cfg.num_hidden_layers,
                                   config.block_size, cfg.kv_cache_dim, dtype=dtype, device=self.device)
        self.graphs = None
        self.last_launch_seconds = 0.0
        if use_graphs:
            max_len = min(config.max_model_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
            max_blocks = min(config.num_kv_blocks, (max_len + config.block_size - 1) // config.block_size)
            self.graphs = DecodeGraphs(self.model, self.kv_pool, config.num_kv_blocks, config.block_size,
                                       config.max_num_seqs, max_blocks, self.device)
            # local experts: capture every bucket now (a DWDP executor's peers may not be up yet: lazily)
            if config.capture_graphs_at_start and isinstance(executor, LocalExecutor):
                self.graphs.capture_all()
        log.info("model %s loaded in %.2fs (%s, %s); KV pool %d blocks x %d tokens (%.1f MiB)",
                 model_dir, self.load_seconds, executor.strategy, dtype, config.num_kv_blocks, config.block_size,
                 self.kv_pool.numel() * self.kv_pool.element_size() / 2**20)

    def execute(self, token_chunks: list[list[int]], start_positions: list[int], block_tables: list[list[int]],
                want_logits: list[bool]) -> torch.Tensor:
        """One forward, waited for; returns float32 logits for the sequences with want_logits (in order)."""
        stats = self.executor.stats
        graph_steps = stats.graph_steps
        logits = self.launch(token_chunks, start_positions, block_tables, want_logits)
        t0 = time.perf_counter()
        if logits.is_cuda:
            torch.cuda.current_stream().synchronize()
        seconds = self.last_launch_seconds + time.perf_counter() - t0
        stats.step_seconds += seconds
        if stats.graph_steps > graph_steps:
            stats.graph_step_seconds += seconds
        return logits

    def launch(self, token_chunks: list[list[int]], start_positions: list[int], block_tables: list[list[int]],
               want_logits: list[bool], fed: FedTokens | None = None) -> torch.Tensor:
        """One forward, launched and not waited for (no host sync on CUDA: the caller reads the result
        through an event, see `ReadBack`). `fed`: input tokens taken on the device from an earlier
        step's sampled tokens (async scheduling); their entries in token_chunks are placeholders.
        Counts the step in the executor's stats and leaves the launch's host seconds (an eager batch's
        build excluded) in `last_launch_seconds`; the caller adds them and its wait for the step to
        `step_seconds`."""
        stats = self.executor.stats
        n_tokens = sum(len(c) for c in token_chunks)
        self.executor.agree_step(n_tokens)
        logits = None
        t0 = time.perf_counter()
        if self.graphs is not None and token_chunks and all(len(c) == 1 for c in token_chunks):   # pure decode
            logits = self.graphs.run([c[0] for c in token_chunks], start_positions, block_tables, want_logits,
                                     feed=None if fed is None else fed.apply)
            stats.graph_steps += logits is not None
        if logits is None:
            batch = ForwardBatch.build(token_chunks, start_positions, block_tables, self.config.block_size,
                                       want_logits, device=self.device)
            t0 = time.perf_counter()
            if fed is not None:
                fed.apply(batch.input_ids)
            logits = self.model(batch, self.kv_pool)
        self.last_launch_seconds = time.perf_counter() - t0
        stats.steps += 1
        stats.tokens += n_tokens
        return logits

    def set_expert_skew(self, hot_experts: list[int], bias: float) -> None:
        """Benchmark knob: make `hot_experts` more likely to be selected in every MoE layer."""
        for layer in self.model.model.layers:
            gate = getattr(layer.mlp, "gate", None)
            if gate is not None:
                gate.selection_skew.zero_()
                if hot_experts:
                    gate.selection_skew[hot_experts] = bias

    def close(self) -> None:
        self.executor.close()
