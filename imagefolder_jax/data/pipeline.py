"""The grain input pipeline: `make_loader` and iterator checkpoint helpers.

    loader = make_loader(source, batch_size=64, resolution=256, train=True, seed=0)
    it = iter(loader)
    batch = next(it)   # {'image': (64, 256, 256, 3) float32 in [-1, 1], 'label': (64,) int32}
    state = get_iterator_state(it)      # bytes (JSON); store with the checkpoint
    it = iter(loader); set_iterator_state(it, state)   # resumes at the same batch

With orbax, save the iterator inside a `CheckpointManager` composite as
`grain.python.PyGrainCheckpointSave(it)` / restore with
`grain.python.PyGrainCheckpointRestore(it)` (item handler
`grain.python.PyGrainCheckpointHandler`); on several processes each one
stores its own shard's state.

Several processes read one global order (`GlobalBatchSampler`): step t's
global batch is positions [t * G, (t + 1) * G) of a seeded permutation of the
source (a fresh one per epoch), and process p takes the rows `batch_rows` of
it (`parallel.process_rows`: process p's contiguous block with the default
mesh). Augmentation randomness is drawn from a per-position seed. The global
batch, its order and its augmentations therefore depend only on (`seed`,
step), not on the number of processes, threads or workers: 2 processes x 2
devices train on exactly the batches of 1 process x 4 devices. `batch_size`
is the per-process batch (len(batch_rows)).

Undecodable records are dropped before batching (batches stay full) and
counted in the `SkipCounter` passed in (default
`transforms.SKIPPED_RECORDS`); with `worker_count > 0` that count lives in the
worker processes, see `SkipCounter`.
"""
from __future__ import annotations

from typing import Any

import grain.python as grain
import numpy as np
from grain import DataLoaderIterator

from imagefolder_jax.data import transforms as T


