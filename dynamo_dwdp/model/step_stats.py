"""Per-rank step accounting shared by every executor: where the time of a step went."""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field


@dataclass
class ExecutorStats:
    """Cumulative counters (monotonic; readers take differences).

    step_seconds      wall time of model forwards
    prefetch_wait_s   time the compute path waited for DWDP weight pulls (exposed stall)
    sync_wait_s       time spent inside collectives (DEP all-to-all, TP all-reduce, step agreement)
    bytes_pulled      remote weight bytes pulled, per peer rank
    graph_steps       steps replayed from a CUDA graph (a subset of steps)
    graph_step_seconds   the part of step_seconds those steps took (the rest: eager steps)
    launch_seconds    wall time of launching the steps (batch build, forward and sampling launched)
    launch_cpu_seconds   the launching thread's CPU time in those launches (wall far above CPU: the
                      thread waited, e.g. for the GIL; CPU near wall: it worked, or spun in the driver,
                      e.g. on a full CUDA launch queue)
    device_steps, device_seconds   steps timed on the device and their device time (CUDA: from the
                      step's start on its stream to its sampled tokens, host-starved gaps included; 0 elsewhere)
    graph_launch_seconds, graph_launch_cpu_seconds, graph_device_seconds   the parts of the three above
                      that graph steps took (the rest: eager steps, e.g. prefill)
    loop_seconds, loop_cpu_seconds   wall and CPU time of the serving loop's iterations that ran a step
                      (schedule, launch, read back, book, deliver, callbacks: `AsyncEngine`)
    compute = step_seconds - prefetch_wait_s - sync_wait_s
    """
    steps: int = 0
    step_seconds: float = 0.0
    prefetch_wait_s: float = 0.0
    sync_wait_s: float = 0.0
    bytes_pulled: dict[int, int] = field(default_factory=lambda: defaultdict(int))
    tokens: int = 0
    graph_steps: int = 0
    graph_step_seconds: float = 0.0
    launch_seconds: float = 0.0
    launch_cpu_seconds: float = 0.0
    device_steps: int = 0
    device_seconds: float = 0.0
    graph_launch_seconds: float = 0.0
    graph_launch_cpu_seconds: float = 0.0
    graph_device_seconds: float = 0.0
    loop_seconds: float = 0.0
    loop_cpu_seconds: float = 0.0

    @property
    def compute_seconds(self) -> float:
        return max(0.0, self.step_seconds - self.prefetch_wait_s - self.sync_wait_s)
