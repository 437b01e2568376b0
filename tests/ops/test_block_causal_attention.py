"""The TPU attention kernel (splash attention under the block-causal mask), run in Pallas's
interpreter on CPU, against XLA's masked attention; its tile accounting for `plan`."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imagefolder_jax import parallel
from imagefolder_jax.models.layers import heads_first_attention
from imagefolder_jax.ops import block_causal_attention as kernel
from imagefolder_jax.ops.masks import block_causal_mask
from imagefolder_jax.planning import flops

SCALES = (1, 1, 2, 3, 5)   # a repeated scale, as the released 10-scale schedule has; L = 40 -> one 128 tile
RELEASED = (1, 1, 2, 3, 3, 4, 5, 6, 8, 11)


def _inputs(dtype, heads=3, head_dim=64, batch=2):
  length = sum(s * s for s in SCALES)
  keys = jax.random.split(jax.random.key(0), 4)
  return [jax.random.normal(k, (batch, length, heads, head_dim), jnp.float32).astype(dtype) for k in keys]


def _both(dtype, scale):
  q, k, v, cotangent = _inputs(dtype)
  mask = jnp.asarray(block_causal_mask(SCALES))[None, None]
  xla = lambda a, b, c: heads_first_attention(a, b, c, scale=scale, mask=mask)
  fused = lambda a, b, c: kernel.block_causal_attention(a, b, c, scales=SCALES, scale=scale)
  with kernel.kernel_interpreted():
    out, vjp = jax.vjp(fused, q, k, v)
    grads = vjp(cotangent)
  ref, ref_vjp = jax.vjp(xla, q, k, v)
  return (out, *grads), (ref, *ref_vjp(cotangent))


@pytest.mark.parametrize("query_tile", ["one unpadded tile", "padded 128-query tiles"])
def test_interpreted_kernel_equals_xla_attention_float32(query_tile, monkeypatch):
  if query_tile.startswith("padded"):   # what sequences over MAX_QUERY_TILE take
    monkeypatch.setattr(kernel, "MAX_QUERY_TILE", 32)
  assert kernel.tiling(40) == ((40, 128, 40) if query_tile.startswith("one") else (128, 128, 128))
  got, want = _both(jnp.float32, 0.3)
  for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
    assert a.dtype == b.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-5, err_msg=name)


def test_interpreted_kernel_equals_xla_attention_bfloat16():
  got, want = _both(jnp.bfloat16, 1.0)
  for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    # Both round the probabilities to bf16 before PV, in different orders of summation.
    assert np.abs(a - b).max() <= 0.02 * np.abs(b).max(), name


def test_kernel_per_device_under_a_mesh():
  """With a mesh and the training rules, the kernel runs inside shard_map over the batch shards."""
  q, k, v, _ = _inputs(jnp.float32)
  mesh = parallel.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  fused = jax.jit(lambda a, b, c: kernel.block_causal_attention(a, b, c, scales=SCALES, scale=1.0))
  with kernel.kernel_interpreted(), jax.set_mesh(mesh), nn.logical_axis_rules(parallel.LOGICAL_RULES):
    out = fused(q, k, v)
  ref = heads_first_attention(q, k, v, scale=1.0, mask=jnp.asarray(block_causal_mask(SCALES))[None, None])
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("topology,splash,lane_dense", [("v5e-4", True, True), ("v5p-8", True, True),
                                                         ("v6e-4", False, True)])
def test_kernel_chosen_by_the_compile_target(topology, splash, lane_dense):
  """Decided by the devices of the mesh being compiled for (compile-only TPUs here), not the host;
  v6e programs take the lane-dense kernels (16 heads of 64) but keep XLA's attention over splash (3
  heads of 64: not whole 128-lane columns)."""
  from imagefolder_jax.planning.topology import compile_only_devices, parse_topology
  devices = compile_only_devices(parse_topology(topology))
  assert not kernel.applies() and not kernel.applies((8, 286, 16, 64))   # this CPU host
  with jax.set_mesh(parallel.make_mesh(devices=devices)), nn.logical_axis_rules(parallel.LOGICAL_RULES):
    assert kernel.applies((8, 40, 3, 64)) is kernel.applies() is splash
    assert kernel.applies((8, 286, 16, 64)) is lane_dense


def test_wrong_sequence_length_is_refused():
  q, k, v, _ = _inputs(jnp.float32)
  with pytest.raises(ValueError, match="sequence length 40 is not that of scales"):
    kernel.block_causal_attention(q, k, v, scales=(1, 2), scale=1.0)


def test_padding_and_computed_pairs():
  length = sum(s * s for s in RELEASED)
  mask = kernel.padded_mask(RELEASED)
  assert length == 286 and kernel.tiling(length) == (286, 384, 286) and mask.shape == (286, 384)
  np.testing.assert_array_equal(mask[:, :length], block_causal_mask(RELEASED))
  assert not mask[:, length:].any()                                 # no query sees padding
  # One tile of all 286 queries x 128 keys per key block: the three blocks hold real keys.
  assert kernel.computed_pairs(RELEASED) == 3 * 286 * 128
  per_pair = 64 * 2 * 16
  assert kernel.kernel_flops("fwd", RELEASED, 2, 16, 64) == 4 * 3 * 286 * 128 * per_pair
  assert kernel.kernel_flops("dq", RELEASED, 2, 16, 64) + kernel.kernel_flops("dkv", RELEASED, 2, 16, 64) \
      == 14 * 3 * 286 * 128 * per_pair
  # Longer sequences: 128-query tiles, both sides padded; padding queries see only themselves, and
  # the tiles above the block diagonal that the mask removes are skipped.
  long = (1, 2, 4, 8, 16, 32)                                       # L = 1365 > MAX_QUERY_TILE
  mask = kernel.padded_mask(long)
  assert kernel.tiling(1365) == (1408, 1408, 128) and mask.shape == (1408, 1408)
  np.testing.assert_array_equal(mask[1365:], np.eye(1408, dtype=bool)[1365:])
  tiles = mask.reshape(11, 128, 11, 128).any(axis=(1, 3))
  assert kernel.computed_pairs(long) == tiles.sum() * 128 * 128 < 11 * 11 * 128 * 128


def test_kernel_flops_read_from_compiled_hlo():
  """`plan` prices each kernel call of a compiled program from its name and result shapes."""
  call = ' custom-call(%p), custom_call_target="tpu_custom_call"'
  hlo_text = "\n".join([
      "HloModule step",
      "ENTRY %main (p: bf16[2,16,384,64]) -> bf16[2,16,384,64] {",
      "  %p = bf16[2,16,384,64]{3,2,1,0} parameter(0)",
      "  %splash_mha_fwd_residuals.1 = (bf16[2,16,286,64]{3,2,1,0}, f32[2,16,286,128]{3,2,1,0})" + call,
      "  %splash_mha_dq_no_residuals.1 = (f32[2,286,64]{2,1,0}, bf16[2,16,286,64]{3,2,1,0})" + call,
      "  ROOT %splash_mha_dkv_no_residuals.1 = (bf16[2,16,384,64]{3,2,1,0}, bf16[2,16,384,64]{3,2,1,0})" + call,
      "}", ""])
  expected = sum(kernel.kernel_flops(kind, RELEASED, 2, 16, 64) for kind in ("fwd", "dq", "dkv"))
  assert flops.attention_kernel_flops(hlo_text, RELEASED, 64) == expected
  assert flops.attention_kernel_flops(hlo_text.replace("splash_mha_", "other_"), RELEASED, 64) == 0.0
  # A batch of one per device: the compiler drops that dimension from the kernel's results.
  one = hlo_text.replace("bf16[2,16,384,64]", "bf16[16,384,64]").replace("bf16[2,16,286,64]", "bf16[16,286,64]")
  assert flops.attention_kernel_flops(one, RELEASED, 64) == expected / 2
