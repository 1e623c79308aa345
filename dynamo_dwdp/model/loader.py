"""Load a Hugging Face DeepSeek checkpoint (safetensors) into `DeepseekV3ForCausalLM`, per rank, streaming.

What is read
------------
* The official per-expert layout (`mlp.experts.E.{gate,up,down}_proj.weight`) and transformers' fused
  layout (`mlp.experts.gate_up_proj` [E, 2I, H], `mlp.experts.down_proj` [E, H, I]).
* Float weights (F32/BF16/F16) and the official FP8 block format (F8_E4M3 `<name>.weight` +
  float32 `<name>.weight_scale_inv`, see model/fp8.py), dequantized exactly to the engine dtype here.
* Multi-token-prediction layers (`num_nextn_predict_layers`) are skipped with one log line.

Per rank, streaming
-------------------
Each rank reads only what it holds: its experts (`executor.experts_to_load`), and under TP only its
rows of column-parallel weights and its columns of row-parallel ones (a column slice reads whole rows,
the file being row-major, and keeps its columns). Tensors are read one at a time with positioned reads
into a fresh buffer, so peak host memory is the model being filled plus a few tensors. The
safetensors library's `safe_open` is not used on purpose: it memory-maps whole files and every page
touched stays resident (counted in the process's RSS) until the file is closed, i.e. a whole shard.
A progress bar over the bytes this rank reads is shown when stderr is a terminal.

Every mismatch raises `CheckpointError` naming the tensor, its shape/dtype and what was expected.
"""
from __future__ import annotations

import json
import logging
import math
import os
import struct
import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import torch

from dynamo_dwdp.errors import CheckpointError
from dynamo_dwdp.model.config import ModelConfig
from dynamo_dwdp.model.fp8 import FP8_DTYPE, dequantize_block_fp8, scale_shape
from dynamo_dwdp.model.layers import Linear

log = logging.getLogger(__name__)

# Non-persistent or derived state that is never in a checkpoint.
_SKIP_SUFFIXES = ("selection_skew", "rope.inv_freq")
SCALE_SUFFIX = "_scale_inv"

_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F8_E4M3": FP8_DTYPE}
_MAX_HEADER = 100 * 2**20


@dataclass(frozen=True)
class TensorInfo:
    path: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int                        # absolute byte offset of the data in the file

    @property
    def row_bytes(self) -> int:
        return math.prod(self.shape[1:]) * self.dtype.itemsize


@dataclass
class LoadReport:
    """What one rank's load read from disk."""

    tensors: Counter = field(default_factory=Counter)      # name -> times read
    bytes_read: int = 0
    skipped_mtp_layers: tuple[int, ...] = ()


def _read_header(path: str) -> dict:
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise CheckpointError(f"{path}: not a safetensors file (shorter than its header)")
        (n,) = struct.unpack("<Q", raw)
        if n > _MAX_HEADER:
            raise CheckpointError(f"{path}: not a safetensors file (header of {n} bytes)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a readable safetensors file (header is not an object)")
    header["__data_start__"] = 8 + n
    return header


