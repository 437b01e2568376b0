"""Tokenizer evaluation (`eval-tokenizer`): rFID, PSNR, SSIM, LPIPS and codebook usage.

  result = evaluate_tokenizer(tokenizer, source, inception=net, lpips_params=params, batch_size=64)

Every record of `source` is read once in source order through the evaluation loader
(`data.make_loader(train=False, drop_remainder=False)`: resize the shorter side to 1.125 x the
resolution, centre crop), one global batch at a time over every device and process
(`data.GlobalBatchSampler`; the last global batch is padded with records marked `valid=False`,
which every statistic drops). Per global batch, one jitted program reconstructs (encode ->
quantize -> decode, clamped to [-1, 1]), rounds both images to uint8 (floor(127.5 (x + 1) + 0.5),
the PNGs a user would save), and computes per image PSNR and SSIM on the uint8 images
(`image_metrics`), LPIPS-VGG on the float images in [-1, 1], and per branch and scale the code
histogram of the valid images. rFID is the Fréchet distance between the Inception pool3 features
of the uint8 reconstructions and those of the uint8 originals (ADM's definition, float64 on the
host). Codebook usage per branch b and scale s: `used` = fraction of the K codes chosen at least
once; `perplexity` = exp(entropy of the code frequencies) (K when uniform, 1 when one code).
"""
from __future__ import annotations

import functools
import logging
import time
from typing import Any, Iterator, Optional

import jax
import jax.numpy as jnp
import numpy as np

from imagefolder_jax import parallel
from imagefolder_jax.errors import ImageFolderError
from imagefolder_jax.evaluation import image_metrics
from imagefolder_jax.progress import Progress


class EvalInputError(ImageFolderError):
  """An evaluation input (source, batch size) that cannot be used."""


def to_uint8_scale(images: jax.Array) -> jax.Array:
  """(..., 3) float in [-1, 1] -> float32 integers 0..255: floor(127.5 (x + 1) + 0.5), clipped
  (the rounding of `generation.to_uint8`, on the device)."""
  return jnp.clip(jnp.floor(127.5 * (images.astype(jnp.float32) + 1.0) + 0.5), 0.0, 255.0)


