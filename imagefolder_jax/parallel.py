"""Device meshes, logical-axis rules and sharding helpers.

One `jax.sharding.Mesh` with named axes ('data', 'fsdp', 'tensor'). Parameters carry logical axis
names (see `models/layers.py`); `logical_rules` maps them to mesh axes. The batch axis is sharded
over ('data', 'fsdp'). The same code runs on 1 CPU, N fake CPU devices
(`XLA_FLAGS=--xla_force_host_platform_device_count=N`), GPU nodes and TPU pods
(call `initialize_distributed()` first on multi-process jobs).
"""
from __future__ import annotations

import logging
import math
import os
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Logical axis -> mesh axis. FSDP shards the model width; tensor parallelism the FFN/heads/vocab.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH_AXES),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("qkv", "tensor"),
    ("heads", "tensor"),
    ("vocab", "tensor"),
    ("latent", None),
)


def initialize_distributed() -> None:
  """Initialises multi-process JAX when launched as one of several processes; a no-op otherwise.

  Triggers: IFJ_DISTRIBUTED=1 (set by launch/tpu_pod.sh; TPU pods auto-detect the coordinator),
  a SLURM job with more than one task, or an explicit JAX_COORDINATOR_ADDRESS. Must run before any
  other JAX call touches the devices.
  """
  if jax.distributed.is_initialized():
    return
  slurm_multi = int(os.environ.get("SLURM_NTASKS", "1")) > 1
  if os.environ.get("IFJ_DISTRIBUTED") == "1" or slurm_multi or "JAX_COORDINATOR_ADDRESS" in os.environ:
    jax.distributed.initialize()
    logging.info("jax.distributed: process %d of %d", jax.process_index(), jax.process_count())


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1,
              devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """Builds a (data, fsdp, tensor) mesh; -1 in `data` takes the remaining devices.

  Axes are Auto (GSPMD propagates shardings from jit in/out shardings and logical constraints).
  """
  devices = list(devices) if devices is not None else jax.devices()
  n = len(devices)
  if data == -1:
    if n % (fsdp * tensor):
      raise ValueError(f"{n} devices cannot be split into fsdp={fsdp} x tensor={tensor}")
    data = n // (fsdp * tensor)
  if data * fsdp * tensor != n:
    raise ValueError(f"mesh data={data} x fsdp={fsdp} x tensor={tensor} != {n} devices")
  array = np.asarray(devices).reshape(data, fsdp, tensor)
  return Mesh(array, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
  """Shards axis 0 over ('data', 'fsdp'), replicates the rest."""
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def param_shardings(mesh: Mesh, boxed_variables: Any, rules=DEFAULT_RULES) -> Any:
  """NamedShardings for a (possibly `nn.Partitioned`-boxed) variable tree; unboxed leaves replicate.

  A dimension is only sharded when its size is divisible by the mesh axes it maps to.
  """
  specs = nn.get_partition_spec(boxed_variables)
  logical = nn.logical_to_mesh(specs, rules)
  shapes = jax.tree.map(lambda x: x.shape, nn.unbox(boxed_variables))

  def fit(spec, shape):
    if not isinstance(spec, P):
      return NamedSharding(mesh, P())
    axes = []
    for dim, axis in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
      names = (axis,) if isinstance(axis, str) else (axis or ())
      size = math.prod(mesh.shape[a] for a in names) if names else 1
      axes.append(axis if names and dim % size == 0 else None)
    return NamedSharding(mesh, P(*axes))

  return jax.tree.map(fit, logical, shapes, is_leaf=lambda x: isinstance(x, P) or x is None)


def shard_batch(mesh: Mesh, tree: Any) -> Any:
  """Places host arrays (global batch on one process) sharded over the batch axes."""
  return jax.tree.map(lambda x: jax.device_put(x, batch_sharding(mesh, np.ndim(x))), tree)
