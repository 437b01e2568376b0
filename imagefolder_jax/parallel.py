"""Device meshes, logical-axis rules and sharding helpers.

One `jax.sharding.Mesh` with named axes ('data', 'fsdp', 'tensor'). Parameters carry logical axis
names (see `models/layers.py`); `logical_rules` maps them to mesh axes. The batch axis is sharded
over ('data', 'fsdp'). The same code runs on 1 CPU, N fake CPU devices
(`XLA_FLAGS=--xla_force_host_platform_device_count=N`), GPU nodes and TPU pods
(call `initialize_distributed()` first on multi-process jobs; see `multihost`).

Host data enters a jitted program only through `host_to_global` (process-local rows) or
`shard_batch` / `global_from_full` (data every process holds in full); results come back through
`to_host` (gathered on every process) or `local_rows` (this process's rows, no communication).
"""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

# Process lifecycle lives in `multihost`; re-exported here because every caller of the sharding
# helpers needs them too.
from imagefolder_jax.multihost import (  # noqa: F401
    DistributedError, any_process, initialize_distributed, is_primary, sync)

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


def local_mesh() -> Mesh:
  """A data-parallel mesh over this process's own devices: for work that each process does on its
  own part of a job (sampling shards, pretokenizing records) without collectives across processes."""
  return make_mesh(devices=jax.local_devices())


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


# ----------------------------------------------------------------------------- host <-> device
def process_rows(mesh: Mesh, global_batch: int) -> np.ndarray:
  """The rows of a global batch of `global_batch` that this process feeds (and reads back) when the
  batch axis is sharded over ('data', 'fsdp'): int64 (global_batch / processes,), ascending.

  With `make_mesh` (devices in process order) process p owns the contiguous block
  [p * b, (p + 1) * b), b = global_batch / processes; other meshes may give other rows.
  """
  sharding = batch_sharding(mesh, 1)
  rows = set()
  for index in sharding.addressable_devices_indices_map((global_batch,)).values():
    rows.update(range(*index[0].indices(global_batch)))
  return np.asarray(sorted(rows), np.int64)


def host_to_global(mesh: Mesh, local_tree: Any, global_batch: Optional[int] = None) -> Any:
  """Process-local batches -> global jax.Arrays sharded over the batch axes.

  Each leaf is (b, ...) holding this process's rows `process_rows(mesh, B)` of the global batch, in
  that order, B = b * processes (or `global_batch`). On one process this is a plain sharded
  `device_put`. This is the one place host data enters a jitted program.
  """
  procs = jax.process_count()

  def one(x):
    x = np.asarray(x)
    total = global_batch if global_batch is not None else x.shape[0] * procs
    sharding = batch_sharding(mesh, x.ndim)
    if procs == 1:
      return jax.device_put(x, sharding)
    rows = process_rows(mesh, total)
    if rows.size != x.shape[0]:
      raise ValueError(f"this process feeds {rows.size} of {total} rows, got a local batch of {x.shape[0]}")
    position = {int(r): i for i, r in enumerate(rows)}
    shape = (total,) + x.shape[1:]
    arrays = []
    for device, index in sharding.addressable_devices_indices_map(shape).items():
      start, stop, _ = index[0].indices(total)
      local = x[position[start]:position[start] + (stop - start)]
      arrays.append(jax.device_put(local, device))
    return jax.make_array_from_single_device_arrays(shape, sharding, arrays)

  return jax.tree.map(one, local_tree)


def shard_batch(mesh: Mesh, tree: Any) -> Any:
  """Places a whole global batch that every process holds (identical on all of them) sharded over
  the batch axes; each process transfers only its own rows."""
  procs = jax.process_count()
  if procs == 1:
    return jax.tree.map(lambda x: jax.device_put(x, batch_sharding(mesh, np.ndim(x))), tree)

  def one(x):
    x = np.asarray(x)
    return host_to_global(mesh, x[process_rows(mesh, x.shape[0])], global_batch=x.shape[0])

  return jax.tree.map(one, tree)


def global_from_full(tree: Any, shardings: Any) -> Any:
  """Host arrays that every process holds in full (e.g. weights read from a file) -> global arrays
  with the given shardings; each device gets its slice, nothing crosses processes."""
  def one(x, sharding):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])
  return jax.tree.map(one, tree, shardings)


def put_global(tree: Any, shardings: Any) -> Any:
  """Places a tree with the given shardings: jax.Arrays are resharded on device, host arrays (the
  same on every process, e.g. weights read from files) go through `global_from_full`."""
  def one(x, sharding):
    if isinstance(x, jax.Array):
      return jax.device_put(x, sharding)
    return global_from_full(x, sharding)
  return jax.tree.map(one, tree, shardings)


def allgather_bytes(data: bytes) -> list[bytes]:
  """Every process's `data`, in process order, on every process (a collective)."""
  if jax.process_count() == 1:
    return [data]
  from jax.experimental import multihost_utils
  lengths = np.asarray(multihost_utils.process_allgather(np.asarray([len(data)], np.int64)))
  longest = int(lengths.max())
  buffer = np.zeros((longest,), np.uint8)
  buffer[:len(data)] = np.frombuffer(data, np.uint8)
  gathered = np.asarray(multihost_utils.process_allgather(buffer))
  return [gathered[i, :int(n)].tobytes() for i, n in enumerate(lengths.reshape(-1))]


def to_host(tree: Any) -> Any:
  """jax.Arrays (sharded over any number of processes) -> NumPy on every process.

  Arrays that are fully addressable or fully replicated are read locally; others are gathered with
  `multihost_utils.process_allgather`, a collective: every process must call this together.
  """
  def needs_gather(x):
    return isinstance(x, jax.Array) and not (x.is_fully_addressable or x.is_fully_replicated)

  leaves, treedef = jax.tree.flatten(tree)
  gather = [i for i, x in enumerate(leaves) if needs_gather(x)]
  out = [None if i in gather else np.asarray(x) for i, x in enumerate(leaves)]
  if gather and jax.process_count() > 1:
    from jax.experimental import multihost_utils
    gathered = multihost_utils.process_allgather([leaves[i] for i in gather], tiled=True)
    for i, value in zip(gather, gathered):
      out[i] = np.asarray(value)
  return jax.tree.unflatten(treedef, out)


def local_rows(x: jax.Array) -> tuple[np.ndarray, np.ndarray]:
  """This process's rows of a batch-sharded array, without any communication:
  (rows (b, ...) NumPy, their global row numbers (b,) int64), ascending and without duplicates."""
  if x.is_fully_addressable:
    value = np.asarray(x)
    return value, np.arange(value.shape[0])
  pieces = {}
  for shard in x.addressable_shards:
    start = shard.index[0].indices(x.shape[0])[0] if shard.index else 0
    pieces.setdefault(start, np.asarray(shard.data))
  starts = sorted(pieces)
  rows = np.concatenate([pieces[s] for s in starts])
  numbers = np.concatenate([np.arange(s, s + pieces[s].shape[0]) for s in starts])
  return rows, numbers
