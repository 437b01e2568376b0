"""Many samples, resumable, in shards: `sample --out-dir` here, and the sampling stage of `eval-generator`.

The shared parts (settings check, shard ranges, the batch loop, atomic shard files) are used by both
runs; `evaluation.generation` adds Inception features to its shards and samples every shard on the
global mesh, while a directory run hands whole shards to processes.

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
from typing import Callable, Iterator, Optional, Sequence

import jax
import numpy as np

from imagefolder_jax import parallel
from imagefolder_jax.data.images import to_uint8
from imagefolder_jax.errors import ImageFolderError
from imagefolder_jax.progress import Progress

SETTINGS_FILE = "settings.json"
IMAGES_DIR = "images"

log = logging.getLogger(__name__)


class SettingsError(ImageFolderError):
  """The directory holds samples of other settings."""


def check_settings(directory: str, settings: dict, *, flag: str, may_differ: Sequence[str] = ()) -> None:
  """Raises `SettingsError` if `directory`'s settings file differs from `settings` in a key outside
  `may_differ`; names each differing key with its stored value and the flag to change (`flag`)."""
  path = os.path.join(directory, SETTINGS_FILE)
  if not os.path.isfile(path):
    return
  with open(path) as f:
    old = json.load(f)
  diff = sorted(k for k in settings if k not in may_differ and old.get(k) != settings[k])
  if diff:
    held = ", ".join(f"{k}={old.get(k)!r}" for k in diff)
    raise SettingsError(f"{directory} holds samples of other settings ({held}); use another {flag} or the "
                        "same settings")


def write_settings(directory: str, settings: dict) -> None:
  os.makedirs(directory, exist_ok=True)
  path = os.path.join(directory, SETTINGS_FILE)
  with open(path + ".tmp", "w") as f:
    json.dump(settings, f, indent=1)
  os.replace(path + ".tmp", path)


def shard_path(directory: str, start: int, end: int) -> str:
  return os.path.join(directory, f"shard_{start:07d}_{end:07d}.npz")


def shard_ranges(num_samples: int, shard_size: int) -> list[tuple[int, int]]:
  """[(start, end)] of consecutive sample numbers, `shard_size` each (the last may be shorter)."""
  return [(s, min(s + shard_size, num_samples)) for s in range(0, num_samples, shard_size)]


def write_npz(path: str, **arrays) -> None:
  """Writes through a temporary name: a shard file exists only once it is complete."""
  tmp = path + ".tmp.npz"
  np.savez(tmp, **arrays)
  os.replace(tmp, path)


def rounded_batch(generator, batch_size: int) -> int:
  """`batch_size` rounded up to a multiple of the generator mesh's batch shards."""
  if generator.mesh is None:
    return batch_size
  shards = int(np.prod([generator.mesh.shape[a] for a in parallel.BATCH_AXES]))
  return -(-batch_size // shards) * shards


def sample_batches(generator, start: int, end: int, labels_of: Callable[[np.ndarray], np.ndarray], settings,
                   batch_size: int, *, gather: Callable = parallel.to_host, force: Optional[dict] = None,
                   dtype: Optional[str] = None, with_ids: bool = True) -> Iterator[dict]:
  """Samples numbers start..end-1, `batch_size` per sampler call; yields per call {'numbers' (n,),
  'labels' (n,), 'images' (n, H, W, 3) uint8, 'ids' (n, P, L) int16 (when `with_ids`)}.

  The last call is padded past `end` (extra draws, dropped): sample i depends only on (seed, i,
  settings), never on the batch it is drawn in. settings: seed, cfg, top_k, top_p, temperature;
  gather: device images -> host array (`parallel.to_host`, or a cross-process gather).
  """
  for b0 in range(start, end, batch_size):
    numbers = np.arange(b0, b0 + batch_size)
    keep = numbers < end
    labels = labels_of(np.minimum(numbers, end - 1))
    out = generator.sample(labels, seed=settings.seed, cfg=settings.cfg, top_k=settings.top_k,
                           top_p=settings.top_p, temperature=settings.temperature, force=force,
                           indices=numbers, dtype=dtype)
    part = {"numbers": numbers[keep], "labels": labels[keep], "images": to_uint8(gather(out.images))[keep]}
    if with_ids:
      part["ids"] = out.codes.flat()[keep].astype(np.int16)
    yield part


# ----------------------------------------------------------------------------- sample --out-dir
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


def image_path(out_dir: str, number: int, label: int) -> str:
  return os.path.join(out_dir, IMAGES_DIR, f"{number:07d}_c{label:04d}.png")


def _check_directory(out_dir: str, run: DirectoryRun, bundle: str) -> None:
  settings = {**dataclasses.asdict(run), "labels": list(run.labels), "bundle": os.path.abspath(bundle)}
  check_settings(out_dir, settings, flag="--out-dir")
  parallel.sync("sample settings read")
  if parallel.is_primary():
    os.makedirs(os.path.join(out_dir, IMAGES_DIR), exist_ok=True)
    write_settings(out_dir, settings)
  parallel.sync("sample settings written")


def sample_to_directory(generator, run: DirectoryRun, out_dir: str, *, batch_size: int = 16,
                        bundle: str = "", force: Optional[dict] = None) -> dict:
  """Writes every sample of `run` under `out_dir`; returns {'written', 'skipped', 'shards'} for
  this process (shards it made / found finished).

  generator: a `Generator` on this process's devices (`parallel.local_mesh()` or none);
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
  batch_size = rounded_batch(generator, batch_size)
  _check_directory(out_dir, run, bundle)
  process, processes = jax.process_index(), jax.process_count()
  mine = [r for k, r in enumerate(shard_ranges(labels.size, run.shard_size)) if k % processes == process]
  todo = [(s, e) for s, e in mine if not os.path.isfile(shard_path(out_dir, s, e))]
  progress = Progress(f"samples (process {process} of {processes})" if processes > 1 else "samples",
                      max(sum(e - s for s, e in todo), 1), every=10.0)
  written = 0
  for start, end in todo:
    parts = []
    for part in sample_batches(generator, start, end, lambda n: labels[n], run, batch_size, force=force,
                               dtype=run.dtype):
      for number, label, image in zip(part["numbers"], part["labels"], part["images"]):
        Image.fromarray(image).save(image_path(out_dir, int(number), int(label)))
      parts.append(part)
      progress.update(len(part["numbers"]))
    numbers = np.concatenate([p["numbers"] for p in parts])
    write_npz(shard_path(out_dir, start, end), ids=np.concatenate([p["ids"] for p in parts]),
              labels=labels[numbers].astype(np.int32), indices=numbers)
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
