"""Shared pieces of the verbs: the one-line error type and bundle loading."""
from __future__ import annotations

import os

PROG = "imagefolder-jax"


class CliError(Exception):
  """A user-facing error: printed as one line, exit code 2."""


def psnr(a, b) -> float:
  """Mean PSNR (dB) of two batches in [-1, 1]."""
  import numpy as np
  mse = np.mean(((np.asarray(a) - np.asarray(b)) / 2.0) ** 2, axis=(1, 2, 3))
  return float(np.mean(10 * np.log10(1.0 / np.maximum(mse, 1e-12))))


def load_model(cls, bundle: str):
  """`cls.load(bundle)` with missing directories and bad bundles as one-line errors."""
  from imagefolder_jax.checkpoint import BundleError
  if not os.path.isdir(bundle):
    raise CliError(f"bundle directory not found: {bundle}")
  try:
    return cls.load(bundle)
  except BundleError as e:
    raise CliError(str(e)) from e
