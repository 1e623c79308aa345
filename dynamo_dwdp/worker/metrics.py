"""`dwdp_*` Prometheus metrics of one worker rank (bridged into the worker's /metrics by Dynamo).

Labels on every family: strategy, role, group, rank. Counters are refreshed from the executor's
cumulative `ExecutorStats` after each engine iteration (cheap: a handful of subtractions).
What operators watch: the step-time split (compute / exposed prefetch stall / sync wait), remote
weight bytes per peer, KV transfer bytes and latency, queue depth, and the queue-to-compute ratio
that autoscalers key on (queue time / compute time over recently finished requests).
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


STEP_TIME = (   # (ExecutorStats field, counter, help): model/step_stats.py says what each field counts
    ("launch_seconds", "dwdp_step_launch_seconds",
     "Wall time of launching steps (batch build, forward and sampling launched)"),
    ("launch_cpu_seconds", "dwdp_step_launch_cpu_seconds",
     "The engine thread's CPU time in those launches (far below the wall time: the thread waited, e.g. for the GIL)"),
    ("device_steps", "dwdp_device_steps", "Steps timed on the device (CUDA)"),
    ("device_seconds", "dwdp_step_device_seconds", "Device time of those steps (first kernel to sampled tokens)"),
    ("graph_launch_seconds", "dwdp_graph_step_launch_seconds",
     "The part of dwdp_step_launch_seconds that graph steps took"),
    ("graph_launch_cpu_seconds", "dwdp_graph_step_launch_cpu_seconds",
     "The part of dwdp_step_launch_cpu_seconds that graph steps took"),
    ("graph_device_seconds", "dwdp_graph_step_device_seconds",
     "The part of dwdp_step_device_seconds that graph steps took"),
    ("loop_seconds", "dwdp_engine_loop_seconds",
     "Wall time of the engine thread's iterations that ran a step (schedule, launch, read back, book, deliver, "
     "callbacks)"),
    ("loop_cpu_seconds", "dwdp_engine_loop_cpu_seconds", "The engine thread's CPU time in them"),
)


class WorkerMetrics:
    def __init__(self, strategy: str, role: str, group: str, rank: int):
        self.registry = CollectorRegistry()
        self.labels = {"strategy": strategy, "role": role, "group": group, "rank": str(rank)}
        names = list(self.labels)
        r = self.registry

        def counter(name, doc, extra=()):
            return Counter(name, doc, names + list(extra), registry=r)

        self.step_seconds = counter("dwdp_step_seconds", "Wall time of model forward steps")
        self.compute_seconds = counter("dwdp_step_compute_seconds", "Step time spent computing")
        self.prefetch_wait = counter("dwdp_step_prefetch_wait_seconds",
                                     "Step time the compute path waited for DWDP weight pulls (exposed stall)")
        self.sync_wait = counter("dwdp_step_sync_wait_seconds",
                                 "Step time inside collectives (DEP all-to-all, TP all-reduce, step agreement)")
        self.steps = counter("dwdp_steps", "Model forward steps")
        self.graph_steps = counter("dwdp_graph_steps", "Decode steps replayed from CUDA graphs (engine.cuda_graphs)")
        self.graph_step_seconds = counter("dwdp_graph_step_seconds",
                                          "The part of dwdp_step_seconds that steps replayed from CUDA graphs took")
        # where a step's time goes (ExecutorStats field -> counter): launch wall and CPU, device span, by kind
        self.step_time = {field: counter(name, doc) for field, name, doc in STEP_TIME}
        self.tokens = counter("dwdp_tokens", "Tokens computed (prompt + generated)")
        self.generated = counter("dwdp_generated_tokens", "Tokens generated and returned")
        self.remote_bytes = counter("dwdp_remote_bytes", "Expert weight bytes pulled from peers", ["peer"])
        self.kv_bytes = counter("dwdp_kv_transfer_bytes", "KV cache bytes moved prefill -> decode (NIXL)")
        self.kv_seconds = Histogram("dwdp_kv_transfer_seconds", "KV transfer latency per request", names,
                                    registry=r, buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5))
        self.kv_failures = counter("dwdp_kv_transfer_failures", "KV transfers that failed (request failed cleanly)")
        self.requests = counter("dwdp_requests", "Requests finished, by outcome", ["outcome"])
        self.queue_depth = Gauge("dwdp_queue_depth", "Requests waiting to be scheduled", names, registry=r)
        self.running = Gauge("dwdp_running_requests", "Requests in the running batch", names, registry=r)
        self.kv_blocks_used = Gauge("dwdp_kv_blocks_used", "KV blocks in use", names, registry=r)
        self.kv_blocks_held = Gauge("dwdp_kv_blocks_held_requests",
                                    "Prefill requests whose KV blocks wait for a decode read", names, registry=r)
        self.q2c = Gauge("dwdp_queue_to_compute_ratio",
                         "Queue time / compute time over recently finished requests (autoscaling signal)",
                         names, registry=r)
        self.peers_down = Gauge("dwdp_group_peers_down", "Peers of this rank's group declared down", names, registry=r)
        self.healthy = Gauge("dwdp_group_healthy", "1 while this rank serves (group whole, engine not broken), else 0",
                             names, registry=r)
        self.epoch = Gauge("dwdp_group_membership_epoch", "Membership changes seen by this rank (peer down or back)",
                           names, registry=r)
        self.recoveries = counter("dwdp_group_recoveries",
                                  "Times this rank served again after its group failed (in place or restarted)")
        self.recovery_seconds = Gauge("dwdp_group_recovery_seconds",
                                      "Time to recovery of the last failure: from the failure to serving again",
                                      names, registry=r)
        self._last: dict[str, float] = {}
        self._last_bytes: dict[int, int] = {}

    def _inc(self, metric, key: str, value: float, **extra) -> None:
        delta = value - self._last.get(key, 0.0)
        if delta > 0:
            metric.labels(**self.labels, **extra).inc(delta)
        self._last[key] = value

    def refresh(self, stats, engine=None, group=None) -> None:
        self._inc(self.step_seconds, "step", stats.step_seconds)
        self._inc(self.compute_seconds, "compute", stats.compute_seconds)
        self._inc(self.prefetch_wait, "prefetch", stats.prefetch_wait_s)
        self._inc(self.sync_wait, "sync", stats.sync_wait_s)
        self._inc(self.steps, "steps", stats.steps)
        self._inc(self.graph_steps, "graph_steps", stats.graph_steps)
        self._inc(self.graph_step_seconds, "graph_step_seconds", stats.graph_step_seconds)
        for field, metric in self.step_time.items():
            self._inc(metric, field, getattr(stats, field))
        self._inc(self.tokens, "tokens", stats.tokens)
        for peer, total in list(stats.bytes_pulled.items()):
            delta = total - self._last_bytes.get(peer, 0)
            if delta > 0:
                self.remote_bytes.labels(**self.labels, peer=str(peer)).inc(delta)
            self._last_bytes[peer] = total
        if engine is not None:
            self.queue_depth.labels(**self.labels).set(len(engine.scheduler.waiting))
            self.running.labels(**self.labels).set(len(engine.scheduler.running))
            self.kv_blocks_used.labels(**self.labels).set(engine.blocks.num_used)
            timings = list(engine.finished_timings)
            compute = sum(c for _, c in timings)
            if compute > 0:
                self.q2c.labels(**self.labels).set(sum(q for q, _ in timings) / compute)
        if group is not None:
            self.peers_down.labels(**self.labels).set(len(group.dead()))
            self.epoch.labels(**self.labels).set(group.epoch)

    def set_health(self, healthy: bool) -> None:
        self.healthy.labels(**self.labels).set(1 if healthy else 0)

    def recovered(self, seconds: float) -> None:
        self.recoveries.labels(**self.labels).inc()
        self.recovery_seconds.labels(**self.labels).set(seconds)