class CheckpointReader:
    """Name -> tensor access over one or many safetensors files; reads only what is asked for."""

    def __init__(self, model_dir: str):
        self.model_dir = model_dir
        index = os.path.join(model_dir, "model.safetensors.index.json")
        if os.path.isfile(index):
            try:
                with open(index, encoding="utf-8") as f:
                    weight_map = json.load(f)["weight_map"]
                files = sorted(set(weight_map.values()))
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
                raise CheckpointError(f"{index}: not a valid safetensors index ({exc})") from None
        else:
            files = sorted(f for f in os.listdir(model_dir) if f.endswith(".safetensors"))
        if not files:
            raise CheckpointError(f"{model_dir}: no *.safetensors weights found")
        self.report = LoadReport()
        self._info: dict[str, TensorInfo] = {}
        self._bad_dtype: dict[str, str] = {}          # tensors in a dtype the engine does not read
        self._files: dict[str, object] = {}
        for name in files:
            path = os.path.join(model_dir, name)
            if not os.path.isfile(path):
                raise CheckpointError(f"{path}: listed in the index but missing")
            header = _read_header(path)
            start = header.pop("__data_start__")
            for key, meta in header.items():
                if key == "__metadata__":
                    continue
                try:
                    dtype_name, shape, (lo, hi) = meta["dtype"], tuple(meta["shape"]), meta["data_offsets"]
                except (KeyError, TypeError, ValueError):
                    raise CheckpointError(f"{path}: tensor '{key}' has a malformed header entry") from None
                dtype = _DTYPES.get(dtype_name)
                if dtype is None:
                    # Other dtypes only occur in formats the engine does not read (int4/int8 packs, ...).
                    self._info[key] = TensorInfo(path, torch.uint8, shape, -1)
                    self._bad_dtype[key] = dtype_name
                    continue
                if hi - lo != math.prod(shape) * dtype.itemsize:
                    raise CheckpointError(f"{path}: tensor '{key}' has {hi - lo} bytes for shape {list(shape)} "
                                          f"of {dtype_name}")
                self._info[key] = TensorInfo(path, dtype, shape, start + lo)
        self.names = set(self._info)

    def has(self, name: str) -> bool:
        return name in self._info

    def info(self, name: str) -> TensorInfo:
        info = self._info.get(name)
        if info is None:
            raise CheckpointError(f"{self.model_dir}: tensor '{name}' is missing from the checkpoint")
        bad = self._bad_dtype.get(name)
        if bad is not None:
            raise CheckpointError(f"{info.path}: tensor '{name}' has dtype {bad}, which the engine does not read "
                                  "(supported: F32, BF16, F16, and F8_E4M3 with weight_scale_inv)")
        return info

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """Tensor `name` (or its rows [start, stop) along dim 0) as stored: one positioned read."""
        info = self.info(name)
        lo, hi = rows if rows is not None else (0, info.shape[0] if info.shape else 1)
        shape = (hi - lo, *info.shape[1:]) if info.shape else ()
        nbytes = math.prod(shape) * info.dtype.itemsize
        buf = torch.empty(nbytes, dtype=torch.uint8)
        fd = self._fd(info.path)
        view = memoryview(buf.numpy()) if nbytes else memoryview(b"")
        pos, done = info.offset + lo * info.row_bytes, 0
        while done < nbytes:
            n = os.preadv(fd, [view[done:]], pos + done)
            if n <= 0:
                raise CheckpointError(f"{info.path}: truncated while reading tensor '{name}'")
            done += n
        self.report.tensors[name] += 1
        self.report.bytes_read += nbytes
        return buf.view(info.dtype).reshape(shape)

    def get(self, name: str) -> torch.Tensor:
        return self.read(name)

    def _fd(self, path: str) -> int:
        fd = self._files.get(path)
        if fd is None:
            fd = self._files[path] = os.open(path, os.O_RDONLY)
        return fd

    def close(self) -> None:
        for fd in self._files.values():
            os.close(fd)
        self._files.clear()


