"""TF1's legacy bilinear resize (`tf.image.resize_bilinear`, align_corners=False,
half_pixel_centers=False), the resize inside the ADM evaluator's Inception graph.

Output pixel d samples source coordinate `src = d * in / out` (no half-pixel shift), blending
floor(src) and floor(src) + 1 (clamped to the last pixel). The half-pixel bilinear of
`jax.image.resize` moves FID features by ~0.1, so the map is built here as a fixed (out, in) matrix
per axis and applied as two matmuls at highest precision.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


@functools.lru_cache(maxsize=32)
def legacy_bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
  """(out_size, in_size) float32 interpolation weights; each row sums to 1."""
  if in_size < 1 or out_size < 1:
    raise ValueError(f"resize sizes must be >= 1, got in_size={in_size}, out_size={out_size}")
  # TF's kernel computes the scale and the source coordinate in float32 (`CalculateResizeScale`,
  # `compute_interpolation_weights`); doing the same keeps floor() on the same side at exact ratios.
  scale = np.float32(in_size) / np.float32(out_size)
  src = np.arange(out_size, dtype=np.float32) * scale
  lo = np.floor(src)
  frac = (src - lo).astype(np.float64)
  lo = lo.astype(np.int64)
  hi = np.minimum(np.ceil(src).astype(np.int64), in_size - 1)
  matrix = np.zeros((out_size, in_size), np.float64)
  rows = np.arange(out_size)
  np.add.at(matrix, (rows, lo), 1.0 - frac)
  np.add.at(matrix, (rows, hi), frac)
  return matrix.astype(np.float32)


def legacy_bilinear_resize(images: jax.Array, size: int) -> jax.Array:
  """images (B, H, W, C) float (0..255 for the Inception input) -> (B, size, size, C) float32."""
  images = jnp.asarray(images, jnp.float32)
  _, h, w, _ = images.shape
  if (h, w) == (size, size):
    return images
  rows = jnp.asarray(legacy_bilinear_matrix(h, size))
  cols = jnp.asarray(legacy_bilinear_matrix(w, size))
  highest = jax.lax.Precision.HIGHEST
  out = jnp.einsum("oh,bhwc->bowc", rows, images, precision=highest)
  return jnp.einsum("pw,bowc->bopc", cols, out, precision=highest)