def global_batch_size(mesh, batch_size: int) -> int:
  """`batch_size` rounded up to a multiple of the mesh's batch shards (and of the processes)."""
  if batch_size < 1:
    raise EvalInputError(f"batch_size must be >= 1, got {batch_size}")
  shards = int(np.prod([mesh.shape[a] for a in parallel.BATCH_AXES]))
  shards = int(np.lcm(shards, jax.process_count()))
  return -(-batch_size // shards) * shards


def eval_batches(source, mesh, batch_size: int, resolution: int, limit: Optional[int] = None
                 ) -> tuple[int, Iterator[tuple[dict, dict]]]:
  """(global batch G, iterator of (device batch, host batch)) over `source` in order, once.

  device batch: {'image': (G, R, R, 3) float32 [-1, 1], 'label': (G,), 'valid': (G,) bool} global
  jax.Arrays sharded over the batch axes; host batch: this process's rows of it as NumPy (its rows
  `parallel.process_rows(mesh, G)`), with 'index'. `limit`: only N records spread evenly (`Subset`).
  """
  from imagefolder_jax.data import make_loader
  if limit is not None:
    if limit < 1:
      raise EvalInputError(f"limit must be >= 1, got {limit}")
    source = Subset(source, limit)
  g = global_batch_size(mesh, batch_size)
  rows = parallel.process_rows(mesh, g)
  loader = make_loader(source, batch_size=len(rows), resolution=resolution, train=False, seed=0,
                       drop_remainder=False, global_batch_size=g, batch_rows=rows)

  steps = -(-len(source) // g)

  def batches():
    # Exactly `steps` global batches on every process (each step is a collective): undecodable
    # records are dropped before batching, so a process may run short; it then pads with invalid rows.
    iterator = iter(loader)
    empty = {"image": np.zeros((0, resolution, resolution, 3), np.float32), "label": np.zeros((0,), np.int32),
             "index": np.zeros((0,), np.int64), "valid": np.zeros((0,), bool)}
    for _ in range(steps):
      batch = next(iterator, None)
      host = empty if batch is None else {k: np.asarray(v) for k, v in batch.items()}
      if len(host["image"]) != len(rows):
        host = _pad_rows(host, len(rows))
      arrays = {k: host[k] for k in ("image", "label", "valid")}
      yield parallel.host_to_global(mesh, arrays, g), host

  return g, batches()


class Subset:
  """`n` records spread evenly over a source: record i is source[(i * len(source)) // n], so a
  class-sorted source (folders, the demo) keeps every class."""

  def __init__(self, source, n: int):
    self._source, self._n = source, min(int(n), len(source))

  def __len__(self) -> int:
    return self._n

  def __getitem__(self, i: int):
    if not 0 <= i < self._n:
      raise IndexError(i)
    return self._source[(i * len(self._source)) // self._n]

  def __repr__(self) -> str:
    return f"Subset({self._source!r}, {self._n})"


def _pad_rows(host: dict, rows: int) -> dict:
  """Pads a short host batch to `rows` with zero rows marked invalid."""
  n = len(host["image"])
  return {k: np.concatenate([v, np.zeros((rows - n,) + v.shape[1:], v.dtype)]) for k, v in host.items()}


def usage_summary(counts: np.ndarray, scales) -> dict:
  """counts (P, S, K) code histograms -> {'branches': [{'scales': [{side, used, perplexity}],
  'used', 'perplexity'} per branch]} (the branch entry pools all scales)."""
  counts = np.asarray(counts, np.float64)

  def stats(c):
    total = c.sum()
    if total <= 0:
      return {"used": 0.0, "perplexity": None}
    p = c[c > 0] / total
    return {"used": float((c > 0).mean()), "perplexity": float(np.exp(-(p * np.log(p)).sum()))}

  branches = []
  for b in range(counts.shape[0]):
    per_scale = [{"side": int(side), **stats(counts[b, s])} for s, side in enumerate(scales)]
    branches.append({"name": ("detail", "semantic")[b] if counts.shape[0] == 2 else f"branch_{b}",
                     **stats(counts[b].sum(0)), "scales": per_scale})
  return {"branches": branches}


class TokenizerEvaluator:
  """The jitted per-batch program of `evaluate_tokenizer`, bound to a tokenizer and a mesh."""

  def __init__(self, tokenizer, mesh, lpips_params: Optional[Any] = None):
    from imagefolder_jax.models.lpips import LPIPS
    self.tokenizer, self.mesh = tokenizer, mesh
    self.module = tokenizer.module
    self.variables = parallel.put_global(tokenizer.variables, jax.tree.map(
        lambda _: parallel.replicated(mesh), tokenizer.variables))
    self.lpips = LPIPS() if lpips_params is not None else None
    self.lpips_params = None if lpips_params is None else parallel.put_global(
        lpips_params, jax.tree.map(lambda _: parallel.replicated(mesh), lpips_params))

  @functools.cached_property
  def step(self):
    q = self.tokenizer.config.quantizer
    module, lpips = self.module, self.lpips
    batch = parallel.batch_sharding(self.mesh, 1)
    out_shardings = dict(psnr=batch, ssim=batch, lpips=batch, valid=batch,
                         recon=parallel.batch_sharding(self.mesh, 4),
                         counts=parallel.replicated(self.mesh))

    def step(variables, lpips_params, images, valid):
      with jax.default_matmul_precision("highest"):
        ids = module.apply(variables, images, method=type(module).encode_ids)
        recon = jnp.clip(module.apply(variables, ids, method=type(module).decode_ids), -1.0, 1.0)
        x8, y8 = to_uint8_scale(images), to_uint8_scale(recon)
        out = dict(psnr=image_metrics.psnr(x8, y8), ssim=image_metrics.ssim(x8, y8), valid=valid,
                   recon=y8.astype(jnp.uint8))
        out["lpips"] = (lpips.apply({"params": lpips_params}, recon, images) if lpips is not None
                        else jnp.zeros(images.shape[:1], jnp.float32))
      weight = valid.astype(jnp.int32)
      counts = [[jnp.zeros((q.codebook_size,), jnp.int32).at[s.reshape(s.shape[0], -1)].add(
          jnp.broadcast_to(weight[:, None], (s.shape[0], s.shape[1] * s.shape[2])))
                 for s in branch] for branch in ids]
      out["counts"] = jnp.stack([jnp.stack(branch) for branch in counts])
      return out

    return jax.jit(step, out_shardings=out_shardings)

  def __call__(self, device_batch: dict) -> dict:
    return self.step(self.variables, self.lpips_params, device_batch["image"], device_batch["valid"])


def evaluate_tokenizer(tokenizer, source, *, mesh=None, inception=None, lpips_params=None,
                       batch_size: int = 32, limit: Optional[int] = None, every: float = 10.0) -> dict:
  """Scores a tokenizer's reconstructions of every record of `source` (see the module docstring).

  tokenizer: `imagefolder_jax.Tokenizer`; source: a random-access source (`data.build_source`);
  inception: `evaluation.features.InceptionFeatures` or None (rFID is then None, with the reason in
  'absent'); lpips_params: LPIPS-VGG params (`convert.lpips`) or None (LPIPS None);
  batch_size: global images per step (rounded up to the batch shards).
  Returns a JSON-ready dict: num_images, psnr, ssim, lpips, rfid, usage, images_per_s, absent.
  """
  from imagefolder_jax.evaluation.fid import compute_statistics
  mesh = mesh if mesh is not None else parallel.make_mesh()
  g, batches = eval_batches(source, mesh, batch_size, tokenizer.resolution, limit)
  evaluator = TokenizerEvaluator(tokenizer, mesh, lpips_params)
  total = len(source) if limit is None else min(limit, len(source))
  progress = Progress("eval-tokenizer", total, every=every)
  per_image: dict[str, list] = {"psnr": [], "ssim": [], "lpips": []}
  counts = None
  feats: dict[str, list] = {"real": [], "recon": []}
  start = time.perf_counter()
  for device_batch, host in batches:
    out = evaluator(device_batch)
    small = parallel.to_host({k: out[k] for k in ("psnr", "ssim", "lpips", "valid", "counts")})
    valid = small["valid"].astype(bool)
    for k in per_image:
      per_image[k].append(small[k][valid].astype(np.float64))
    counts = small["counts"].astype(np.int64) if counts is None else counts + small["counts"]
    if inception is not None:
      recon, numbers = parallel.local_rows(out["recon"])
      if len(numbers) != len(host["image"]):
        raise RuntimeError(f"this process holds {len(numbers)} rows of the batch, fed {len(host['image'])}")
      mine = host["valid"].astype(bool)
      real = (np.floor(127.5 * (host["image"] + 1.0) + 0.5)).clip(0, 255).astype(np.uint8)
      for name, images in (("real", real), ("recon", recon)):
        feats[name].extend(_features_in_slices(inception, images, mine))
    progress.update(int(valid.sum()))
  seconds = time.perf_counter() - start
  n = int(sum(len(v) for v in per_image["psnr"]))
  if n == 0:
    raise EvalInputError(f"{source!r}: no readable image")
  result: dict = {"num_images": n, "global_batch": g, "absent": {}}
  for k, parts in per_image.items():
    values = np.concatenate(parts)
    finite = values[np.isfinite(values)]
    result[k] = float(finite.mean()) if finite.size else None
  result["psnr_identical_images"] = int((~np.isfinite(np.concatenate(per_image["psnr"]))).sum())
  if lpips_params is None:
    result["lpips"] = None
    result["absent"]["lpips"] = "no LPIPS weights given"
  result["rfid"] = None
  if inception is None:
    result["absent"]["rfid"] = "no Inception network given"
  else:
    real, recon = (np.concatenate(feats[k]) for k in ("real", "recon"))
    if len(real) < 2:
      result["absent"]["rfid"] = f"{len(real)} image(s); FID needs at least 2"
    else:
      result["rfid"] = compute_statistics(recon).frechet_distance(compute_statistics(real))
  result["usage"] = usage_summary(counts, tokenizer.config.quantizer.scales)
  result["images_per_s"] = n / seconds if seconds > 0 else None
  logging.info("eval-tokenizer: %d images, %.2f images/s (including Inception)", n, result["images_per_s"] or 0)
  return result


def _features_in_slices(net, images: np.ndarray, valid: np.ndarray) -> list[np.ndarray]:
  """pool3 features of this process's valid rows, fed in fixed slices of `net.local_batch` rows so
  every process makes the same number of (collective) calls whatever its number of valid rows."""
  out = []
  for s in range(0, len(images), net.local_batch):
    chunk = images[s:s + net.local_batch][valid[s:s + net.local_batch]]
    out.append(net(chunk)["pool_3"])
  return out
