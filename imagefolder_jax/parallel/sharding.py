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
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from imagefolder_jax.errors import ImageFolderError

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# The one sharding table: logical axis name (on parameters, see `models/layers.py`, and on the
# activations constrained with `layers.constrain`) -> mesh axes. Earlier rules win; a mesh axis is
# used at most once per array (flax's `logical_to_mesh_axes`), and a dimension that its mesh axes do
# not divide stays replicated (`fit_spec`). FSDP shards the model width, tensor parallelism the
# FFN hidden width, the heads / fused qkv and the logit rows; the batch is split over data x fsdp.
# Override from the config: `mesh.rules = (("mlp", None), ("embed", ("fsdp", "tensor")))` (pairs are
# put in front of these, so they win).
LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH_AXES),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("qkv", "tensor"),
    ("heads", "tensor"),
    ("vocab", "tensor"),
    ("length", None),
    ("head_dim", None),
    ("latent", None),
    ("conv_in", None),
    ("conv_out", None),
)

MESH_KEYS = ("data", "fsdp", "tensor", "dcn_data", "dcn_fsdp", "dcn_tensor")
# Frozen networks (teacher, LPIPS, the generator's tokenizer) smaller than this are replicated;
# larger ones are split over 'fsdp' (config: mesh.frozen_replicate_below_mb).
FROZEN_REPLICATE_BELOW_MB = 512


class MeshConfigError(ImageFolderError):
  """A mesh or sharding-rule setting is invalid."""


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, *, dcn_data: int = 1, dcn_fsdp: int = 1,
              dcn_tensor: int = 1, devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """Builds a (data, fsdp, tensor) mesh; -1 in `data` takes the remaining devices.

  data/fsdp/tensor are the axis sizes inside one slice or node (ICI / NVLink); dcn_* multiply them
  across slices or nodes (DCN / the network): axis size = ici * dcn. With any dcn_* > 1 the devices
  are laid out by `mesh_utils.create_hybrid_device_mesh` (slices by `slice_index`, else one process =
  one granule), so that e.g. FSDP stays inside a node and data parallelism goes across, as maxtext
  does. Otherwise devices keep their order (process by process), and `process_rows` gives each
  process one contiguous block of the batch.
  Axes are Auto (GSPMD propagates shardings from jit in/out shardings and logical constraints).
  """
  devices = list(devices) if devices is not None else jax.devices()
  n = len(devices)
  dcn = (dcn_data, dcn_fsdp, dcn_tensor)
  if min(dcn) < 1 or min(fsdp, tensor) < 1 or (data < 1 and data != -1):
    raise MeshConfigError(f"mesh sizes must be >= 1 (data may be -1): data={data} fsdp={fsdp} tensor={tensor} "
                          f"dcn={dcn}")
  per_slice = n // math.prod(dcn) if n % math.prod(dcn) == 0 else None
  if per_slice is None:
    raise MeshConfigError(f"{n} devices cannot be split into dcn_data x dcn_fsdp x dcn_tensor = {dcn}")
  if data == -1:
    if per_slice % (fsdp * tensor):
      raise MeshConfigError(f"{per_slice} devices per slice cannot be split into fsdp={fsdp} x tensor={tensor}")
    data = per_slice // (fsdp * tensor)
  if data * fsdp * tensor != per_slice:
    raise MeshConfigError(f"mesh data={data} x fsdp={fsdp} x tensor={tensor} x dcn {dcn} != {n} devices")
  if math.prod(dcn) > 1:
    from jax.experimental import mesh_utils
    # GPU nodes all report slice_index 0: granules are then processes (one per node).
    by_slice = len({getattr(d, "slice_index", None) for d in devices} - {None}) > 1
    array = mesh_utils.create_hybrid_device_mesh((data, fsdp, tensor), dcn, devices,
                                                 process_is_granule=not by_slice)
  else:
    array = np.asarray(devices).reshape(data, fsdp, tensor)
  return Mesh(array, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)


def local_mesh() -> Mesh:
  """A data-parallel mesh over this process's own devices: for work that each process does on its
  own part of a job (sampling shards, pretokenizing records) without collectives across processes."""
  return make_mesh(devices=jax.local_devices())


def rules_from_config(overrides: Any = None) -> tuple[tuple[str, Any], ...]:
  """LOGICAL_RULES with `overrides` ((logical, mesh axes or None), ...) in front (they win)."""
  if not overrides:
    return LOGICAL_RULES
  pairs = []
  for item in overrides:
    if not (isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], str)):
      raise MeshConfigError(f"mesh.rules entries must be (logical_name, mesh_axes), got {item!r}")
    name, axes = item
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    bad = [a for a in names if a not in MESH_AXES]
    if bad:
      raise MeshConfigError(f"mesh.rules: {name!r} -> {axes!r} names unknown mesh axes {bad} (known: {MESH_AXES})")
    pairs.append((name, axes if isinstance(axes, str) or axes is None else tuple(axes)))
  return tuple(pairs) + LOGICAL_RULES


