"""`DwdpSettings`: the DWDP knobs. One type: the `dwdp` section of configs/*.yaml, the worker's
`--dwdp-*` flags (generated from these fields) and `generate`/the benchmarks all build it, and
the DWDP executor receives it whole."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

from dynamo_dwdp.config.schema import internal, spec

TRANSPORTS = ("auto", "shm", "cuda_ipc")


@dataclass(frozen=True, kw_only=True)
class DwdpSettings:
    """DWDP: routed experts partitioned over the ranks of a group, remote experts pulled from peers."""

    experts_per_rank: int | None = spec(None, doc="L: routed experts each rank holds; null = E / ranks "
                                                  "(set together with prefetch_per_peer)", min=1)
    prefetch_per_peer: int | None = spec(None, doc="P: experts pulled from each peer per layer; null = what "
                                                   "covers the rest (set together with experts_per_rank)", min=1)
    contention_opt: bool = spec(False, doc="interleave the peer copies in 2 MiB slices, round-robin over peers "
                                           "(TensorRT-LLM DwdpConfig.contention_opt)")
    routed_only: bool = spec(False, doc="pull only the remote experts this step's tokens are routed to, instead "
                                        "of every remote expert of the layer")
    transport: str = spec("auto", doc="how peer weights are read: shm (CPU shared memory), cuda_ipc (GPU peer "
                                      "memory), auto = by device", choices=TRANSPORTS)
    slice_bytes: int = internal(2 << 20)   # contention_opt: bytes per interleaved slice (tests shrink it)

    def _problems(self) -> Iterator[tuple[str, str]]:
        if (self.experts_per_rank is None) != (self.prefetch_per_peer is None):
            given, missing = (("experts_per_rank", "prefetch_per_peer") if self.experts_per_rank is not None
                              else ("prefetch_per_peer", "experts_per_rank"))
            yield given, (f"set without {missing} (allowed: experts_per_rank and prefetch_per_peer both "
                          "integers, or both null)")
        elif self.experts_per_rank is not None and self.prefetch_per_peer > self.experts_per_rank:
            yield "prefetch_per_peer", (f"{self.prefetch_per_peer} is more than a peer holds "
                                        f"(allowed: <= experts_per_rank = {self.experts_per_rank})")
