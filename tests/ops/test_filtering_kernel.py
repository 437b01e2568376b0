"""The top-k / top-p draw kernel: interpreted on CPU against the XLA filter, and compiled for TPUs."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imagefolder_jax.ops import block_causal_attention, filtering, filtering_kernel

VOCAB = 256


def _logits(rows: int, seed: int = 0) -> jax.Array:
  """Normal logits with the cases the searches must get right: -inf entries, ties at every value,
  a row of one value, and -0 beside +0."""
  x = np.asarray(jax.random.normal(jax.random.key(seed), (rows, VOCAB)), np.float32) * 3
  x[1, :200] = -np.inf
  x[2] = np.round(x[2])
  x[3] = 0.5
  x[4, ::2], x[4, 1::2] = -0.0, 0.0
  return jnp.asarray(x)


@pytest.mark.parametrize("top_k, top_p, draws", [(20, 0.9, 5), (0, 0.8, 5), (20, 0.0, 5), (0, 0.0, 2), (1, 0.5, 5),
                                                  (VOCAB, 0.99, 5), (20, 0.3, 3), (0, 0.2, 2)])
def test_interpreted_kernel_draws_the_xla_paths_ids(top_k, top_p, draws):
  """With the same uniforms the kernel's ids are `sample_with_retries`' on this CPU (its rounds
  from the top-k law, then the exact top-p fallback: a small top-p and few uniforms reach the
  fallback in most rows), and each is one of the filters' survivors. 37 rows: the last grid step
  is partial."""
  logits = _logits(37)
  uniforms = jax.random.uniform(jax.random.key(1), (37, draws))
  with block_causal_attention.kernel_interpreted():
    got = jax.jit(lambda u, x: filtering_kernel.draw(u, x, top_k, top_p))(uniforms, logits)
  want = filtering.sample_with_retries(uniforms, logits, top_k, top_p)
  np.testing.assert_array_equal(got, want)
  mask = filtering.top_k_top_p_mask(logits, top_k, top_p)
  assert bool(jnp.take_along_axis(mask, got[:, None], axis=1).all())


def test_interpreted_kernel_draws_the_filtered_law():
  """Over many uniforms one row's draws follow softmax of its filtered logits (chi-square)."""
  logits = jnp.tile(_logits(8, seed=3)[:1], (4096, 1))
  uniforms = jax.random.uniform(jax.random.key(4), (4096, 3))
  with block_causal_attention.kernel_interpreted():
    ids = np.asarray(filtering_kernel.draw(uniforms, logits, 12, 0.9))
  probs = np.asarray(filtering.filtered_probs(logits[:1], 12, 0.9))[0]
  support = probs > 0
  assert set(np.unique(ids)) <= set(np.flatnonzero(support))
  counts = np.bincount(ids, minlength=VOCAB)[support]
  expected = probs[support] * len(ids)
  chi2 = float(np.sum((counts - expected) ** 2 / expected))
  assert chi2 < 3 * support.sum() + 30, (chi2, support.sum())


def test_sampler_filter_takes_the_kernel_where_it_applies():
  """`sample_with_retries` draws through the kernel in a TPU program (here: interpreted), the same
  ids as without; a traced top-p or a vocabulary not in 128-lane columns keeps XLA's path."""
  logits = _logits(16).reshape(2, 8, VOCAB)
  uniforms = jax.random.uniform(jax.random.key(2), (2, 8, 5))
  fn = lambda u, x: filtering.sample_with_retries(u, x, 20, 0.9)
  assert not filtering_kernel.applies(VOCAB, 0.9)                       # this CPU host
  with block_causal_attention.kernel_interpreted():
    program = str(jax.make_jaxpr(fn)(uniforms, logits))
    got = jax.jit(fn)(uniforms, logits)
    assert not filtering_kernel.applies(VOCAB, jnp.float32(0.9))
    assert not filtering_kernel.applies(200, 0.9)
  assert filtering_kernel.KERNEL_NAME in program
  np.testing.assert_array_equal(got, fn(uniforms, logits))
  with pytest.raises(ValueError, match="multiple of 128"):
    filtering_kernel.draw(uniforms, logits[..., :200], 20, 0.9)
  with pytest.raises(ValueError, match="2 uniforms"):
    filtering_kernel.draw(uniforms[..., :1], logits, 20, 0.9)


def test_compiled_for_tpus_per_batch_shard():
  """Compiled by Mosaic for a v5e-4 mesh: one kernel per chip on its rows (no collective), priced by
  the TPU cost model at its estimate: each row's logits and uniforms read once, its id written."""
  from jax.sharding import Mesh, NamedSharding
  from jax.sharding import PartitionSpec as P

  from imagefolder_jax.planning import hlo
  from imagefolder_jax.planning.topology import compile_only_devices, parse_topology
  mesh = Mesh(np.array(compile_only_devices(parse_topology("v5e-4"))), ("data",))
  rows = NamedSharding(mesh, P("data"))

  def fn(u, x):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return filtering.sample_with_retries(u, x, 750, 0.95)

  compiled = jax.jit(fn).lower(jax.ShapeDtypeStruct((8, 6, 2, 5), jnp.float32, sharding=rows),
                               jax.ShapeDtypeStruct((8, 6, 2, 4096), jnp.float32, sharding=rows)).compile()
  text = compiled.as_text()
  calls = hlo.custom_calls_named(text, filtering_kernel.KERNEL_NAME)
  assert [shapes for _, shapes, _ in calls] == [[[24, 1]]]   # per chip: 2 samples x 6 positions x 2 branches
  assert not [k for k in hlo.collectives(text, list(mesh.devices.flat)) if k != "unknown_trip_counts"]
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  kernel_bytes = 24 * 4096 * 4 + 24 * 5 * 4 + 24 * 4
  assert kernel_bytes <= cost["bytes accessed"] < kernel_bytes + 24 * 4096 * 4 * 3
  assert filtering_kernel.vector_ops(24, 4096, 750, 0.95) == 24 * 4096 * (32 + 32 + 12 + 8) * 3
