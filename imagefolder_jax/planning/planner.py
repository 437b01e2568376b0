"""Memory and step-time plan of a training config on a mesh, before renting the devices.

`plan(stage, config, mesh_sizes, ...)` compiles the real train step (`train.loop.jit_train_step`: the
same shardings, logical rules, donation, remat and dtype as training) against abstract inputs
(`jax.ShapeDtypeStruct`, nothing allocated) and reports per device the parameters, optimizer state,
EMA, frozen networks and batch (from the shardings), what the compiled program holds
(`memory_analysis()`), its FLOPs beside the analytic model FLOPs (`flops.train_flops_per_example`),
its collectives, and a step-time estimate.

Two targets:
* `topology=` (`planning.topology`): compile-only TPU or GPU devices; the TPU / GPU compiler's own
  buffers, collectives and cost model; the step time is a roofline of the compiled program
  (`roofline`), beside the TPU cost model's `optimal_seconds` where that is a time.
* `devices=N` fake CPU devices (`XLA_FLAGS=--xla_force_host_platform_device_count=N` before jax
  starts): XLA:CPU's buffers, which differ from an accelerator's (temporaries are not a plan for a
  GPU or TPU); the step time is analytic FLOPs / (devices x peak x an assumed MFU).
"""
from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from imagefolder_jax.planning import hlo, hlo_costs
from imagefolder_jax.planning.chips import CHIPS as CHIP_SPECS
from imagefolder_jax.planning.chips import ChipSpec
from imagefolder_jax.planning.errors import PlanError
from imagefolder_jax.planning.topology import Topology, compile_only_devices

CHIP_MEMORY: dict[str, float] = {name: chip.memory_bytes for name, chip in CHIP_SPECS.items()}
CHIPS = tuple(sorted(CHIP_MEMORY)) + ("cpu",)
# Share of a GPU's memory a plan may use: the launchers set XLA_PYTHON_CLIENT_MEM_FRACTION=0.90.
# TPU memory in `chips` is already the compiler's own limit.
USABLE_FRACTION = 0.9
# Deviceless GPU compiles cannot autotune Triton's GEMM tiles, and Triton's default tiles fail to
# compile some fused dots ("Couldn't find output tile sizes"); plans use cuBLAS GEMMs instead.
GPU_COMPILER_OPTIONS = {"xla_gpu_enable_triton_gemm": False}


