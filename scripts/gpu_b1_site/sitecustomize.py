"""Loaded by every process that scripts/gpu_b1.py's bench starts (this folder on PYTHONPATH, spawned rank
processes included). The bench's probe (engine_bench._Probe) marks each MoE layer's routed experts with one
index_fill_ per layer, hooked on executor.forward; a folded layer calls forward_folded, hooked here the same way
(its routed columns), so that every variant runs the same probe kernels. B1_PROBE=none removes the probe's
per-layer kernels (what the bench itself adds to a step)."""
import os

if os.environ.get("B1_BENCH") == "1":
    from dynamo_dwdp.bench import engine_bench as _eb

    _init = _eb._Probe.__init__

    def _probe_init(self, runner):
        _init(self, runner)
        ex, k = self.executor, runner.model_config.num_experts_per_tok
        if os.environ.get("B1_PROBE") == "none":
            ex.forward = type(ex).forward.__get__(ex)
            return
        inner = ex.forward_folded

        def folded(layer, x, ids, w, shared):
            self.live[self.moe_index[layer]].index_fill_(0, ids[:, :k].reshape(-1), True)
            return inner(layer, x, ids, w, shared)

        ex.forward_folded = folded

    _eb._Probe.__init__ = _probe_init
