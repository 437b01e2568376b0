"""Improved precision and recall (Kynkäänniemi et al. 2019) as the ADM evaluator's ManifoldEstimator.

Each set's manifold is the union of balls around its points with radius the squared distance to the
k-th nearest neighbour (k = 3, the point itself counting as the 0th). Precision: the fraction of
samples inside the reference manifold; recall: the fraction of references inside the sample
manifold. Distances are squared Euclidean `max(|u|^2 - 2 u.v + |v|^2, 0)`, computed in blocks of
10,000 x 10,000 rows like ADM. ADM's DistanceBlock computes them in float16 and falls back to
float32 for a block with a non-finite entry; `distance_dtype='float16'` (default) does the same
(products accumulated in float32 and rounded to float16, as TF's GPU kernels), 'float32' skips the
float16 step. Blocks run jitted on the default device.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

ADM_BLOCK = 10000
ADM_NEIGHBOURHOOD = 3


def _distances32(u: jax.Array, v: jax.Array) -> jax.Array:
  highest = jax.lax.Precision.HIGHEST
  norm_u = jnp.sum(u * u, axis=1)[:, None]
  norm_v = jnp.sum(v * v, axis=1)[None, :]
  return jnp.maximum(norm_u - 2 * jnp.matmul(u, v.T, precision=highest) + norm_v, 0.0)


def _distances16(u: jax.Array, v: jax.Array) -> jax.Array:
  u16, v16 = u.astype(jnp.float16), v.astype(jnp.float16)
  f32 = jnp.float32
  norm_u = jnp.sum(jnp.square(u16).astype(f32), axis=1).astype(jnp.float16)[:, None]
  norm_v = jnp.sum(jnp.square(v16).astype(f32), axis=1).astype(jnp.float16)[None, :]
  dots = jnp.matmul(u16, v16.T, preferred_element_type=f32, precision=jax.lax.Precision.HIGHEST)
  return jnp.maximum(norm_u - 2 * dots.astype(jnp.float16) + norm_v, jnp.float16(0))


def pairwise_distances(u: jax.Array, v: jax.Array, distance_dtype: str = "float16") -> jax.Array:
  """u (N, D), v (M, D) float32 -> (N, M) float32 squared distances (ADM's DistanceBlock)."""
  u, v = jnp.asarray(u, jnp.float32), jnp.asarray(v, jnp.float32)
  if distance_dtype == "float32":
    return _distances32(u, v)
  if distance_dtype != "float16":
    raise ValueError(f"distance_dtype must be 'float16' or 'float32', got {distance_dtype!r}")
  d16 = _distances16(u, v)
  return jax.lax.cond(jnp.all(jnp.isfinite(d16)), lambda: d16.astype(jnp.float32), lambda: _distances32(u, v))


def _pad_rows(x: np.ndarray, rows: int, value: float = 0.0) -> np.ndarray:
  if x.shape[0] == rows:
    return x
  pad = np.full((rows - x.shape[0],) + x.shape[1:], value, x.dtype)
  return np.concatenate([x, pad])


@functools.partial(jax.jit, static_argnames=("k", "distance_dtype"))
def _smallest_block(rows, cols, col_valid, best, k, distance_dtype):
  d = pairwise_distances(rows, cols, distance_dtype)
  d = jnp.where(col_valid[None, :], d, jnp.inf)
  merged = jnp.concatenate([best, d], axis=1)
  return -jax.lax.top_k(-merged, k + 1)[0]


def manifold_radii(features: np.ndarray, k: int = ADM_NEIGHBOURHOOD, block: int = ADM_BLOCK,
                   distance_dtype: str = "float16") -> np.ndarray:
  """features (N, D) -> (N,) float32: squared distance of each point to its k-th nearest neighbour
  (itself included as the 0th), ADM's `manifold_radii(...)[:, 0]` for nhood_sizes=(k,)."""
  features = np.asarray(features, np.float32)
  n = features.shape[0]
  if n <= k:
    raise ValueError(f"manifold radii with k={k} need more than {k} feature vectors, got {n}")
  block = min(block, n)
  radii = np.zeros(n, np.float32)
  for r0 in range(0, n, block):
    rows = _pad_rows(features[r0:r0 + block], block)
    best = jnp.full((block, k + 1), jnp.inf, jnp.float32)
    for c0 in range(0, n, block):
      cols = features[c0:c0 + block]
      valid = np.arange(block) < cols.shape[0]
      best = _smallest_block(rows, _pad_rows(cols, block), valid, best, k=k, distance_dtype=distance_dtype)
    radii[r0:r0 + block] = np.asarray(best[:, k])[:min(block, n - r0)]
  return radii


@functools.partial(jax.jit, static_argnames=("distance_dtype",))
def _inside_block(a, radii_a, b, radii_b, distance_dtype):
  d = pairwise_distances(a, b, distance_dtype)
  a_in_b = jnp.any(d <= radii_b[None, :], axis=1)
  b_in_a = jnp.any(d <= radii_a[:, None], axis=0)
  return a_in_b, b_in_a


def precision_recall(reference: np.ndarray, samples: np.ndarray, k: int = ADM_NEIGHBOURHOOD,
                     block: int = ADM_BLOCK, distance_dtype: str = "float16") -> tuple[float, float]:
  """reference (N1, D), samples (N2, D) features -> (precision, recall) as ADM's compute_prec_recall."""
  reference, samples = np.asarray(reference, np.float32), np.asarray(samples, np.float32)
  if reference.ndim != 2 or samples.ndim != 2 or reference.shape[1] != samples.shape[1]:
    raise ValueError(f"precision/recall need (N, D) features of one D, got {reference.shape} and {samples.shape}")
  radii_ref = manifold_radii(reference, k, block, distance_dtype)
  radii_smp = manifold_radii(samples, k, block, distance_dtype)
  return _precision_recall_from_radii(reference, radii_ref, samples, radii_smp, block, distance_dtype)


def _precision_recall_from_radii(reference, radii_ref, samples, radii_smp, block, distance_dtype):
  n1, n2 = len(reference), len(samples)
  b1, b2 = min(block, n1), min(block, n2)
  ref_in = np.zeros(n1, bool)
  smp_in = np.zeros(n2, bool)
  for r0 in range(0, n1, b1):
    # Padded points get radius -1: no distance (>= 0) is inside them, and their own flags are cut off.
    a = _pad_rows(reference[r0:r0 + b1], b1)
    ra = _pad_rows(radii_ref[r0:r0 + b1], b1, -1.0)
    m1 = min(b1, n1 - r0)
    for c0 in range(0, n2, b2):
      b = _pad_rows(samples[c0:c0 + b2], b2)
      rb = _pad_rows(radii_smp[c0:c0 + b2], b2, -1.0)
      m2 = min(b2, n2 - c0)
      a_in, b_in = _inside_block(a, ra, b, rb, distance_dtype=distance_dtype)
      ref_in[r0:r0 + m1] |= np.asarray(a_in)[:m1]
      smp_in[c0:c0 + m2] |= np.asarray(b_in)[:m2]
  return float(np.mean(smp_in)), float(np.mean(ref_in))