@dataclasses.dataclass
class Plan:
  """Per-device bytes, FLOPs and the step-time estimate of one (config, mesh, target).

  compiler: 'tpu' / 'gpu' (compile-only devices of `topology`) or 'cpu' (fake CPU devices; its
  temporaries are XLA:CPU's). Byte counts are per device; NaN when not compiled.
  """
  stage: str
  mesh: dict
  devices: int
  chip: str
  global_batch: int
  params_bytes: float
  opt_state_bytes: float
  ema_bytes: float
  other_state_bytes: float
  frozen_bytes: float
  batch_bytes: float
  temp_bytes: float
  xla_flops_per_device: float
  analytic_flops_per_step: float
  peak_flops: float
  mfu: float
  chip_memory: float
  num_params: int
  compiler: str = "cpu"
  topology: Optional[str] = None
  argument_bytes: float = float("nan")
  output_bytes: float = float("nan")
  alias_bytes: float = float("nan")
  compiled_peak_bytes: float = float("nan")
  bytes_accessed: float = float("nan")
  kernel_flops_per_device: float = 0.0   # in Pallas kernels, which the compiler's count leaves out
  kernel_bytes_per_device: float = 0.0   # their operands and results, which its 'bytes accessed' leaves out
  vector_ops_per_device: float = 0.0     # element operations of kernels on the vector units: in no roofline term
  loop_scale: Optional[dict] = None       # hlo_costs.loop_scales: the cost model's counts x these = as run
  collectives: dict = dataclasses.field(default_factory=dict)
  roofline: dict = dataclasses.field(default_factory=dict)
  optimal_seconds: Optional[float] = None
  optimal_note: str = ""
  out_of_memory: str = ""     # the compiler's refusal (TPU RESOURCE_EXHAUSTED), when it refused
  compiler_options: dict = dataclasses.field(default_factory=dict)
  compiler_warnings: list = dataclasses.field(default_factory=list)

  @property
  def accelerator(self) -> bool:
    return self.compiler in ("tpu", "gpu")

  @property
  def peak_bytes(self) -> float:
    """Per device at the step's peak. Accelerator compiles: the compiler's own peak. Fake CPU
    devices: the (donated, so not doubled) state, frozen nets, batch and XLA:CPU's temporaries
    (without temporaries when not compiled)."""
    if self.accelerator and not np.isnan(self.compiled_peak_bytes):
      return self.compiled_peak_bytes
    temp = 0.0 if np.isnan(self.temp_bytes) else self.temp_bytes
    return (self.params_bytes + self.opt_state_bytes + self.ema_bytes + self.other_state_bytes + self.frozen_bytes
            + self.batch_bytes + temp)

  @property
  def memory_limit(self) -> float:
    return self.chip_memory if self.compiler == "tpu" else USABLE_FRACTION * self.chip_memory

  @property
  def fits(self) -> bool:
    return not self.out_of_memory and self.peak_bytes <= self.memory_limit

  @property
  def step_seconds(self) -> float:
    """Accelerators: the compiled program's roofline; fake CPU devices: analytic FLOPs at `mfu`."""
    if self.roofline.get("seconds"):
      return self.roofline["seconds"]
    return self.analytic_flops_per_step / (self.devices * self.peak_flops * self.mfu)

  @property
  def images_per_second(self) -> float:
    return self.global_batch / self.step_seconds

  @property
  def implied_mfu(self) -> float:
    """Analytic model FLOPs / (devices x peak x step time)."""
    return self.analytic_flops_per_step / (self.devices * self.peak_flops * self.step_seconds)

  def to_dict(self) -> dict:
    d = dataclasses.asdict(self)
    fin = lambda v: None if isinstance(v, float) and not np.isfinite(v) else v
    d = {k: fin(v) for k, v in d.items()}
    d.update(peak_bytes=fin(self.peak_bytes), fits=self.fits, chip_memory=self.chip_memory,
             memory_limit=self.memory_limit, step_seconds=self.step_seconds,
             images_per_second=self.images_per_second, implied_mfu=self.implied_mfu,
             chips=self.devices, roofline_seconds=self.roofline.get("seconds"),
             flops_per_chip=fin(self.xla_flops_per_device))
    return d


def parse_mesh(text: str) -> dict:
  """'data=2,fsdp=4,tensor=1[,dcn_data=2]' -> {'data': 2, 'fsdp': 4, 'tensor': 1, ...}."""
  from imagefolder_jax.parallel import MESH_KEYS
  out = {}
  for part in filter(None, (p.strip() for p in text.split(","))):
    name, sep, value = part.partition("=")
    if not sep or name not in MESH_KEYS:
      raise PlanError(f"--mesh {text!r}: {part!r} is not AXIS=SIZE with AXIS in {MESH_KEYS}")
    try:
      out[name] = int(value)
    except ValueError:
      raise PlanError(f"--mesh {text!r}: size {value!r} of {name} is not an integer") from None
  return out


def per_device_bytes(abstract: Any, shardings: Any) -> float:
  """Bytes one device holds of a tree of ShapeDtypeStructs placed with `shardings`."""
  total = 0
  for x, s in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings)):
    shape = s.shard_shape(tuple(x.shape)) if x.shape else ()
    total += int(np.prod(shape)) * jnp.dtype(x.dtype).itemsize
  return float(total)


