"""Shared pieces of the verbs: the one-line error type and bundle loading."""
from __future__ import annotations

import os

from imagefolder_jax.errors import ImageFolderError

PROG = "imagefolder-jax"


class CliError(ImageFolderError):
  """A user-facing error: printed as one line, exit code 2."""


def psnr(a, b) -> float:
  """Mean PSNR (dB) of two batches in [-1, 1]."""
  import numpy as np
  mse = np.mean(((np.asarray(a) - np.asarray(b)) / 2.0) ** 2, axis=(1, 2, 3))
  return float(np.mean(10 * np.log10(1.0 / np.maximum(mse, 1e-12))))


def load_model(cls, bundle: str, **kwargs):
  """`cls.load(bundle, **kwargs)` with missing directories and bad bundles as one-line errors.

  The loaded variables are checked against the model's own (abstract, never computed) init, so a
  bundle with a missing, mis-shaped or mis-typed array is refused here, before any work starts.
  """
  from imagefolder_jax.storage.bundle import BundleError
  if not os.path.isdir(bundle):
    raise CliError(f"bundle directory not found: {bundle}" if not os.path.exists(bundle)
                   else f"--bundle must be a bundle directory, got a file: {bundle}")
  try:
    model = cls.load(bundle, **kwargs)
    _check_model_variables(model, bundle)
  except BundleError as e:
    raise CliError(str(e)) from e
  except (TypeError, KeyError, ValueError, AttributeError) as e:  # config fields of the wrong type/shape
    raise CliError(f"{bundle}: unusable bundle ({type(e).__name__}: {' '.join(str(e).split())[:300]})") from e
  return model


def _check_model_variables(model, bundle: str) -> None:
  import jax
  import jax.numpy as jnp

  from imagefolder_jax.storage.bundle import check_variables
  models = [model.tokenizer, model] if hasattr(model, "tokenizer") else [model]
  for m in models:
    if hasattr(m, "tokenizer"):  # the generator: its init takes labels and next-scale inputs
      c = m.module.config
      args = (jnp.zeros((1,), jnp.int32), jnp.zeros((1, c.num_tokens - c.scales[0] ** 2, c.input_dim), jnp.float32))
      name = "generator"
    else:
      r = m.resolution
      args = (jnp.zeros((1, r, r, 3), jnp.float32),)
      name = "tokenizer"
    expected = jax.eval_shape(lambda *a: m.module.init({"params": jax.random.key(0)}, *a), *args)
    variables = m.variables if name == "tokenizer" or "params" in m.variables else {"params": m.variables}
    check_variables(f"{bundle} ({name})", variables, expected)
