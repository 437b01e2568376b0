"""Memory and step-time plan of a training config on a mesh, before renting the devices.

`plan(stage, config, mesh, devices, chip)` compiles the real train step (`train.loop.jit_train_step`,
the same shardings and logical rules as training) against abstract inputs
(`jax.ShapeDtypeStruct`, nothing allocated) on `devices` fake CPU devices, and reports per device:
parameters, optimizer state, EMA, frozen networks (from the shardings), XLA's temporaries
(`memory_analysis()`), the FLOPs of the compiled program (`cost_analysis()`) beside the analytic
model FLOPs (`flops.train_flops_per_example`), and the step time / images per second that the chip's
peak gives at a stated MFU.

Limits (said in the output too): the program is compiled by XLA:CPU, whose fusion and buffer
assignment differ from the GPU/TPU compilers, so temporaries are an estimate; the step time is
analytic FLOPs / (devices x peak x MFU), not a measurement. Needs `jax.device_count() >= devices`:
set `XLA_FLAGS=--xla_force_host_platform_device_count=N` before jax starts (the CLI verb does).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

# Memory per chip (bytes of HBM a JAX device sees), from the vendors' spec sheets.
CHIP_MEMORY: dict[str, float] = {
    "h100": 80e9,        # H100 SXM5: 80 GB HBM3
    "h200": 141e9,       # H200 SXM: 141 GB HBM3e
    "a100": 80e9,        # A100 SXM4 80GB
    "v4": 32 * 2 ** 30,  # TPU v4: 32 GiB HBM2 per chip
    "v5e": 16 * 2 ** 30,  # TPU v5e: 16 GiB HBM2 per chip
    "v5p": 95 * 2 ** 30,  # TPU v5p: 95 GiB HBM2e per chip
    "v6e": 32 * 2 ** 30,  # TPU v6e: 32 GiB HBM per chip
}
CHIPS = tuple(sorted(CHIP_MEMORY)) + ("cpu",)
# Share of device memory a plan may use: XLA/the runtime reserve some (maxtext leaves ~10%).
USABLE_FRACTION = 0.9


class PlanError(ValueError):
  """A plan request is invalid (names the offending value)."""


@dataclasses.dataclass
class Plan:
  """Per-device bytes, FLOPs and the step-time estimate of one (config, mesh, chip)."""
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

  @property
  def peak_bytes(self) -> float:
    """Live at the step's peak: the (donated, so not doubled) state, frozen nets, batch, temporaries
    (without temporaries when the plan was not compiled)."""
    temp = 0.0 if np.isnan(self.temp_bytes) else self.temp_bytes
    return (self.params_bytes + self.opt_state_bytes + self.ema_bytes + self.other_state_bytes + self.frozen_bytes
            + self.batch_bytes + temp)

  @property
  def fits(self) -> bool:
    return self.peak_bytes <= USABLE_FRACTION * self.chip_memory

  @property
  def step_seconds(self) -> float:
    return self.analytic_flops_per_step / (self.devices * self.peak_flops * self.mfu)

  @property
  def images_per_second(self) -> float:
    return self.global_batch / self.step_seconds

  def to_dict(self) -> dict:
    d = dataclasses.asdict(self)
    d.update(peak_bytes=self.peak_bytes, fits=self.fits, step_seconds=self.step_seconds,
             images_per_second=self.images_per_second)
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


def _per_device_bytes(abstract: Any, shardings: Any) -> float:
  """Bytes one device holds of a tree of ShapeDtypeStructs placed with `shardings`."""
  total = 0
  for x, s in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings)):
    shape = s.shard_shape(tuple(x.shape)) if x.shape else ()
    total += int(np.prod(shape)) * jnp.dtype(x.dtype).itemsize
  return float(total)


def chip_peak_and_memory(chip: str) -> tuple[float, float]:
  """(peak FLOP/s, memory bytes) of one device of `chip`; 'cpu' measures this machine's matmul rate."""
  from imagefolder_jax import flops
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


