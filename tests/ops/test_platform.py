"""Platform-specific code paths follow the devices a program is compiled for (ops/platform.py)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imagefolder_jax.models.layers import attention_implementation
from imagefolder_jax.ops import filtering
from imagefolder_jax.ops.platform import compiling_for, normalize, platform_of, target_platform


def test_platform_of_meshes_devices_and_names():
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
  assert platform_of(mesh) == platform_of(jax.devices()[0]) == platform_of(None) == "cpu"
  assert [normalize(p) for p in ("cuda", "rocm", "TPU", "cpu")] == ["gpu", "gpu", "tpu", "cpu"]
  with pytest.raises(ValueError, match="unknown platform"):
    normalize("metal-x")


def test_target_follows_compiling_for_then_the_set_mesh_then_the_backend():
  assert target_platform() == "cpu"
  with compiling_for("tpu"):
    assert target_platform() == "tpu"
    with compiling_for("cuda"):
      assert target_platform() == "gpu"
    assert target_platform() == "tpu"
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
  with jax.set_mesh(mesh):
    seen = []
    jax.jit(lambda x: seen.append(target_platform()) or x)(1.0)
    assert seen == ["cpu"]


def test_cpu_only_paths_are_left_out_of_other_targets(monkeypatch):
  # The filter's cache-sized chunks (a lax.map over row chunks) and the tree-reduction option are
  # XLA:CPU's; a TPU or GPU program gets one wide pass and no option.
  assert filtering.compiler_options("cpu") and filtering.compiler_options("tpu") == {}
  assert filtering.compiler_options("gpu") == {}
  logits = jnp.zeros((600, 64))

  def loops(platform):
    with compiling_for(platform):
      jaxpr = jax.make_jaxpr(lambda x: filtering.top_k_top_p_mask(x, 5, 0.9))(logits)
    return str(jaxpr).count("scan[") + str(jaxpr).count("while[")

  assert loops("tpu") < loops("cpu")
  # cuDNN's fused attention is chosen for GPU targets only (16-bit, head size <= 128, multiple of 8),
  # where cuDNN can build it; a deviceless GPU compile (no cuDNN, no GPU) gets XLA's.
  from imagefolder_jax.models import layers
  assert attention_implementation(jnp.bfloat16, 64) == "xla"
  with compiling_for("gpu"):
    assert attention_implementation(jnp.bfloat16, 64) == "xla" and not layers.cudnn_attention_available()
    monkeypatch.setattr(layers, "cudnn_attention_available", lambda: True)  # as on a GPU node
    assert attention_implementation(jnp.bfloat16, 64) == "cudnn"
    assert attention_implementation(jnp.float32, 64) == "xla"
    assert attention_implementation(jnp.bfloat16, 256) == "xla"
