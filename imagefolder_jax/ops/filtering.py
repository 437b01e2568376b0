"""Top-k then top-p (nucleus) filtering, exactly as the official `sample_with_top_k_top_p_`.

Official semantics (docs/design.md §3), along the last axis (one branch's vocabulary):
  * top-k: remove entries strictly below the k-th largest value (ties with it survive);
  * top-p on the top-k-filtered logits: sort ascending, softmax, float32 cumsum, remove entries
    whose cumsum is <= 1 - top_p; the largest entry always survives.
`top_k = 0` (or >= V) disables top-k; `top_p <= 0` or `>= 1` disables top-p.

Implementation: both filters remove a prefix of the ascending order, so each is a value threshold,
found here exactly without sorting (XLA:CPU's TopK and sort run a comparator per element on one
thread: `lax.top_k(., 750)` on one guided image's 572 x 4096 logits takes ~85 ms). Logits map to
order-preserving uint32 keys; `_largest_key_at_most` finds the largest key t whose F(t) (the count,
or the 2^-30 fixed-point probability mass, of the entries with key <= t) is <= a target:
  * top-k: F = count, target V - k; the first bracket is guessed from the row's mean and spread;
  * top-p: F = mass of the top-k survivors, target 1 - top_p (the official cumsum cut).
Each bisection step is one fused integer pass over the row (value midpoints, key midpoints as a
bound on the step count); once <= `_END_GAME` entries are left in the bracket they are pulled out
and the answer read off their running sums. Entries tied with a boundary value are kept together
(the official result on such ties depends on the sort order, which is unspecified).

Sampling (`sample_with_retries`) draws inverse-CDF in two levels (blocks of `_BLOCK`, then inside
the block) from the top-k law and redraws the rows whose draw top-p removes (one pass to check),
with the exact top-p search as fallback: the official law without the top-p search. Programs compiled
for TPUs run the same rounds in one kernel (`filtering_kernel`: the searches on chip).
"""
from __future__ import annotations

import statistics
from typing import NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from imagefolder_jax.ops.platform import target_platform

TopP = Union[float, jax.Array]

_VALUE_STEPS = 24
_BLOCK = 64
# Half-width, in standard deviations, of the guessed first bracket of the top-k search.
_GUESS_WIDTH = 0.1
# Bisection stops once this many entries are left in the bracket; they are resolved directly.
_END_GAME = 8
# Top-p: value-bisection steps on the mass alone before counts are tracked (one pass each, not two).
_TOP_P_BLIND_STEPS = 8
# Rows per chunk: 256 x 4096 keys are 4 MB, which stays in cache between the passes.
_CHUNK_ROWS = 256
_MASS_ONE = float(2 ** 30)
# Rows the exact top-p fallback of `sample_with_retries` handles per pass (the rows still rejected
# after every round: usually none or a few).
_FALLBACK_ROWS = 128


def compiler_options(platform: Optional[str] = None) -> dict[str, str]:
  """XLA options for a jitted program that runs these filters on `platform` ('cpu', 'gpu', 'tpu';
  None: `platform.target_platform()`).

  XLA:CPU rewrites every reduction over more than 32 entries into reduce-windows of 32 (its
  `TreeReductionRewriter`, which bounds float rounding); for the integer counts and sums of the
  searches that runs ~3x slower per entry than one loop (0.34 vs 0.12 ns per key counted, 968 x 4096
  keys on a 2-core Xeon) and took half the filter's time. The searches are exact in any order, and
  the sampler's float reductions are over <= a few thousand entries, so on CPU the pass is switched
  off for the whole program (`jax.jit(..., compiler_options=compiler_options(platform))`). Other
  platforms: {}.
  """
  platform = platform or target_platform()
  return {"xla_disable_hlo_passes": "tree_reduction_rewriter"} if platform == "cpu" else {}


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


def _static_top_p_off(top_p: TopP) -> bool:
  return isinstance(top_p, (int, float, np.floating)) and not 0.0 < float(top_p) < 1.0


def sortable_keys(x: jax.Array) -> jax.Array:
  """float32 -> uint32 with the same order (-inf < ... < -0 < +0 < ... < inf; no NaNs)."""
  bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
  return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(0x80000000))


def _key_values(keys: jax.Array) -> jax.Array:
  """Inverse of `sortable_keys`."""
  bits = jnp.where(keys >> 31 == 1, keys & jnp.uint32(0x7FFFFFFF), ~keys)
  return jax.lax.bitcast_convert_type(bits, jnp.float32)


