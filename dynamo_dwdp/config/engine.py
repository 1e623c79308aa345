"""`EngineSettings`: the native engine of every rank. One type, one set of defaults.

The `engine` section of configs/*.yaml, the worker's engine flags (generated from these fields)
and every in-process engine (`generate`, the benchmarks, the tests) use this one frozen object;
the runner receives it whole. Pure data: `torch_dtype` imports torch only when asked.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

from dynamo_dwdp.config.schema import internal, spec
from dynamo_dwdp.errors import UserError

DTYPES = ("float32", "bfloat16")
"""dtypes a settings file may name."""
TORCH_DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
                "float16": "float16", "fp16": "float16"}
"""Every dtype spelling the engine accepts -> the torch dtype's name."""
ATTENTION_BACKENDS = ("auto", "reference", "sdpa")
"""auto = SDPA prefill and the Triton decode kernel where they apply; reference = the torch paths the tests
compare with; sdpa = SDPA prefill (see model/attention.py: use_sdpa, use_decode_kernel)."""
WEIGHT_FORMATS = ("native", "fp8-block", "fp8-block-a8")
"""native = the checkpoint's weights in `dtype`; fp8-block = experts and dense linears re-quantized at load into
the official 128x128 block FP8 format and kept resident as FP8 (cuda only; model/fp8_weights.py), computed W8A16
(bf16 activations); fp8-block-a8 = the same weights, the routed experts computed W8A8 (activations quantized per
token in 1x128 groups, FP8 tensor-core MMAs; kernels/moe_fp8a8.py), dense linears W8A16."""
FP8_FORMATS = ("fp8-block", "fp8-block-a8")
"""The weight formats that keep weights resident as FP8 (cuda only)."""
POSITIVE_INTS = ("block_size", "num_kv_blocks", "max_num_seqs", "max_num_batched_tokens")


@dataclass(frozen=True, kw_only=True)
class EngineSettings:
    """The native engine of every rank (paged MLA KV cache, continuous batching)."""

    device: str = spec("cpu", doc="where the engine runs (rank r of a group on cuda uses cuda:r)",
                       choices=("cpu", "cuda"))
    dtype: str = spec("float32", doc="compute / weight dtype", choices=DTYPES)
    block_size: int = spec(16, doc="tokens per KV block (a power of two)", min=1, max=1024)
    num_kv_blocks: int = spec(256, doc="KV blocks in each rank's pool", min=1)
    max_num_seqs: int = spec(32, doc="most sequences in one batch", min=1)
    max_num_batched_tokens: int = spec(512, doc="most tokens in one step (chunked prefill splits longer prompts)",
                                       min=1)
    max_model_len: int | None = spec(None, doc="longest prompt + output, in tokens; null = the model's "
                                               "max_position_embeddings", min=1)
    torch_threads: int = spec(0, doc="intra-op CPU threads per rank (OMP_NUM_THREADS); 0 = torch's default",
                              min=0, max=1024)
    cuda_graphs: bool = spec(False, doc="capture decode steps in CUDA graphs (device cuda only)")
    separate_prefill_steps: bool = spec(False, doc="a step holds prompt chunks or decode tokens, never both "
                                                   "(they alternate while both wait), so decode steps replay "
                                                   "CUDA graphs; false: chunked prefill mixes them into one "
                                                   "eager step")
    async_scheduling: bool = spec(False, doc="overlap the host's work with the GPU: the next step is scheduled and "
                                             "launched while the current one runs, its new tokens fed on the "
                                             "device (outputs are reported one step later; a sequence that stops "
                                             "at a token costs one discarded row in the step after). Ranks of a "
                                             "lock-step group (dep, tp) always step synchronously")
    stream_interval: int = spec(1, doc="tokens per streamed chunk after a request's first (which goes out at "
                                       "once): fewer chunks cost the serving process less host time per step; "
                                       "a request's last chunk carries what is left", min=1, max=1024)
    weight_format: str = spec("native", doc="native, or fp8-block: experts and dense linears resident as FP8 with "
                                            "128x128 block scales (device cuda only); fp8-block-a8: the same, "
                                            "routed experts with FP8 activations too", choices=WEIGHT_FORMATS)
    # Runtime-only knobs (not settings-file keys): tests and benchmarks set them in-process.
    enable_prefix_caching: bool = internal(True)
    seed: int = internal(0)
    attention_backend: str = internal("auto")
    capture_graphs_at_start: bool = internal(True)   # with cuda_graphs: capture every decode bucket while starting

    def _problems(self) -> Iterator[tuple[str, str]]:
        if self.block_size & (self.block_size - 1):
            yield "block_size", f"{self.block_size} is not a power of two (allowed: 1, 2, 4, ..., 1024)"
        if self.cuda_graphs and self.device != "cuda":
            yield "cuda_graphs", "true needs engine.device cuda (allowed: false on cpu)"
        if self.weight_format in FP8_FORMATS and self.device != "cuda":
            yield "weight_format", f"{self.weight_format} needs engine.device cuda (allowed: native on cpu)"
        capacity = self.num_kv_blocks * self.block_size
        if self.max_model_len is not None and self.max_model_len > capacity:
            yield "max_model_len", (f"{self.max_model_len} does not fit in the KV pool of num_kv_blocks x "
                                    f"block_size = {capacity} tokens (allowed: <= {capacity})")

    @property
    def torch_dtype(self) -> Any:
        try:
            name = TORCH_DTYPES[self.dtype]
        except KeyError:
            raise UserError(f"engine dtype {self.dtype!r} is not one of {sorted(TORCH_DTYPES)}") from None
        import torch  # here, not at the top: settings files and the CLI are read without torch

        return getattr(torch, name)

    def validate(self) -> "EngineSettings":
        """The checks an in-process engine needs (a settings file is checked by the schema as well)."""
        for name in POSITIVE_INTS:
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise UserError(f"engine {name}={v!r}: must be an integer >= 1")
        self.torch_dtype  # noqa: B018 (validates)
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise UserError(f"engine attention_backend={self.attention_backend!r}: must be one of "
                            f"{', '.join(ATTENTION_BACKENDS)}")
        if self.weight_format not in WEIGHT_FORMATS:
            raise UserError(f"engine weight_format={self.weight_format!r}: must be one of {', '.join(WEIGHT_FORMATS)}")
        if self.weight_format in FP8_FORMATS and not self.device.startswith("cuda"):
            raise UserError(f"engine weight_format={self.weight_format} needs device=cuda, not {self.device!r}")
        return self
