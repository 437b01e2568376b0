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
import json
import logging
import os
import time
from typing import Optional, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils

from imagefolder_jax.evaluation.progress import Progress
from imagefolder_jax.multihost import sync
from imagefolder_jax.parallel import BATCH_AXES

SETTINGS_FILE = "settings.json"


class ResumeError(ValueError):
  """A work directory holds shards of different settings."""


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


def to_uint8(images) -> np.ndarray:
  """(..., 3) float in [-1, 1] -> uint8 floor(127.5 (x + 1) + 0.5) clipped to [0, 255]."""
  x = np.floor(127.5 * (np.asarray(images, np.float32) + 1.0) + 0.5)
  return np.clip(x, 0, 255).astype(np.uint8)


def sample_labels(numbers: np.ndarray, classes: Sequence[int]) -> np.ndarray:
  """Label of each sample number: classes[i % len(classes)]."""
  classes = np.asarray(classes, np.int32)
  return classes[np.asarray(numbers) % len(classes)]


def _host(x) -> np.ndarray:
  if jax.process_count() > 1:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def _check_settings(work_dir: str, run: SampleRun, bundle: str) -> None:
  os.makedirs(work_dir, exist_ok=True)
  path = os.path.join(work_dir, SETTINGS_FILE)
  settings = {**dataclasses.asdict(run), "bundle": os.path.abspath(bundle)}
  settings["classes"] = list(run.classes) if run.classes is not None else None
  if os.path.isfile(path):
    with open(path) as f:
      old = json.load(f)
    # More samples may be added to a run; everything else must match.
    diff = sorted(k for k in settings if k != "num_samples" and old.get(k) != settings[k])
    if diff:
      raise ResumeError(f"{work_dir} holds samples of other settings ({', '.join(f'{k}={old.get(k)!r}' for k in diff)}); "
                        "use another --work-dir or the same settings")
  sync("eval-generator settings read")
  if jax.process_index() == 0:
    with open(path + ".tmp", "w") as f:
      json.dump(settings, f, indent=1)
    os.replace(path + ".tmp", path)


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


def shard_path(work_dir: str, start: int, end: int) -> str:
  return os.path.join(work_dir, f"shard_{start:07d}_{end:07d}.npz")


def generate_samples(generator, features, run: SampleRun, work_dir: str, bundle: str = "",
                     batch_size: int = 64) -> dict:
  """Samples run.num_samples images shard by shard; returns {'images': (N, H, W, 3) uint8 (only
  when `keep_images`), 'labels', 'pool_3', 'spatial', 'samples_per_s'} read back from the shards.

  generator: `imagefolder_jax.generation.Generator` (its mesh decides the sharding);
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
  _check_settings(work_dir, run, bundle)
  if generator.mesh is not None:
    shards = int(np.prod([generator.mesh.shape[a] for a in BATCH_AXES]))
    batch_size = -(-batch_size // shards) * shards
  # Every process samples every shard together (the generator's mesh spans them all), so they
  # must agree on which shards are finished: decided once, from the files as they are now.
  starts = range(0, run.num_samples, run.shard_size)
  finished = {s for s in starts if os.path.isfile(shard_path(work_dir, s, min(s + run.shard_size, run.num_samples)))}
  sync("eval-generator shards listed")
  progress = Progress("samples", run.num_samples, every=10.0)
  sampled, sampling_time = 0, 0.0
  for start in starts:
    end = min(start + run.shard_size, run.num_samples)
    path = shard_path(work_dir, start, end)
    if start in finished:
      progress.update(end - start)
      continue
    images, numbers_done = [], []
    t0 = time.perf_counter()
    for b0 in range(start, end, batch_size):
      numbers = np.arange(b0, b0 + batch_size)          # padded past `end`: extra draws, dropped
      out = generator.sample(sample_labels(numbers, classes), seed=run.seed, cfg=run.cfg, top_k=run.top_k,
                             top_p=run.top_p, temperature=run.temperature, indices=numbers)
      keep = numbers < end
      images.append(to_uint8(_host(out.images))[keep])
      numbers_done.append(numbers[keep])
    sampling_time += time.perf_counter() - t0
    sampled += end - start
    images = np.concatenate(images)
    feats = _shard_features(features, images)
    if jax.process_index() == 0:
      tmp = path + ".tmp.npz"
      np.savez(tmp, images=images, labels=sample_labels(np.concatenate(numbers_done), classes),
               pool_3=feats["pool_3"], spatial=feats["spatial"])
      os.replace(tmp, path)
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
  for start in range(0, num_samples, shard_size):
    path = shard_path(work_dir, start, min(start + shard_size, num_samples))
    if not os.path.isfile(path):
      raise FileNotFoundError(f"missing shard {path}")
    with np.load(path, allow_pickle=False) as data:
      for k in keys:
        parts[k].append(data[k])
  return {k: np.concatenate(v) for k, v in parts.items()}