def mesh_from_config(mesh_config: Any = None, devices: Optional[Sequence[jax.Device]] = None):
  """config.mesh (data, fsdp, tensor, dcn_*, rules, frozen_replicate_below_mb) -> (Mesh, rules)."""
  m = dict(mesh_config or {})
  rules = rules_from_config(m.pop("rules", None))
  m.pop("frozen_replicate_below_mb", None)
  unknown = sorted(set(m) - set(MESH_KEYS))
  if unknown:
    known = MESH_KEYS + ("rules", "frozen_replicate_below_mb")
    raise MeshConfigError(f"unknown mesh settings {unknown} (known: {known})")
  return make_mesh(**{k: int(v) for k, v in m.items()}, devices=devices), rules


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
  """Shards axis 0 over ('data', 'fsdp'), replicates the rest."""
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def traced_batch_spec(shape: Sequence[int]) -> Optional[P]:
  """The PartitionSpec that shards axis 0 of `shape` over the batch axes of the mesh set while
  tracing (`jax.set_mesh` / `use_abstract_mesh`), or None with no such mesh of more than one device
  or when they do not divide it: for kernels and per-row loops run per batch shard in shard_map."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return None
  spec = fit_spec(dict(mesh.shape), P(tuple(a for a in BATCH_AXES if a in mesh.shape)), shape)
  return spec if spec[0] is not None else None


def fit_spec(mesh_shape: dict, spec: Any, shape: Sequence[int]) -> P:
  """A mesh PartitionSpec with every dimension its mesh axes do not divide left replicated."""
  if not isinstance(spec, P):
    return P()
  axes = []
  for dim, axis in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    names = (axis,) if isinstance(axis, str) else tuple(axis or ())
    names = tuple(a for a in names if a in mesh_shape)
    size = math.prod(mesh_shape[a] for a in names) if names else 1
    axes.append((names[0] if len(names) == 1 else names) if names and dim % size == 0 else None)
  return P(*axes)


def logical_shardings(mesh: Mesh, boxed: Any, rules=LOGICAL_RULES) -> Any:
  """NamedShardings for an `nn.Partitioned`-boxed tree (arrays or ShapeDtypeStructs), by the rules;
  unboxed leaves are replicated. The result has the unboxed tree's structure."""
  def to_mesh(spec):
    if not isinstance(spec, P):
      return None
    # A logical name may label two dimensions (e.g. a latent->latent conv's ('latent', 'latent')):
    # only the first is mapped, as one mesh axis cannot split two dimensions of one array.
    names = [n if not (isinstance(n, str) and n in spec[:i]) else None for i, n in enumerate(spec)]
    return nn.logical_to_mesh_axes(tuple(names), rules)

  specs = nn.get_partition_spec(boxed)
  logical = jax.tree.map(to_mesh, specs, is_leaf=lambda x: isinstance(x, P) or x is None)
  shapes = jax.tree.map(lambda x: x.shape, nn.unbox(boxed))
  return jax.tree.map(lambda spec, shape: NamedSharding(mesh, fit_spec(dict(mesh.shape), spec, shape)),
                      logical, shapes, is_leaf=lambda x: isinstance(x, P) or x is None)


def _key_names(path) -> tuple:
  return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def state_shardings(mesh: Mesh, abstract_state: Any, logical: dict, rules=LOGICAL_RULES) -> Any:
  """Shardings for a whole train state by the logical axes of the parameters it holds.

  logical: {top-level state key: boxed (abstract) parameter tree}, e.g. {'params': p, 'ema_params': p,
  'opt_state': p, 'disc': d}. Inside state[key], a leaf whose key path ends with a parameter's full
  path (and has its shape) takes that parameter's sharding: so params, their EMA and every optimizer
  moment (optax keeps them in parameter-shaped subtrees) follow the same rule. Everything else (the
  step, rng, scalar counters, codebook statistics) is replicated.
  """
  table = {}
  for key, boxed in logical.items():
    shard_tree = logical_shardings(mesh, boxed, rules)
    shapes = jax.tree.map(lambda x: tuple(x.shape), nn.unbox(boxed))
    for path, sharding in jax.tree_util.tree_flatten_with_path(shard_tree)[0]:
      table.setdefault(key, {})[_key_names(path)] = sharding
    for path, shape in jax.tree_util.tree_flatten_with_path(shapes, is_leaf=lambda x: isinstance(x, tuple))[0]:
      table[key][_key_names(path)] = (table[key][_key_names(path)], shape)
  depth = {key: max(len(p) for p in entries) for key, entries in table.items()}

  def one(path, leaf):
    names = _key_names(path)
    entries = table.get(names[0]) if names else None
    if entries:
      for n in range(min(depth[names[0]], len(names) - 1), 0, -1):
        hit = entries.get(names[-n:])
        if hit is not None and hit[1] == tuple(np.shape(leaf)):
          return hit[0]
    return NamedSharding(mesh, P())

  return jax.tree_util.tree_map_with_path(one, abstract_state)


def frozen_shardings(mesh: Mesh, tree: Any, replicate_below_mb: float = FROZEN_REPLICATE_BELOW_MB) -> Any:
  """Frozen networks (no logical axes: they come from converters): each top-level network is
  replicated when smaller than `replicate_below_mb`, else every leaf of it >= 1 MiB is split over
  'fsdp' along its largest divisible dimension (a forward-only network costs one all-gather per use,
  which pays only when replicas no longer fit)."""
  n = mesh.shape["fsdp"]

  def network(sub):
    size = sum(int(np.prod(np.shape(x))) * np.dtype(getattr(x, "dtype", np.float32)).itemsize
               for x in jax.tree.leaves(sub))
    if n == 1 or size < replicate_below_mb * 2 ** 20:
      return jax.tree.map(lambda _: NamedSharding(mesh, P()), sub)

    def leaf(x):
      shape = np.shape(x)
      if int(np.prod(shape)) * 4 < 2 ** 20:
        return NamedSharding(mesh, P())
      for d in sorted(range(len(shape)), key=lambda d: -shape[d]):
        if shape[d] % n == 0:
          return NamedSharding(mesh, P(*[("fsdp" if i == d else None) for i in range(len(shape))]))
      return NamedSharding(mesh, P())
    return jax.tree.map(leaf, sub)

  if not isinstance(tree, dict):
    return network(tree)
  return {k: network(v) for k, v in tree.items()}


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
