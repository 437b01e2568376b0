"""Accelerator topologies by name, and compile-only devices for them on a machine without any.

Names as they are sold: Cloud TPU `v4-32`, `v5p-64` (TensorCores: 2 per chip, so 32 chips),
`v5e-256` / `v5litepod-256`, `v6e-64` (chips), or the raw `v5p:4x4x4` / `v5e:2x4` chip grid; GPU nodes
`h100-8`, `h100-16` (2 nodes x 8), `h200-8`, `a100-8`. `--slices N` puts N such TPU slices side by
side over the data-centre network (their devices carry `slice_index`, which the mesh's `dcn_*` axes
follow); GPU nodes are counted in the name.

The devices come from `jax.experimental.topologies.get_topology_desc`: TPU ones from libtpu (the
`tpu` extra), GPU ones from the CUDA plugin (the `gpu-compile` extra) with a `GpuTargetConfigProto`
shipped in `gpu_targets/` (from XLA's `xla/backends/gpu/target_config/specs/`). Nothing runs on
them: `jax.jit(...).lower(...).compile()` over a mesh of them runs that platform's compiler.
"""
from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import math
import os
import re
from typing import Any, Optional

from imagefolder_jax.planning.chips import CHIPS, ChipSpec
from imagefolder_jax.planning.errors import PlanError

# Cloud names count TensorCores for v4 and v5p (2 per chip), chips for v5e and v6e.
TPU_CORES_PER_CHIP = {"v4": 2, "v5p": 2, "v5e": 1, "v6e": 1}
TPU_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e"}
GPUS_PER_NODE = 8
GPU_TARGETS = {"h100": "h100.txtpb", "h200": "h200.txtpb", "a100": "a100.txtpb"}
# Lines libtpu prints when it loads on a machine that is not a TPU VM.
LIBTPU_NOISE = ("could not determine TPU", "Logging before InitGoogle()", "unexpected worker hostname",
                "=== Source Location Trace", "libtpu_init_utils.cc", "Failed to find host bounds")


@dataclasses.dataclass(frozen=True)
class Topology:
  """name: as given; shape: the chip grid of one slice (TPU, 2 or 3 dims) or (nodes, GPUs per node)."""
  name: str
  chip: ChipSpec
  shape: tuple[int, ...]
  slices: int = 1

  @property
  def platform(self) -> str:
    return self.chip.platform

  @property
  def chips_per_slice(self) -> int:
    return math.prod(self.shape)

  @property
  def chips(self) -> int:
    return self.chips_per_slice * self.slices

  @property
  def grid(self) -> str:
    return "x".join(map(str, self.shape))

  def describe(self) -> str:
    if self.platform == "gpu":
      nodes, per_node = self.shape
      return f"{self.name}: {nodes} node(s) x {per_node} {self.chip.name.upper()}"
    slices = f" x {self.slices} slices" if self.slices > 1 else ""
    return f"{self.name} = {self.chip.name}:{self.grid} ({self.chips_per_slice} chips){slices}"


