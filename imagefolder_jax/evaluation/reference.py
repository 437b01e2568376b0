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
import zlib
from typing import Iterator, Optional

import numpy as np

from imagefolder_jax.errors import ImageFolderError
from imagefolder_jax.evaluation.fid import FeatureStatistics

IMAGES_KEY = "arr_0"
KNOWN_KEYS = ("arr_0", "mu", "sigma", "mu_s", "sigma_s", "pool_3", "spatial", "labels")


class ReferenceBatchError(ImageFolderError):
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
      raise ReferenceBatchError(f"{path}: arr_0 must be (N, H, W, 3) uint8, got {images.dtype} {images.shape}")
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
    raise ReferenceBatchError(f"{path}: nothing to write")
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
  """(shape, fortran_order, dtype) of `key` in an .npz without reading its data; `ReferenceBatchError`
  when the member is shorter or longer than its header says (a truncated or padded array)."""
  with zipfile.ZipFile(path) as z, z.open(f"{key}.npy") as f:
    shape, fortran, dtype = _read_header(f)
    expected = f.tell() + int(np.prod(shape)) * np.dtype(dtype).itemsize
    size = z.getinfo(f"{key}.npy").file_size
  if size != expected:
    raise ReferenceBatchError(f"{path}: {key} holds {size} bytes, its header {dtype} {shape} needs {expected} "
                         "(a truncated or damaged file)")
  return shape, fortran, dtype


# A zip archive (np.savez) starts with a local file header, or (no members) the end record.
_ZIP_SIGNATURES = (b"PK\x03\x04", b"PK\x05\x06")
# Everything a damaged zip member can raise while it is read: a bad CRC or header (BadZipFile), a
# short stream (EOFError, zlib.error), a bad .npy header or payload (ValueError), I/O (OSError).
_READ_ERRORS = (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error, KeyError)


def _what_file_is(path: str) -> str:
  from imagefolder_jax.convert.common import _what_file_is as what
  with open(path, "rb") as f:
    return what(f.read(16))


def _read_array(data, path: str, key: str) -> np.ndarray:
  """`data[key]` as a real-valued array, every failure a `ReferenceBatchError` naming file and key."""
  try:
    x = data[key]
  except _READ_ERRORS as e:
    if "allow_pickle" in str(e):
      raise ReferenceBatchError(f"{path}: {key} holds pickled Python objects, not numbers (never unpickled)") from e
    reason = " ".join(str(e).split())[:200]
    raise ReferenceBatchError(f"{path}: {key} is unreadable ({type(e).__name__}: {reason})") from e
  if x.dtype.kind not in "fiu":
    raise ReferenceBatchError(f"{path}: {key} must hold real numbers, got dtype {x.dtype}")
  if x.dtype.kind == "f" and not np.all(np.isfinite(x)):
    raise ReferenceBatchError(f"{path}: {key} holds NaN/inf")
  return x


def _check_statistics(path: str, mean: str, cov: str, stats: FeatureStatistics) -> None:
  d = stats.mu.shape[0] if stats.mu.ndim == 1 else None
  if d is None or stats.sigma.shape != (d, d):
    raise ReferenceBatchError(f"{path}: {mean} must be (D,) and {cov} (D, D), got {stats.mu.shape} and "
                         f"{stats.sigma.shape}")


def _check_features(path: str, key: str, x: np.ndarray, stats: Optional[FeatureStatistics], mean: str) -> None:
  if x.ndim != 2 or x.shape[0] < 1:
    raise ReferenceBatchError(f"{path}: {key} must be (N, D) features, got shape {x.shape}")
  if stats is None and x.shape[0] < 2:
    raise ReferenceBatchError(f"{path}: {key} holds {x.shape[0]} feature row(s) and no {mean}; "
                              "statistics need at least 2")
  if stats is not None and x.shape[1] != stats.mu.shape[0]:
    raise ReferenceBatchError(f"{path}: {key} has D={x.shape[1]} but {mean} has D={stats.mu.shape[0]}")


