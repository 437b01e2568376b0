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

Each process reads a disjoint shard of the source (`shard_index` /
`shard_count`, default `jax.process_index()` / `jax.process_count()`), and
`batch_size` is the per-process batch. Training shuffles with a fresh
permutation per epoch and draws augmentation randomness from per-record
seeds, so the output depends only on (`seed`, shard, position), not on
thread or worker counts.

Undecodable records are dropped before batching (batches stay full) and
counted in the `SkipCounter` passed in (default
`transforms.SKIPPED_RECORDS`); with `worker_count > 0` that count lives in the
worker processes, see `SkipCounter`.
"""
from __future__ import annotations

from typing import Any

import grain.python as grain
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
    drop_remainder: drop the last partial batch, and make all shards the same
      size (needed for lock-step multi-process training).
    skip_counter: counts records dropped as undecodable.
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
  sampler = grain.IndexSampler(
      num_records=len(source), shard_options=shard_options, shuffle=train,
      num_epochs=num_epochs, seed=seed)
  if train:
    geometry = T.RandomCropFlip(resolution, area_range=tuple(crop_area_range),
                                flip_prob=flip_prob, resample=resample)
  else:
    geometry = T.CenterCropResize(resolution, resize_ratio=eval_resize_ratio, resample=resample)
  operations = [
      T.DecodeImage(skip_counter),
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


def get_iterator_state(iterator: DataLoaderIterator) -> bytes:
  """The position of a loader iterator, as JSON bytes, for checkpoints."""
  return iterator.get_state()


def set_iterator_state(iterator: DataLoaderIterator, state: bytes) -> None:
  """Moves `iterator` to a position saved by `get_iterator_state`.

  The loader must be built with the same source, seed, sharding and
  worker_count (grain validates these and raises ValueError otherwise).
  """
  iterator.set_state(state)
