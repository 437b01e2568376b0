"""The lane-dense block-causal attention kernels (forward, backward), run in Pallas's interpreter on
CPU against XLA's masked attention, when `block_causal_attention` takes them, and their TPU compile."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imagefolder_jax import parallel
from imagefolder_jax.models.layers import heads_first_attention
from imagefolder_jax.ops import block_causal_attention, lane_dense_attention
from imagefolder_jax.ops.masks import block_causal_mask

SCALES = (1, 1, 2, 3, 5)   # L = 40, a repeated scale as in the released schedule
RELEASED = (1, 1, 2, 3, 3, 4, 5, 6, 8, 11)


def _inputs(dtype, heads, head_dim, batch=2, scales=SCALES):
  length = sum(s * s for s in scales)
  keys = jax.random.split(jax.random.key(0), 4)
  return [jax.random.normal(k, (batch, length, heads, head_dim), jnp.float32).astype(dtype) for k in keys]


def _both(dtype, scale, heads, head_dim):
  """(kernel's out, dq, dk, dv), (XLA's) for one cotangent; (B, L, H, D) arrays."""
  q, k, v, cotangent = _inputs(dtype, heads, head_dim)
  b, length = q.shape[:2]
  flat = lambda x: x.reshape(b, length, heads * head_dim)
  fused = lambda a, b_, c: lane_dense_attention.lane_dense_attention(
      flat(a), flat(b_), flat(c), scales=SCALES, head_dim=head_dim, scale=scale, interpret=True).reshape(q.shape)
  xla = lambda a, b_, c: heads_first_attention(a, b_, c, scale=scale,
                                               mask=jnp.asarray(block_causal_mask(SCALES))[None, None])
  out, vjp = jax.vjp(fused, q, k, v)
  ref, ref_vjp = jax.vjp(xla, q, k, v)
  return (out, *vjp(cotangent)), (ref, *ref_vjp(cotangent))


@pytest.mark.parametrize("heads,head_dim", [(4, 64), (4, 32), (1, 128)])
def test_interpreted_kernels_equal_xla_attention_float32(heads, head_dim):
  got, want = _both(jnp.float32, 0.3, heads, head_dim)
  for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
    assert a.dtype == b.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-5, err_msg=name)


def test_interpreted_kernels_equal_xla_attention_bfloat16():
  got, want = _both(jnp.bfloat16, 1.0, 4, 64)
  for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
    assert a.dtype == jnp.bfloat16, name
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    # Both round the probabilities to bf16 before PV; the backward's products accumulate differently.
    assert np.abs(a - b).max() <= 0.02 * np.abs(b).max(), name


def test_which_shapes_the_kernels_take():
  assert lane_dense_attention.supported(286, 16, 64)          # the released d16 schedule
  assert lane_dense_attention.supported(286, 1, 128)
  assert not lane_dense_attention.supported(286, 3, 64)       # 192 lanes: not whole 128-lane columns
  assert not lane_dense_attention.supported(lane_dense_attention.MAX_LENGTH + 1, 16, 64)
  assert lane_dense_attention.kernel_flops("fwd", 2, 286, 16, 64) == 2 * 2 * 286 * 286 * 128 * 16 * 2
  with pytest.raises(ValueError, match="do not match scales"):
    q = jnp.zeros((1, 40, 128), jnp.bfloat16)
    lane_dense_attention.lane_dense_attention(q, q, q, scales=(1, 2), head_dim=64, scale=1.0)
  with pytest.raises(ValueError, match="whole 128-lane columns"):
    q = jnp.zeros((1, 40, 192), jnp.bfloat16)
    lane_dense_attention.lane_dense_attention(q, q, q, scales=SCALES, head_dim=64, scale=1.0)


@pytest.mark.parametrize("heads,head_dim,kernel_name", [(4, 64, "lane_dense_attention"), (3, 64, "splash_mha")])
def test_block_causal_attention_takes_them_for_whole_columns(heads, head_dim, kernel_name):
  """`block_causal_attention` runs the lane-dense kernels where heads make whole 128-lane columns
  (per device, under a mesh), splash attention elsewhere; both equal XLA's attention."""
  q, k, v, _ = _inputs(jnp.float32, heads, head_dim)
  fused = lambda a, b, c: block_causal_attention.block_causal_attention(a, b, c, scales=SCALES, scale=1.0)
  mesh = parallel.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  with block_causal_attention.kernel_interpreted(), jax.set_mesh(mesh), nn.logical_axis_rules(parallel.LOGICAL_RULES):
    out = jax.jit(fused)(q, k, v)
    jaxpr = str(jax.make_jaxpr(jax.grad(lambda *x: jnp.sum(fused(*x) ** 2), argnums=(0, 1, 2)))(q, k, v))
  assert kernel_name in jaxpr and "shard_map" in jaxpr
  ref = heads_first_attention(q, k, v, scale=1.0, mask=jnp.asarray(block_causal_mask(SCALES))[None, None])
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=2e-5, atol=2e-5)


