"""`EngineConfig`: the engine's knobs (mirrors the `engine` section of configs/*.yaml)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from dynamo_dwdp.errors import UserError

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}

ATTENTION_BACKENDS = ("auto", "reference", "sdpa")
WEIGHT_FORMATS = ("native", "fp8-block")


@dataclass
class EngineConfig:
    block_size: int = 16
    num_kv_blocks: int = 512
    max_num_seqs: int = 32
    max_num_batched_tokens: int = 512
    max_model_len: int | None = None          # default: the model's max_position_embeddings
    device: str = "cpu"
    dtype: str = "float32"
    enable_prefix_caching: bool = True
    seed: int = 0
    cuda_graphs: bool = False
    attention_backend: str = "auto"           # auto | reference | sdpa (see model/attention.py: use_sdpa, use_decode_kernel)
    weight_format: str = "native"             # native | fp8-block: experts + dense linears quantized at load (CUDA)
    capture_graphs_at_start: bool = True      # with cuda_graphs: capture every decode bucket while starting

    @property
    def torch_dtype(self) -> torch.dtype:
        try:
            return DTYPES[self.dtype]
        except KeyError:
            raise UserError(f"engine dtype {self.dtype!r} is not one of {sorted(DTYPES)}") from None

    def validate(self) -> "EngineConfig":
        for name in ("block_size", "num_kv_blocks", "max_num_seqs", "max_num_batched_tokens"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise UserError(f"engine {name}={v!r}: must be an integer >= 1")
        self.torch_dtype  # noqa: B018 (validates)
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise UserError(f"engine attention_backend={self.attention_backend!r}: must be one of "
                            f"{', '.join(ATTENTION_BACKENDS)}")
        if self.weight_format not in WEIGHT_FORMATS:
            raise UserError(f"engine weight_format={self.weight_format!r}: must be one of {', '.join(WEIGHT_FORMATS)}")
        if self.weight_format == "fp8-block" and not self.device.startswith("cuda"):
            raise UserError(f"engine weight_format=fp8-block needs device=cuda, not {self.device!r}")
        return self
