"""The sampler's cached-attention TPU kernel, run in Pallas's interpreter on CPU, against XLA's
attention over the cache's prefix; when it applies; and its compile for TPUs under a mesh."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imagefolder_jax.models.layers import heads_first_attention
from imagefolder_jax.ops import block_causal_attention, cached_attention

HEADS, HEAD_DIM, LENGTH = 4, 64, 40


def _inputs(dtype, queries, batch=2):
  keys = jax.random.split(jax.random.key(queries), 3)
  q = jax.random.normal(keys[0], (batch, queries, HEADS * HEAD_DIM)).astype(dtype)
  k, v = (jax.random.normal(key, (batch, LENGTH, HEADS * HEAD_DIM)).astype(dtype) for key in keys[1:])
  return q, k, v


def _xla(q, k, v, end, scale):
  heads = lambda x: x.reshape(*x.shape[:2], HEADS, HEAD_DIM)
  out = heads_first_attention(heads(q), heads(k[:, :end]), heads(v[:, :end]), scale=scale)
  return out.reshape(q.shape)


@pytest.mark.parametrize("end,queries", [(1, 1), (5, 4), (30, 16), (40, 9)])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_interpreted_kernel_equals_xla_attention(end, queries, dtype):
  """Every key < end, none after (the block of keys is end rounded up to 8 rows, or all 40)."""
  q, k, v = _inputs(dtype, queries)
  with block_causal_attention.kernel_interpreted():
    got = cached_attention.cached_attention(q, k, v, end=end, head_dim=HEAD_DIM, scale=0.3)
  want = _xla(q, k, v, end, 0.3)
  assert got.dtype == want.dtype == dtype and got.shape == q.shape
  # Same arithmetic; bf16 results may differ by a rounding of the float32 sums' order.
  tolerance = 1e-2 if dtype == jnp.bfloat16 else 2e-6
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=tolerance, atol=tolerance)


def test_interpreted_kernel_normalizes_q_and_k_per_head():
  """With head scales the kernel l2-normalizes each head's q (times its scale) and cached k in float32,
  cast back to bfloat16, as the generator's attention does before XLA's attention."""
  from imagefolder_jax.models.generator import l2_normalize
  q, k, v = _inputs(jnp.bfloat16, 16)
  head_scale = jnp.asarray([0.5, 2.0, 4.0, 8.0])
  with block_causal_attention.kernel_interpreted():
    got = cached_attention.cached_attention(q, k, v, end=30, head_dim=HEAD_DIM, scale=1.0, head_scale=head_scale)
  heads = lambda x: x.reshape(*x.shape[:2], HEADS, HEAD_DIM).astype(jnp.float32)
  qn = (l2_normalize(heads(q)) * head_scale[:, None]).astype(jnp.bfloat16).reshape(q.shape)
  kn = l2_normalize(heads(k)).astype(jnp.bfloat16).reshape(k.shape)
  want = _xla(qn, kn, v, 30, 1.0)
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=1e-2, atol=1e-2)
  with pytest.raises(ValueError, match="one scale per head"):
    cached_attention.cached_attention(q, k, v, end=30, head_dim=HEAD_DIM, scale=1.0, head_scale=head_scale[:2])


@pytest.mark.parametrize("end", [0, 5, 32])
@pytest.mark.parametrize("normalized", [False, True])
def test_interpreted_kernel_attends_to_fresh_keys_beside_the_cache(end, normalized):
  """fresh_k / fresh_v (the last scale's own keys, never cached) extend the cache's first `end` rows:
  one softmax over both, as XLA's attention over their concatenation."""
  from imagefolder_jax.models.generator import l2_normalize
  q, k, v = _inputs(jnp.bfloat16, 8)
  fresh_k, fresh_v = k[:, -8:], v[:, -8:]
  head_scale = jnp.asarray([0.5, 2.0, 4.0, 8.0]) if normalized else None
  with block_causal_attention.kernel_interpreted():
    got = cached_attention.cached_attention(q, k, v, end=end, head_dim=HEAD_DIM, scale=0.3, head_scale=head_scale,
                                            fresh_k=fresh_k, fresh_v=fresh_v)
  keys = jnp.concatenate([k[:, :end], fresh_k], axis=1)
  values = jnp.concatenate([v[:, :end], fresh_v], axis=1)
  if normalized:
    heads = lambda x: x.reshape(*x.shape[:2], HEADS, HEAD_DIM).astype(jnp.float32)
    q = (l2_normalize(heads(q)) * head_scale[:, None]).astype(jnp.bfloat16).reshape(q.shape)
    keys = l2_normalize(heads(keys)).astype(jnp.bfloat16).reshape(keys.shape)
  want = _xla(q, keys, values, end + 8, 0.3)
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=1e-2, atol=1e-2)
  with pytest.raises(ValueError, match="fresh keys"):
    cached_attention.cached_attention(q, k, v, end=end, head_dim=HEAD_DIM, scale=0.3, fresh_k=fresh_k,
                                      fresh_v=fresh_v[:, :4])