def plan(stage: str, config: ml_collections.ConfigDict, mesh_sizes: dict, devices: int, chip: str,
         mfu: float = 0.4, pretokenized: Optional[bool] = None, compile: bool = True) -> Plan:
  """Compiles `stage`'s train step for `config` on a (data, fsdp, tensor) mesh of `devices` devices.

  pretokenized: the generator reads pre-tokenized codes (`pretokenize`; default: when
  config.data.source is 'codes:...'), else it encodes images with the frozen tokenizer in the step.
  compile: False skips the compile (seconds instead of minutes for large models): the state, frozen
  and batch bytes are exact, temporaries and compiled FLOPs are then unknown (NaN).
  """
  from imagefolder_jax import flops, parallel
  from imagefolder_jax.train import checkpointing, loop
  if not 0 < mfu <= 1:
    raise PlanError(f"--mfu {mfu}: must be in (0, 1]")
  if devices < 1 or jax.device_count() < devices:
    raise PlanError(f"--devices {devices}: this process has {jax.device_count()} devices (set "
                    f"XLA_FLAGS=--xla_force_host_platform_device_count={devices} before jax starts)")
  peak, memory = chip_peak_and_memory(chip)
  mesh_config = dict(config.get("mesh", {}))
  mesh_config.update(mesh_sizes)
  try:
    mesh, rules = parallel.mesh_from_config(mesh_config, devices=jax.devices()[:devices])
  except parallel.MeshConfigError as e:
    raise PlanError(str(e)) from e
  batch = int(config.data.batch_size)
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  if batch % shards:
    raise PlanError(f"data.batch_size={batch} is not divisible by the {shards} batch shards of the mesh "
                    f"{dict(mesh.shape)}")
  task, frozen = make_task(stage, config)
  if pretokenized is None:
    pretokenized = stage == "generator" and str(config.data.source).startswith("codes:")
  if stage == "generator" and pretokenized:
    c = task.model_config
    example = {"codes": jax.ShapeDtypeStruct((batch, c.num_branches, c.num_tokens), jnp.int32),
               "label": jax.ShapeDtypeStruct((batch,), jnp.int32)}
  else:
    r = task.resolution
    example = {"image": jax.ShapeDtypeStruct((batch, r, r, 3), jnp.float32),
               "label": jax.ShapeDtypeStruct((batch,), jnp.int32)}
  rng = jax.random.key(0)
  abstract, shardings = loop.shardings_for(task, mesh, rules, rng, example)
  frozen_shardings = parallel.frozen_shardings(
      mesh, frozen, mesh_config.get("frozen_replicate_below_mb", parallel.FROZEN_REPLICATE_BELOW_MB))
  step = loop.jit_train_step(task, mesh, rules, shardings, frozen_shardings)
  batch_abstract = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=parallel.batch_sharding(mesh, len(v.shape)))
                    for k, v in example.items()}
  frozen_abstract = checkpointing.abstract_with_shardings(frozen, frozen_shardings)
  temp, xla_flops = float("nan"), float("nan")
  if compile:
    with jax.set_mesh(mesh):
      compiled = step.lower(checkpointing.abstract_with_shardings(abstract, shardings), frozen_abstract,
                            batch_abstract).compile()
    temp = float(compiled.memory_analysis().temp_size_in_bytes)
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    xla_flops = float(cost.get("flops", 0.0)) if cost else 0.0
  parts = {k: _per_device_bytes(abstract[k], shardings[k]) for k in ("params", "opt_state", "ema_params")}
  other = sum(_per_device_bytes(abstract[k], shardings[k]) for k in abstract if k not in parts)
  analytic = flops.train_flops_per_example(task, pretokenized=pretokenized)["total"] * batch
  return Plan(stage=stage, mesh=dict(mesh.shape), devices=devices, chip=chip, global_batch=batch,
              params_bytes=parts["params"], opt_state_bytes=parts["opt_state"], ema_bytes=parts["ema_params"],
              other_state_bytes=other, frozen_bytes=_per_device_bytes(frozen, frozen_shardings),
              batch_bytes=_per_device_bytes(batch_abstract, [v.sharding for v in batch_abstract.values()]),
              temp_bytes=temp, xla_flops_per_device=xla_flops,
              analytic_flops_per_step=float(analytic), peak_flops=peak, mfu=mfu, chip_memory=memory,
              num_params=int(sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract["params"]))))


def format_plan(p: Plan) -> str:
  """A human-readable table of one plan (GiB = 2^30 bytes)."""
  gib = lambda b: f"{b / 2 ** 30:8.2f} GiB"
  compiled = not np.isnan(p.temp_bytes)
  mesh = ",".join(f"{k}={v}" for k, v in p.mesh.items())
  rows = [
      f"{p.stage}: {p.num_params / 1e6:.1f}M params, global batch {p.global_batch}, mesh {mesh} "
      f"on {p.devices} x {p.chip}",
      f"  params          {gib(p.params_bytes)} per device",
      f"  optimizer state {gib(p.opt_state_bytes)}",
      f"  EMA params      {gib(p.ema_bytes)}",
      f"  other state     {gib(p.other_state_bytes)}",
      f"  frozen networks {gib(p.frozen_bytes)}",
      f"  batch           {gib(p.batch_bytes)}",
      (f"  temporaries     {gib(p.temp_bytes)} (XLA:CPU memory_analysis; accelerators' compilers differ)"
       if compiled else "  temporaries     not compiled (--no-compile): unknown"),
      f"  peak            {gib(p.peak_bytes)} of {gib(p.chip_memory)} -> "
      f"{'fits' if p.fits else 'DOES NOT FIT'} (limit {USABLE_FRACTION:.0%}"
      f"{'' if compiled else ', state/frozen/batch only'})",
      f"  FLOPs/step      analytic {p.analytic_flops_per_step:.3e}" +
      (f"; compiled {p.xla_flops_per_device:.3e} per device x {p.devices} = "
       f"{p.xla_flops_per_device * p.devices:.3e} (cost_analysis)" if compiled else ""),
      f"  at MFU {p.mfu:.0%} of {p.peak_flops / 1e12:.1f} TFLOP/s per device: {p.step_seconds:.3f} s/step, "
      f"{p.images_per_second:,.0f} images/s (estimate, not a measurement)",
  ]
  return "\n".join(rows)
