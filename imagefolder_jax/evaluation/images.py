"""Image streams for evaluation: 'folder:DIR', 'tfds:NAME', 'npz:FILE' (ADM `arr_0`) or 'demo'.

Images go to the Inception network as they are stored (uint8 RGB, any size; the network input
resize happens on the device for uniform batches). A folder or TFDS set may mix sizes: each image
that is not `size`x`size` is resized on the host with the same TF1 legacy bilinear map (float32 on
the 0..255 scale), so a batch is always uniform. Records that cannot be decoded are skipped and
counted (`ImageStream.skipped`), never fatal.
"""
from __future__ import annotations

import logging
from typing import Iterator, Optional

import numpy as np

from imagefolder_jax.evaluation.reference import iter_npz_images, load_reference
from imagefolder_jax.models.inception import INPUT_SIZE
from imagefolder_jax.ops.tf_resize import legacy_bilinear_matrix


def host_resize(image: np.ndarray, size: int = INPUT_SIZE) -> np.ndarray:
  """(H, W, 3) uint8 -> (size, size, 3) float32 0..255 with TF1's legacy bilinear (host NumPy)."""
  h, w, _ = image.shape
  rows, cols = legacy_bilinear_matrix(h, size), legacy_bilinear_matrix(w, size)
  x = np.asarray(image, np.float32).reshape(h, w * 3)
  x = (rows @ x).reshape(size, w, 3)                      # rows first, as the device path
  return np.matmul(cols, x).astype(np.float32)            # (size, size, 3): cols @ (w, 3) per row


class ImageStream:
  """Iterable of image batches from a spec; `len()` is the number of records (before skipping).

  labels: after iteration, the labels of the images yielded (sources with labels; else None).
  """

  def __init__(self, spec: str, split: str = "train", data_dir: Optional[str] = None, batch_size: int = 200,
               size: int = INPUT_SIZE, limit: Optional[int] = None, shard: tuple[int, int] = (0, 1)):
    """shard: (index, count): this process reads records index, index + count, ... (multi-process)."""
    self.spec, self.batch_size, self.size, self.skipped = spec, batch_size, size, 0
    self.shard = shard
    from imagefolder_jax.data.sources import build_source, parse_spec
    kind, arg = parse_spec(spec, kinds=("demo", "folder", "tfds", "npz"))
    self._npz = None
    self._source = None
    if kind == "npz":
      ref = load_reference(arg)
      if not ref.has_images:
        raise ValueError(f"{arg}: holds no images (arr_0)")
      self._npz, self._count = arg, ref.num_images
    else:
      self._source = build_source(spec, data_dir=data_dir, split=split)
      self._count = len(self._source)
    if limit is not None:
      self._count = min(self._count, int(limit))
    self.labels: Optional[np.ndarray] = None

  def __len__(self) -> int:
    index, count = self.shard
    return len(range(index, self._count, count))

  def __iter__(self) -> Iterator[np.ndarray]:
    if self._npz is not None:
      yield from self._iter_npz()
    else:
      yield from self._iter_source()

  def _iter_npz(self) -> Iterator[np.ndarray]:
    index, count = self.shard
    seen = 0
    for batch in iter_npz_images(self._npz, self.batch_size):
      rows = np.arange(seen, seen + len(batch))
      seen += len(batch)
      mine = (rows % count == index) & (rows < self._count)
      if mine.any():
        yield batch[mine]
      if seen >= self._count:
        break

  def _iter_source(self) -> Iterator[np.ndarray]:
    from imagefolder_jax.data.transforms import decode_image
    index, count = self.shard
    pending, labels = [], []
    for i in range(index, self._count, count):
      record = self._source[i]
      try:
        if record.get("image") is None:
          raise ValueError(record.get("error", "unreadable"))
        image = decode_image(record["image"])
      except ValueError as e:
        self.skipped += 1
        logging.warning("skipping %s: %s", record.get("id", i), e)
        continue
      if image.shape[:2] != (self.size, self.size):
        image = host_resize(image, self.size)
      if pending and (image.dtype != pending[0].dtype):
        yield np.stack(pending)
        pending = []
      pending.append(image)
      labels.append(int(record.get("label", -1)))
      if len(pending) == self.batch_size:
        yield np.stack(pending)
        pending = []
    if pending:
      yield np.stack(pending)
    self.labels = np.asarray(labels, np.int32)