def _split_point(lo: jax.Array, hi: jax.Array, step: jax.Array) -> jax.Array:
  """A key strictly between lo and hi (requires hi - lo >= 2): the value midpoint while it is
  strictly inside and `step` < _VALUE_STEPS, else the key midpoint."""
  by_key = lo + ((hi - lo) >> 1)
  by_value = sortable_keys(0.5 * _key_values(lo) + 0.5 * _key_values(hi))
  use_value = (by_value > lo) & (by_value < hi) & (step < _VALUE_STEPS)
  return jnp.where(use_value, by_value, by_key)


class _Bracket(NamedTuple):
  """Per row: F(lo) <= target < F(hi); N(.) counts the entries with key <= ., F(.) sums their weights."""
  lo: jax.Array
  hi: jax.Array
  value_lo: jax.Array
  count_lo: jax.Array
  count_hi: jax.Array


def _bracket_members(keys: jax.Array, b: _Bracket, size: int) -> tuple[jax.Array, jax.Array]:
  """The first `size` entries (vocabulary order) with lo < key <= hi: (their indices, valid), each (R, size).

  Found without a scan over the row: per block of `_BLOCK` entries a member count (one pass), then
  for the j-th member its block and its place inside that block (arrays of (R, size, _BLOCK)).
  """
  rows, vocab = keys.shape
  blocks = -(-vocab // _BLOCK)
  pad = ((0, 0), (0, blocks * _BLOCK - vocab))
  member = (keys > b.lo[:, None]) & (keys <= b.hi[:, None])
  member = jnp.pad(member, pad).reshape(rows, blocks, _BLOCK)
  block_end = jnp.cumsum(jnp.sum(member, axis=-1, dtype=jnp.int32), axis=-1)          # (R, blocks)
  rank = jnp.arange(1, size + 1, dtype=jnp.int32)                                       # (size,)
  block = jnp.minimum(jnp.sum(block_end[:, None, :] < rank[None, :, None], axis=-1), blocks - 1)  # (R, size)
  block_start = jnp.where(block > 0, jnp.take_along_axis(block_end, jnp.maximum(block - 1, 0), axis=-1), 0)
  inside = jnp.take_along_axis(member, block[..., None], axis=1)                        # (R, size, _BLOCK)
  place = jnp.sum(jnp.cumsum(inside, axis=-1, dtype=jnp.int32) < (rank - block_start)[..., None], axis=-1)
  index = block * _BLOCK + jnp.minimum(place, _BLOCK - 1)
  valid = rank[None, :] <= block_end[:, -1:]
  return jnp.minimum(index, vocab - 1), valid


def _weight_below(keys: jax.Array, weights: jax.Array, t: jax.Array) -> jax.Array:
  """(R,) sum of weights over {key <= t}. An AND with the all-ones / zero mask vectorises better on
  XLA:CPU than a select (measured ~1.5x)."""
  below = -(keys <= t[:, None]).astype(jnp.int32)
  return jnp.sum(weights & below, axis=-1)


def _count_below(keys: jax.Array, t: jax.Array) -> jax.Array:
  return jnp.sum(keys <= t[:, None], axis=-1, dtype=jnp.int32)


def _largest_key_at_most(keys: jax.Array, weights: Optional[jax.Array], target: jax.Array, *,
                         guesses: Optional[tuple[jax.Array, jax.Array]] = None, blind_steps: int = 0) -> jax.Array:
  """The largest key t with F(t) = sum of `weights` over {key <= t} <= target, per row.

  keys (R, V) uint32; weights (R, V) int32 >= 0, or None for all ones (F = N, a count); target (R,)
  int32 with 0 <= target < F(max key) (rows with target < 0 get min key - 1).
  guesses: two keys per row (R,) expected to bracket the answer closely (a wrong guess only costs
    steps); blind_steps: bisection steps that evaluate F alone (cheaper than F and N when weighted).
  Then bisection with F and N narrows [lo, hi] until at most `_END_GAME` entries lie inside; those
  are pulled out and the answer read off their running sums, which spares the last steps (the ones
  the closest-spaced row of a batch needs). Exact: {key > result} is the answer's set.
  """
  ones = weights is None

  def evaluate(t):
    count = _count_below(keys, t)
    return (count if ones else _weight_below(keys, weights, t)), count

  def narrowed(b: _Bracket, move_up: jax.Array, move_down: jax.Array, t, value, count) -> _Bracket:
    return _Bracket(jnp.where(move_up, t, b.lo), jnp.where(move_down, t, b.hi),
                    jnp.where(move_up, value, b.value_lo), jnp.where(move_up, count, b.count_lo),
                    jnp.where(move_down, count, b.count_hi))

  target = target.astype(jnp.int32)
  lo, hi = jnp.min(keys, axis=-1) - jnp.uint32(1), jnp.max(keys, axis=-1)
  zeros = jnp.zeros(lo.shape, jnp.int32)
  b = _Bracket(lo, hi, zeros, zeros, jnp.full(lo.shape, keys.shape[-1], jnp.int32))
  if guesses is not None:
    # The guessed pivots (ordered, clipped to [lo, hi]) split the range in three; keep the right part.
    g1, g2 = (jnp.clip(g, lo, hi) for g in (jnp.minimum(*guesses), jnp.maximum(*guesses)))
    (f1, n1), (f2, n2) = evaluate(g1), evaluate(g2)
    fits1, fits2 = f1 <= target, f2 <= target
    b = narrowed(b, fits1 & ~fits2, ~fits1, g1, f1, n1)
    b = narrowed(b, fits2, fits1 & ~fits2, g2, f2, n2)
  if blind_steps:
    def blind(step, b):
      mid = _split_point(b.lo, b.hi, step)
      value = _weight_below(keys, weights, mid)
      fits = value <= target
      open_ = b.hi - b.lo > 1
      return narrowed(b, fits & open_, ~fits & open_, mid, value, b.count_lo)

    b = jax.lax.fori_loop(0, blind_steps, blind, b)
    b = b._replace(count_lo=_count_below(keys, b.lo), count_hi=_count_below(keys, b.hi))

  def finished(b: _Bracket):
    return (target < 0) | (b.count_hi - b.count_lo <= _END_GAME) | (b.hi - b.lo <= 1)

  def body(state):
    b, step = state
    done = finished(b)
    mid = _split_point(b.lo, b.hi, step)
    value, count = evaluate(mid)
    fits = value <= target
    return narrowed(b, fits & ~done, ~fits & ~done, mid, value, count), step + 1

  b, _ = jax.lax.while_loop(lambda state: ~jnp.all(finished(state[0])), body, (b, jnp.int32(blind_steps)))
  index, valid = _bracket_members(keys, b, _END_GAME)
  member_keys = jnp.take_along_axis(keys, index, axis=-1)
  member_weights = (jnp.ones(index.shape, jnp.int32) if ones else jnp.take_along_axis(weights, index, axis=-1))
  # F at each member: F(lo) plus the members at or below it (ties included).
  at_or_below = (member_keys[:, None, :] <= member_keys[:, :, None]) & valid[:, None, :]
  value = b.value_lo[:, None] + jnp.sum(jnp.where(at_or_below, member_weights[:, None, :], 0), axis=-1)
  fits = valid & (value <= target[:, None])
  best = jnp.maximum(b.lo, jnp.max(jnp.where(fits, member_keys, 0), axis=-1))
  # hi - lo <= 1: the only key inside is hi (all ties), and F(hi) > target.
  return jnp.where((target < 0) | (b.hi - b.lo <= 1), b.lo, best)


def _gaussian_guesses(center: jax.Array, spread: jax.Array, z: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Keys of center + spread * (z -/+ _GUESS_WIDTH): where a roughly normal row puts a quantile."""
  return (sortable_keys(center + spread * (z - _GUESS_WIDTH)), sortable_keys(center + spread * (z + _GUESS_WIDTH)))


def _kth_largest_cut(keys: jax.Array, x: jax.Array, k: int) -> jax.Array:
  """keys (R, V), x (R, V) float32 -> (R,) key t with {key > t} == {key >= k-th largest key} (exact)."""
  vocab = x.shape[-1]
  mean = jnp.mean(x, axis=-1)
  std = jnp.sqrt(jnp.maximum(jnp.mean(jnp.square(x - mean[:, None]), axis=-1), 0.0))
  z = jnp.float32(statistics.NormalDist().inv_cdf(1.0 - (k - 0.5) / vocab))
  target = jnp.full(mean.shape, vocab - k, jnp.int32)
  return _largest_key_at_most(keys, None, target, guesses=_gaussian_guesses(mean, std, z))


def _top_p_weights(mask: jax.Array, weights: jax.Array, top_p: TopP) -> tuple[jax.Array, jax.Array]:
  """The top-p test as integers: (2^-30 fixed-point probabilities (R, V) int32 of the top-k
  survivors, removal limit (R,) int32, < 0 when top-p is off). An entry is removed by top-p iff
  the fixed-point mass of the entries at or below its key is <= the limit (official: ascending
  cumsum <= 1 - top_p; the largest entry always survives since the whole mass exceeds the limit).

  int32 sums vectorise on XLA:CPU, float sums do not; the rounding, std ~sqrt(V / 12) 2^-30 ~ 2e-8,
  is below the official float32 cumsum's own.
  """
  kept = jnp.where(mask, weights, 0.0)
  probs = kept / jnp.sum(kept, axis=-1, keepdims=True)
  fixed = jnp.round(probs * _MASS_ONE).astype(jnp.int32)
  threshold = jnp.broadcast_to(removal_threshold(top_p), mask.shape[:1])
  # floor(threshold * 2^30) is exact in float32 (a power-of-two scaling) and fits in int32.
  return fixed, jnp.where(threshold < 0, -1, jnp.floor(threshold * _MASS_ONE).astype(jnp.int32))


def _top_k_survivors(logits: jax.Array, top_k: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """logits (R, V) -> (keys (R, V) uint32, top-k mask (R, V) bool, exp(logits - row max) (R, V))."""
  x = logits.astype(jnp.float32)
  keys = sortable_keys(x)
  weights = jnp.exp(x - jnp.max(x, axis=-1, keepdims=True))
  if 0 < top_k < x.shape[-1]:
    mask = keys > _kth_largest_cut(keys, x, top_k)[:, None]
  else:
    mask = jnp.ones(x.shape, bool)
  return keys, mask, weights


def _apply_top_p(keys: jax.Array, mask: jax.Array, weights: jax.Array, top_p: TopP) -> jax.Array:
  """The top-k mask (R, V) narrowed by top-p (exact search for the cut)."""
  fixed, limit = _top_p_weights(mask, weights, top_p)
  cut = _largest_key_at_most(keys, fixed, limit, blind_steps=_TOP_P_BLIND_STEPS)
  return mask & (keys > cut[:, None])


def _survivors(logits: jax.Array, top_k: int, top_p: TopP) -> tuple[jax.Array, jax.Array]:
  """logits (R, V) -> (survivor mask (R, V) bool, exp(logits - row max) float32 (R, V))."""
  keys, mask, weights = _top_k_survivors(logits, top_k)
  if _static_top_p_off(top_p):
    return mask, weights
  return _apply_top_p(keys, mask, weights, top_p), weights


def _rows(fn, logits: jax.Array, *args):
  """Applies fn to logits flattened to (R, V) (args: (R, ...) per-row arrays) and restores the
  leading shape on every output. On CPUs more than `_CHUNK_ROWS` rows go through in chunks, one
  after the other, so that every pass of the searches runs on arrays that stay in cache (accelerators
  want the opposite: all rows in one wide pass)."""
  lead, vocab = logits.shape[:-1], logits.shape[-1]
  x = logits.reshape(-1, vocab)
  args = [a.reshape(x.shape[0], *a.shape[len(lead):]) for a in args]
  rows = x.shape[0]
  if rows <= _CHUNK_ROWS or target_platform() != "cpu":
    out = fn(x, *args)
  else:
    # Equal chunks of <= _CHUNK_ROWS: 288 rows go as 2 x 144, not as 2 x 256 with 224 rows of padding.
    chunks = -(-rows // _CHUNK_ROWS)
    size = -(-rows // chunks)
    pad = chunks * size - rows
    split = lambda a: jnp.pad(a, ((0, pad),) + ((0, 0),) * (a.ndim - 1)).reshape(chunks, size, *a.shape[1:])
    out = jax.lax.map(lambda c: fn(*c), (split(x), *map(split, args)))
    out = jax.tree.map(lambda a: a.reshape(chunks * size, *a.shape[2:])[:rows], out)
  return jax.tree.map(lambda a: a.reshape(lead + a.shape[1:]), out)


def top_k_top_p_mask(logits: jax.Array, top_k: int = 0, top_p: TopP = 0.0) -> jax.Array:
  """Survivors of top-k then top-p along the last axis. logits: (..., V) -> bool (..., V)."""
  if not 0 < top_k < logits.shape[-1] and _static_top_p_off(top_p):
    return jnp.ones(logits.shape, bool)
  return _rows(lambda x: _survivors(x, top_k, top_p)[0], logits)


def filter_logits(logits: jax.Array, top_k: int = 0, top_p: TopP = 0.0) -> jax.Array:
  """Logits with filtered-out entries set to -inf (official `masked_fill_`)."""
  return jnp.where(top_k_top_p_mask(logits, top_k, top_p), logits, -jnp.inf)


def filtered_probs(logits: jax.Array, top_k: int = 0, top_p: TopP = 0.0) -> jax.Array:
  """softmax of the filtered logits (the official helper with `return_p=True`), float32."""
  return jax.nn.softmax(filter_logits(logits.astype(jnp.float32), top_k, top_p), axis=-1)


def _last_positive(weights: jax.Array) -> jax.Array:
  """(R, N) -> (R,) index of the last entry > 0 (0 when none)."""
  n = weights.shape[-1]
  return jnp.max(jnp.where(weights > 0, jnp.arange(n), 0), axis=-1)


def _inverse_cdf(weights: jax.Array, targets: jax.Array) -> jax.Array:
  """(R, N) non-negative weights, (R,) targets in [0, total) -> (R,) index of the first entry whose
  running sum exceeds the target, never one of weight 0 (rounding at the end falls back to the last
  positive entry)."""
  cdf = jnp.cumsum(weights, axis=-1)
  index = jnp.sum(cdf <= targets[:, None], axis=-1)
  return jnp.minimum(index, _last_positive(weights))


class _DrawTables(NamedTuple):
  blocks: jax.Array      # (R, nb, _BLOCK) weights, zero-padded
  block_mass: jax.Array  # (R, nb)
  block_cdf: jax.Array   # (R, nb)


def _draw_tables(weights: jax.Array) -> _DrawTables:
  rows, vocab = weights.shape
  count = -(-vocab // _BLOCK)
  blocks = jnp.pad(weights, ((0, 0), (0, count * _BLOCK - vocab))).reshape(rows, count, _BLOCK)
  block_mass = jnp.sum(blocks, axis=-1)
  return _DrawTables(blocks, block_mass, jnp.cumsum(block_mass, axis=-1))


def _draw_from(tables: _DrawTables, uniforms: jax.Array) -> jax.Array:
  """uniforms (R,) in [0, 1) -> ids (R,) int32 ~ the tabulated weights (row sums > 0)."""
  target = uniforms.astype(jnp.float32) * tables.block_cdf[:, -1]
  block = _inverse_cdf(tables.block_mass, target)
  before = jnp.where(block > 0, jnp.take_along_axis(tables.block_cdf, (block - 1)[:, None], axis=-1)[:, 0], 0.0)
  inside = jnp.take_along_axis(tables.blocks, block[:, None, None], axis=1)[:, 0]
  offset = _inverse_cdf(inside, jnp.maximum(target - before, 0.0))
  return (block * _BLOCK + offset).astype(jnp.int32)


def _draw(weights: jax.Array, uniforms: jax.Array) -> jax.Array:
  """weights (R, V) >= 0 (row sums > 0), uniforms (R,) in [0, 1) -> ids (R,) int32 ~ weights."""
  return _draw_from(_draw_tables(weights), uniforms)


def sample_with_uniforms(uniforms: jax.Array, logits: jax.Array, top_k: int = 0, top_p: TopP = 0.0) -> jax.Array:
  """Inverse-CDF draw from softmax(filtered logits), one per row, given uniforms in [0, 1).

  uniforms: (...) float; logits: (..., V) -> ids (...) int32. One uniform per row; the top-p cut is
  searched exactly. `sample_with_retries` draws the same distribution faster.
  """
  def draw(x, u):
    mask, weights = _survivors(x, top_k, top_p)
    return _draw(jnp.where(mask, weights, 0.0), u)

  return _rows(draw, logits, uniforms)


def sample_with_retries(uniforms: jax.Array, logits: jax.Array, top_k: int = 0, top_p: TopP = 0.0) -> jax.Array:
  """Draws from softmax(filtered logits) by rejection: from the top-k distribution, redrawing the
  rows whose draw top-p removes. Same distribution as `sample_with_uniforms`.

  uniforms: (..., n) float in [0, 1), n >= 2 independent uniforms per row: [..., :n-1] feed up to
    n - 1 rounds of draws, [..., n-1] the exact fallback (top-p cut searched, as in
    `sample_with_uniforms`) for rows still rejected after them. logits: (..., V) -> ids (...) int32.

  Top-p removes at most 1 - top_p of the top-k mass, so a draw is rejected with probability
  <= 1 - top_p and each round costs one pass over the row instead of the ~15 of the cut's search;
  the fallback runs only on the rows rejected n - 1 times, `_FALLBACK_ROWS` of them per pass.
  """
  if uniforms.shape[-1] < 2:
    raise ValueError(f"sample_with_retries needs >= 2 uniforms per row, got {uniforms.shape[-1]}")
  from imagefolder_jax.ops import filtering_kernel
  from imagefolder_jax.parallel import traced_batch_spec
  if filtering_kernel.applies(logits.shape[-1], top_p):
    # On TPUs every pass of the XLA searches below is a trip through HBM; the kernel keeps each row
    # on chip through the same rounds (the same ids).
    local = lambda u, x: filtering_kernel.draw(u, x, top_k, top_p)
  elif _static_top_p_off(top_p):
    return sample_with_uniforms(uniforms[..., 0], logits, top_k, top_p)
  else:
    local = lambda u, x: _retries(u, x, top_k, top_p)
  spec = traced_batch_spec(logits.shape)
  if spec is None or (isinstance(top_p, jax.Array) and top_p.ndim):
    return local(uniforms, logits)
  # Under a mesh each device draws its own rows (the same draws): as one global program, the
  # rejected rows' gather and the loops' conditions would cross devices in every round.
  rows = jax.P(spec[0])   # the leading axis; the ids have one axis fewer than the logits
  if isinstance(top_p, jax.Array):
    return jax.shard_map(lambda u, x, p: _retries(u, x, top_k, p), in_specs=(rows, rows, jax.P()), out_specs=rows,
                         check_vma=False)(uniforms, logits, top_p)
  return jax.shard_map(local, in_specs=(rows, rows), out_specs=rows, check_vma=False)(uniforms, logits)


def _retries(uniforms: jax.Array, logits: jax.Array, top_k: int, top_p: TopP) -> jax.Array:
  """`sample_with_retries` over the rows it is given (all of them, or one device's)."""
  rounds = uniforms.shape[-1] - 1

  def draw(x, u):
    keys, mask, weights = _top_k_survivors(x, top_k)
    fixed, limit = _top_p_weights(mask, weights, top_p)
    tables = _draw_tables(jnp.where(mask, weights, 0.0))

    def removed(ids):
      drawn_key = jnp.take_along_axis(keys, ids[:, None], axis=-1)[:, 0]
      return _weight_below(keys, fixed, drawn_key) <= limit

    def another_round(state):
      ids, rejected, r = state
      fresh = _draw_from(tables, jnp.take(u, r, axis=1))
      ids = jnp.where(rejected, fresh, ids)
      return ids, rejected & removed(ids), r + 1

    ids = _draw_from(tables, u[:, 0])
    ids, rejected, _ = jax.lax.while_loop(lambda s: jnp.any(s[1]) & (s[2] < rounds), another_round,
                                          (ids, removed(ids), jnp.int32(1)))

    rows = x.shape[0]
    cap = min(rows, _FALLBACK_ROWS)

    def exact(state):
      # Up to `cap` still-rejected rows per pass, gathered: the exact search runs over those rows
      # only, not over every row of the call (a pass over all rows costs as much HBM traffic as the
      # whole retry loop, for the few rows that need it).
      ids, todo = state
      picked = jnp.nonzero(todo, size=cap, fill_value=rows)[0]                        # (cap,)
      safe = jnp.minimum(picked, rows - 1)
      k_, m_, w_ = keys[safe], mask[safe], weights[safe]
      kept = jnp.where(_apply_top_p(k_, m_, w_, top_p), w_, 0.0)
      drawn = _draw(kept, u[safe, rounds])
      return ids.at[picked].set(drawn, mode="drop"), todo.at[picked].set(False, mode="drop")

    ids, _ = jax.lax.while_loop(lambda s: jnp.any(s[1]), exact, (ids, rejected))
    return ids

  return _rows(draw, logits, uniforms)


def sample_top_k_top_p(key: jax.Array, logits: jax.Array, top_k: int = 0, top_p: TopP = 0.0,
                       rounds: int = 4) -> jax.Array:
  """One draw per row from softmax(filtered logits) (`sample_with_retries`, up to `rounds` rounds).

  logits: (..., V) -> ids (...) int32.
  """
  return sample_with_retries(jax.random.uniform(key, logits.shape[:-1] + (rounds + 1,)), logits, top_k, top_p)