def chip_peak_and_memory(chip: str) -> tuple[float, float]:
  """(peak FLOP/s, memory bytes) of one device of `chip`; 'cpu' measures this machine's matmul rate."""
  from imagefolder_jax.planning import flops
  if chip == "cpu":
    import os
    return flops.measure_cpu_matmul_rate(), float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
  if chip not in CHIP_MEMORY or chip not in flops.PEAK_FLOPS:
    raise PlanError(f"--chip {chip!r}: known chips are {CHIPS}")
  return flops.PEAK_FLOPS[chip], CHIP_MEMORY[chip]


def make_task(stage: str, config: ml_collections.ConfigDict):
  """The training task without loading any weights. The generator's frozen tokenizer comes from
  `config.tokenizer_bundle` when set, else the released layout (`TokenizerConfig()`'s defaults)."""
  if stage == "tokenizer":
    from imagefolder_jax.train.tokenizer_task import TokenizerTask
    task = TokenizerTask(config, load_frozen=False)
    return task, task.abstract_frozen()
  if stage == "generator":
    from imagefolder_jax.train.generator_task import GeneratorTask
    tokenizer_config = None
    if not config.get("tokenizer_bundle"):
      from imagefolder_jax.models.tokenizer import TokenizerConfig
      tokenizer_config = TokenizerConfig()
    task = GeneratorTask(config, load_frozen=False, tokenizer_config=tokenizer_config)
    return task, task.abstract_frozen()
  raise PlanError(f"stage must be 'tokenizer' or 'generator', got {stage!r}")


def _target_devices(devices: Optional[int], topology: Optional[Topology]) -> list:
  if topology is not None:
    return compile_only_devices(topology)
  if devices is None or devices < 1 or jax.device_count() < devices:
    raise PlanError(f"--devices {devices}: this process has {jax.device_count()} devices (set "
                    f"XLA_FLAGS=--xla_force_host_platform_device_count={devices} before jax starts)")
  return jax.devices()[:devices]


def default_mesh_sizes(topology: Optional[Topology], config_mesh: dict, mesh_sizes: dict) -> dict:
  """The config's mesh with `mesh_sizes` on top; on several TPU slices or GPU nodes the data axis
  goes across them (dcn_data) unless a dcn_* size is given (FSDP inside, data parallel across)."""
  sizes = {**config_mesh, **mesh_sizes}
  granules = 1
  if topology is not None:
    granules = topology.slices if topology.platform == "tpu" else topology.shape[0]
  if granules > 1 and not any(k.startswith("dcn_") and int(sizes.get(k, 1)) > 1 for k in sizes):
    sizes["dcn_data"] = granules
    if "data" not in mesh_sizes:
      sizes["data"] = -1
  return sizes


def _example_batch(stage: str, task, batch: int, pretokenized: bool) -> dict:
  if stage == "generator" and pretokenized:
    c = task.model_config
    return {"codes": jax.ShapeDtypeStruct((batch, c.num_branches, c.num_tokens), jnp.int32),
            "label": jax.ShapeDtypeStruct((batch,), jnp.int32)}
  r = task.resolution
  return {"image": jax.ShapeDtypeStruct((batch, r, r, 3), jnp.float32),
          "label": jax.ShapeDtypeStruct((batch,), jnp.int32)}


_RESOURCE_EXHAUSTED = re.compile(r"RESOURCE_EXHAUSTED.*?required for (.*?) \(([\d.]+[KMGT]?)\) exceeds available "
                                 r"HBM \(([\d.]+[KMGT]?)\)", re.S)