def test_compiled_for_tpus_per_batch_shard():
  """The released schedule's step (forward and backward) compiled for 4 v5e chips: per batch shard,
  no collectives, no splash kernel, and the TPU cost model prices both kernels by their estimates."""
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  from imagefolder_jax.planning import hlo, hlo_costs
  from imagefolder_jax.planning.topology import compile_only_devices, parse_topology
  mesh = parallel.make_mesh(devices=compile_only_devices(parse_topology("v5e-4")))
  length, heads, head_dim = sum(s * s for s in RELEASED), 16, 64
  spec = jax.ShapeDtypeStruct((8, length, heads, head_dim), jnp.bfloat16,
                              sharding=NamedSharding(mesh, P(("data", "fsdp"))))

  def loss(q, k, v):
    with nn.logical_axis_rules(parallel.LOGICAL_RULES):
      out = block_causal_attention.block_causal_attention(q, k, v, scales=RELEASED, scale=1.0)
    return jnp.sum(out.astype(jnp.float32) ** 2)   # the backward needs the forward's output

  with jax.set_mesh(mesh):
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(spec, spec, spec).compile()
  text = compiled.as_text()
  calls = hlo.custom_calls_named(text, "")
  names = sorted(n for n, _, _ in calls if "lane_dense_attention" in n)
  assert len(names) == 2 and not [n for n, _, _ in calls if "splash" in n], [n for n, _, _ in calls]
  assert not hlo.collectives(text, list(mesh.devices.flat))
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  kernels = sum(lane_dense_attention.kernel_flops(kind, 2, length, heads, head_dim) for kind in ("fwd", "bwd"))
  assert kernels <= cost["flops"] <= 1.01 * kernels        # 2 sequences per chip; the rest is elementwise
  assert hlo_costs.kernel_bytes(text) == 0                   # priced by the cost model already


def test_the_longest_sequence_compiles_for_v5e():
  """Scoped VMEM holds the backward kernel's (L, L) arrays up to MAX_LENGTH (1004 tokens here)."""
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  from imagefolder_jax.planning.topology import compile_only_devices, parse_topology
  scales = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16, 18)
  length = sum(s * s for s in scales)
  assert length <= lane_dense_attention.MAX_LENGTH < length + 18 * 18
  mesh = parallel.make_mesh(devices=compile_only_devices(parse_topology("v5e-4"))[:1])
  spec = jax.ShapeDtypeStruct((1, length, 128), jnp.bfloat16, sharding=NamedSharding(mesh, P()))

  def loss(q, k, v):
    out = lane_dense_attention.lane_dense_attention(q, k, v, scales=scales, head_dim=64, scale=1.0)
    return jnp.sum(out.astype(jnp.float32) ** 2)

  jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(spec, spec, spec).compile()
