"""ADM reference / sample batches: `.npz` files read and written without pickles.

ADM's keys: `arr_0` (N, H, W, 3) uint8 images, `mu` / `sigma` (pool_3 statistics), `mu_s` /
`sigma_s` (spatial statistics). We add, when known, the features themselves (`pool_3` (N, 2048)
float32, `spatial` (N, 2023) float32) so that precision, recall and IS need no second pass, and the
sample labels (`labels`). ADM's evaluator ignores keys it does not know.
"""
from __future__ import annotations

import dataclasses
import os
import zipfile
from typing import Iterator, Optional

import numpy as np

from imagefolder_jax.evaluation.fid import FeatureStatistics

IMAGES_KEY = "arr_0"
KNOWN_KEYS = ("arr_0", "mu", "sigma", "mu_s", "sigma_s", "pool_3", "spatial", "labels")


class ReferenceError(ValueError):
  """An .npz file is not a usable ADM batch (names the file and the key)."""


@dataclasses.dataclass
class ReferenceBatch:
  """What an ADM-format file holds; absent entries are None. Images are read on demand
  (`iter_npz_images`), never loaded here."""
  path: str
  num_images: int = 0
  image_shape: Optional[tuple] = None
  pool: Optional[FeatureStatistics] = None
  spatial: Optional[FeatureStatistics] = None
  pool_3: Optional[np.ndarray] = None
  spatial_features: Optional[np.ndarray] = None
  labels: Optional[np.ndarray] = None

  @property
  def has_images(self) -> bool:
    return self.num_images > 0


def save_reference(path: str, *, images: Optional[np.ndarray] = None, pool: Optional[FeatureStatistics] = None,
                   spatial: Optional[FeatureStatistics] = None, pool_3: Optional[np.ndarray] = None,
                   spatial_features: Optional[np.ndarray] = None, labels: Optional[np.ndarray] = None) -> None:
  """Writes an ADM-format .npz (uncompressed, like ADM's reference batches)."""
  arrays = {}
  if images is not None:
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
      raise ReferenceError(f"{path}: arr_0 must be (N, H, W, 3) uint8, got {images.dtype} {images.shape}")
    arrays[IMAGES_KEY] = images
  if pool is not None:
    arrays["mu"], arrays["sigma"] = pool.mu, pool.sigma
  if spatial is not None:
    arrays["mu_s"], arrays["sigma_s"] = spatial.mu, spatial.sigma
  if pool_3 is not None:
    arrays["pool_3"] = np.asarray(pool_3, np.float32)
  if spatial_features is not None:
    arrays["spatial"] = np.asarray(spatial_features, np.float32)
  if labels is not None:
    arrays["labels"] = np.asarray(labels, np.int32)
  if not arrays:
    raise ReferenceError(f"{path}: nothing to write")
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  tmp = path + ".tmp.npz"
  np.savez(tmp, **arrays)
  os.replace(tmp, path)


def _read_header(f) -> tuple:
  """(shape, fortran_order, dtype) of an open .npy stream, leaving it at the data."""
  version = np.lib.format.read_magic(f)
  if version == (1, 0):
    return np.lib.format.read_array_header_1_0(f)
  return np.lib.format.read_array_header_2_0(f)


def _npy_header(path: str, key: str) -> tuple:
  """(shape, fortran_order, dtype) of `key` in an .npz without reading its data."""
  with zipfile.ZipFile(path) as z, z.open(f"{key}.npy") as f:
    return _read_header(f)


def load_reference(path: str) -> ReferenceBatch:
  """Reads statistics and features (allow_pickle=False); images stay on disk."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"npz file not found: {path}")
  try:
    data = np.load(path, allow_pickle=False)
  except (ValueError, OSError, zipfile.BadZipFile) as e:
    raise ReferenceError(f"{path}: not a readable .npz ({type(e).__name__}: {e})") from e
  with data:
    keys = set(data.files)
    batch = ReferenceBatch(path=path)
    for mean, cov, field in (("mu", "sigma", "pool"), ("mu_s", "sigma_s", "spatial")):
      if (mean in keys) != (cov in keys):
        raise ReferenceError(f"{path}: holds {mean if mean in keys else cov!r} without "
                             f"{cov if mean in keys else mean!r}")
      if mean in keys:
        setattr(batch, field, FeatureStatistics(np.asarray(data[mean], np.float64),
                                                np.asarray(data[cov], np.float64)))
    if "pool_3" in keys:
      batch.pool_3 = np.asarray(data["pool_3"], np.float32)
    if "spatial" in keys:
      batch.spatial_features = np.asarray(data["spatial"], np.float32)
    if "labels" in keys:
      batch.labels = np.asarray(data["labels"])
  if IMAGES_KEY in keys:
    shape, _, dtype = _npy_header(path, IMAGES_KEY)
    if dtype != np.uint8 or len(shape) != 4 or shape[-1] != 3:
      raise ReferenceError(f"{path}: arr_0 must be (N, H, W, 3) uint8, got {dtype} {shape}")
    batch.num_images, batch.image_shape = int(shape[0]), tuple(shape[1:])
  if not (batch.has_images or batch.pool is not None or batch.pool_3 is not None):
    raise ReferenceError(f"{path}: holds neither images (arr_0), statistics (mu, sigma) nor features "
                         f"(pool_3); keys: {sorted(keys)}")
  return batch


def iter_npz_images(path: str, batch_size: int) -> Iterator[np.ndarray]:
  """Streams `arr_0` in (<= batch_size, H, W, 3) uint8 batches without loading the whole array
  (ADM reference batches are gigabytes)."""
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  with zipfile.ZipFile(path) as z:
    if f"{IMAGES_KEY}.npy" not in z.namelist():
      raise ReferenceError(f"{path}: no {IMAGES_KEY} (images)")
    with z.open(f"{IMAGES_KEY}.npy") as f:
      shape, fortran, dtype = _read_header(f)
      if fortran or dtype != np.uint8:
        raise ReferenceError(f"{path}: arr_0 must be C-ordered uint8, got {dtype} fortran={fortran}")
      per_image = int(np.prod(shape[1:]))
      for start in range(0, shape[0], batch_size):
        n = min(batch_size, shape[0] - start)
        data = f.read(n * per_image)
        if len(data) != n * per_image:
          raise ReferenceError(f"{path}: arr_0 is truncated at image {start}")
        yield np.frombuffer(data, np.uint8).reshape((n,) + tuple(shape[1:]))
