"""planning.hlo_costs: a compiled loop's FLOPs and bytes counted per trip, against the TPU cost
model's count of the same program unrolled (compile-only v5e device; the tpu extra)."""
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from imagefolder_jax import planning
from imagefolder_jax.planning import hlo_costs

TRIPS = 8


def _layer(i, c, w):
  return jnp.tanh(c @ w[i]) * 1.5 + c


def _looped(w, x):
  return jax.lax.fori_loop(0, TRIPS, lambda i, c: _layer(i, c, w), x)


def _unrolled(w, x):
  for i in range(TRIPS):
    x = _layer(i, x, w)
  return x


def _until_small(w, x):  # a data-dependent trip count: the compiler cannot know it
  return jax.lax.while_loop(lambda c: jnp.abs(c).sum() > 1.0, lambda c: _layer(0, c, w), x)


def _compile(fn):
  devices = planning.compile_only_devices(planning.parse_topology("v5e-1"))
  placed = NamedSharding(Mesh(np.asarray(devices), ("x",)), P())
  args = (jax.ShapeDtypeStruct((TRIPS, 1024, 1024), jnp.bfloat16, sharding=placed),
          jax.ShapeDtypeStruct((4096, 1024), jnp.bfloat16, sharding=placed))
  from jax._src import config as jax_config
  with jax_config.enable_compilation_cache(False):   # compile-only programs cannot be cached
    compiled = jax.jit(fn).lower(*args).compile()
  cost = compiled.cost_analysis()
  return compiled.as_text(), cost[0] if isinstance(cost, (list, tuple)) else cost


def test_loop_scales_turn_the_cost_models_once_priced_body_into_the_program_as_run():
  looped_text, looped = _compile(_looped)
  unrolled_text, unrolled = _compile(_unrolled)
  assert looped["flops"] < unrolled["flops"] / (TRIPS - 1)   # the cost model prices the body once
  scales = hlo_costs.loop_scales(looped_text)
  assert abs(scales["flops"] - TRIPS) < 0.05 * TRIPS, scales
  np.testing.assert_allclose(looped["flops"] * scales["flops"], unrolled["flops"], rtol=0.02)
  # Bytes are an estimate (the counts here take a sliced operand whole; measured +7%).
  np.testing.assert_allclose(looped["bytes accessed"] * scales["bytes"], unrolled["bytes accessed"], rtol=0.2)
  assert hlo_costs.loop_scales(unrolled_text) is None
  rows = hlo_costs.instruction_flops(unrolled_text)
  np.testing.assert_allclose(sum(r["flops"] for r in rows), 2 * TRIPS * 4096 * 1024 * 1024, rtol=1e-6)


def test_a_loop_of_unknown_trip_count_is_counted_once():
  text, _ = _compile(_until_small)
  assert hlo_costs.loop_scales(text) is None


def test_roofline_scales_the_cost_models_counts_by_the_loop_scale():
  from imagefolder_jax.planning.chips import CHIPS
  from imagefolder_jax.planning.planner import roofline
  chip = CHIPS["v5e"]
  fields = {"xla_flops_per_device": 1e12, "bytes_accessed": 1e10, "collectives": {}}
  once = roofline(fields, chip, analytic_flops_per_chip=0.0)
  scaled = roofline({**fields, "loop_scale": {"flops": 2.0, "bytes": 1.5}}, chip, analytic_flops_per_chip=0.0)
  assert scaled["flops_per_chip"] == 2e12 and scaled["compute_seconds"] == 2 * once["compute_seconds"]
  assert np.isclose(scaled["memory_seconds"], 1.5 * once["memory_seconds"])


def _doubled(estimate):
  from jax.experimental import pallas as pl

  def kernel(x_ref, o_ref):
    o_ref[...] = x_ref[...] * 2

  def fn(w, x):
    return pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype), grid=(8,),
                          in_specs=[pl.BlockSpec((512, 1024), lambda i: (i, 0))],
                          out_specs=pl.BlockSpec((512, 1024), lambda i: (i, 0)), cost_estimate=estimate)(x)
  return fn


def test_a_pallas_kernel_costs_nothing_to_the_cost_model_unless_it_has_an_estimate():
  """Without an estimate the TPU cost model prices a kernel at 0: `kernel_bytes` counts its operand
  and result (4096 x 1024 bf16 each), which `plan` adds. With one, the model takes the estimate."""
  from jax.experimental import pallas as pl
  text, cost = _compile(_doubled(None))
  assert not cost.get("bytes accessed") and not cost.get("flops")
  assert hlo_costs.kernel_bytes(text) == 2 * 4096 * 1024 * 2
  text, cost = _compile(_doubled(pl.CostEstimate(flops=4096 * 1024, transcendentals=0, bytes_accessed=10 ** 7)))
  assert cost["bytes accessed"] == 10 ** 7 and cost["flops"] == 4096 * 1024
  assert hlo_costs.kernel_bytes(text) == 0
  assert [r["bytes"] for r in hlo_costs.instruction_bytes(text) if r["estimated"]] == [10 ** 7]


def test_an_in_place_update_counts_its_update_not_its_buffer():
  """A dynamic-update-slice of one row into the (TRIPS, 1024, 1024) buffer: the cost model and the
  count both price the row (read and written), not the 16 MiB buffer."""
  def fn(w, x):
    return jax.lax.dynamic_update_slice(w, x[:1].reshape(1, 1, 1024), (0, 3, 0))
  devices = planning.compile_only_devices(planning.parse_topology("v5e-1"))
  placed = NamedSharding(Mesh(np.asarray(devices), ("x",)), P())
  args = (jax.ShapeDtypeStruct((TRIPS, 1024, 1024), jnp.bfloat16, sharding=placed),
          jax.ShapeDtypeStruct((4096, 1024), jnp.bfloat16, sharding=placed))
  compiled = jax.jit(fn, donate_argnums=0).lower(*args).compile()
  rows = [r for r in hlo_costs.instruction_bytes(compiled.as_text()) if r["op"] == "dynamic-update-slice"]
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  assert rows and all(r["bytes"] < 2 ** 16 for r in rows) and cost["bytes accessed"] < 2 ** 16
