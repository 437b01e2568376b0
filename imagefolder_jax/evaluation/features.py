"""Inception features of image batches, jitted and sharded over every device of the mesh.

  net = InceptionFeatures.load()                   # default bundle (converted on first use)
  feats = net.extract(batches, total=n)            # {'pool_3': (N, 2048), 'spatial': (N, 2023), ['logits']}

Each batch (N, H, W, 3) uint8 (or float32 on the 0..255 scale) is resized to 299x299 with TF1's
legacy bilinear when it is not that size, scaled (x - 128) / 128 and run through the network. The
batch axis is sharded over the mesh's ('data', 'fsdp') axes; the last batch is padded to the
compiled batch size, so one program serves a whole run. On several processes each one passes its
own images (`jax.make_array_from_process_local_data`) and gets every process's features back, in
process order.
"""
from __future__ import annotations

import functools
from typing import Iterable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import PartitionSpec as P

from imagefolder_jax.models.inception import INPUT_SIZE, FIDInception, InceptionConfig
from imagefolder_jax.ops.platform import compiling_for
from imagefolder_jax.ops.tf_resize import legacy_bilinear_resize
from imagefolder_jax.parallel import BATCH_AXES, batch_sharding, make_mesh, replicated
from imagefolder_jax.progress import Progress
from imagefolder_jax.storage.bundle import BundleError, load_bundle

DEFAULT_PER_DEVICE_BATCH = 50
FEATURE_KEYS = ("pool_3", "spatial", "logits")


def scale_inputs(images: jax.Array) -> jax.Array:
  """(B, H, W, 3) on the 0..255 scale -> (B, 299, 299, 3) network input (u8 - 128) / 128."""
  resized = legacy_bilinear_resize(images.astype(jnp.float32), INPUT_SIZE)
  return (resized - 128.0) / 128.0


def load_inception(directory: Optional[str] = None) -> tuple[InceptionConfig, dict]:
  """(config, variables) of an Inception bundle; None = the default one (`convert.inception`)."""
  from imagefolder_jax.convert.inception import BUNDLE_MODEL, ensure_default_inception
  directory = directory or ensure_default_inception()
  configs, variables = load_bundle(directory)
  if BUNDLE_MODEL not in configs:
    raise BundleError(f"{directory}: the bundle holds no Inception network (models: {sorted(configs)}); "
                      "write one with `imagefolder-jax convert-inception --out DIR`")
  return InceptionConfig.from_dict(configs[BUNDLE_MODEL]), variables[BUNDLE_MODEL]


class InceptionFeatures:
  """The FID Inception network bound to a mesh.

  per_device_batch: images per device per step (the compiled batch is that times the batch shards).
  precision: matmul/conv precision ('highest' keeps accelerator features float32-exact; TF32 moves
  FID by more than the parity tolerance).
  """

  def __init__(self, config: InceptionConfig, variables: dict, mesh=None,
               per_device_batch: int = DEFAULT_PER_DEVICE_BATCH, precision: str = "highest"):
    if per_device_batch < 1:
      raise ValueError(f"per_device_batch must be >= 1, got {per_device_batch}")
    self.config = config
    self.mesh = mesh if mesh is not None else make_mesh()
    shards = int(np.prod([self.mesh.shape[a] for a in BATCH_AXES]))
    self.global_batch = per_device_batch * shards
    # Each process feeds the rows of its own devices.
    self.local_batch = self.global_batch // jax.process_count()
    self.precision = precision
    self.variables = jax.device_put(variables, replicated(self.mesh))
    self.module = FIDInception(config)

  @classmethod
  def load(cls, directory: Optional[str] = None, **kwargs) -> "InceptionFeatures":
    config, variables = load_inception(directory)
    return cls(config, variables, **kwargs)

  @property
  def has_logits(self) -> bool:
    return self.config.with_logits

  @functools.cached_property
  def _forward(self):
    sharding = batch_sharding(self.mesh, 4)

    def per_device(variables, images):
      with jax.default_matmul_precision(self.precision), compiling_for(self.mesh):
        return self.module.apply(variables, scale_inputs(images))

    # Images are independent: each device runs the network on its own rows, so the module sees a
    # per-device batch (its CPU path loops over images, which under plain jit would gather the batch).
    forward = jax.shard_map(per_device, mesh=self.mesh, in_specs=(P(), P(BATCH_AXES)), out_specs=P(BATCH_AXES))
    out_shardings = {k: batch_sharding(self.mesh, 2) for k in FEATURE_KEYS[:2 + self.has_logits]}
    return jax.jit(forward, in_shardings=(replicated(self.mesh), sharding), out_shardings=out_shardings)

  def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
    """This process's images (n <= local_batch, H, W, 3) uint8 or float32 0..255 -> features of every
    process's images (numpy float32, padding rows removed)."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.shape[0] > self.local_batch:
      raise ValueError(f"images must be (n <= {self.local_batch}, H, W, 3), got {images.shape}")
    if images.dtype != np.uint8:
      images = images.astype(np.float32)
    n = images.shape[0]
    if n < self.local_batch:
      images = np.concatenate([images, np.zeros((self.local_batch - n,) + images.shape[1:], images.dtype)])
    counts = np.asarray([n])
    if jax.process_count() > 1:
      counts = np.asarray(multihost_utils.process_allgather(counts)).reshape(-1)
    batch = jax.make_array_from_process_local_data(batch_sharding(self.mesh, 4), images)
    out = self._forward(self.variables, batch)
    if jax.process_count() > 1:
      out = multihost_utils.process_allgather(out, tiled=True)
    keep = np.concatenate([np.arange(c) + i * self.local_batch for i, c in enumerate(counts)])
    return {k: np.asarray(v)[keep] for k, v in out.items()}

  def extract(self, batches: Iterable[np.ndarray], total: Optional[int] = None,
              what: str = "inception features", every: float = 10.0) -> dict[str, np.ndarray]:
    """Features of a stream of batches (any sizes; re-chunked to local_batch) -> concatenated arrays.

    On several processes, `total` counts this process's images; the result holds every process's.
    """
    progress = Progress(what, total * jax.process_count() if total else None, every=every)
    parts: dict[str, list] = {}
    for chunk in _rechunk(batches, self.local_batch):
      out = self(chunk)
      for k, v in out.items():
        parts.setdefault(k, []).append(v)
      progress.update(len(out["pool_3"]))
    if not parts:
      raise ValueError(f"{what}: no images")
    return {k: np.concatenate(v) for k, v in parts.items()}


def _rechunk(batches: Iterable[np.ndarray], size: int) -> Iterable[np.ndarray]:
  """Re-cuts a stream of (n_i, H, W, 3) arrays into (size, ...) chunks (the last may be shorter).
  A change of image shape or dtype flushes the pending chunk (one compile per shape)."""
  pending: list[np.ndarray] = []
  count = 0
  for batch in batches:
    batch = np.asarray(batch)
    if pending and (batch.shape[1:] != pending[0].shape[1:] or batch.dtype != pending[0].dtype):
      yield np.concatenate(pending)
      pending, count = [], 0
    start = 0
    while start < len(batch):
      take = min(size - count, len(batch) - start)
      pending.append(batch[start:start + take])
      count += take
      start += take
      if count == size:
        yield np.concatenate(pending)
        pending, count = [], 0
  if pending:
    yield np.concatenate(pending)
