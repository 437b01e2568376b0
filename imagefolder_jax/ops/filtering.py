"""Top-k then top-p (nucleus) filtering, exactly as the official `sample_with_top_k_top_p_`.

Official semantics (README point 10), along the last axis (one branch's vocabulary):
  * top-k: remove entries strictly below the k-th largest value (ties with it survive);
  * top-p on the top-k-filtered logits: sort ascending, softmax, float32 cumsum, remove entries
    whose cumsum is <= 1 - top_p; the largest entry always survives.
`top_k = 0` (or >= V) disables top-k; `top_p <= 0` or `>= 1` disables top-p.

Implementation: the removed set of top-p is a prefix of the ascending order, so it is a value
threshold; it is computed on the k values `lax.top_k` returns (entries outside the top-k carry
probability 0 and add exact zeros to the official cumsum), plus the mass of any ties with the
k-th value that `lax.top_k` left out. The boundary entry is kept together with every entry of
equal value (the official result on ties depends on the sort order, which is unspecified).
Everything is vectorised over leading axes (rows, branches) and jittable; `top_k` is static.
"""
from __future__ import annotations

from typing import Union

import jax
import jax.numpy as jnp
import numpy as np

TopP = Union[float, jax.Array]


def removal_threshold(top_p: TopP) -> jax.Array:
  """float32 `1 - top_p`, the official cumsum cut; a negative value when top-p is disabled.

  A Python float is subtracted in float64 and rounded once, as PyTorch compares a float32 tensor
  with the Python scalar `1 - top_p` (float32(0.05), not 1 - float32(0.95)).
  """
  if isinstance(top_p, (int, float, np.floating)):
    top_p = float(top_p)
    return jnp.asarray(np.float32(1.0 - top_p) if 0.0 < top_p < 1.0 else np.float32(-1.0))
  top_p = jnp.asarray(top_p, jnp.float32)
  return jnp.where((top_p > 0) & (top_p < 1), 1.0 - top_p, -1.0)


def _top_values(logits: jax.Array, top_k: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(values, indices) sorted descending: the top-k, or the whole row when top-k is disabled;
  plus the number of entries equal to the k-th value that were left out (official ties)."""
  vocab = logits.shape[-1]
  k = top_k if 0 < top_k < vocab else vocab
  # The barrier keeps XLA:CPU from rewriting TopK into a full sort when its output meets `logits`
  # again below (measured 4x slower on (9152, 4096) rows); it is free elsewhere.
  values, indices = jax.lax.optimization_barrier(jax.lax.top_k(logits, k))
  if k == vocab:
    return values, indices, jnp.zeros(logits.shape[:-1], jnp.int32)
  kept = jnp.sum(logits >= values[..., -1:], axis=-1)
  return values, indices, (kept - k).astype(jnp.int32)


def _top_p_cut(values: jax.Array, left_out_ties: jax.Array, threshold: jax.Array) -> jax.Array:
  """Smallest surviving value (..., 1) given descending top values.

  The official cumsum runs over the ascending filtered row: zeros (removed entries), then the
  left-out ties of the k-th value, then `values` reversed.
  """
  values = values.astype(jnp.float32)
  weights = jnp.exp(values - values[..., :1])
  tie_mass = left_out_ties.astype(jnp.float32) * weights[..., -1]
  total = jnp.sum(weights, axis=-1) + tie_mass
  ascending = (weights / total[..., None])[..., ::-1]
  cumsum = (tie_mass / total)[..., None] + jnp.cumsum(ascending, axis=-1)
  removed = cumsum <= threshold
  removed = removed.at[..., -1].set(False)
  num_kept = values.shape[-1] - jnp.sum(removed, axis=-1, keepdims=True)
  return jnp.take_along_axis(values, num_kept - 1, axis=-1)


def _static_top_p_off(top_p: TopP) -> bool:
  return isinstance(top_p, (int, float, np.floating)) and not 0.0 < float(top_p) < 1.0


def _cut_value(logits: jax.Array, top_k: int, top_p: TopP):
  """(smallest surviving value (..., 1) float32, descending top values, their indices)."""
  values, indices, ties = _top_values(logits, top_k)
  if _static_top_p_off(top_p):
    return values[..., -1:].astype(jnp.float32), values, indices
  threshold = removal_threshold(top_p)
  cut = jnp.where(threshold >= 0, _top_p_cut(values, ties, threshold), values[..., -1:].astype(jnp.float32))
  return cut, values, indices


def top_k_top_p_mask(logits: jax.Array, top_k: int = 0, top_p: TopP = 0.0) -> jax.Array:
  """Survivors of top-k then top-p along the last axis. logits: (..., V) -> bool (..., V)."""
  if not 0 < top_k < logits.shape[-1] and _static_top_p_off(top_p):
    return jnp.ones(logits.shape, bool)
  cut, _, _ = _cut_value(logits, top_k, top_p)
  return logits.astype(jnp.float32) >= cut


def filter_logits(logits: jax.Array, top_k: int = 0, top_p: TopP = 0.0) -> jax.Array:
  """Logits with filtered-out entries set to -inf (official `masked_fill_`)."""
  return jnp.where(top_k_top_p_mask(logits, top_k, top_p), logits, -jnp.inf)


def filtered_probs(logits: jax.Array, top_k: int = 0, top_p: TopP = 0.0) -> jax.Array:
  """softmax of the filtered logits (the official helper with `return_p=True`), float32."""
  return jax.nn.softmax(filter_logits(logits.astype(jnp.float32), top_k, top_p), axis=-1)


def sample_with_uniforms(uniforms: jax.Array, logits: jax.Array, top_k: int = 0, top_p: TopP = 0.0) -> jax.Array:
  """Inverse-CDF draw from softmax(filtered logits), one per row, given uniforms in [0, 1).

  uniforms: (...) float; logits: (..., V) -> ids (...) int32. Works on the k top values only, so a
  whole scale needs one uniform per (position, branch) instead of V Gumbel numbers, and the random
  stream can be drawn once for all scales. Ties with the k-th value that `lax.top_k` left out
  cannot be drawn; they only matter for exact float ties.
  """
  cut, values, indices = _cut_value(logits, top_k, top_p)
  values = values.astype(jnp.float32)
  weights = jnp.where(values >= cut, jnp.exp(values - values[..., :1]), 0.0)
  cdf = jnp.cumsum(weights, axis=-1)
  # Removed entries sit at the tail (values are descending) with zero weight, so the count of
  # cdf entries <= u * total stays below the number of survivors for u < 1.
  target = uniforms.astype(jnp.float32)[..., None] * cdf[..., -1:]
  choice = jnp.minimum(jnp.sum(cdf <= target, axis=-1), values.shape[-1] - 1)
  return jnp.take_along_axis(indices, choice[..., None], axis=-1)[..., 0].astype(jnp.int32)


def sample_top_k_top_p(key: jax.Array, logits: jax.Array, top_k: int = 0, top_p: TopP = 0.0) -> jax.Array:
  """One draw per row from softmax(filtered logits). logits: (..., V) -> ids (...) int32."""
  return sample_with_uniforms(jax.random.uniform(key, logits.shape[:-1]), logits, top_k, top_p)
