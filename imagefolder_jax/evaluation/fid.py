"""Fréchet distance (FID, sFID) as the ADM evaluator computes it: float64 on the host, SciPy sqrtm.

A float32 matrix square root is not good enough here (FID 185 where the truth is 189.5), so the
statistics and the distance stay in NumPy float64; only the features come from the device.
"""
from __future__ import annotations

import dataclasses
import logging
import warnings

import numpy as np
from scipy import linalg

from imagefolder_jax.errors import ImageFolderError

log = logging.getLogger("imagefolder_jax.evaluation")


class FIDError(ImageFolderError):
  """Statistics that cannot be compared (shape mismatch, a complex square root)."""


@dataclasses.dataclass
class FeatureStatistics:
  """mu (D,) float64 and sigma (D, D) float64 of a feature set (ADM's FIDStatistics)."""
  mu: np.ndarray
  sigma: np.ndarray

  def frechet_distance(self, other: "FeatureStatistics", eps: float = 1e-6) -> float:
    return frechet_distance(self, other, eps)


def compute_statistics(features: np.ndarray) -> FeatureStatistics:
  """features (N, D) -> mean and unbiased covariance (np.cov, rowvar=False) in float64."""
  features = np.asarray(features, np.float64)
  if features.ndim != 2 or features.shape[0] < 2:
    raise FIDError(f"statistics need (N >= 2, D) features, got shape {features.shape}")
  return FeatureStatistics(np.mean(features, axis=0), np.cov(features, rowvar=False))


def frechet_distance(a: FeatureStatistics, b: FeatureStatistics, eps: float = 1e-6) -> float:
  """||mu_a - mu_b||^2 + tr(S_a) + tr(S_b) - 2 tr(sqrtm(S_a S_b)), with ADM's fallbacks: a
  non-finite sqrtm retries with eps on the diagonals; an imaginary part above 1e-3 on the diagonal
  is an error, a smaller one is dropped."""
  mu1, mu2 = np.atleast_1d(np.asarray(a.mu, np.float64)), np.atleast_1d(np.asarray(b.mu, np.float64))
  s1, s2 = np.atleast_2d(np.asarray(a.sigma, np.float64)), np.atleast_2d(np.asarray(b.sigma, np.float64))
  if mu1.shape != mu2.shape or s1.shape != s2.shape:
    raise FIDError(f"statistics differ in dimension: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs {s2.shape}")
  diff = mu1 - mu2
  covmean = _sqrtm(s1.dot(s2))
  if not np.isfinite(covmean).all():
    log.warning("FID: singular covariance product; adding %g to the diagonals", eps)
    offset = np.eye(s1.shape[0]) * eps
    covmean = _sqrtm((s1 + offset).dot(s2 + offset))
  if np.iscomplexobj(covmean):
    if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
      raise FIDError(f"FID: sqrtm has an imaginary component of {np.max(np.abs(covmean.imag)):.3g}")
    covmean = covmean.real
  return float(diff.dot(diff) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def _sqrtm(m: np.ndarray) -> np.ndarray:
  """SciPy's sqrtm, with its singular-matrix warning said in one log line (ADM passes disp=False,
  deprecated in SciPy 1.16; the plain call returns the same matrix)."""
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always", linalg.LinAlgWarning)
    out = linalg.sqrtm(m)
  for w in caught:
    if not issubclass(w.category, linalg.LinAlgWarning):
      warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
  if any(issubclass(w.category, linalg.LinAlgWarning) for w in caught):
    log.warning("FID: the covariance product is singular (fewer images than feature dimensions?); "
                "its square root may be inaccurate")
  return out
