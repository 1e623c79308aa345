"""GPU machine models for the roofline planner: datasheet peaks plus explicit achievable efficiencies.

A `Hardware` entry is data, not code. Every rate is a *peak* (dense, no sparsity) with its source, and
three efficiency factors turn peaks into achievable rates:

- `math_efficiency`: fraction of dense tensor-core peak reached by large GEMMs and flash-style
  attention kernels. One number for every op and every dtype of that machine.
- `hbm_efficiency`: fraction of HBM peak reached by a streaming kernel.
- `link_efficiency`: fraction of the per-direction peer-link peak reached by a large peer pull.

Invariant: the factors are properties of the machine model, the same for every workload, model and
token count. They are never fitted per workload (nor to any published table). The values below are:

- math 0.70 for every datasheet machine: a typical sustained fraction of dense peak for large
  tensor-core GEMMs and FlashAttention-class kernels (cuBLAS / FlashAttention-2/3 reports land at
  roughly 0.6-0.8 of dense peak); no machine-specific measurement exists here yet.
- HBM 0.85 and link 0.85 for every datasheet machine, taken from a PyTorch probe on a
  2 x H200 host (NV18, torch 2.11 + CUDA 13.0, 2026-11-23): device copy 4.19 of 4.8 TB/s (0.87) and peer pull 386 of
  450 GB/s (0.86), rounded down to 0.85 and assumed to carry over to other NVIDIA parts.
- `h200-measured` carries the probe's *achieved* HBM and peer rates with efficiency 1.0 (they are
  already achieved numbers); its math rates are the H200 datasheet at 0.70 (no GEMM probe yet).

Units: TFLOP/s (1e12), TB/s (1e12 B/s), GB/s (1e9 B/s), GiB (2**30 B).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

from dynamo_dwdp.errors import UserError

# Dtype names understood everywhere in the planner.
DTYPES = ("bf16", "fp8", "nvfp4")


@dataclass(frozen=True)
class Hardware:
    """One GPU (one rank) of a machine, with its peer link to the other GPUs of the group."""

    name: str
    description: str
    # Dense tensor-core peak per dtype, TFLOP/s. A dtype missing here has no tensor-core path.
    dense_tflops: dict[str, float]
    hbm_tbps: float  # HBM peak, TB/s
    link_gbps: float  # peer link (NVLink) peak, GB/s per direction per GPU
    memory_gib: float  # HBM capacity per GPU
    math_efficiency: float
    hbm_efficiency: float
    link_efficiency: float
    sources: tuple[str, ...] = field(default=())

    # -- achievable rates (what the planner divides by) --------------------------------------------
    def flops_per_s(self, dtype: str) -> float:
        """Achievable tensor FLOP/s for `dtype`; UserError if the GPU has no such tensor-core path."""
        if dtype not in self.dense_tflops:
            allowed = ", ".join(sorted(self.dense_tflops))
            raise UserError(f"--gpu {self.name} has no {dtype} tensor cores (has: {allowed})")
        return self.dense_tflops[dtype] * 1e12 * self.math_efficiency

    @property
    def hbm_bytes_per_s(self) -> float:
        return self.hbm_tbps * 1e12 * self.hbm_efficiency

    @property
    def link_bytes_per_s(self) -> float:
        return self.link_gbps * 1e9 * self.link_efficiency

    @property
    def memory_bytes(self) -> float:
        return self.memory_gib * 2**30

    def supports(self, dtype: str) -> bool:
        return dtype in self.dense_tflops

    def with_link_gbps(self, gbps: float) -> "Hardware":
        """Same machine with an achieved peer bandwidth (efficiency 1.0), e.g. from a probe."""
        if gbps <= 0:
            raise UserError(f"--link-gbps must be > 0, got {gbps}")
        return replace(self, link_gbps=float(gbps), link_efficiency=1.0)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["sources"] = list(self.sources)
        d["achievable"] = {
            "tflops": {k: round(self.flops_per_s(k) / 1e12, 1) for k in self.dense_tflops},
            "hbm_tbps": round(self.hbm_bytes_per_s / 1e12, 3),
            "link_gbps": round(self.link_bytes_per_s / 1e9, 1),
        }
        return d


DATASHEET_MATH_EFFICIENCY = 0.70
DATASHEET_HBM_EFFICIENCY = 0.85
DATASHEET_LINK_EFFICIENCY = 0.85

HARDWARE: dict[str, Hardware] = {
    "h100": Hardware(
        name="h100",
        description="NVIDIA H100 SXM5 80 GB, NVLink 4 (datasheet peaks)",
        # H100 SXM datasheet: BF16 1,979 TFLOPS and FP8 3,958 TFLOPS *with sparsity* -> half dense.
        # Hopper has no FP4 tensor cores.
        dense_tflops={"bf16": 989.4, "fp8": 1978.9},
        hbm_tbps=3.35,  # H100 SXM datasheet: HBM3 3.35 TB/s
        link_gbps=450.0,  # NVLink 4: 900 GB/s bidirectional per GPU (18 links) -> 450 per direction
        memory_gib=80.0,  # datasheet 80 GB (nvidia-smi: 81559 MiB)
        math_efficiency=DATASHEET_MATH_EFFICIENCY,
        hbm_efficiency=DATASHEET_HBM_EFFICIENCY,
        link_efficiency=DATASHEET_LINK_EFFICIENCY,
        sources=("NVIDIA H100 Tensor Core GPU datasheet (SXM5 column)",),
    ),
    "h200": Hardware(
        name="h200",
        description="NVIDIA H200 SXM 141 GB, NVLink 4 (datasheet peaks)",
        # H200 datasheet: same tensor cores as H100 SXM (BF16 1,979 / FP8 3,958 TFLOPS with sparsity).
        dense_tflops={"bf16": 989.4, "fp8": 1978.9},
        hbm_tbps=4.8,  # H200 datasheet: HBM3e 4.8 TB/s
        link_gbps=450.0,  # NVLink 4: 900 GB/s bidirectional -> 450 per direction
        memory_gib=141.0,  # datasheet 141 GB (measured: 143771 MiB = 140.4 GiB)
        math_efficiency=DATASHEET_MATH_EFFICIENCY,
        hbm_efficiency=DATASHEET_HBM_EFFICIENCY,
        link_efficiency=DATASHEET_LINK_EFFICIENCY,
        sources=("NVIDIA H200 Tensor Core GPU datasheet (SXM column)",),
    ),
    "gb200": Hardware(
        name="gb200",
        description="one Blackwell GPU of a GB200 NVL72, NVLink 5 (datasheet peaks / 72)",
        # GB200 NVL72 datasheet (72 GPUs, with sparsity): FP4 1,440 PF, FP8 720 PF, BF16 360 PF.
        # Per GPU dense = /72 /2: FP4 10, FP8 5, BF16 2.5 PFLOP/s.
        dense_tflops={"bf16": 2500.0, "fp8": 5000.0, "nvfp4": 10000.0},
        hbm_tbps=8.0,  # NVL72 datasheet: 576 TB/s HBM3e over 72 GPUs
        link_gbps=900.0,  # NVLink 5: 1.8 TB/s bidirectional per GPU (130 TB/s / 72) -> 900 per direction
        memory_gib=186.0,  # NVL72 datasheet: 13.4 TB HBM3e over 72 GPUs
        math_efficiency=DATASHEET_MATH_EFFICIENCY,
        hbm_efficiency=DATASHEET_HBM_EFFICIENCY,
        link_efficiency=DATASHEET_LINK_EFFICIENCY,
        sources=("NVIDIA GB200 NVL72 datasheet (rack figures divided by 72; sparse peaks halved)",),
    ),
    "h200-measured": Hardware(
        name="h200-measured",
        description="2 x H200 SXM (NV18) as probed on 2026-11-23: achieved HBM copy and peer pull",
        dense_tflops={"bf16": 989.4, "fp8": 1978.9},  # datasheet, as for h200 (no GEMM probe yet)
        hbm_tbps=4.19,  # measured device-to-device copy, bytes read + written, 256 MiB bf16
        link_gbps=386.0,  # measured peer pull GPU1 -> GPU0, 128 MiB copy (one direction)
        memory_gib=140.4,  # measured: 143771 MiB per GPU
        math_efficiency=DATASHEET_MATH_EFFICIENCY,
        hbm_efficiency=1.0,  # already an achieved rate
        link_efficiency=1.0,  # already an achieved rate
        sources=(
            "PyTorch probe on 2 x H200 (NV18; 256 MiB device copy, 128 MiB peer pull; torch 2.11 + CUDA 13.0)",
            "NVIDIA H200 datasheet for the tensor-core peaks",
        ),
    ),
    "h100-measured": Hardware(
        name="h100-measured",
        description="1 x H100 SXM 80 GB as probed on 2026-11-23 (scripts/gpu_perf.py): achieved HBM copy and bf16 GEMM",
        dense_tflops={"bf16": 770.0, "fp8": 1978.9 * DATASHEET_MATH_EFFICIENCY},  # bf16: 8192^3 GEMM 756-782
        hbm_tbps=2.94,  # measured device-to-device copy, bytes read + written, 1 GiB bf16 (2.94-2.96)
        link_gbps=450.0 * DATASHEET_LINK_EFFICIENCY,  # not measured: a single-GPU machine has no peer
        memory_gib=79.6,  # nvidia-smi: 81559 MiB
        math_efficiency=1.0,  # already achieved rates (fp8: datasheet x 0.70)
        hbm_efficiency=1.0,
        link_efficiency=1.0,
        sources=(
            "docs/results/gpu_perf_h100_2026-11-23.json (torch 2.11 + CUDA 13.0, one H100 80GB HBM3)",
            "NVIDIA H100 datasheet for fp8 and NVLink",
        ),
    ),
}


def get_hardware(name: str) -> Hardware:
    """Look up a machine model by name; UserError listing the known names otherwise."""
    try:
        return HARDWARE[name.lower()]
    except KeyError:
        raise UserError(f"unknown --gpu {name!r}; known: {', '.join(HARDWARE)}") from None