def load_reference(path: str) -> ReferenceBatch:
  """Reads statistics and features (allow_pickle=False); images stay on disk.

  Raises `ReferenceBatchError` (one line naming the file and the key) for anything that is not a usable
  ADM batch: not a zip of .npy arrays, a damaged member, pickled objects, non-real or non-finite
  numbers, statistics or features of inconsistent shapes, an image array that is not
  (N >= 1, H, W, 3) uint8, or none of images / statistics / features at all.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f"npz file not found: {path}")
  try:
    what = _what_file_is(path)
    with open(path, "rb") as f:
      head = f.read(4)
  except OSError as e:
    raise ReferenceBatchError(f"{path}: unreadable ({type(e).__name__}: {e})") from e
  if head not in _ZIP_SIGNATURES:
    raise ReferenceBatchError(f"{path}: not an .npz file (a zip of .npy arrays): {what}")
  try:
    data = np.load(path, allow_pickle=False)
  except _READ_ERRORS as e:
    reason = " ".join(str(e).split())[:200]
    raise ReferenceBatchError(f"{path}: not a readable .npz ({type(e).__name__}: {reason})") from e
  if not isinstance(data, np.lib.npyio.NpzFile):  # pragma: no cover - the zip signature was checked
    raise ReferenceBatchError(f"{path}: not an .npz file")
  with data:
    keys = set(data.files)
    batch = ReferenceBatch(path=path)
    for mean, cov, field in (("mu", "sigma", "pool"), ("mu_s", "sigma_s", "spatial")):
      if (mean in keys) != (cov in keys):
        raise ReferenceBatchError(f"{path}: holds {mean if mean in keys else cov!r} without "
                             f"{cov if mean in keys else mean!r}")
      if mean in keys:
        stats = FeatureStatistics(np.asarray(_read_array(data, path, mean), np.float64),
                                  np.asarray(_read_array(data, path, cov), np.float64))
        _check_statistics(path, mean, cov, stats)
        setattr(batch, field, stats)
    if "pool_3" in keys:
      batch.pool_3 = np.asarray(_read_array(data, path, "pool_3"), np.float32)
      _check_features(path, "pool_3", batch.pool_3, batch.pool, "mu")
    if "spatial" in keys:
      batch.spatial_features = np.asarray(_read_array(data, path, "spatial"), np.float32)
      _check_features(path, "spatial", batch.spatial_features, batch.spatial, "mu_s")
    if "labels" in keys:
      batch.labels = _read_array(data, path, "labels")
      if batch.labels.ndim != 1 or batch.labels.dtype.kind not in "iu":
        raise ReferenceBatchError(
            f"{path}: labels must be (N,) integers, got {batch.labels.dtype} {batch.labels.shape}")
  if IMAGES_KEY in keys:
    try:
      shape, _, dtype = _npy_header(path, IMAGES_KEY)
    except ReferenceBatchError:
      raise
    except _READ_ERRORS as e:
      raise ReferenceBatchError(f"{path}: {IMAGES_KEY} is unreadable ({type(e).__name__}: {e})") from e
    if dtype != np.uint8 or len(shape) != 4 or shape[-1] != 3 or shape[0] < 1:
      raise ReferenceBatchError(f"{path}: arr_0 must be (N >= 1, H, W, 3) uint8, got {dtype} {shape}")
    batch.num_images, batch.image_shape = int(shape[0]), tuple(shape[1:])
  if not (batch.has_images or batch.pool is not None or batch.pool_3 is not None):
    raise ReferenceBatchError(f"{path}: holds neither images (arr_0), statistics (mu, sigma) nor features "
                         f"(pool_3); keys: {sorted(keys)}")
  return batch


def feature_dims(batch: ReferenceBatch) -> tuple[Optional[int], Optional[int]]:
  """(pool D, spatial D) of what `batch` stores (statistics or features); None where it stores
  images only (their features come from the Inception network)."""
  pool = batch.pool.mu.shape[0] if batch.pool is not None else (
      batch.pool_3.shape[1] if batch.pool_3 is not None else None)
  spatial = batch.spatial.mu.shape[0] if batch.spatial is not None else (
      batch.spatial_features.shape[1] if batch.spatial_features is not None else None)
  return pool, spatial


def check_feature_dims(batch: ReferenceBatch, pool: Optional[int], spatial: Optional[int], against: str) -> None:
  """Refuses a batch whose stored feature dimensions differ from `pool` / `spatial` (those of
  `against`: another file, or the Inception network); None skips that check."""
  have = feature_dims(batch)
  pairs = (("pool_3 (mu/sigma/pool_3)", have[0], pool), ("spatial (mu_s/sigma_s/spatial)", have[1], spatial))
  for name, mine, theirs in pairs:
    if mine is not None and theirs is not None and mine != theirs:
      raise ReferenceBatchError(f"{batch.path}: {name} features have D={mine}, {against} has D={theirs}")


def iter_npz_images(path: str, batch_size: int) -> Iterator[np.ndarray]:
  """Streams `arr_0` in (<= batch_size, H, W, 3) uint8 batches without loading the whole array
  (ADM reference batches are gigabytes)."""
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  with zipfile.ZipFile(path) as z:
    if f"{IMAGES_KEY}.npy" not in z.namelist():
      raise ReferenceBatchError(f"{path}: no {IMAGES_KEY} (images)")
    with z.open(f"{IMAGES_KEY}.npy") as f:
      shape, fortran, dtype = _read_header(f)
      if fortran or dtype != np.uint8:
        raise ReferenceBatchError(f"{path}: arr_0 must be C-ordered uint8, got {dtype} fortran={fortran}")
      per_image = int(np.prod(shape[1:]))
      for start in range(0, shape[0], batch_size):
        n = min(batch_size, shape[0] - start)
        data = f.read(n * per_image)
        if len(data) != n * per_image:
          raise ReferenceBatchError(f"{path}: arr_0 is truncated at image {start}")
        yield np.frombuffer(data, np.uint8).reshape((n,) + tuple(shape[1:]))
