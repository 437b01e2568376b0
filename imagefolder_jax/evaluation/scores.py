"""The ADM evaluator's numbers from two feature sets: FID, sFID, IS, precision, recall.

  ref = FeatureSet.from_reference(load_reference("VIRTUAL_imagenet256_labeled.npz"), net)
  smp = FeatureSet.from_features(net.extract(batches))
  scores = adm_scores(ref, smp, logits_kernel=net_logits_kernel)

As in ADM: statistics stored in a file (`mu`, `sigma`, `mu_s`, `sigma_s`) are used as they are;
otherwise they are computed from the features. Precision and recall need features on both sides;
the Inception Score needs the samples' pool_3 features and the 1008-way classifier kernel.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import numpy as np

from imagefolder_jax.evaluation.fid import FeatureStatistics, compute_statistics, frechet_distance
from imagefolder_jax.evaluation.inception_score import inception_score, softmax
from imagefolder_jax.evaluation.precision_recall import precision_recall
from imagefolder_jax.evaluation.reference import ReferenceBatch, iter_npz_images


@dataclasses.dataclass
class FeatureSet:
  """Statistics (always) and features (when known) of one image set."""
  pool: FeatureStatistics
  spatial: Optional[FeatureStatistics]
  pool_3: Optional[np.ndarray] = None
  spatial_features: Optional[np.ndarray] = None

  @classmethod
  def from_features(cls, features: dict) -> "FeatureSet":
    """{'pool_3': (N, 2048), 'spatial': (N, 2023)} (as `InceptionFeatures.extract` returns)."""
    return cls(pool=compute_statistics(features["pool_3"]), spatial=compute_statistics(features["spatial"]),
               pool_3=np.asarray(features["pool_3"], np.float32),
               spatial_features=np.asarray(features["spatial"], np.float32))

  @classmethod
  def from_reference(cls, ref: ReferenceBatch, extract: Optional[Callable[[str], dict]] = None,
                     need_features: bool = False) -> "FeatureSet":
    """From an ADM file: stored statistics win; stored features next; images last, through
    `extract(path) -> features` (e.g. `lambda p: net.extract(iter_npz_images(p, 500))`).

    need_features: compute features from the images even when statistics are stored (for
    precision/recall), if the file has images and no stored features.
    """
    pool_3, spatial_features = ref.pool_3, ref.spatial_features
    missing = ((ref.pool is None and pool_3 is None) or (ref.spatial is None and spatial_features is None)
               or (need_features and pool_3 is None))
    if missing and ref.has_images and extract is not None:
      features = extract(ref.path)
      pool_3, spatial_features = features["pool_3"], features["spatial"]
    pool = ref.pool if ref.pool is not None else (compute_statistics(pool_3) if pool_3 is not None else None)
    if pool is None:
      raise ValueError(f"{ref.path}: no pool_3 statistics, features or images to compute them from")
    spatial = ref.spatial if ref.spatial is not None else (
        compute_statistics(spatial_features) if spatial_features is not None else None)
    return cls(pool=pool, spatial=spatial, pool_3=pool_3, spatial_features=spatial_features)


def npz_extractor(net, batch_size: int = 500) -> Callable[[str], dict]:
  """`extract` for `FeatureSet.from_reference`: streams a file's images through `net`."""
  from imagefolder_jax.evaluation.reference import load_reference

  def extract(path: str) -> dict:
    return net.extract(iter_npz_images(path, batch_size), total=load_reference(path).num_images,
                       what=f"inception features of {path}")
  return extract


def adm_scores(reference: FeatureSet, samples: FeatureSet, logits_kernel: Optional[np.ndarray] = None,
               distance_dtype: str = "float16") -> dict:
  """{'fid', 'sfid', 'precision', 'recall', 'inception_score'}; entries that cannot be computed
  from what is given are None (never guessed)."""
  out: dict = {"fid": frechet_distance(samples.pool, reference.pool)}
  out["sfid"] = (frechet_distance(samples.spatial, reference.spatial)
                 if samples.spatial is not None and reference.spatial is not None else None)
  if samples.pool_3 is not None and reference.pool_3 is not None:
    out["precision"], out["recall"] = precision_recall(reference.pool_3, samples.pool_3,
                                                       distance_dtype=distance_dtype)
  else:
    out["precision"] = out["recall"] = None
  out["inception_score"] = None
  if logits_kernel is not None and samples.pool_3 is not None:
    logits = np.asarray(samples.pool_3, np.float32) @ np.asarray(logits_kernel, np.float32)
    out["inception_score"] = inception_score(softmax(logits))
  out["num_samples"] = None if samples.pool_3 is None else int(len(samples.pool_3))
  return out
