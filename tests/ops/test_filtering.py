"""Top-k / top-p filtering against the official masks and a NumPy transcription of the official helper."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from support import RUN_LONG

from imagefolder_jax.ops import filtering
from imagefolder_jax.ops.filtering import (
  filter_logits,
  filtered_probs,
  removal_threshold,
  sample_top_k_top_p,
  sample_with_retries,
  sample_with_uniforms,
  top_k_top_p_mask,
)


def official_mask(logits: np.ndarray, top_k: int, top_p: float) -> np.ndarray:
  """NumPy transcription of `models/helpers.py::sample_with_top_k_top_p_` (mask of survivors)."""
  x = np.array(logits, np.float32)
  if top_k > 0:
    kth = -np.sort(-x, axis=-1)[..., top_k - 1:top_k]
    x = np.where(x < kth, -np.inf, x)
  if top_p > 0:
    order = np.argsort(x, axis=-1, kind="stable")
    s = np.take_along_axis(x, order, -1)
    e = np.exp(s - s[..., -1:])
    cum = np.cumsum((e / e.sum(-1, keepdims=True)).astype(np.float32), axis=-1, dtype=np.float32)
    remove = cum <= np.float32(1 - top_p)
    remove[..., -1] = False
    x_remove = np.zeros_like(remove)
    np.put_along_axis(x_remove, order, remove, -1)
    x = np.where(x_remove, -np.inf, x)
  return np.isfinite(x)


@pytest.fixture(scope="module")
def guided_s5(parity_expected):
  """The stored official guided logits of scale 5 as (B, 16, P, V) (feed these, not ours:
  tests/fixtures/parity_tiny/README.md)."""
  return parity_expected["gen_guided_s5"].reshape(2, 16, 2, 4096)


def test_official_masks_and_probs(parity_expected, guided_s5):
  e = parity_expected
  mask = np.asarray(top_k_top_p_mask(jnp.asarray(guided_s5), 750, 0.95)).reshape(2, 16, 8192)
  np.testing.assert_array_equal(mask, e["gen_filter_mask_s5"])
  topk_only = np.asarray(top_k_top_p_mask(jnp.asarray(guided_s5), 750, 0.0)).reshape(2, 16, 8192)
  np.testing.assert_array_equal(topk_only, e["gen_filter_mask_topk_only_s5"])
  probs = np.asarray(filtered_probs(jnp.asarray(guided_s5), 750, 0.95)).reshape(2, 16, 8192)
  np.testing.assert_allclose(probs, e["gen_filter_probs_s5"], rtol=0, atol=1e-8)
  np.testing.assert_allclose(probs.reshape(2, 16, 2, 4096).sum(-1), 1.0, atol=1e-5)


def test_jitted_traced_top_p_matches(parity_expected, guided_s5):
  fn = jax.jit(top_k_top_p_mask, static_argnums=1)
  mask = np.asarray(fn(jnp.asarray(guided_s5), 750, jnp.float32(0.95))).reshape(2, 16, 8192)
  np.testing.assert_array_equal(mask, parity_expected["gen_filter_mask_s5"])
  off = np.asarray(fn(jnp.asarray(guided_s5), 750, jnp.float32(1.0))).reshape(2, 16, 8192)
  np.testing.assert_array_equal(off, parity_expected["gen_filter_mask_topk_only_s5"])


def test_removal_threshold_rounds_like_pytorch():
  # PyTorch compares float32 with the Python scalar 1 - 0.95 rounded once to float32.
  assert np.float32(removal_threshold(0.95)) == np.float32(1 - 0.95)
  assert np.float32(removal_threshold(0.0)) < 0 and np.float32(removal_threshold(1.0)) < 0


@pytest.mark.parametrize("top_k,top_p", [(0, 0.0), (0, 0.9), (5, 0.0), (5, 0.5), (37, 0.95), (64, 0.3),
                                         (100, 0.7)])
def test_matches_numpy_official_on_random_logits(top_k, top_p):
  logits = np.random.default_rng(top_k).normal(size=(3, 7, 64)).astype(np.float32) * 2.0
  want = official_mask(logits, min(top_k, 64) if top_k else 0, top_p)
  got = np.asarray(top_k_top_p_mask(jnp.asarray(logits), top_k, top_p))
  np.testing.assert_array_equal(got, want)
  filtered = np.asarray(filter_logits(jnp.asarray(logits), top_k, top_p))
  np.testing.assert_array_equal(np.isfinite(filtered), want)
  np.testing.assert_array_equal(filtered[want], logits[want])


def test_top_k_keeps_ties_with_the_kth_value():
  logits = jnp.array([[3.0, 1.0, 2.0, 2.0, 2.0, 0.0]])
  np.testing.assert_array_equal(np.asarray(top_k_top_p_mask(logits, 2, 0.0))[0],
                                [True, False, True, True, True, False])
  # Ties left out by lax.top_k still count in the top-p mass: 3 + 2 + 2 + 2 over a 0.45 nucleus.
  np.testing.assert_array_equal(np.asarray(top_k_top_p_mask(logits, 2, 0.45))[0],
                                official_mask(np.asarray(logits), 2, 0.45)[0])


def test_draws_stay_in_the_support_and_follow_the_probabilities():
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.normal(size=(2, 8)).astype(np.float32))
  top_k, top_p = 6, 0.8
  mask = np.asarray(top_k_top_p_mask(logits, top_k, top_p))
  probs = np.asarray(filtered_probs(logits, top_k, top_p))
  n = 20000
  keys = jax.random.split(jax.random.key(0), n)
  draws = np.asarray(jax.jit(jax.vmap(lambda k: sample_top_k_top_p(k, logits, top_k, top_p)))(keys))  # (n, 2)
  assert draws.dtype == np.int32
  for row in range(2):
    counts = np.bincount(draws[:, row], minlength=8) / n
    assert mask[row][draws[:, row]].all()
    np.testing.assert_allclose(counts, probs[row], atol=0.015)
  # Without filtering, draws follow softmax(logits).
  free = np.asarray(jax.jit(jax.vmap(lambda k: sample_top_k_top_p(k, logits, 0, 0.0)))(keys))
  np.testing.assert_allclose(np.bincount(free[:, 0], minlength=8) / n, np.asarray(jax.nn.softmax(logits[0])),
                             atol=0.015)


@pytest.mark.parametrize("vocab", [4096, 1000])
@pytest.mark.parametrize("distribution", ["normal", "heavy_tailed", "skewed", "tiny_spread", "peaked"])
def test_full_vocabulary_rows_match_numpy_official(vocab, distribution):
  """Full-size rows (where the bisection, its guessed first bracket and the end game all run)."""
  rng = np.random.default_rng(vocab + len(distribution))
  shape = (40, vocab)
  logits = {"normal": lambda: 2.0 * rng.normal(size=shape),
            "heavy_tailed": lambda: rng.standard_t(2.0, size=shape),
            "skewed": lambda: -3.0 * rng.exponential(size=shape),
            "tiny_spread": lambda: 1e-3 * rng.normal(size=shape),
            "peaked": lambda: 8.0 * rng.normal(size=shape)}[distribution]().astype(np.float32)
  for top_k, top_p in [(750, 0.95), (1, 0.9), (vocab - 1, 0.5), (0, 0.95), (37, 0.0)]:
    want = official_mask(logits, top_k, top_p)
    got = np.asarray(top_k_top_p_mask(jnp.asarray(logits), top_k, top_p))
    np.testing.assert_array_equal(got, want, err_msg=f"top_k={top_k} top_p={top_p}")


def test_top_k_with_many_ties_in_full_rows():
  rng = np.random.default_rng(7)
  logits = (np.round(rng.normal(size=(30, 4096)) * 4) / 4).astype(np.float32)  # ~30 distinct values
  for top_k in (1, 100, 750, 4000):
    want = official_mask(logits, top_k, 0.0)
    np.testing.assert_array_equal(np.asarray(top_k_top_p_mask(jnp.asarray(logits), top_k, 0.0)), want)
  # Top-p on ties: the official cut depends on the sort order; ours keeps every entry tied with a
  # survivor, so it is the official set plus, at most, the rest of the boundary value's ties.
  for top_k, top_p in ((0, 0.95), (750, 0.9), (100, 0.5)):
    want = official_mask(logits, top_k, top_p)
    got = np.asarray(top_k_top_p_mask(jnp.asarray(logits), top_k, top_p))
    assert (got | ~want).all()
    boundary = np.where(want, logits, np.inf).min(-1, keepdims=True)
    assert (logits[got & ~want] == np.broadcast_to(boundary, logits.shape)[got & ~want]).all()


@pytest.mark.parametrize("rounds", [1, 4])
def test_rejection_draws_follow_the_filtered_law(rounds):
  """sample_with_retries (rejection from the top-k law, exact fallback; rounds=1 sends every
  rejected row to the fallback) and sample_with_uniforms (exact cut) draw the same law."""
  rng = np.random.default_rng(1)
  logits = jnp.asarray(rng.normal(size=(3, 40)).astype(np.float32) * 1.5)
  top_k, top_p = 25, 0.6   # top-p removes ~40% of the top-k mass: many rejections
  mask = np.asarray(top_k_top_p_mask(logits, top_k, top_p))
  probs = np.asarray(filtered_probs(logits, top_k, top_p))
  n = 30000
  u = jax.random.uniform(jax.random.key(3), (n, 3, rounds + 1))
  retried = np.asarray(jax.jit(lambda u: sample_with_retries(u, jnp.broadcast_to(logits, (n, 3, 40)), top_k, top_p),
                               compiler_options=RUN_LONG)(u))
  exact = np.asarray(jax.jit(lambda u: sample_with_uniforms(u, jnp.broadcast_to(logits, (n, 3, 40)), top_k, top_p),
                             compiler_options=RUN_LONG)(u[..., 0]))
  for draws in (retried, exact):
    assert draws.dtype == np.int32
    for row in range(3):
      assert mask[row][draws[:, row]].all()
      np.testing.assert_allclose(np.bincount(draws[:, row], minlength=40) / n, probs[row], atol=0.012)


def test_rejection_draws_stay_in_full_vocabulary_support():
  rng = np.random.default_rng(2)
  logits = jnp.asarray((rng.normal(size=(4, 64, 4096)) * 3).astype(np.float32))
  # logits as an argument: a closed-over array is a constant, whose folding made this compile 9 s, not 1
  ids = np.asarray(jax.jit(lambda k, x: sample_top_k_top_p(k, x, 750, 0.95))(jax.random.key(0), logits))
  mask = np.asarray(top_k_top_p_mask(logits, 750, 0.95))
  assert np.take_along_axis(mask, ids[..., None], -1).all()
  with pytest.raises(ValueError, match="uniforms per row"):
    sample_with_retries(jnp.zeros((4, 64, 1)), logits, 750, 0.95)


def test_chunked_rows_give_the_same_results(monkeypatch):
  import imagefolder_jax.ops.filtering as filtering
  rng = np.random.default_rng(5)
  logits = jnp.asarray((rng.normal(size=(5, 61, 512)) * 2).astype(np.float32))
  u = jax.random.uniform(jax.random.key(1), (5, 61, 5))
  whole = (np.asarray(top_k_top_p_mask(logits, 100, 0.9)), np.asarray(sample_with_retries(u, logits, 100, 0.9)))
  for chunk_rows in (64, 100):  # 305 rows -> 5 chunks of 61; 4 chunks of 77, 3 rows of padding
    monkeypatch.setattr(filtering, "_CHUNK_ROWS", chunk_rows)
    chunked = (np.asarray(top_k_top_p_mask(logits, 100, 0.9)), np.asarray(sample_with_retries(u, logits, 100, 0.9)))
    np.testing.assert_array_equal(chunked[0], whole[0])
    np.testing.assert_array_equal(chunked[1], whole[1])


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the option is for XLA:CPU")
def test_compiler_options_keep_row_reductions_whole_and_results_equal():
  """`compiler_options()` must switch off XLA:CPU's split of long reductions into windows of 32 (the
  filter's speed on CPU rests on it) without changing a single mask or draw."""
  import re

  from imagefolder_jax.ops.filtering import compiler_options
  rng = np.random.default_rng(7)
  logits = jnp.asarray((rng.normal(size=(40, 4096)) * 2).astype(np.float32))
  u = jax.random.uniform(jax.random.key(2), (40, 5))

  def fn(u, x):
    return top_k_top_p_mask(x, 750, 0.95), sample_with_retries(u, x, 750, 0.95)

  default, whole = jax.jit(fn), jax.jit(fn, compiler_options=compiler_options())
  windows_of_32 = lambda f: re.findall(r"window=\{size=[0-9x]*32 stride=", f.lower(u, logits).compile().as_text())
  assert windows_of_32(default), "XLA:CPU no longer splits reductions: compiler_options() may be obsolete"
  assert not windows_of_32(whole)
  for a, b in zip(default(u, logits), whole(u, logits)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_fallback_on_gathered_rows_equals_one_pass_over_all_rows(monkeypatch):
  """rounds=1 with top_p=0.5 leaves many rows rejected: the exact fallback in passes of 4 gathered
  rows draws exactly what one pass over every row draws (the fallback gathers the rejected rows
  because a pass over every row cost the d16 sampler 74 GB of HBM traffic on v5e: docs/planning.md)."""
  rng = np.random.default_rng(0)
  logits = jnp.asarray((rng.normal(size=(3, 50, 64)) * 2).astype(np.float32))
  u = jax.random.uniform(jax.random.key(0), (3, 50, 2))
  draw = lambda: np.asarray(jax.jit(lambda u, x: filtering.sample_with_retries(u, x, 40, 0.5))(u, logits))
  monkeypatch.setattr(filtering, "_FALLBACK_ROWS", 4)
  passes = draw()
  monkeypatch.setattr(filtering, "_FALLBACK_ROWS", 10_000)
  whole = draw()
  np.testing.assert_array_equal(passes, whole)
  mask = np.asarray(filtering.top_k_top_p_mask(logits, 40, 0.5))
  assert np.take_along_axis(mask, passes[..., None], -1).all()