_UNITS = {"": 1, "K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}


def _gib(text: str) -> float:
  """'5.18T' (the TPU compiler's binary units) -> GiB."""
  unit = text[-1] if text[-1] in _UNITS else ""
  return float(text[:-1] if unit else text) * _UNITS[unit] / 2 ** 30


# Compiler log lines worth a user's attention (the rest of its log is progress chatter).
_WARNING_MARKERS = ("Involuntary full rematerialization", "Can't reduce memory use below", "rematerialization")


def compiler_warnings(lines: Sequence[str]) -> list[str]:
  """The compiler's warnings among captured log lines, without the log prefix, shortened, once each."""
  found: list[str] = []
  for line in lines:
    if any(m in line for m in _WARNING_MARKERS):
      text = re.sub(r"^[WEI]\d{4} [\d:.]+\s+\d+\s+\S+\]\s*", "", line.strip())
      text = re.sub(r"\s+", " ", text)[:240]
      if text not in found:
        found.append(text)
  return found


def compile_for(lowered, compiler: str, warnings: Optional[list] = None):
  """(compiled program or None, the compiler's out-of-memory refusal as one line or ''); the
  compiler's warnings (`compiler_warnings`) are appended to `warnings`."""
  from jax._src import config as jax_config

  from imagefolder_jax._startup import captured_stderr
  options = GPU_COMPILER_OPTIONS if compiler == "gpu" else {}
  compiled, error = None, None
  # A persistent compilation cache (JAX_COMPILATION_CACHE_DIR) cannot hold compile-only programs.
  with captured_stderr() as lines, jax_config.enable_compilation_cache(False):
    try:
      compiled = lowered.compile(compiler_options=options or None)
    except Exception as e:  # XlaRuntimeError; the TPU compiler refuses programs larger than HBM
      error = e
  if warnings is not None:
    warnings.extend(compiler_warnings(lines))
  if error is None:
    return compiled, ""
  text = str(error)
  m = _RESOURCE_EXHAUSTED.search(text)
  if m:
    return None, (f"the {compiler.upper()} compiler needs {_gib(m.group(2)):,.2f} GiB for {m.group(1)}, "
                  f"{_gib(m.group(3)):.2f} GiB available")
  if "RESOURCE_EXHAUSTED" in text:
    return None, " ".join(text.split())[:300]
  raise PlanError(f"the {compiler.upper()} compiler failed: {' '.join(text.split())[:400]}") from None


def analyze_compiled(compiled, devices: Sequence, chip: Optional[ChipSpec],
                     analytic_flops: float, kernel_flops: Optional[Callable[[str], float]] = None,
                     vector_ops: Optional[Callable[[str], float]] = None) -> dict:
  """memory_analysis / cost_analysis / collectives / roofline of an accelerator compile -> Plan fields.
  kernel_flops: FLOPs per device of the program's Pallas kernels, from its HLO text; vector_ops: their
  element operations on the vector units, likewise."""
  memory = compiled.memory_analysis()
  fields = dict(argument_bytes=float(memory.argument_size_in_bytes), output_bytes=float(memory.output_size_in_bytes),
                alias_bytes=float(memory.alias_size_in_bytes), temp_bytes=float(memory.temp_size_in_bytes))
  # The TPU compiler's peak_memory_in_bytes is at times below arguments + temporaries (41.5 vs 46.9
  # GiB for the ImageNet tokenizer on v5p): the larger of the two is the plan's peak.
  peak = float(getattr(memory, "peak_memory_in_bytes", 0) or 0)
  fields["compiled_peak_bytes"] = max(peak, fields["argument_bytes"] + fields["output_bytes"] - fields["alias_bytes"]
                                      + fields["temp_bytes"])
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  text = compiled.as_text()
  fields["collectives"] = hlo.collectives(text, devices)
  fields["kernel_flops_per_device"] = float(kernel_flops(text)) if kernel_flops is not None else 0.0
  fields["vector_ops_per_device"] = float(vector_ops(text)) if vector_ops is not None else 0.0
  if cost:
    fields["xla_flops_per_device"] = float(cost.get("flops", float("nan")))
    fields["bytes_accessed"] = float(cost.get("bytes accessed", float("nan")))
    fields["optimal_seconds"], fields["optimal_note"] = hlo.repaired_optimal_seconds(cost.get("optimal_seconds"), text)
    fields["loop_scale"] = hlo_costs.loop_scales(text)
    fields["kernel_bytes_per_device"] = hlo_costs.kernel_bytes(text)
  else:
    fields["optimal_note"] = "the GPU compiler has no cost model here (cost_analysis() is None)"
  if chip is not None:
    fields["roofline"] = roofline(fields, chip, analytic_flops / len(devices))
  return fields


def roofline(fields: dict, chip: ChipSpec, analytic_flops_per_chip: float) -> dict:
  """Seconds per step on one chip: max(FLOPs / peak, HBM bytes / bandwidth) + collective wire bytes
  over ICI / NVLink and DCN / the network, with no overlap of communication and compute (an upper
  bound on a good schedule; a lower bound on a poor one). FLOPs: the compiled count where the
  compiler gives one, plus its Pallas kernels' (which it cannot see into), at least the analytic
  count per chip; HBM bytes: the cost model's 'bytes accessed' (TPU only), which prices Pallas kernels
  at 0, plus the kernels' operands and results (fields['kernel_bytes_per_device']). The cost model
  prices a while body once: in a program with loops of known trip count (`train.grad_accum`) its
  counts are scaled by fields['loop_scale'] (hlo_costs.loop_scales)."""
  scale = fields.get("loop_scale") or {}
  compiled_flops = (fields.get("xla_flops_per_device", float("nan")) * scale.get("flops", 1.0)
                    + fields.get("kernel_flops_per_device", 0.0))
  flops = analytic_flops_per_chip if np.isnan(compiled_flops) else max(compiled_flops, analytic_flops_per_chip)
  compute = flops / chip.peak_flops
  accessed = (fields.get("bytes_accessed", float("nan")) * scale.get("bytes", 1.0)
              + fields.get("kernel_bytes_per_device", 0.0))
  memory = None if np.isnan(accessed) else accessed / chip.memory_bandwidth
  wire = sum(v["wire_bytes"] for k, v in fields["collectives"].items() if isinstance(v, dict))
  cross = sum(v["cross_bytes"] for k, v in fields["collectives"].items() if isinstance(v, dict))
  ici, dcn = (wire - cross) / chip.ici_bandwidth, cross / chip.dcn_bandwidth
  seconds = max(compute, memory or 0.0) + ici + dcn
  return {"compute_seconds": compute, "memory_seconds": memory, "ici_seconds": ici, "dcn_seconds": dcn,
          "seconds": seconds, "flops_per_chip": flops}


def plan(stage: str, config: ml_collections.ConfigDict, mesh_sizes: dict, devices: Optional[int] = None,
         chip: Optional[str] = None, mfu: float = 0.4, pretokenized: Optional[bool] = None, compile: bool = True,
         topology: Optional[Topology] = None) -> Plan:
  """Compiles `stage`'s train step for `config` on a (data, fsdp, tensor, dcn_*) mesh.

  topology: compile-only TPU / GPU devices (`planning.topology.parse_topology`); else `devices` fake
    CPU devices planned for `chip`'s peak and memory ('h100', 'v5p', ..., 'cpu').
  pretokenized: the generator reads pre-tokenized codes (`pretokenize`; default: when
    config.data.source is 'codes:...'), else it encodes images with the frozen tokenizer in the step.
  compile: False skips the compile (seconds instead of minutes for large models): the state, frozen
    and batch bytes are exact, the compiled numbers are then unknown (NaN).
  A program too large for the chip is a plan that does not fit (`out_of_memory`), not an error.
  """
  from imagefolder_jax import parallel
  from imagefolder_jax.planning import flops
  from imagefolder_jax.train import checkpointing, loop
  if not 0 < mfu <= 1:
    raise PlanError(f"--mfu {mfu}: must be in (0, 1]")
  target = _target_devices(devices, topology)
  if topology is not None:
    spec: Optional[ChipSpec] = topology.chip
    peak, memory, chip_name, compiler = spec.peak_flops, spec.memory_bytes, spec.name, topology.platform
  else:
    spec = None
    peak, memory = chip_peak_and_memory(chip)
    chip_name, compiler = chip, "cpu"
  mesh_config = default_mesh_sizes(topology, dict(config.get("mesh", {})), mesh_sizes)
  try:
    mesh, rules = parallel.mesh_from_config(mesh_config, devices=target)
  except parallel.MeshConfigError as e:
    raise PlanError(str(e)) from e
  batch = int(config.data.batch_size)
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  if batch % shards:
    raise PlanError(f"data.batch_size={batch} is not divisible by the {shards} batch shards of the mesh "
                    f"{dict(mesh.shape)} (set --config.data.batch_size to a multiple of {shards})")
  task, frozen = make_task(stage, config)
  if pretokenized is None:
    pretokenized = stage == "generator" and str(config.data.source).startswith("codes:")
  example = _example_batch(stage, task, batch, pretokenized)
  abstract, shardings = loop.shardings_for(task, mesh, rules, jax.random.key(0), example)
  frozen_shardings = parallel.frozen_shardings(
      mesh, frozen, mesh_config.get("frozen_replicate_below_mb", parallel.FROZEN_REPLICATE_BELOW_MB))
  step = loop.jit_train_step(task, mesh, rules, shardings, frozen_shardings)
  batch_abstract = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=parallel.batch_sharding(mesh, len(v.shape)))
                    for k, v in example.items()}
  frozen_abstract = checkpointing.abstract_with_shardings(frozen, frozen_shardings)
  analytic = float(flops.train_flops_per_example(task, pretokenized=pretokenized)["total"] * batch)
  fields: dict = dict(temp_bytes=float("nan"), xla_flops_per_device=float("nan"))
  if compile:
    with jax.set_mesh(mesh):
      lowered = step.lower(checkpointing.abstract_with_shardings(abstract, shardings), frozen_abstract,
                           batch_abstract)
    if compiler == "cpu":
      compiled = lowered.compile()
      cost = compiled.cost_analysis()
      cost = cost[0] if isinstance(cost, (list, tuple)) else cost
      fields = dict(temp_bytes=float(compiled.memory_analysis().temp_size_in_bytes),
                    xla_flops_per_device=float(cost.get("flops", 0.0)) if cost else 0.0)
    else:
      fields["compiler_warnings"] = []
      compiled, refusal = compile_for(lowered, compiler, fields["compiler_warnings"])
      fields["compiler_options"] = dict(GPU_COMPILER_OPTIONS) if compiler == "gpu" else {}
      if compiled is None:
        fields["out_of_memory"] = refusal
      else:
        kernels = (functools.partial(flops.attention_kernel_flops, scales=task.model_config.scales,
                                     head_dim=task.model_config.head_dim) if stage == "generator" else None)
        fields.update(analyze_compiled(compiled, list(np.asarray(mesh.devices).flat), spec, analytic, kernels))
  parts = {k: per_device_bytes(abstract[k], shardings[k]) for k in ("params", "opt_state", "ema_params")}
  other = sum(per_device_bytes(abstract[k], shardings[k]) for k in abstract if k not in parts)
  return Plan(stage=stage, mesh=dict(mesh.shape), devices=len(target), chip=chip_name, global_batch=batch,
              params_bytes=parts["params"], opt_state_bytes=parts["opt_state"], ema_bytes=parts["ema_params"],
              other_state_bytes=other, frozen_bytes=per_device_bytes(frozen, frozen_shardings),
              batch_bytes=per_device_bytes(batch_abstract, [v.sharding for v in batch_abstract.values()]),
              analytic_flops_per_step=analytic, peak_flops=peak, mfu=mfu, chip_memory=memory,
              num_params=int(sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract["params"]))),
              compiler=compiler, topology=topology.describe() if topology is not None else None,
              **{"temp_bytes": float("nan"), "xla_flops_per_device": float("nan"), **fields})
