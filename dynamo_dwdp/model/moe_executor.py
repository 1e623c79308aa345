"""`MoEExecutor`: the one interface through which the model runs routed experts.

Life cycle (called by the loader/runner, in this order):
  experts_to_load(layer) -> global expert ids this rank must read from the checkpoint
  load_expert(layer, e, gate, up, down)   full checkpoint tensors; the executor keeps what it needs
  finalize()                              after all layers: build buffers, exchange handles, ...
  begin_step() / forward(layer, ...) per MoE layer / end_step()   once per model step
  close()
Contract of forward: x [T, H], topk_ids [T, k], topk_weights [T, k] -> routed output [T, H] for
this rank's tokens (TP: a partial sum the model all-reduces together with the shared experts).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Iterable

import torch

from dynamo_dwdp.model.config import ModelConfig
from dynamo_dwdp.model.experts import ExpertBank, routed_experts
from dynamo_dwdp.model.kernels.moe_gemm import SharedExperts, routed_experts_fused
from dynamo_dwdp.model.step_stats import ExecutorStats


class MoEExecutor(ABC):
    strategy: str = "?"
    graph_safe: bool = False      # its forward can be captured in a CUDA graph (no host-side protocol)

    def __init__(self, cfg: ModelConfig, device: torch.device, dtype: torch.dtype):
        self.cfg = cfg
        self.device = device
        self.dtype = dtype
        self.stats = ExecutorStats()

    @abstractmethod
    def experts_to_load(self, layer: int) -> Iterable[int]: ...

    @abstractmethod
    def load_expert(self, layer: int, expert: int, gate: torch.Tensor, up: torch.Tensor,
                    down: torch.Tensor) -> None: ...

    def finalize(self) -> None:
        pass

    def begin_step(self) -> None:
        pass

    def end_step(self) -> None:
        pass

    @abstractmethod
    def forward(self, layer: int, x: torch.Tensor, topk_ids: torch.Tensor,
                topk_weights: torch.Tensor) -> torch.Tensor: ...

    folds_shared: bool = False     # forward_folded exists (the shared experts in the routed call, small batches)

    def forward_folded(self, layer: int, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                       shared: SharedExperts) -> torch.Tensor:
        """forward() plus the shared experts, run as always-selected experts E.. of the same launches; topk_ids
        [T, k + shared.count] holds their ids (weight 1) after the routed ones. Executors with folds_shared."""
        raise NotImplementedError(f"strategy {self.strategy} does not fold the shared experts")

    # CUDA-graph protocol (engine/cuda_graphs.py); no-ops for executors without host-side state.
    def graph_epoch(self) -> object:
        """Changes when captured graphs become invalid (e.g. a DWDP peer went down)."""
        return 0

    def agree_step(self, tokens: int) -> None:
        """Called on the host once per model step, before its forward (eager or replayed), with the
        step's token count (DEP: the group agrees on the step's batch bucket here, never per layer)."""

    def graph_batch(self, batch_size: int) -> int:
        """The batch size a decode graph must be chosen for (DEP: the group's agreed largest batch, so
        that every rank replays the same bucket)."""
        return batch_size

    def begin_warmup(self) -> None:
        """Called before the eager warm-up forwards of a capture (DEP: they must not exchange with
        peers, which are not warming up)."""

    def end_warmup(self) -> None:
        """Called after them."""

    def prepare_capture(self) -> None:
        """Called before a capture: no work of this executor may be in flight afterwards."""

    def end_capture(self) -> None:
        """Called after a capture (successful or not)."""

    def before_replay(self) -> None:
        """Called before each replay, on the host."""

    def after_replay(self) -> None:
        """Called after each replay: the graph changed device state behind the host's back."""

    def close(self) -> None:
        pass

    # helpers -------------------------------------------------------------------------------
    def _new_bank(self, first: int, count: int, intermediate: int | None = None) -> ExpertBank:
        I = intermediate or self.cfg.moe_intermediate_size
        H = self.cfg.hidden_size
        return ExpertBank(first, torch.empty(count, 2 * I, H, device=self.device, dtype=self.dtype),
                          torch.empty(count, H, I, device=self.device, dtype=self.dtype))

    @staticmethod
    def _store(bank: ExpertBank, expert: int, gate, up, down) -> None:
        i = expert - bank.first
        I = gate.shape[0]
        bank.w13[i, :I].copy_(gate)
        bank.w13[i, I:].copy_(up)
        bank.w2[i].copy_(down)


class LocalExecutor(MoEExecutor):
    """All experts in this process (`single`, and each rank of replicated `dp`)."""

    strategy = "single"

    @property
    def graph_safe(self) -> bool:
        """Capturable where the expert path has no host sync: the grouped-GEMM path (CUDA, bf16)."""
        return self.device.type == "cuda" and self.dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm")

    def __init__(self, cfg, device, dtype):
        super().__init__(cfg, device, dtype)
        self.banks: dict[int, ExpertBank] = {}

    def experts_to_load(self, layer):
        return range(self.cfg.n_routed_experts)

    def load_expert(self, layer, expert, gate, up, down):
        bank = self.banks.get(layer)
        if bank is None:
            bank = self.banks[layer] = self._new_bank(0, self.cfg.n_routed_experts)
        self._store(bank, expert, gate, up, down)

    def forward(self, layer, x, topk_ids, topk_weights):
        return routed_experts(x, topk_ids, topk_weights, [self.banks[layer]])

    @property
    def folds_shared(self) -> bool:
        """The fold runs the fused kernels over one bf16 bank holding every expert (not FP8-resident)."""
        bank = next(iter(self.banks.values()), None)             # every layer's bank has the same format
        return self.dtype == torch.bfloat16 and bank is not None and bank.w13_scale is None

    def forward_folded(self, layer, x, topk_ids, topk_weights, shared):
        return routed_experts_fused(x, topk_ids, topk_weights, [self.banks[layer]], shared=shared)