def _tpu_grid(kind: str, chips: int) -> tuple[int, ...]:
  """The chip grid Cloud TPU gives `chips` chips of `kind`: 2-D for v5e/v6e, 3-D for v4/v5p."""
  if chips < 1 or chips & (chips - 1):
    raise PlanError(f"{chips} chips: Cloud TPU slices have a power-of-two number of chips")
  if TPU_CORES_PER_CHIP[kind] == 1:  # 2-D torus: 1x1, 2x2, 2x4, 4x4, 4x8, 8x8, 8x16, 16x16
    k = chips.bit_length() - 1
    a = 2 ** (k // 2)
    return (a, chips // a)
  if chips < 4:
    return (1, 1, chips)
  grid = [2, 2, 1]  # v4-8 / v5p-8; then the rightmost smallest side doubles: 2x2x2, 2x2x4, 2x4x4, 4x4x4
  while math.prod(grid) < chips:
    smallest = min(grid)
    i = max(j for j, side in enumerate(grid) if side == smallest)
    grid[i] *= 2
  return tuple(grid)


def parse_topology(name: str, slices: int = 1) -> Topology:
  """'v5p-64', 'v5litepod-256', 'v5p:4x4x4', 'h100-16', ... -> Topology (PlanError names the problem)."""
  text = name.strip().lower()
  if slices < 1:
    raise PlanError(f"--slices {slices}: must be >= 1")
  raw = re.fullmatch(r"([a-z0-9]+):(\d+(?:x\d+){1,2})", text)
  sold = re.fullmatch(r"([a-z0-9]+)-(\d+)", text)
  kind = (raw or sold).group(1) if (raw or sold) else None
  kind = TPU_ALIASES.get(kind, kind)
  known = sorted(TPU_CORES_PER_CHIP) + sorted(GPU_TARGETS)
  if kind not in known:
    raise PlanError(f"--topology {name!r}: expected NAME-COUNT (v4-32, v5p-64, v5e-256, v5litepod-256, v6e-64, "
                    f"h100-8, h100-16, h200-8, a100-8) or TPU:GRID (v5p:4x4x4, v5e:2x4); known chips {known}")
  chip = CHIPS[kind]
  if chip.platform == "gpu":
    if raw:
      raise PlanError(f"--topology {name!r}: GPUs are named by count, e.g. {kind}-8 or {kind}-16")
    gpus = int(sold.group(2))
    if slices != 1:
      raise PlanError(f"--slices is for TPU slices; GPU nodes are counted in the name ({kind}-{8 * slices})")
    if gpus < 1 or (gpus > GPUS_PER_NODE and gpus % GPUS_PER_NODE):
      raise PlanError(f"--topology {name!r}: {gpus} GPUs are not whole nodes of {GPUS_PER_NODE}")
    per_node = min(gpus, GPUS_PER_NODE)
    return Topology(f"{kind}-{gpus}", chip, (gpus // per_node, per_node))
  if raw:
    shape = tuple(int(x) for x in raw.group(2).split("x"))
    dims = 2 if TPU_CORES_PER_CHIP[kind] == 1 else 3
    if len(shape) != dims or min(shape) < 1:
      raise PlanError(f"--topology {name!r}: {kind} grids have {dims} sides, e.g. "
                      f"{'v5e:4x4' if dims == 2 else 'v5p:2x4x4'}")
    return Topology(f"{kind}:{raw.group(2)}", chip, shape, slices)
  count = int(sold.group(2))
  cores = TPU_CORES_PER_CHIP[kind]
  if count % cores:
    raise PlanError(f"--topology {name!r}: {kind} names count TensorCores ({cores} per chip); {count} is not a "
                    f"multiple of {cores}")
  return Topology(f"{kind}-{count}", chip, _tpu_grid(kind, count // cores), slices)


def _pinned_version(package: str) -> Optional[str]:
  """The version of `package` that the installed jax pins in its extras ('0.0.42.*' for libtpu)."""
  for requirement in importlib.metadata.requires("jax") or ():
    m = re.match(rf"{re.escape(package)}\s*==\s*([\w.*]+)", requirement)
    if m:
      return m.group(1)
  return None


def _check_compiler(platform: str) -> None:
  """PlanError (one line, the command that fixes it) unless this platform's compiler is installed
  and built for the installed jaxlib: a mismatched PJRT plugin aborts the whole process."""
  jaxlib = importlib.metadata.version("jaxlib")
  if platform == "tpu":
    if importlib.util.find_spec("libtpu") is None:
      raise PlanError(f"compiling for TPU needs libtpu: pip install 'imagefolder-jax[tpu]' "
                      f"(libtpu=={_pinned_version('libtpu') or '?'} for jax {jaxlib})")
    have, want = importlib.metadata.version("libtpu"), _pinned_version("libtpu")
    if want and not re.fullmatch(want.replace(".", r"\.").replace("*", ".*"), have):
      raise PlanError(f"libtpu {have} does not match jax {jaxlib} (needs libtpu=={want}): "
                      "pip install 'imagefolder-jax[tpu]'")
    return
  if importlib.util.find_spec("jax_cuda12_plugin") is None:
    raise PlanError(f"compiling for GPUs needs the CUDA plugin: pip install 'imagefolder-jax[gpu-compile]' "
                    f"(jax-cuda12-plugin=={jaxlib}, jax-cuda12-pjrt=={jaxlib})")
  for package in ("jax-cuda12-plugin", "jax-cuda12-pjrt"):
    try:
      have = importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
      raise PlanError(f"{package} is missing: pip install 'imagefolder-jax[gpu-compile]'") from None
    if have != jaxlib:
      raise PlanError(f"{package} {have} does not match jaxlib {jaxlib}: pip install '{package}=={jaxlib}'")


def gpu_target_config(chip: str) -> str:
  """The GpuTargetConfigProto text shipped for `chip` ('h100', 'h200', 'a100')."""
  path = os.path.join(os.path.dirname(__file__), "gpu_targets", GPU_TARGETS[chip])
  with open(path) as f:
    return f.read()


def compile_only_devices(topology: Topology) -> list[Any]:
  """The devices of `topology` for jax's compiler (nothing can run on them), in id order."""
  _check_compiler(topology.platform)
  from jax.experimental import topologies

  from imagefolder_jax._startup import filtered_stderr
  if topology.platform == "gpu":
    nodes, per_node = topology.shape
    try:
      desc = topologies.get_topology_desc(platform="cuda", target_config=gpu_target_config(topology.chip.name),
                                          topology=f"1x{nodes}x{per_node}")
    except NotImplementedError:
      raise PlanError("the CUDA plugin did not register (it checks for CUDA unless JAX_PLATFORMS=cpu or "
                      "JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1): rerun with JAX_PLATFORMS=cpu") from None
    return list(desc.devices)
  kind = topology.chip.name
  options: dict[str, Any] = {}
  if kind == "v4":
    options["chip_config_name"] = "megacore"   # one device per chip, as v5p (maxtext's v4 setting)
  if topology.chips_per_slice == 1:
    options["chips_per_host_bounds"] = (1, 1, 1)
  elif TPU_CORES_PER_CHIP[kind] == 1 and topology.chips_per_slice >= 8:
    options["chips_per_host_bounds"] = (2, 4, 1)  # v5e / v6e hosts hold 8 chips
  if topology.slices > 1:
    options["num_slices"] = topology.slices
  os.environ.setdefault("TPU_LOG_DIR", "disabled")  # else libtpu leaves a log file per process in /tmp
  # libtpu takes /tmp/libtpu_lockfile for the chips of this host; compile-only devices use none, and
  # another process (a test worker, a training job on a TPU VM) may hold it.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  try:
    with filtered_stderr(LIBTPU_NOISE):
      desc = topologies.get_topology_desc(platform="tpu", topology_name=f"{kind}:{topology.grid}", **options)
  except Exception as e:  # libtpu's own message names the layout it refused
    raise PlanError(f"libtpu cannot lay out {topology.describe()}: {str(e).strip().splitlines()[0][:300]}") from None
  return sorted(desc.devices, key=lambda d: d.id)
