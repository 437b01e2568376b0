"""The sampler's top-k / top-p draw as one TPU kernel (Pallas): each row's logits read once, the
searches and the draws on chip.

`filtering.sample_with_retries` in XLA writes and reads the whole (R, V) logits about a hundred
times a call on TPUs: keys, weights, masks, fixed-point masses and draw tables are each materialized
in HBM, and every step of its searches is a pass over them (the d16 sampler at 256 per v5e chip
moved ~105 GB in its last scale's filter alone, by the TPU cost model: docs/planning.md). This
kernel loads a block of rows into VMEM and finds, per row, with integer-exact searches:

  * the k-th largest logit (top-k keeps every entry >= it: ties survive), by a descent over the 32
    bits of order-preserving int32 keys, one count per bit;
  * the top-p cut on the top-k survivors' 2^-30 fixed-point probabilities (the entries whose
    ascending mass is <= 1 - top_p are removed), by the same descent over masked integer sums;
  * the draws of `sample_with_retries`: from the top-k law with the row's first uniform, redrawn
    with the next while top-p removes the draw, then, for a row rejected every round, from the
    top-p law with the last. A draw is the first entry whose running sum of the weights exceeds
    u x their total, by bisection over the vocabulary (ceil(log2 V) masked sums), never an entry
    of weight 0.

So the ids are the XLA path's, but for a draw within float rounding of a boundary (the sums run in
another order). `applies` decides: programs compiled for TPUs with a static top-p and a lane-aligned
vocabulary; within `block_causal_attention.kernel_interpreted()` Pallas's interpreter runs it on any
backend (tests).
"""
from __future__ import annotations

import functools
from typing import Union

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from imagefolder_jax.ops.block_causal_attention import interpreted, xla_forced
from imagefolder_jax.ops.filtering import _MASS_ONE
from imagefolder_jax.ops.platform import target_platform

KERNEL_NAME = "top_k_top_p_draw"  # the compiled program's custom calls are named after it

# Rows per grid step: 8 rows of 4096 float32 logits are 128 KiB, one (8, 128)-tiled sublane group.
ROWS_PER_STEP = 8
_INT_MIN = np.int32(-2 ** 31)
# Element operations per entry and pass of the kernel's searches (compare, select, add): its VPU work,
# which no roofline term holds (`vector_ops`).
_OPS_PER_ENTRY_PASS = 3


def applies(vocab: int, top_p) -> bool:
  """Whether a draw over `vocab` entries with this top-p takes the kernel in the program traced now."""
  static = isinstance(top_p, (int, float, np.floating))
  if not static or vocab % 128:
    return False
  if interpreted():
    return True
  return target_platform() == "tpu" and not xla_forced()


def _top_p_limit(top_p: float) -> int:
  """The XLA path's fixed-point removal limit, floor(threshold x 2^30), as a Python int at trace time
  (`filtering.removal_threshold`'s float32 rounding of 1 - top_p); -1 when top-p is off."""
  if not 0.0 < float(top_p) < 1.0:
    return -1
  return int(np.floor(np.float32(1.0 - float(top_p)) * np.float32(_MASS_ONE)))


def _largest_where(holds, rows: int) -> jax.Array:
  """(rows, 1) int32: the largest c with holds(c) true, per row, for a predicate true at INT_MIN and
  monotone (true below some c, false above), by deciding the bits of c + 2^31 from the top."""
  def bit(i, chosen):
    candidate = chosen | jnp.left_shift(jnp.int32(1), 31 - i)   # bits of c + 2^31, as int32
    return jnp.where(holds(candidate ^ _INT_MIN), candidate, chosen)

  return jax.lax.fori_loop(0, 32, bit, jnp.zeros((rows, 1), jnp.int32)) ^ _INT_MIN


