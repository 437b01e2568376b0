"""Shared building blocks (models/layers.py)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imagefolder_jax.models.layers import attention, heads_first_attention


@pytest.mark.parametrize("dtype,atol", [(jnp.float32, 1e-5), (jnp.bfloat16, 1e-2)])
@pytest.mark.parametrize("masked", [False, True])
def test_heads_first_attention_is_jax_xla_attention(dtype, atol, masked):
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.normal(size=(2, n, 3, 16)), dtype) for n in (7, 11, 11))
  mask = jnp.asarray(rng.uniform(size=(2, 1, 7, 11)) < 0.6).at[..., 0].set(True) if masked else None
  want = jax.nn.dot_product_attention(q, k, v, mask=mask, scale=0.37, implementation="xla")
  got = heads_first_attention(q, k, v, mask=mask, scale=0.37)
  assert got.shape == want.shape and got.dtype == want.dtype
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), atol=atol)
  if masked:  # a masked key changes nothing, an unmasked one does
    v2 = v.at[:, 3].add(5.0)
    rows_see_3 = np.asarray(mask[:, 0, :, 3])
    changed = heads_first_attention(q, k, v2, mask=mask, scale=0.37)
    moved = np.abs(np.asarray(changed - got, np.float32)).max(axis=(2, 3))
    assert (moved[~rows_see_3] == 0).all() and (moved[rows_see_3] > 0).all()


def test_attention_on_cpu_takes_the_heads_first_path():
  if jax.default_backend() != "cpu":
    pytest.skip("CPU dispatch")
  q = jnp.ones((1, 4, 2, 8))
  np.testing.assert_array_equal(np.asarray(attention(q, q, q, scale=1.0)),
                                np.asarray(heads_first_attention(q, q, q, scale=1.0)))
  # Both products are batched over (B, H) in front: dot_general batching dims (0, 1) on both sides.
  text = jax.jit(lambda q: attention(q, q, q, scale=1.0)).lower(q).as_text()
  assert text.count("batching_dims = [0, 1] x [0, 1]") == 2, text
