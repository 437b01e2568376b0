"""What one accelerator chip can do: peak matmul rate, memory, memory and network bandwidth.

Figures are the vendors' published ones (sources beside each entry), except the TPUs' memory: the
HBM the TPU compiler lets one program use (libtpu 0.0.42's RESOURCE_EXHAUSTED message: "available
HBM"), a little below the chip's. Bandwidths are bytes per second per chip in one direction: the
interconnect's figure is half the published bidirectional one. They feed the plan's roofline and
verdict (`planning.plan`), not any compile.
"""
from __future__ import annotations

import dataclasses

GB = 1e9
GIB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class ChipSpec:
  """One chip (one jax device: TPU v4/v5p devices are megacore chips, GPUs one GPU)."""
  name: str
  platform: str            # 'tpu' or 'gpu'
  peak_flops: float        # dense bf16 matmul FLOP/s
  memory_bytes: float      # HBM a program may use: TPU the compiler's limit, GPU the memory size
  memory_bandwidth: float  # HBM bytes/s
  ici_bandwidth: float     # bytes/s per chip and direction inside a slice / node (ICI, NVLink)
  dcn_bandwidth: float     # bytes/s per chip and direction across slices / nodes (DCN, InfiniBand)
  source: str


CHIPS: dict[str, ChipSpec] = {c.name: c for c in (
    # Cloud TPU v4 page: 275 TFLOPS bf16, 32 GiB HBM2 at 1200 GB/s; ICI from the pod's 1.1 PB/s
    # all-reduce bandwidth over 4096 chips. DCN per chip is not published: v5e's figure.
    ChipSpec("v4", "tpu", 275e12, 30.75 * GIB, 1200 * GB, 1.1e15 / 4096, 25e9 / 8,
             "cloud.google.com/tpu/docs/v4"),
    # Cloud TPU v5e page: 197 TFLOPS bf16, 16 GB HBM2 at 819 GB/s, ICI 400 GB/s bidirectional,
    # 2 x 100 Gbps NICs per 8-chip host.
    ChipSpec("v5e", "tpu", 197e12, 15.75 * GIB, 819 * GB, 200 * GB, 200e9 / 8 / 8,
             "cloud.google.com/tpu/docs/v5e"),
    # Cloud TPU v5p page: 459 TFLOPS bf16, 95 GiB HBM2e at 2765 GB/s, ICI 1200 GB/s bidirectional,
    # DCN 50 Gbps per chip.
    ChipSpec("v5p", "tpu", 459e12, 95.74 * GIB, 2765 * GB, 600 * GB, 50e9 / 8,
             "cloud.google.com/tpu/docs/v5p"),
    # Cloud TPU v6e page: 918 TFLOPS bf16, 32 GB HBM at 1638 GB/s, ICI 800 GB/s bidirectional. DCN
    # per chip is not published: v5e's figure.
    ChipSpec("v6e", "tpu", 918e12, 31.25 * GIB, 1638 * GB, 400 * GB, 200e9 / 8 / 8,
             "cloud.google.com/tpu/docs/v6e"),
    # NVIDIA H100 SXM5 datasheet: 989.4 TFLOPS bf16 dense, 80 GB HBM3 at 3.35 TB/s, NVLink 900 GB/s
    # bidirectional; one 400 Gb/s InfiniBand NIC per GPU (DGX H100).
    ChipSpec("h100", "gpu", 989.4e12, 80 * GB, 3.35e12, 450 * GB, 400e9 / 8,
             "nvidia.com H100 datasheet; DGX H100"),
    # NVIDIA H200 SXM datasheet: the H100's tensor cores, 141 GB HBM3e at 4.8 TB/s, NVLink 900 GB/s.
    ChipSpec("h200", "gpu", 989.4e12, 141 * GB, 4.8e12, 450 * GB, 400e9 / 8,
             "nvidia.com H200 datasheet; DGX H200"),
    # NVIDIA A100 80GB SXM datasheet: 312 TFLOPS bf16 dense, 2.039 TB/s, NVLink 600 GB/s
    # bidirectional; one 200 Gb/s HDR InfiniBand NIC per GPU (DGX A100).
    ChipSpec("a100", "gpu", 312e12, 80 * GB, 2.039e12, 300 * GB, 200e9 / 8,
             "nvidia.com A100 datasheet; DGX A100"),
)}
