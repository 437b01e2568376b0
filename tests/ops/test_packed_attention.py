"""The tokenizer ViT's packed-projection attention kernel for the sampler's decode: run in Pallas's
interpreter on CPU against the same arithmetic in XLA, when it applies, and its compile for TPUs."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imagefolder_jax.models.layers import heads_first_attention
from imagefolder_jax.ops import block_causal_attention, packed_attention

HEADS, HEAD_DIM = 4, 64


def _qkv(dtype, length, batch=2):
  return jax.random.normal(jax.random.key(length), (batch, length, 3 * HEADS * HEAD_DIM)).astype(dtype)


def _split(qkv):
  return (qkv.reshape(*qkv.shape[:2], 3, HEADS, HEAD_DIM)[:, :, i] for i in range(3))


def _reference(qkv, scale):
  """float32 logits and softmax over bfloat16 operands (the MXU's at XLA's default precision on TPUs)."""
  bf16 = lambda a: a.astype(jnp.bfloat16).astype(jnp.float32)
  q, k, v = (bf16(a) for a in _split(qkv))
  logits = jnp.einsum("bthd,bshd->bhts", q, k, precision="highest") * scale
  probs = bf16(jax.nn.softmax(logits, axis=-1))
  out = jnp.einsum("bhts,bshd->bthd", probs, v, precision="highest")
  return out.reshape(qkv.shape[0], qkv.shape[1], -1)


@pytest.mark.parametrize("length", [1, 13, 40])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_interpreted_kernel_equals_xla_attention(length, dtype):
  qkv = _qkv(dtype, length)
  with block_causal_attention.kernel_interpreted():
    got = packed_attention.packed_attention(qkv, heads=HEADS, head_dim=HEAD_DIM, scale=0.125)
  assert got.dtype == dtype and got.shape == (2, length, HEADS * HEAD_DIM)
  got = np.asarray(got, np.float32)
  np.testing.assert_allclose(got, _reference(qkv.astype(jnp.float32), 0.125), rtol=1e-2 if dtype == jnp.bfloat16
                             else 2e-5, atol=1e-2 if dtype == jnp.bfloat16 else 2e-5)
  # The same function as the ViT's attention, to the rounding of the MXU's bfloat16 operands.
  want = heads_first_attention(*_split(qkv), scale=0.125).reshape(got.shape)
  np.testing.assert_allclose(got, np.asarray(want, np.float32), rtol=3e-2, atol=3e-2)


def test_kernel_applies_forward_only_on_tpus_at_default_precision():
  from imagefolder_jax import parallel
  from imagefolder_jax.planning.topology import compile_only_devices, parse_topology
  applies = packed_attention.applies
  with jax.set_mesh(parallel.make_mesh(devices=compile_only_devices(parse_topology("v5e-4")))):
    assert not applies(jnp.float32, 12, 64)                            # a gradient may be taken
    with packed_attention.forward_only():
      assert applies(jnp.float32, 12, 64) and applies(jnp.bfloat16, 16, 64)
      assert not applies(jnp.float32, 3, 64)                           # 192 lanes: no whole 128-lane columns
      with jax.default_matmul_precision("highest"):                     # float32-exact matmuls asked for
        assert not applies(jnp.float32, 12, 64)
      with block_causal_attention.xla_attention():
        assert not applies(jnp.float32, 12, 64)
  with packed_attention.forward_only():
    assert not applies(jnp.float32, 12, 64)                            # this CPU host


def test_vit_attention_takes_the_kernel_in_the_forward_only_scope():
  from imagefolder_jax.models.vit import Attention
  module = Attention(HEADS * HEAD_DIM, HEADS)
  x = jax.random.normal(jax.random.key(1), (2, 9, HEADS * HEAD_DIM))
  variables = module.init(jax.random.key(0), x)
  with block_causal_attention.kernel_interpreted(), packed_attention.forward_only():
    program = str(jax.make_jaxpr(module.apply)(variables, x))
    got = module.apply(variables, x)
  assert "pallas_call" in program and packed_attention.KERNEL_NAME in program
  assert "pallas_call" not in str(jax.make_jaxpr(module.apply)(variables, x))
  np.testing.assert_allclose(got, module.apply(variables, x), rtol=3e-2, atol=3e-2)


def test_refuses_a_projection_that_is_not_q_k_v():
  with pytest.raises(ValueError, match="not q, k and v"):
    packed_attention.packed_attention(_qkv(jnp.float32, 4)[..., :-128], heads=HEADS, head_dim=HEAD_DIM, scale=1.0)
  with pytest.raises(ValueError, match="whole"):
    packed_attention.packed_attention(_qkv(jnp.float32, 4)[..., :3 * 192], heads=3, head_dim=HEAD_DIM, scale=1.0)


def test_compiled_for_tpus_per_batch_shard():
  """Under a 4-chip mesh the kernel runs per batch shard and the TPU cost model prices it by its
  estimate: the projection read once and the result written once (float32), and the MXU work."""
  from jax.sharding import Mesh, NamedSharding
  from jax.sharding import PartitionSpec as P

  from imagefolder_jax.ops import cached_attention
  from imagefolder_jax.planning import hlo
  from imagefolder_jax.planning.topology import compile_only_devices, parse_topology
  mesh = Mesh(np.array(compile_only_devices(parse_topology("v5e-4"))), ("data",))
  spec = jax.ShapeDtypeStruct((8, 40, 3 * HEADS * HEAD_DIM), jnp.float32, sharding=NamedSharding(mesh, P("data")))

  def fn(qkv):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return packed_attention.packed_attention(qkv, heads=HEADS, head_dim=HEAD_DIM, scale=1.0)

  compiled = jax.jit(fn).lower(spec).compile()
  text = compiled.as_text()
  assert [shapes for _, shapes, _ in hlo.custom_calls_named(text, packed_attention.KERNEL_NAME)] == \
      [[[2, 40, HEADS * HEAD_DIM]]]
  assert not [k for k in hlo.collectives(text, list(mesh.devices.flat)) if k != "unknown_trip_counts"]
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  assert cost["bytes accessed"] == 4 * 2 * 40 * HEADS * HEAD_DIM * 4
  assert cost["flops"] == cached_attention.kernel_flops(2, 40, 40, HEADS, HEAD_DIM)