def _draw(kept: jax.Array, uniform: jax.Array) -> jax.Array:
  """kept (rows, V) weights >= 0 (row sums > 0), uniform (rows, 1) in [0, 1) -> (rows, 1) int32: the
  first entry whose running sum exceeds uniform x total; an entry of weight > 0 even where rounding
  of the sums would point elsewhere."""
  rows, vocab = kept.shape
  index = jax.lax.broadcasted_iota(jnp.int32, kept.shape, 1)
  target = uniform * jnp.sum(kept, axis=-1, keepdims=True)

  def halve(_, bounds):
    lo, hi = bounds                     # sum(kept[:lo]) <= target < sum(kept[:hi])
    mid = jnp.right_shift(lo + hi, 1)
    below = jnp.sum(jnp.where(index < mid, kept, 0.0), axis=-1, keepdims=True)
    fits = below <= target
    return jnp.where(fits, mid, lo), jnp.where(fits, hi, mid)

  steps = max(1, int(np.ceil(np.log2(vocab))))
  lo, _ = jax.lax.fori_loop(0, steps, halve, (jnp.zeros((rows, 1), jnp.int32), jnp.full((rows, 1), vocab, jnp.int32)))
  positive = kept > 0
  chosen_positive = jnp.max(jnp.where((index == lo) & positive, 1, 0), axis=-1, keepdims=True) > 0
  last_before = jnp.max(jnp.where((index <= lo) & positive, index, -1), axis=-1, keepdims=True)
  first = jnp.min(jnp.where(positive, index, vocab), axis=-1, keepdims=True)
  return jnp.where(chosen_positive, lo, jnp.where(last_before >= 0, last_before, first))


def _round_half_even(v: jax.Array) -> jax.Array:
  """jnp.round of v >= 0 (half to even), from floor alone: Mosaic lowers `round` only on a TPU host."""
  whole = jnp.floor(v)
  rest = v - whole                                  # exact in float32 for v >= 0
  odd = whole - 2.0 * jnp.floor(0.5 * whole)        # 1 for odd, 0 for even
  return whole + jnp.where(rest > 0.5, 1.0, jnp.where(rest < 0.5, 0.0, odd))


def _kernel(logits_ref, uniforms_ref, ids_ref, *, top_k: int, limit: int):
  x = logits_ref[...].astype(jnp.float32)                      # (rows, V)
  rows, vocab = x.shape
  uniforms = uniforms_ref[...].astype(jnp.float32)             # (rows, rounds + 1)
  rounds = uniforms.shape[1] - 1
  bits = jax.lax.bitcast_convert_type(x, jnp.int32)
  keys = jnp.where(bits < 0, bits ^ jnp.int32(0x7FFFFFFF), bits)  # ordered as the floats (-0 < +0)
  kept = jnp.exp(x - jnp.max(x, axis=-1, keepdims=True))
  if 0 < top_k < vocab:
    kth = _largest_where(lambda c: jnp.sum(jnp.where(keys >= c, 1.0, 0.0), axis=-1, keepdims=True) >= top_k, rows)
    kept = jnp.where(keys >= kth, kept, 0.0)
  if limit < 0:
    ids_ref[...] = _draw(kept, uniforms[:, :1])
    return
  fixed = _round_half_even(kept / jnp.sum(kept, axis=-1, keepdims=True) * _MASS_ONE).astype(jnp.int32)
  cut = _largest_where(lambda c: jnp.sum(jnp.where(keys <= c, fixed, 0), axis=-1, keepdims=True) <= limit, rows)
  index = jax.lax.broadcasted_iota(jnp.int32, x.shape, 1)
  column = jax.lax.broadcasted_iota(jnp.int32, uniforms.shape, 1)

  def removed(ids):                      # top-p removes the drawn entry: its key is at or below the cut
    return jnp.max(jnp.where(index == ids, keys, _INT_MIN), axis=-1, keepdims=True) <= cut

  def uniform(r):
    return jnp.sum(jnp.where(column == r, uniforms, 0.0), axis=-1, keepdims=True)

  # `filtering.sample_with_retries`' rounds: draws from the top-k law, each row redrawn while top-p
  # removes its draw, then the rows still rejected drawn from the top-p law with the last uniform.
  def another_round(state):
    ids, rejected, r = state
    ids = jnp.where(rejected, _draw(kept, uniform(r)), ids)
    return ids, jnp.where(rejected & removed(ids), 1, 0), r + 1

  ids = _draw(kept, uniforms[:, :1])
  ids, rejected, _ = jax.lax.while_loop(lambda s: (jnp.max(s[1]) > 0) & (s[2] < rounds), another_round,
                                        (ids, jnp.where(removed(ids), 1, 0), jnp.int32(1)))
  ids_ref[...] = ids

  @pl.when(jnp.max(rejected) > 0)
  def _():
    exact = _draw(jnp.where(keys > cut, kept, 0.0), uniform(rounds))
    ids_ref[...] = jnp.where(rejected > 0, exact, ids)


