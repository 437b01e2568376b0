"""Plan of the batch sampler (`Generator.sample`'s program) for a topology: per-chip memory, FLOPs,
collectives and the time per image its roofline gives, beside the matmul-FLOP roofline of the chip."""
from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from imagefolder_jax.ops import filtering_kernel
from imagefolder_jax.planning import hlo
from imagefolder_jax.planning.errors import PlanError
from imagefolder_jax.planning.planner import (
  GPU_COMPILER_OPTIONS,
  Plan,
  analyze_compiled,
  compile_for,
  default_mesh_sizes,
  make_task,
  per_device_bytes,
)
from imagefolder_jax.planning.topology import Topology, compile_only_devices


def plan_sampler(config: ml_collections.ConfigDict, mesh_sizes: dict, topology: Topology, batch: int, *,
                 top_k: int = 750, top_p: float = 0.95, guidance: bool = True,
                 dtype: Optional[str] = None) -> Plan:
  """Compiles the sampler of `config`'s generator (and its tokenizer: config.tokenizer_bundle's, or
  the released layout) for `batch` samples over `topology` (batch sharded over every chip, weights
  replicated), with the paper's filters by default. dtype: the generator's compute dtype."""
  from imagefolder_jax import parallel
  from imagefolder_jax.inference.sampling import SamplerSettings, make_sampler
  from imagefolder_jax.models.generator import NextScaleGenerator
  from imagefolder_jax.planning import flops
  devices = compile_only_devices(topology)
  sizes = default_mesh_sizes(topology, {}, mesh_sizes)
  try:
    mesh, _ = parallel.mesh_from_config(sizes, devices=devices)
  except parallel.MeshConfigError as e:
    raise PlanError(str(e)) from e
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  if batch < 1 or batch % shards:
    raise PlanError(f"--batch {batch}: must be a positive multiple of the {shards} batch shards of the mesh")
  task, frozen = make_task("generator", config)
  model_config = task.model_config if dtype is None else dataclasses.replace(task.model_config, dtype=dtype)
  settings = SamplerSettings(top_k=top_k, top_p=top_p, guidance=guidance)
  sampler = make_sampler(NextScaleGenerator(model_config), task.tokenizer, settings, mesh=mesh)
  rep, rows = parallel.replicated(mesh), parallel.batch_sharding(mesh)
  example = task.example_batch(1)
  params = jax.eval_shape(task.init_state, jax.random.key(0), example)["ema_params"]
  generator_vars = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep), {"params": params})
  tokenizer_vars = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep), frozen["tokenizer"])
  key = jax.eval_shape(lambda: jax.random.key(0))
  scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=rep)
  ids = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=rows)
  lowered = sampler.lower(generator_vars, tokenizer_vars, ids, jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=rep),
                          scalar, scalar, {}, ids)
  analytic = float(flops.sample_flops(task.model_config, task.tokenizer_config, guidance=guidance)["total"] * batch)
  warnings: list = []
  compiled, refusal = compile_for(lowered, topology.platform, warnings)
  fields: dict = dict(compiler_warnings=warnings, out_of_memory=refusal,
                      compiler_options=dict(GPU_COMPILER_OPTIONS) if topology.platform == "gpu" else {},
                      temp_bytes=float("nan"), xla_flops_per_device=float("nan"))
  if compiled is not None:
    def vector_ops(text: str) -> float:   # the top-k/top-p kernel's, by the rows of its calls
      rows = sum(shapes[0][0] * runs for _, shapes, runs in hlo.custom_calls_named(text, filtering_kernel.KERNEL_NAME))
      return filtering_kernel.vector_ops(rows, model_config.codebook_size, top_k, top_p)

    fields.update(analyze_compiled(compiled, list(np.asarray(mesh.devices).flat), topology.chip, analytic,
                                   vector_ops=vector_ops))
  chip = topology.chip
  return Plan(stage="sampler", mesh=dict(mesh.shape), devices=len(devices), chip=chip.name, global_batch=batch,
              params_bytes=per_device_bytes(generator_vars, jax.tree.map(lambda x: x.sharding, generator_vars)),
              opt_state_bytes=0.0, ema_bytes=0.0, other_state_bytes=0.0,
              frozen_bytes=per_device_bytes(tokenizer_vars, jax.tree.map(lambda x: x.sharding, tokenizer_vars)),
              batch_bytes=float(2 * 4 * batch / shards), analytic_flops_per_step=analytic,
              peak_flops=chip.peak_flops, mfu=1.0, chip_memory=chip.memory_bytes,
              num_params=int(sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))),
              compiler=topology.platform, topology=topology.describe(), **fields)
