"""Many samples to a directory, split over processes, resumable (`sample --out-dir`).

Sample number i (0 <= i < N) has label `labels[i]` and depends only on (seed, i, settings)
(`Generator.sample(..., indices=...)`), so a run is cut into shards of `shard_size` consecutive
numbers and shard k is made by process k mod P on its own devices, with no collective between
processes. A shard is finished when its `.npz` exists; it is written after the shard's PNGs, through
a temporary name, so a rerun (on any number of processes or devices, with any batch size) skips
finished shards and redoes the rest, and the directory ends up the same.

  DIR/settings.json                     what the run was asked for (a rerun must match)
  DIR/images/0000042_c0207.png          sample 42, class 207, uint8 RGB
  DIR/shard_0000000_0001000.npz         ids (n, P, L) int16, labels (n,), indices (n,) of samples 0..999
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Optional, Sequence

import jax
import numpy as np

from imagefolder_jax import parallel
from imagefolder_jax.evaluation.generation import to_uint8
from imagefolder_jax.evaluation.progress import Progress

SETTINGS_FILE = "settings.json"
IMAGES_DIR = "images"

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class DirectoryRun:
  """What a directory run samples. labels: (N,) class id of each sample number."""
  labels: tuple[int, ...]
  seed: int = 0
  cfg: float = 3.25
  top_k: int = 750
  top_p: float = 0.95
  temperature: float = 1.0
  shard_size: int = 1000
  dtype: Optional[str] = None   # generator compute dtype (Generator.sample's dtype)


def shard_path(out_dir: str, start: int, end: int) -> str:
  return os.path.join(out_dir, f"shard_{start:07d}_{end:07d}.npz")


def image_path(out_dir: str, number: int, label: int) -> str:
  return os.path.join(out_dir, IMAGES_DIR, f"{number:07d}_c{label:04d}.png")


class SettingsError(ValueError):
  """The directory holds samples of other settings."""


def _check_settings(out_dir: str, run: DirectoryRun, bundle: str) -> None:
  settings = {**dataclasses.asdict(run), "labels": list(run.labels), "bundle": os.path.abspath(bundle)}
  path = os.path.join(out_dir, SETTINGS_FILE)
  if os.path.isfile(path):
    with open(path) as f:
      old = json.load(f)
    diff = sorted(k for k in settings if old.get(k) != settings[k])
    if diff:
      raise SettingsError(f"{out_dir} holds samples of other settings (they differ in {', '.join(diff)}); "
                          "use another --out-dir or the same settings")
  parallel.sync("sample settings read")
  if parallel.is_primary():
    os.makedirs(os.path.join(out_dir, IMAGES_DIR), exist_ok=True)
    with open(path + ".tmp", "w") as f:
      json.dump(settings, f, indent=1)
    os.replace(path + ".tmp", path)
  parallel.sync("sample settings written")


def sample_to_directory(generator, run: DirectoryRun, out_dir: str, *, batch_size: int = 16,
                        bundle: str = "", force: Optional[dict] = None) -> dict:
  """Writes every sample of `run` under `out_dir`; returns {'written', 'skipped', 'shards'} for
  this process (shards it made / found finished).

  generator: a `generation.Generator` on this process's devices (`parallel.local_mesh()` or none);
  batch_size: samples per sampler call on this process (rounded up to its mesh's batch shards);
  force: optional `Generator.sample` force dict built for `batch_size` rows (the same tokens for
  every sample).
  """
  from PIL import Image
  labels = np.asarray(run.labels, np.int64)
  if labels.ndim != 1 or labels.size == 0:
    raise ValueError("labels must be a non-empty 1-D sequence of class ids")
  if run.shard_size < 1 or batch_size < 1:
    raise ValueError(f"shard_size and batch_size must be >= 1, got {run.shard_size} and {batch_size}")
  if generator.mesh is not None:
    shards = int(np.prod([generator.mesh.shape[a] for a in parallel.BATCH_AXES]))
    batch_size = -(-batch_size // shards) * shards
  _check_settings(out_dir, run, bundle)
  process, processes = jax.process_index(), jax.process_count()
  starts = list(range(0, labels.size, run.shard_size))
  mine = [s for k, s in enumerate(starts) if k % processes == process]
  todo = [s for s in mine if not os.path.isfile(shard_path(out_dir, s, min(s + run.shard_size, labels.size)))]
  total = sum(min(s + run.shard_size, labels.size) - s for s in todo)
  progress = Progress(f"samples (process {process} of {processes})" if processes > 1 else "samples",
                      max(total, 1), every=10.0)
  written = 0
  for start in todo:
    end = min(start + run.shard_size, labels.size)
    ids, numbers_done = [], []
    for b0 in range(start, end, batch_size):
      numbers = np.arange(b0, b0 + batch_size)
      keep = numbers < end
      batch_labels = labels[np.minimum(numbers, end - 1)]   # rows past the shard's end: drawn, dropped
      out = generator.sample(batch_labels, seed=run.seed, cfg=run.cfg, top_k=run.top_k, top_p=run.top_p,
                             temperature=run.temperature, force=force, indices=numbers,
                             dtype=run.dtype)
      images = to_uint8(parallel.to_host(out.images))[keep]
      for number, label, image in zip(numbers[keep], batch_labels[keep], images):
        Image.fromarray(image).save(image_path(out_dir, int(number), int(label)))
      ids.append(out.codes.flat()[keep].astype(np.int16))
      numbers_done.append(numbers[keep])
      progress.update(int(keep.sum()))
    path = shard_path(out_dir, start, end)
    tmp = path + ".tmp.npz"
    numbers_done = np.concatenate(numbers_done)
    np.savez(tmp, ids=np.concatenate(ids), labels=labels[numbers_done].astype(np.int32), indices=numbers_done)
    os.replace(tmp, path)
    written += end - start
  parallel.sync("sample shards written")
  return {"written": written, "skipped": len(mine) - len(todo), "shards": len(mine)}


def read_directory(out_dir: str) -> dict:
  """All finished shards of a directory run: {'ids' (N, P, L), 'labels' (N,), 'indices' (N,)},
  ordered by sample number."""
  names = sorted(n for n in os.listdir(out_dir) if n.startswith("shard_") and n.endswith(".npz")
                 and not n.endswith(".tmp.npz"))
  if not names:
    raise FileNotFoundError(f"{out_dir}: no finished sample shards")
  parts: dict = {"ids": [], "labels": [], "indices": []}
  for name in names:
    with np.load(os.path.join(out_dir, name), allow_pickle=False) as data:
      for k in parts:
        parts[k].append(data[k])
  return {k: np.concatenate(v) for k, v in parts.items()}


def labels_for(classes: Sequence[int], per_class: int) -> tuple[int, ...]:
  """Sample i has class classes[i // per_class] (rows of a class grid)."""
  return tuple(int(c) for c in np.repeat(np.asarray(classes, np.int64), per_class))
