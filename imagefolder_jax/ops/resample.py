"""Exact resamplers as fixed matrices.

The official model uses three different resamplers, none of which is what
`jax.image.resize` computes for all cases, so each is built here as a small
(n_out, n_in) matrix applied separably over height and width:

* `area_matrix`: PyTorch `F.interpolate(mode='area')` == `adaptive_avg_pool2d`.
  Windows run from floor(i*n_in/n_out) to ceil((i+1)*n_in/n_out) and overlap
  when n_out does not divide n_in.
* `bicubic_matrix`: PyTorch `F.interpolate(mode='bicubic', align_corners=False)`
  without antialias: cubic convolution with a=-0.75, source index
  (i+0.5)*n_in/n_out-0.5 (not clamped), sample indices clamped to the edge.
  `jax.image.resize` uses a=-0.5 and renormalises at the edge, so it differs.
* `antialiased_bicubic_matrix`: PIL-style / `F.interpolate(bicubic, antialias=True)`:
  cubic a=-0.5 stretched by the scale when downsampling, window clipped to the
  image and weights renormalised. This one equals `jax.image.resize(...,
  'bicubic', antialias=True)`; a matrix keeps all three on one code path.

All matrices are float64 NumPy at construction (exact, cached) and cast by the caller.
"""
from __future__ import annotations

import functools
import math

import jax.numpy as jnp
import numpy as np


def _cubic(x: np.ndarray, a: float) -> np.ndarray:
  x = np.abs(x)
  near = ((a + 2) * x - (a + 3)) * x * x + 1
  far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
  return np.where(x <= 1, near, np.where(x < 2, far, 0.0))


@functools.lru_cache(maxsize=None)
def area_matrix(n_in: int, n_out: int) -> np.ndarray:
  """(n_out, n_in) adaptive-average-pooling weights (rows sum to 1)."""
  _check_sizes(n_in, n_out)
  m = np.zeros((n_out, n_in))
  for i in range(n_out):
    start = (i * n_in) // n_out
    end = -((-(i + 1) * n_in) // n_out)  # ceil
    m[i, start:end] = 1.0 / (end - start)
  m.flags.writeable = False
  return m


@functools.lru_cache(maxsize=None)
def bicubic_matrix(n_in: int, n_out: int, a: float = -0.75) -> np.ndarray:
  """(n_out, n_in) PyTorch non-antialiased bicubic weights (align_corners=False)."""
  _check_sizes(n_in, n_out)
  scale = n_in / n_out
  m = np.zeros((n_out, n_in))
  for i in range(n_out):
    src = (i + 0.5) * scale - 0.5
    base = math.floor(src)
    t = src - base
    for offset in range(-1, 3):
      weight = _cubic(np.array(offset - t), a)
      m[i, min(max(base + offset, 0), n_in - 1)] += weight
  m.flags.writeable = False
  return m


def _antialiased_matrix(n_in: int, n_out: int, kernel, support: float) -> np.ndarray:
  """PIL-style antialiased weights: `kernel` stretched by the scale when downsampling, the window
  clipped to the image and each row renormalised."""
  _check_sizes(n_in, n_out)
  scale = n_in / n_out
  stretch = max(scale, 1.0)
  m = np.zeros((n_out, n_in))
  for i in range(n_out):
    center = (i + 0.5) * scale
    lo = max(int(math.floor(center - support * stretch + 0.5)), 0)
    hi = min(int(math.floor(center + support * stretch + 0.5)), n_in)
    js = np.arange(lo, hi)
    w = kernel((js + 0.5 - center) / stretch)
    m[i, lo:hi] = w / w.sum()
  m.flags.writeable = False
  return m


@functools.lru_cache(maxsize=None)
def antialiased_bicubic_matrix(n_in: int, n_out: int, a: float = -0.5) -> np.ndarray:
  """(n_out, n_in) PIL-style antialiased bicubic weights (rows sum to 1)."""
  return _antialiased_matrix(n_in, n_out, lambda x: _cubic(x, a), support=2.0)


@functools.lru_cache(maxsize=None)
def antialiased_bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
  """(n_out, n_in) PIL-style antialiased bilinear (triangle) weights = torch bilinear, antialias=True."""
  return _antialiased_matrix(n_in, n_out, lambda x: np.maximum(0.0, 1.0 - np.abs(x)), support=1.0)


def _check_sizes(n_in: int, n_out: int) -> None:
  if n_in < 1 or n_out < 1:
    raise ValueError(f"resample sizes must be positive, got {n_in} -> {n_out}")


def resize_with(matrix_fn, x: jnp.ndarray, size: int) -> jnp.ndarray:
  """Separable resize of `x: (B, H, W, C)` to `(B, size, size, C)` with `matrix_fn`.

  Identity sizes return `x` unchanged (the official code skips the resize there).
  """
  h, w = x.shape[1], x.shape[2]
  if h == size and w == size:
    return x
  mh = jnp.asarray(matrix_fn(h, size), x.dtype)
  mw = jnp.asarray(matrix_fn(w, size), x.dtype)
  return jnp.einsum("oh,bhwc,pw->bopc", mh, x, mw, precision="highest")


def area_downsample(x: jnp.ndarray, size: int) -> jnp.ndarray:
  """`(B, H, W, C) -> (B, size, size, C)`, adaptive average pooling."""
  return resize_with(area_matrix, x, size)


def bicubic_upsample(x: jnp.ndarray, size: int) -> jnp.ndarray:
  """`(B, h, w, C) -> (B, size, size, C)`, PyTorch bicubic (a=-0.75, edge clamp)."""
  return resize_with(bicubic_matrix, x, size)


def antialiased_bicubic_resize(x: jnp.ndarray, size: int) -> jnp.ndarray:
  """`(B, H, W, C) -> (B, size, size, C)`, PIL-style antialiased bicubic (a=-0.5)."""
  return resize_with(antialiased_bicubic_matrix, x, size)