def _ensure_absl_flags_parsed() -> None:
  # grain's worker processes read absl flags; a library user may never call
  # app.run, so mark them parsed (with defaults) rather than crash in a worker.
  from absl import flags  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def make_loader(
    source: Any,
    *,
    batch_size: int,
    resolution: int,
    train: bool,
    seed: int,
    num_epochs: int | None = None,
    worker_count: int = 0,
    shard_index: int | None = None,
    shard_count: int | None = None,
    drop_remainder: bool = True,
    skip_counter: T.SkipCounter | None = None,
    global_batch_size: int | None = None,
    batch_rows: Any = None,
    start_position: int = 0,
    crop_area_range: tuple[float, float] = (0.8, 1.0),
    flip_prob: float = 0.5,
    eval_resize_ratio: float = 1.125,
    resample: str = "lanczos",
    read_threads: int = 16,
    worker_buffer_size: int = 1,
) -> grain.DataLoader:
  """Builds a grain DataLoader of normalised, batched images.

  Args:
    source: a random-access source (see `sources`), records
      {'image': bytes | uint8 array, 'label': int, 'id': str}.
    batch_size: per-process batch size.
    resolution: output side in pixels.
    train: True: shuffle + `RandomCropFlip` augmentation; False: source order
      + `CenterCropResize` (Resize(round(resolution * eval_resize_ratio)) +
      CenterCrop(resolution)).
    seed: shuffle and augmentation seed (the same on every process).
    num_epochs: passes over the data; None means forever when training and
      one pass when evaluating.
    worker_count: grain worker processes (0: threads in this process).
    shard_index, shard_count: this process's data shard; default
      `jax.process_index()` / `jax.process_count()`.
    drop_remainder: with `num_epochs`, drop the last partial global batch;
      otherwise pad it to a full batch with records marked `valid=False`
      (every process then runs the same number of steps).
    skip_counter: counts records dropped as undecodable.
    global_batch_size, batch_rows: the global batch G and the rows of it that
      this process takes (default: G = batch_size * shard_count and process
      `shard_index`'s contiguous block). Records are then read in one global
      order (`GlobalBatchSampler`); with `train=False` every record carries
      `index` (its position in the source, >= len(source) for the padding that
      completes the last global batch) and `valid`.
    start_position: global position to start from (a resumed run with a
      different process count continues at step * G).
    crop_area_range, flip_prob: train augmentation (see `transforms`).
    eval_resize_ratio: eval resize of the shorter side relative to `resolution`.
    resample: PIL filter name for resizing.
    read_threads: threads reading and transforming records per process/worker.
    worker_buffer_size: batches each worker prepares ahead.

  Returns:
    a `grain.python.DataLoader`; `iter()` of it yields
    {'image': (batch_size, resolution, resolution, 3) float32 in [-1, 1],
     'label': (batch_size,) int32}.
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  if resolution < 1:
    raise ValueError(f"resolution must be >= 1, got {resolution}")
  if len(source) == 0:
    raise ValueError(f"source {source!r} is empty")
  if shard_index is None or shard_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    shard_index = jax.process_index() if shard_index is None else shard_index
    shard_count = jax.process_count() if shard_count is None else shard_count
  if not 0 <= shard_index < shard_count:
    raise ValueError(f"need 0 <= shard_index < shard_count, got {shard_index}, {shard_count}")
  if num_epochs is None and not train:
    num_epochs = 1
  if worker_count > 0:
    _ensure_absl_flags_parsed()
  skip_counter = T.SKIPPED_RECORDS if skip_counter is None else skip_counter

  shard_options = grain.ShardOptions(shard_index, shard_count, drop_remainder=drop_remainder)
  if global_batch_size is None:
    global_batch_size = batch_size * shard_count
  if batch_rows is None:
    batch_rows = range(shard_index * batch_size, (shard_index + 1) * batch_size)
  sampler = GlobalBatchSampler(
      len(source), global_batch_size=global_batch_size, batch_rows=batch_rows,
      shard_index=shard_index, shard_count=shard_count, shuffle=train, seed=seed,
      num_epochs=num_epochs, start_position=start_position, pad_last=not drop_remainder)
  if not train:
    source = IndexedSource(source, sampler.num_positions or len(source))
  if train:
    geometry = T.RandomCropFlip(resolution, area_range=tuple(crop_area_range),
                                flip_prob=flip_prob, resample=resample)
  else:
    geometry = T.CenterCropResize(resolution, resize_ratio=eval_resize_ratio, resample=resample)
  if len(batch_rows) != batch_size:
    raise ValueError(f"batch_rows has {len(batch_rows)} rows, batch_size is {batch_size}")
  operations = [
      # Evaluation keeps undecodable records as invalid rows: one fixed number of steps everywhere.
      T.DecodeImage(skip_counter, keep_invalid=not train),
      T.DropSkipped(),
      geometry,
      T.ToModelInput(),
      grain.Batch(batch_size, drop_remainder=drop_remainder),
  ]
  return grain.DataLoader(
      data_source=source, sampler=sampler, operations=operations,
      worker_count=worker_count, worker_buffer_size=worker_buffer_size,
      shard_options=shard_options,
      read_options=grain.ReadOptions(num_threads=read_threads))


class GlobalBatchSampler:
  """A grain sampler that reads one global order of records, whatever the number of processes.

  The loader of process `shard_index` (of `shard_count`) asks for sampler indices
  i = j * shard_count + shard_index, j = 0, 1, ... (grain's convention). Its j-th record is row
  `batch_rows[j % b]` of global batch t = j // b (b = len(batch_rows)), i.e. global position
  g = start_position + t * global_batch_size + batch_rows[j % b]. Position g reads record
  `perm_e[g mod N]` of epoch e = g // N (a fresh seeded permutation per epoch when shuffling, the
  source order otherwise) with augmentation seed `seed + g`. Without shuffling, positions past the
  last epoch return record key g itself, so an `IndexedSource` can mark them as padding.
  With `num_epochs` the order ends after the last global batch, which is padded when `pad_last`
  and dropped when it is partial otherwise; `num_positions` is the number of positions read.
  """

  def __init__(self, num_records: int, *, global_batch_size: int, batch_rows, shard_index: int,
               shard_count: int, shuffle: bool, seed: int, num_epochs: int | None,
               start_position: int = 0, pad_last: bool = True):
    if num_records < 1:
      raise ValueError("the source is empty")
    rows = [int(r) for r in batch_rows]
    if not rows or min(rows) < 0 or max(rows) >= global_batch_size:
      raise ValueError(f"batch_rows must lie in [0, {global_batch_size}), got {rows[:4]}...")
    self._n, self._rows, self._g = num_records, rows, global_batch_size
    self._shard_index, self._shard_count = shard_index, shard_count
    self._shuffle, self._seed, self._epochs = shuffle, seed, num_epochs
    self._start = start_position
    self._keys = grain.MapDataset.range(num_records)
    if shuffle:
      self._keys = self._keys.shuffle(seed=seed)
    if num_epochs is None:
      self._len = self.num_positions = None
    else:
      positions = num_epochs * num_records
      steps = -(-positions // global_batch_size) if pad_last else positions // global_batch_size
      self._len = steps * len(rows) * shard_count
      self.num_positions = steps * global_batch_size

  def __len__(self) -> int:
    import sys  # pylint: disable=g-import-not-at-top
    return sys.maxsize if self._len is None else self._len

  def __repr__(self) -> str:
    # grain checks this when an iterator state is restored: a state only fits the same order.
    return (f"GlobalBatchSampler(num_records={self._n}, global_batch_size={self._g}, rows="
            f"{self._rows[0]}..{self._rows[-1]}, shuffle={self._shuffle}, seed={self._seed}, "
            f"num_epochs={self._epochs}, start={self._start})")

  def position(self, index: int) -> int:
    """Global position of sampler index `index`."""
    j = index // self._shard_count
    b = len(self._rows)
    return self._start + (j // b) * self._g + self._rows[j % b]

  def __getitem__(self, index: int):
    from grain._src.python import record  # pylint: disable=g-import-not-at-top
    if index < 0 or (self._len is not None and index >= self._len):
      raise IndexError(f"sampler index {index} is out of range")
    g = self.position(index)
    if self._shuffle or self._epochs is None or g < self._epochs * self._n:
      key = int(self._keys[g]) if self._shuffle else g % self._n
    else:
      key = g
    rng = np.random.Generator(np.random.Philox(key=(self._seed or 0) + g))
    return record.RecordMetadata(index=index, record_key=key, rng=rng)


class IndexedSource:
  """Evaluation view of a source, `padded_length` records long: key k -> the record k mod N plus
  `index` = k and `valid` = k < N, so padded rows of the last global batch can be dropped after
  the step."""

  def __init__(self, source: Any, padded_length: int):
    self._source = source
    self._length = max(int(padded_length), len(source))

  def __len__(self) -> int:
    # grain wraps record keys modulo the source length: report the padded length.
    return self._length

  def __getitem__(self, key: int) -> dict:
    n = len(self._source)
    record = dict(self._source[key % n])
    record["index"] = key
    record["valid"] = key < n
    return record

  def __repr__(self) -> str:
    return f"IndexedSource({self._source!r})"


def get_iterator_state(iterator: DataLoaderIterator) -> bytes:
  """The position of a loader iterator, as JSON bytes, for checkpoints."""
  return iterator.get_state()


def set_iterator_state(iterator: DataLoaderIterator, state: bytes) -> None:
  """Moves `iterator` to a position saved by `get_iterator_state`.

  The loader must be built with the same source, seed, sharding and
  worker_count (grain validates these and raises ValueError otherwise).
  """
  iterator.set_state(state)