def test_kernel_applies_on_tpus_in_16_bits_with_whole_lane_columns():
  from imagefolder_jax import parallel
  from imagefolder_jax.planning.topology import compile_only_devices, parse_topology
  applies = cached_attention.applies
  assert not applies(jnp.bfloat16, 16, 64)                              # this CPU host
  with block_causal_attention.kernel_interpreted():
    assert applies(jnp.bfloat16, 16, 64) and applies(jnp.float16, 1, 128) and applies(jnp.bfloat16, 4, 32)
    assert not applies(jnp.float32, 16, 64)                             # XLA's float32 matmul precision
    assert not applies(jnp.bfloat16, 3, 64)                             # 192 lanes: no whole 128-lane columns
    assert not applies(jnp.bfloat16, 2, 48)
  for topology in ("v5e-4", "v6e-4"):
    with jax.set_mesh(parallel.make_mesh(devices=compile_only_devices(parse_topology(topology)))):
      assert applies(jnp.bfloat16, 16, 64)
      with block_causal_attention.xla_attention():
        assert not applies(jnp.bfloat16, 16, 64)


def test_mismatched_shapes_are_refused():
  q, k, v = _inputs(jnp.bfloat16, 4)
  with pytest.raises(ValueError, match="end=41"):
    cached_attention.cached_attention(q, k, v, end=41, head_dim=HEAD_DIM, scale=1.0)
  with pytest.raises(ValueError, match="whole"):
    cached_attention.cached_attention(q[..., :192], k[..., :192], v[..., :192], end=8, head_dim=HEAD_DIM, scale=1.0)


def test_compiled_for_tpus_per_batch_shard():
  """Under a 4-chip mesh the kernel runs per batch shard (no gather of the cache), and the TPU cost
  model prices it by its estimate: the queries and result, and the first `keys` rows of each cache."""
  from jax.sharding import Mesh, NamedSharding
  from jax.sharding import PartitionSpec as P

  from imagefolder_jax.planning import hlo, hlo_costs
  from imagefolder_jax.planning.topology import compile_only_devices, parse_topology
  mesh = Mesh(np.array(compile_only_devices(parse_topology("v5e-4"))), ("data",))
  rows = NamedSharding(mesh, P("data"))
  spec = lambda n: jax.ShapeDtypeStruct((8, n, HEADS * HEAD_DIM), jnp.bfloat16, sharding=rows)

  def attend(q, k, v, end=30, **fresh):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return cached_attention.cached_attention(q, k, v, end=end, head_dim=HEAD_DIM, scale=1.0, **fresh)

  fn = lambda q, k, v: attend(q, k, v)

  compiled = jax.jit(fn).lower(spec(16), spec(LENGTH), spec(LENGTH)).compile()
  text = compiled.as_text()
  calls = hlo.custom_calls_named(text, cached_attention.KERNEL_NAME)
  assert [shapes for _, shapes, _ in calls] == [[[2, 16, HEADS * HEAD_DIM]]]
  assert not [k for k in hlo.collectives(text, list(mesh.devices.flat)) if k != "unknown_trip_counts"]
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  # Per chip 2 samples: 16 queries in and out, 32 rows (30 rounded up to 8) of k and v; bf16.
  assert cost["bytes accessed"] == 2 * 2 * (2 * 16 + 2 * 32) * HEADS * HEAD_DIM
  assert cost["flops"] == cached_attention.kernel_flops(2, 16, 32, HEADS, HEAD_DIM)
  assert hlo_costs.kernel_bytes(text) == 0                   # priced by the cost model already

  # With 16 fresh rows beside 24 cached ones: read and priced as well.
  fresh = lambda q, k, v, fk, fv: attend(q, k, v, end=24, fresh_k=fk, fresh_v=fv)
  cost = jax.jit(fresh).lower(spec(16), spec(LENGTH), spec(LENGTH), spec(16), spec(16)).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  assert cost["bytes accessed"] == 2 * 2 * (2 * 16 + 2 * (24 + 16)) * HEADS * HEAD_DIM
