"""The fused attention kernels (interpreted) inside shard_map over 8 devices equal XLA's attention:
batch split over data x fsdp, heads over tensor, forward and gradients; splash attention (16-wide
heads) and the lane-dense kernels (64-wide heads, one 128-lane column per device).

Run by tests/programs/eight_devices.py with 8 fake CPU devices."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from imagefolder_jax import parallel
from imagefolder_jax.models.layers import heads_first_attention
from imagefolder_jax.ops import block_causal_attention as kernel
from imagefolder_jax.ops.masks import block_causal_mask

SCALES = (1, 1, 2, 3)


def run() -> None:
  for head_dim, name in ((16, "splash_mha"), (64, "lane_dense_attention")):
    _check(head_dim, name)


def _check(head_dim: int, kernel_name: str) -> None:
  length = sum(s * s for s in SCALES)
  keys = jax.random.split(jax.random.key(0), 4)
  q, k, v, cotangent = (jax.random.normal(key, (4, length, 4, head_dim), jnp.float32) for key in keys)
  mesh = parallel.make_mesh(2, 2, 2)
  spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp"), None, "tensor"))
  q, k, v, cotangent = (jax.device_put(x, spec) for x in (q, k, v, cotangent))

  def loss(attend, a, b, c):
    return jnp.sum(attend(a, b, c) * cotangent)

  fused = lambda a, b, c: kernel.block_causal_attention(a, b, c, scales=SCALES, scale=0.5)
  xla = lambda a, b, c: heads_first_attention(a, b, c, scale=0.5,
                                              mask=jnp.asarray(block_causal_mask(SCALES))[None, None])
  with kernel.kernel_interpreted(), jax.set_mesh(mesh), nn.logical_axis_rules(parallel.LOGICAL_RULES):
    got = jax.jit(jax.value_and_grad(lambda *x: loss(fused, *x), argnums=(0, 1, 2)))(q, k, v)
    jaxpr = str(jax.make_jaxpr(jax.grad(lambda *x: loss(fused, *x), argnums=(0, 1, 2)))(q, k, v))
  want = jax.jit(jax.value_and_grad(lambda *x: loss(xla, *x), argnums=(0, 1, 2)))(q, k, v)
  assert "shard_map" in jaxpr and kernel_name in jaxpr, f"{kernel_name} did not run per device"
  np.testing.assert_allclose(float(got[0]), float(want[0]), rtol=1e-5)
  for a, b in zip(got[1], want[1]):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-5)
