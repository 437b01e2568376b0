"""The rules table, mesh settings and `plan`'s input checks (no compiles; the compiled plan on 8
devices is checked in test_train_sharding.py)."""
import pytest
from jax.sharding import PartitionSpec as P

from imagefolder_jax import parallel, planning


def test_fit_spec_replicates_what_the_mesh_does_not_divide():
  mesh = {"data": 2, "fsdp": 4, "tensor": 2}
  assert parallel.fit_spec(mesh, P("fsdp", "tensor"), (64, 6)) == P("fsdp", "tensor")
  assert parallel.fit_spec(mesh, P("fsdp", "tensor"), (6, 3)) == P(None, None)      # 6 % 4, 3 % 2
  assert parallel.fit_spec(mesh, P(("data", "fsdp"), None), (16, 5)) == P(("data", "fsdp"), None)
  assert parallel.fit_spec(mesh, P(("data", "fsdp"),), (12,)) == P(None)             # 12 % 8
  assert parallel.fit_spec(mesh, None, (3, 3)) == P()


def test_rules_override_wins_and_is_validated():
  rules = parallel.rules_from_config((("mlp", None), ("embed", ("fsdp", "tensor"))))
  import flax.linen as nn
  assert nn.logical_to_mesh_axes(("embed", "mlp"), rules) == P(("fsdp", "tensor"), None)
  assert nn.logical_to_mesh_axes(("embed", "mlp"), parallel.LOGICAL_RULES) == P("fsdp", "tensor")
  with pytest.raises(parallel.MeshConfigError, match="'model'"):
    parallel.rules_from_config((("mlp", "model"),))
  with pytest.raises(parallel.MeshConfigError, match="unknown mesh settings"):
    parallel.mesh_from_config({"data": 1, "expert": 2})


def test_mesh_sizes_must_match_the_devices():
  import jax
  with pytest.raises(parallel.MeshConfigError, match="fsdp=3"):
    parallel.make_mesh(-1, 3, 1, devices=jax.devices()[:1] * 4)
  with pytest.raises(parallel.MeshConfigError, match="dcn"):
    parallel.make_mesh(1, 1, 1, dcn_data=3, devices=jax.devices()[:1] * 2)


def test_parse_mesh_and_chip_errors_name_the_value():
  assert planning.parse_mesh("data=2,fsdp=4,tensor=1") == {"data": 2, "fsdp": 4, "tensor": 1}
  assert planning.parse_mesh("fsdp=8,dcn_data=4") == {"fsdp": 8, "dcn_data": 4}
  with pytest.raises(planning.PlanError, match="'x'"):
    planning.parse_mesh("data=x")
  with pytest.raises(planning.PlanError, match="'model=2'"):
    planning.parse_mesh("model=2")
  with pytest.raises(planning.PlanError, match="'h900'"):
    planning.chip_peak_and_memory("h900")
  assert planning.chip_peak_and_memory("v5p") == (459e12, 95.74 * 2 ** 30)   # what the TPU compiler allows


def test_a_logical_name_on_two_dimensions_maps_once():
  """The quantizer's latent->latent convs carry ('latent', 'latent'); flax refuses duplicates."""
  import flax.linen as nn
  import jax
  rules = parallel.rules_from_config((("latent", "fsdp"),))
  mesh = parallel.make_mesh(devices=jax.devices()[:1])
  boxed = {"phi": nn.Partitioned(jax.ShapeDtypeStruct((3, 3, 8, 8), "float32"), (None, None, "latent", "latent"))}
  assert parallel.logical_shardings(mesh, boxed, rules)["phi"].spec == P(None, None, "fsdp", None)
