"""Resumable, sharded class-conditional sampling for gFID (`eval-generator`).

Sample number i has label `classes[i % len(classes)]` (50,000 samples over 1,000 classes: 50 per
class) and depends only on (seed, i, settings) (`Generator.sample(..., indices=...)`), so the run is
cut into shards of `shard_size` consecutive numbers, each written to `work_dir` as
`shard_<first>_<end>.npz` (uint8 images, labels, Inception features) once finished. A rerun with the
same settings skips finished shards; other settings are refused (`settings.json`). Images are
rounded to uint8 as floor(127.5 (x + 1) + 0.5), clipped, not truncated. On several processes the
features of a shard come back grouped by process, not in sample order (the scores do not depend on
the order, except the Inception Score's split boundaries).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Optional, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils

from imagefolder_jax.data.images import to_uint8  # noqa: F401  (the ADM rounding, re-exported for callers)
from imagefolder_jax.inference.sample_runner import (
  SettingsError,
  check_settings,
  rounded_batch,
  sample_batches,
  shard_path,
  shard_ranges,
  write_npz,
  write_settings,
)
from imagefolder_jax.parallel.multihost import sync
from imagefolder_jax.progress import Progress

__all__ = ["SampleRun", "SettingsError", "generate_samples", "read_shards", "sample_labels", "to_uint8"]


@dataclasses.dataclass(frozen=True)
class SampleRun:
  num_samples: int
  seed: int = 0
  cfg: float = 3.25
  top_k: int = 750
  top_p: float = 0.95
  temperature: float = 1.0
  classes: Optional[tuple[int, ...]] = None   # None = every class of the generator
  shard_size: int = 1000


def sample_labels(numbers: np.ndarray, classes: Sequence[int]) -> np.ndarray:
  """Label of each sample number: classes[i % len(classes)]."""
  classes = np.asarray(classes, np.int32)
  return classes[np.asarray(numbers) % len(classes)]


def _host(x) -> np.ndarray:
  if jax.process_count() > 1:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def _check_settings(work_dir: str, run: SampleRun, bundle: str) -> None:
  settings = {**dataclasses.asdict(run), "bundle": os.path.abspath(bundle)}
  settings["classes"] = list(run.classes) if run.classes is not None else None
  # More samples may be added to a run; everything else must match.
  check_settings(work_dir, settings, flag="--work-dir", may_differ=("num_samples",))
  sync("eval-generator settings read")
  if jax.process_index() == 0:
    write_settings(work_dir, settings)


def _shard_features(features, images: np.ndarray) -> dict:
  """Inception features of a shard that every process holds in full: each process feeds its
  interleaved slice, in as many calls (collectives) as the longest slice needs, so that every
  process makes the same number of calls also when the slices differ in length."""
  processes, rows = jax.process_count(), features.local_batch
  mine = images[jax.process_index()::processes]
  longest_slice = -(-len(images) // processes)
  calls = -(-longest_slice // rows)
  parts = [features(mine[i * rows:(i + 1) * rows]) for i in range(calls)]
  return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def generate_samples(generator, features, run: SampleRun, work_dir: str, bundle: str = "",
                     batch_size: int = 64) -> dict:
  """Samples run.num_samples images shard by shard; returns {'labels', 'pool_3', 'spatial',
  'samples_per_s'} read back from the shards.

  generator: `imagefolder_jax.Generator` (its mesh decides the sharding);
  features: `evaluation.features.InceptionFeatures`; batch_size: global samples per sampler call
  (rounded up to the mesh's batch shards).
  """
  if run.num_samples < 1 or run.shard_size < 1 or batch_size < 1:
    raise ValueError(f"num_samples, shard_size and batch_size must be >= 1, got "
                     f"{run.num_samples}, {run.shard_size}, {batch_size}")
  classes = run.classes if run.classes is not None else tuple(range(generator.config.num_classes))
  bad = [c for c in classes if not 0 <= c < generator.config.num_classes]
  if bad or not classes:
    raise ValueError(f"classes must be non-empty ids in [0, {generator.config.num_classes}), got {bad[:3] or classes}")
  os.makedirs(work_dir, exist_ok=True)
  _check_settings(work_dir, run, bundle)
  batch_size = rounded_batch(generator, batch_size)
  # Every process samples every shard together (the generator's mesh spans them all), so they
  # must agree on which shards are finished: decided once, from the files as they are now.
  ranges = shard_ranges(run.num_samples, run.shard_size)
  finished = {s for s, e in ranges if os.path.isfile(shard_path(work_dir, s, e))}
  sync("eval-generator shards listed")
  progress = Progress("samples", run.num_samples, every=10.0)
  sampled, sampling_time = 0, 0.0
  for start, end in ranges:
    if start in finished:
      progress.update(end - start)
      continue
    t0 = time.perf_counter()
    parts = list(sample_batches(generator, start, end, lambda n: sample_labels(n, classes), run, batch_size,
                                gather=_host, with_ids=False))
    sampling_time += time.perf_counter() - t0
    sampled += end - start
    images = np.concatenate([p["images"] for p in parts])
    feats = _shard_features(features, images)
    if jax.process_index() == 0:
      write_npz(shard_path(work_dir, start, end), images=images, labels=np.concatenate([p["labels"] for p in parts]),
                pool_3=feats["pool_3"], spatial=feats["spatial"])
    progress.update(end - start)
  sync("eval-generator shards written")
  rate = sampled / sampling_time if sampling_time > 0 else None
  if rate:
    logging.info("sampled %d images at %.2f samples/s (sampler and decode only)", sampled, rate)
  return {"samples_per_s": rate, **read_shards(work_dir, run.num_samples, run.shard_size)}


def read_shards(work_dir: str, num_samples: int, shard_size: int, with_images: bool = False) -> dict:
  """Concatenates the shards of samples 0..num_samples: labels, pool_3, spatial (and images)."""
  keys = ("labels", "pool_3", "spatial") + (("images",) if with_images else ())
  parts: dict = {k: [] for k in keys}
  for start, end in shard_ranges(num_samples, shard_size):
    path = shard_path(work_dir, start, end)
    if not os.path.isfile(path):
      raise FileNotFoundError(f"missing shard {path}")
    with np.load(path, allow_pickle=False) as data:
      for k in keys:
        parts[k].append(data[k])
  return {k: np.concatenate(v) for k, v in parts.items()}
