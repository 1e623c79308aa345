"""Load a Hugging Face DeepSeek-V3 checkpoint (safetensors) into `DeepseekV3ForCausalLM`.

Reads the official per-expert layout (`mlp.experts.E.{gate,up,down}_proj.weight`) and the fused
layout transformers writes with `save_original_format=False` (`mlp.experts.gate_up_proj` [E, 2I, H],
`mlp.experts.down_proj` [E, H, I]). Only the experts the executor asks for are read from disk.
Every mismatch raises `CheckpointError` naming the tensor, its shape and the expected shape.
"""
from __future__ import annotations

import json
import logging
import os
from contextlib import ExitStack
from typing import Callable

import torch

from dynamo_dwdp.errors import CheckpointError
from dynamo_dwdp.model.config import ModelConfig
from dynamo_dwdp.model.layers import Linear

log = logging.getLogger(__name__)

# Non-persistent or derived state that is never in a checkpoint.
_SKIP_SUFFIXES = ("selection_skew", "rope.inv_freq")


class CheckpointReader:
    """Name -> tensor access over one or many safetensors files, opened lazily."""

    def __init__(self, model_dir: str):
        from safetensors import safe_open

        self.model_dir = model_dir
        index = os.path.join(model_dir, "model.safetensors.index.json")
        files: list[str]
        if os.path.isfile(index):
            try:
                with open(index, encoding="utf-8") as f:
                    weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise CheckpointError(f"{index}: not a valid safetensors index ({exc})") from None
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(f for f in os.listdir(model_dir) if f.endswith(".safetensors"))
        if not files:
            raise CheckpointError(f"{model_dir}: no *.safetensors weights found")
        self._stack = ExitStack()
        self._where: dict[str, object] = {}
        for name in files:
            path = os.path.join(model_dir, name)
            if not os.path.isfile(path):
                raise CheckpointError(f"{path}: listed in the index but missing")
            try:
                handle = self._stack.enter_context(safe_open(path, framework="pt"))
            except Exception as exc:  # safetensors raises its own error types
                raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None
            for key in handle.keys():
                self._where[key] = handle
        self.names = set(self._where)

    def has(self, name: str) -> bool:
        return name in self._where

    def get(self, name: str) -> torch.Tensor:
        handle = self._where.get(name)
        if handle is None:
            raise CheckpointError(f"{self.model_dir}: tensor '{name}' is missing from the checkpoint")
        return handle.get_tensor(name)

    def get_slice(self, name: str):
        handle = self._where.get(name)
        if handle is None:
            raise CheckpointError(f"{self.model_dir}: tensor '{name}' is missing from the checkpoint")
        return handle.get_slice(name)

    def close(self) -> None:
        self._stack.close()


def _expect(name: str, tensor: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    if tuple(tensor.shape) != tuple(shape):
        raise CheckpointError(f"tensor '{name}' has shape {list(tensor.shape)}, expected {list(shape)}")
    return tensor


def _shard(t: torch.Tensor, dim: int | None, size: int, rank: int) -> torch.Tensor:
    if dim is None or size == 1:
        return t
    return t.chunk(size, dim=dim)[rank]


def load_weights(model, model_dir: str, progress: Callable[[int, int], None] | None = None) -> None:
    """Fill `model` (a DeepseekV3ForCausalLM with its executor) from `model_dir`."""
    cfg: ModelConfig = model.cfg
    tp = model.tp
    reader = CheckpointReader(model_dir)
    if any(n.endswith("weight_scale_inv") for n in reader.names):
        raise CheckpointError(f"{model_dir}: FP8 block-quantized checkpoints (weight_scale_inv) are not supported; "
                              "convert to bf16 first")
    try:
        modules = dict(model.named_modules())
        params = [(n, p) for n, p in model.named_parameters()] + [
            (n, b) for n, b in model.named_buffers() if not n.endswith(_SKIP_SUFFIXES)]
        total = len(params) + len(cfg.moe_layers)
        done = 0
        for name, target in params:
            if name == "lm_head.weight" and cfg.tie_word_embeddings and not reader.has(name):
                src = reader.get("model.embed_tokens.weight")
            else:
                src = reader.get(name)
            owner = modules.get(name.rsplit(".", 1)[0])
            tp_dim = owner.tp_dim if isinstance(owner, Linear) else None
            full_shape = list(target.shape)
            if tp_dim is not None:
                full_shape[tp_dim] *= tp.size
            _expect(name, src, tuple(full_shape))
            dtype = torch.float32 if name.endswith("e_score_correction_bias") else target.dtype
            with torch.no_grad():
                target.data = _shard(src, tp_dim, tp.size, tp.rank).to(device=target.device, dtype=dtype).contiguous()
            done += 1
            if progress:
                progress(done, total)
        executor = model.executor
        for layer in cfg.moe_layers:
            _load_layer_experts(reader, cfg, layer, executor)
            done += 1
            if progress:
                progress(done, total)
        executor.finalize()
    finally:
        reader.close()


def _load_layer_experts(reader: CheckpointReader, cfg: ModelConfig, layer: int, executor) -> None:
    H, I, E = cfg.hidden_size, cfg.moe_intermediate_size, cfg.n_routed_experts
    prefix = f"model.layers.{layer}.mlp.experts"
    fused = reader.has(f"{prefix}.gate_up_proj")
    if fused:
        gu = reader.get_slice(f"{prefix}.gate_up_proj")
        dn = reader.get_slice(f"{prefix}.down_proj")
        _expect(f"{prefix}.gate_up_proj", torch.empty(gu.get_shape(), device="meta"), (E, 2 * I, H))
        _expect(f"{prefix}.down_proj", torch.empty(dn.get_shape(), device="meta"), (E, H, I))
    for e in executor.experts_to_load(layer):
        if fused:
            w13 = gu[e:e + 1][0]
            gate, up = w13[:I], w13[I:]
            down = dn[e:e + 1][0]
        else:
            gate = _expect(f"{prefix}.{e}.gate_proj.weight", reader.get(f"{prefix}.{e}.gate_proj.weight"), (I, H))
            up = _expect(f"{prefix}.{e}.up_proj.weight", reader.get(f"{prefix}.{e}.up_proj.weight"), (I, H))
            down = _expect(f"{prefix}.{e}.down_proj.weight", reader.get(f"{prefix}.{e}.down_proj.weight"), (H, I))
        executor.load_expert(layer, e, gate, up, down)
