"""Per-image reconstruction metrics on the device: PSNR and SSIM of uint8-scale images.

Both take images on the 0..255 scale (the uint8 images a user would save), so the numbers are the
ones `skimage.metrics` gives on the PNGs:
  psnr = 10 log10(255^2 / mse) per image (mean over H, W, channels), averaged over images;
  ssim = Wang et al. 2004 with an 11x11 Gaussian window (sigma 1.5), K1 = 0.01, K2 = 0.03,
  population (not sample) covariances, the map taken over the 'valid' window positions, averaged
  over positions and channels -- `skimage.metrics.structural_similarity(a, b, data_range=255,
  channel_axis=-1, gaussian_weights=True, sigma=1.5, use_sample_covariance=False)`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03
DATA_RANGE = 255.0


def gaussian_valid_matrix(size: int, window: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> np.ndarray:
  """(size - window + 1, size) float32: row i holds the normalised 1-D Gaussian at i..i+window-1,
  so `M @ x` is the 'valid' Gaussian filter along one axis (separable, as the 2-D window)."""
  if size < window:
    raise ValueError(f"SSIM needs images of at least {window} pixels a side, got {size}")
  offsets = np.arange(window) - (window - 1) / 2
  taps = np.exp(-offsets ** 2 / (2 * sigma ** 2))
  taps /= taps.sum()
  m = np.zeros((size - window + 1, size), np.float64)
  for i in range(size - window + 1):
    m[i, i:i + window] = taps
  return m.astype(np.float32)


def psnr(a: jax.Array, b: jax.Array) -> jax.Array:
  """a, b: (B, H, W, C) on the 0..255 scale -> (B,) PSNR in dB (inf where identical)."""
  mse = jnp.mean(jnp.square(a.astype(jnp.float32) - b.astype(jnp.float32)), axis=(1, 2, 3))
  return 10.0 * jnp.log10(DATA_RANGE ** 2 / mse)


def ssim(a: jax.Array, b: jax.Array) -> jax.Array:
  """a, b: (B, H, W, C) on the 0..255 scale -> (B,) mean SSIM (see the module docstring)."""
  _, h, w, _ = a.shape
  rows, cols = jnp.asarray(gaussian_valid_matrix(h)), jnp.asarray(gaussian_valid_matrix(w))
  # Work on [-1, 1]-centred values: the variances are differences of second moments, and float32
  # loses ~eps * E[x^2] to cancellation; centring shrinks E[x^2] (SSIM is invariant to a common
  # affine map of both images when the constants scale with it: c1, c2 below are for range 2).
  x = a.astype(jnp.float32) / (DATA_RANGE / 2) - 1.0
  y = b.astype(jnp.float32) / (DATA_RANGE / 2) - 1.0

  def blur(z):   # (B, H, W, C) -> (B, H - 10, W - 10, C)
    return jnp.einsum("ih,jw,bhwc->bijc", rows, cols, z, precision=jax.lax.Precision.HIGHEST)

  mu_x, mu_y = blur(x), blur(y)
  var_x = blur(x * x) - mu_x * mu_x
  var_y = blur(y * y) - mu_y * mu_y
  cov = blur(x * y) - mu_x * mu_y
  c1, c2 = (SSIM_K1 * 2.0) ** 2, (SSIM_K2 * 2.0) ** 2
  # Luminance: shift-invariance does not hold for the mean term, so map the means back to [0, 2].
  mx, my = mu_x + 1.0, mu_y + 1.0
  ssim_map = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx * mx + my * my + c1) * (var_x + var_y + c2))
  return jnp.mean(ssim_map, axis=(1, 2, 3))
