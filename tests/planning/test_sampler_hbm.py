"""The sampler's HBM traffic fixes (docs/planning.md): the KV cache grows by concatenation instead of
in-place updates of a preallocated cache, and the exact top-p fallback runs on the rejected rows only."""
import jax
import jax.numpy as jnp
import numpy as np

from imagefolder_jax.models.generator import GeneratorConfig, NextScaleGenerator, init_cache
from imagefolder_jax.ops import filtering


def test_kv_cache_grows_without_dynamic_update_slices():
  """Per scale the cache gains that scale's positions, heads first; no dynamic-update-slice is
  traced (each one costs a read and write of the whole cache per scale and block on TPU)."""
  c = GeneratorConfig(depth=2, width=32, num_heads=2, num_classes=3, codebook_size=16, latent_dim=4,
                      scales=(1, 2, 3))
  module = NextScaleGenerator(c)
  labels = jnp.zeros((2,), jnp.int32)
  inputs = jnp.zeros((2, c.num_tokens - 1, c.input_dim))
  variables = module.init(jax.random.key(0), labels, inputs)

  def decode(variables, labels):
    cond = module.apply(variables, labels, method=NextScaleGenerator.condition)
    tokens = module.apply(variables, cond, method=NextScaleGenerator.first_scale_tokens)
    cache, sizes = init_cache(c, 2), []
    for si, (begin, end) in enumerate(c.begin_ends):
      if si:
        tokens = module.apply(variables, si, inputs[:, begin - 1:end - 1], method=NextScaleGenerator.scale_tokens)
      _, cache = module.apply(variables, si, tokens, cond, cache, method=NextScaleGenerator.decode_scale_features)
      sizes.append(cache[0]["k"].shape)
    return sizes

  sizes = decode(variables, labels)
  assert sizes == [(2, 2, 1, 16), (2, 2, 5, 16), (2, 2, 14, 16)]
  assert "dynamic_update_slice" not in jax.jit(decode).lower(variables, labels).as_text()


def test_fallback_on_gathered_rows_equals_one_pass_over_all_rows(monkeypatch):
  """rounds=1 with top_p=0.5 leaves many rows rejected: the exact fallback in passes of 4 gathered
  rows draws exactly what one pass over every row draws."""
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