class WeightSource:
    """Reads a weight in float (dequantizing FP8 blocks exactly), whole or a TP slice of it."""

    def __init__(self, reader: CheckpointReader, cfg: ModelConfig):
        self.reader, self.cfg = reader, cfg
        self.block = cfg.quant.block if cfg.quant is not None else None

    def is_fp8(self, name: str) -> bool:
        info = self.reader.info(name)
        if info.dtype != FP8_DTYPE:
            return False
        if self.block is None:
            raise CheckpointError(f"{self.reader.model_dir}: tensor '{name}' is float8_e4m3fn but config.json has "
                                  "no 'quantization_config' (expected quant_method fp8 with weight_block_size)")
        if len(info.shape) != 2:
            raise CheckpointError(f"tensor '{name}' is float8_e4m3fn with shape {list(info.shape)}; only 2-D "
                                  "block-quantized weights are read")
        scale = name + SCALE_SUFFIX
        if not self.reader.has(scale):
            raise CheckpointError(f"{self.reader.model_dir}: tensor '{name}' is float8_e4m3fn but '{scale}' is missing")
        want = scale_shape(info.shape, self.block)
        got = self.reader.info(scale).shape
        if tuple(got) != want:
            raise CheckpointError(f"tensor '{scale}' has shape {list(got)}, expected {list(want)} for a weight of "
                                  f"shape {list(info.shape)} in {self.block[0]}x{self.block[1]} blocks")
        return True

    def nbytes(self, name: str, rows: tuple[int, int] | None = None) -> int:
        """Bytes `read(name, rows)` takes from disk (FP8 reads whole row blocks and their scales)."""
        info = self.reader.info(name)
        lo, hi = rows if rows is not None else (0, info.shape[0] if info.shape else 1)
        if self.is_fp8(name):
            lo, hi = self._aligned(lo, hi, info.shape[0])
            srows = math.ceil((hi - lo) / self.block[0])
            return (hi - lo) * info.row_bytes + srows * self.reader.info(name + SCALE_SUFFIX).row_bytes
        return (hi - lo) * info.row_bytes if info.shape else info.dtype.itemsize

    def _aligned(self, lo: int, hi: int, n: int) -> tuple[int, int]:
        b = self.block[0]
        return lo // b * b, min(-(-hi // b) * b, n)

    def read(self, name: str, rows: tuple[int, int] | None = None, cols: tuple[int, int] | None = None,
             expect: tuple[int, ...] | None = None, device: torch.device | None = None) -> torch.Tensor:
        """The full-precision value of `name`, optionally rows/cols [start, stop) of a 2-D weight.
        `expect` is the full tensor's shape (checked before anything is read). FP8 blocks travel to
        `device` as stored (1 byte per weight) and are dequantized there."""
        info = self.reader.info(name)
        if expect is not None and tuple(info.shape) != tuple(expect):
            raise CheckpointError(f"tensor '{name}' has shape {list(info.shape)}, expected {list(expect)}")
        if self.is_fp8(name):
            lo, hi = rows if rows is not None else (0, info.shape[0])
            alo, ahi = self._aligned(lo, hi, info.shape[0])
            b0 = self.block[0]
            q = self.reader.read(name, (alo, ahi)).to(device or "cpu")
            s = self.reader.read(name + SCALE_SUFFIX, (alo // b0, -(-ahi // b0))).to(q.device)
            t = dequantize_block_fp8(q, s, self.block)[lo - alo: hi - alo]
        else:
            t = self.reader.read(name, rows)
        if cols is not None:
            t = t[:, cols[0]:cols[1]]
        return t


def _shard_range(n: int, size: int, rank: int) -> tuple[int, int]:
    step = n // size
    return rank * step, (rank + 1) * step


def load_weights(model, model_dir: str, progress: Callable[[int, int], None] | None = None,
                 progress_bar: bool | None = None) -> LoadReport:
    """Fill `model` (a DeepseekV3ForCausalLM with its executor) from `model_dir`; returns what was read.

    `progress(done_bytes, total_bytes)` is called after every read; `progress_bar` None shows a tqdm
    bar over bytes when stderr is a terminal."""
    cfg: ModelConfig = model.cfg
    tp = model.tp
    reader = CheckpointReader(model_dir)
    try:
        src = WeightSource(reader, cfg)
        if cfg.quant is None and any(n.endswith("weight" + SCALE_SUFFIX) for n in reader.names):
            raise CheckpointError(f"{model_dir}: tensors '*.weight_scale_inv' found but config.json has no "
                                  "'quantization_config' (expected quant_method fp8)")
        if cfg.num_nextn_predict_layers:
            layers = list(cfg.mtp_layers)
            reader.report.skipped_mtp_layers = tuple(layers)
            log.info("skipping %d multi-token-prediction layer(s) (model.layers.%s.*): not used for serving",
                     len(layers), ",".join(map(str, layers)))
        plan = _plan(model, cfg, tp, src)
        total = sum(n for n, _ in plan)
        bar = _progress_bar(total, model_dir, model.executor, progress_bar)
        done = 0
        try:
            for nbytes, action in plan:
                action()
                done += nbytes
                if bar is not None:
                    bar.update(nbytes)
                if progress:
                    progress(done, total)
        finally:
            if bar is not None:
                bar.close()
        model.executor.finalize()
        model.refuse_weights()                      # fused tensors (fuse_weights) follow the new weights
        return reader.report
    finally:
        reader.close()


def _progress_bar(total: int, model_dir: str, executor, wanted: bool | None):
    if wanted is False or (wanted is None and not sys.stderr.isatty()):
        return None
    from tqdm import tqdm

    rank = getattr(getattr(executor, "group", None), "rank", None)
    desc = f"loading {os.path.basename(os.path.normpath(model_dir))}" + (f" rank {rank}" if rank is not None else "")
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, file=sys.stderr,
                position=rank or 0, leave=rank in (None, 0))


def _plan(model, cfg: ModelConfig, tp, src: WeightSource) -> list[tuple[int, Callable[[], None]]]:
    """(bytes read, action) for every tensor this rank holds, in model order."""
    modules = dict(model.named_modules())
    params = [(n, p) for n, p in model.named_parameters()] + [
        (n, b) for n, b in model.named_buffers() if not n.endswith(_SKIP_SUFFIXES)]
    plan: list[tuple[int, Callable[[], None]]] = []
    for name, target in params:
        disk = name
        if name == "lm_head.weight" and cfg.tie_word_embeddings and not src.reader.has(name):
            disk = "model.embed_tokens.weight"
        owner = modules.get(name.rsplit(".", 1)[0])
        tp_dim = owner.tp_dim if isinstance(owner, Linear) and tp.size > 1 else None
        full = list(target.shape)
        if tp_dim is not None:
            full[tp_dim] *= tp.size
        rows = cols = None
        if tp_dim == 0:
            rows = _shard_range(full[0], tp.size, tp.rank)
        elif tp_dim == 1:
            cols = _shard_range(full[1], tp.size, tp.rank)
        dtype = torch.float32 if name.endswith("e_score_correction_bias") else target.dtype
        src.reader.info(disk)                       # missing tensors fail before anything is read

        def action(target=target, disk=disk, rows=rows, cols=cols, full=tuple(full), dtype=dtype):
            t = src.read(disk, rows, cols, expect=full, device=target.device)
            with torch.no_grad():
                target.data = t.to(device=target.device, dtype=dtype).contiguous()
        plan.append((src.nbytes(disk, rows), action))
    executor = model.executor
    for layer in cfg.moe_layers:
        plan.extend(_expert_plan(src, cfg, layer, executor))
    return plan


def _expert_plan(src: WeightSource, cfg: ModelConfig, layer: int, executor):
    """Reads of this rank's experts of one MoE layer. Under TP the executor's `expert_rows` (the
    slice of the intermediate dimension it keeps) limits the reads to that slice."""
    H, I, E = cfg.hidden_size, cfg.moe_intermediate_size, cfg.n_routed_experts
    prefix = f"model.layers.{layer}.mlp.experts"
    rows = getattr(executor, "expert_rows", None)
    sl = (rows.start, rows.stop) if rows is not None else None
    reader = src.reader
    if reader.has(f"{prefix}.gate_up_proj"):
        gu, dn = f"{prefix}.gate_up_proj", f"{prefix}.down_proj"
        for name, shape in ((gu, (E, 2 * I, H)), (dn, (E, H, I))):
            got = reader.info(name)
            if got.dtype == FP8_DTYPE:
                raise CheckpointError(f"tensor '{name}' is float8_e4m3fn in the fused expert layout; FP8 "
                                      "checkpoints use the per-expert layout")
            if tuple(got.shape) != shape:
                raise CheckpointError(f"tensor '{name}' has shape {list(got.shape)}, expected {list(shape)}")
        for e in executor.experts_to_load(layer):
            def action(e=e):
                w13 = reader.read(gu, (e, e + 1))[0]
                gate, up = w13[:I], w13[I:]
                down = reader.read(dn, (e, e + 1))[0]
                if sl is not None:
                    gate, up, down = gate[sl[0]:sl[1]], up[sl[0]:sl[1]], down[:, sl[0]:sl[1]]
                executor.load_expert(layer, e, gate, up, down)
            yield reader.info(gu).row_bytes + reader.info(dn).row_bytes, action
        return
    for e in executor.experts_to_load(layer):
        names = [f"{prefix}.{e}.{p}_proj.weight" for p in ("gate", "up", "down")]
        for n in names:
            reader.info(n)

        def action(e=e, names=names):
            dev = getattr(executor, "device", None)
            gate = src.read(names[0], sl, expect=(I, H), device=dev)
            up = src.read(names[1], sl, expect=(I, H), device=dev)
            down = src.read(names[2], None, sl, expect=(H, I), device=dev)
            executor.load_expert(layer, e, gate, up, down)
        yield src.nbytes(names[0], sl) + src.nbytes(names[1], sl) + src.nbytes(names[2]), action