def passes(vocab: int, top_k: int, top_p) -> int:
  """Passes of the kernel over each row in VMEM (each a compare, select and reduction per entry)
  with one draw; each redraw round of a block of rows adds ceil(log2 V) + 1."""
  searches = (32 if 0 < top_k < vocab else 0) + (32 if _top_p_limit(top_p) >= 0 else 0)
  # + the row's max, exponentials, sums and fixed-point masses, and the draw's guards and removal check
  return searches + int(np.ceil(np.log2(vocab))) + 8


def vector_ops(rows: int, vocab: int, top_k: int, top_p) -> int:
  """Element operations of the kernel over `rows` rows with one draw each (a lower bound: redraws
  add theirs): VPU work that the TPU cost model and the roofline do not price (the kernel declares
  its bytes and exponentials only)."""
  return rows * vocab * passes(vocab, top_k, top_p) * _OPS_PER_ENTRY_PASS


def draw(uniforms: jax.Array, logits: jax.Array, top_k: int, top_p: Union[float, int]) -> jax.Array:
  """One draw per row from softmax(top-k, then top-p, filtered logits), over the rows it is given
  (`filtering.sample_with_retries` runs it per batch shard under a mesh).

  uniforms: (..., n) in [0, 1), as `filtering.sample_with_retries` takes them (n >= 2 with top-p:
  n - 1 rounds and the fallback's; with top-p off only the first is used); logits: (..., V) with V a
  multiple of 128. Returns ids (...) int32, `sample_with_retries`' ids.
  """
  lead, vocab = logits.shape[:-1], logits.shape[-1]
  if vocab % 128:
    raise ValueError(f"top-k/top-p kernel: a vocabulary of {vocab} is not a multiple of 128 lanes")
  limit = _top_p_limit(top_p)
  if uniforms.shape[-1] < 2 and limit >= 0:
    raise ValueError(f"top-k/top-p kernel: top-p needs >= 2 uniforms per row, got {uniforms.shape[-1]}")
  x = logits.reshape(-1, vocab)
  u = uniforms.reshape(x.shape[0], -1)
  rows = x.shape[0]
  # The last block may run past the rows: its extra rows read undefined logits and their ids are
  # dropped on the write (every loop of the kernel has a bounded trip count).
  cost = pl.CostEstimate(flops=0, transcendentals=rows * vocab,
                         bytes_accessed=int(x.dtype.itemsize * rows * vocab + u.dtype.itemsize * u.size + 4 * rows))
  ids = pl.pallas_call(
      functools.partial(_kernel, top_k=int(top_k), limit=limit),
      grid=(pl.cdiv(rows, ROWS_PER_STEP),),
      in_specs=[pl.BlockSpec((ROWS_PER_STEP, vocab), lambda i: (i, 0)),
                pl.BlockSpec((ROWS_PER_STEP, u.shape[1]), lambda i: (i, 0))],
      out_specs=pl.BlockSpec((ROWS_PER_STEP, 1), lambda i: (i, 0)),
      out_shape=jax.ShapeDtypeStruct((rows, 1), jnp.int32),
      interpret=interpreted(),
      name=KERNEL_NAME,
      cost_estimate=cost,
  )(x, u)
  return ids.reshape(lead)


__all__ = ["KERNEL_NAME", "ROWS_PER_STEP", "applies", "draw", "passes", "vector_ops"]
