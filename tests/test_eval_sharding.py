"""Inception features sharded over 8 fake CPU devices equal one device (random-weight network)."""
import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import numpy as np, jax
    from imagefolder_jax.evaluation.features import InceptionFeatures
    from imagefolder_jax.models.inception import FIDInception, InceptionConfig
    from imagefolder_jax.parallel import make_mesh
    assert jax.device_count() == 8, jax.devices()
    config = InceptionConfig(with_logits=True)
    variables = FIDInception(config).init(jax.random.key(0), np.zeros((1, 299, 299, 3), np.float32))
    images = np.random.default_rng(0).integers(0, 256, (11, 64, 64, 3), dtype=np.uint8)
    one = InceptionFeatures(config, variables, mesh=make_mesh(devices=jax.devices()[:1]), per_device_batch=4)
    eight = InceptionFeatures(config, variables, mesh=make_mesh(), per_device_batch=1)
    assert eight.global_batch == 8
    a = one.extract([images[:5], images[5:]])          # 11 images: the last batch is padded
    b = eight.extract([images])
    for k in ("pool_3", "spatial", "logits"):
      assert a[k].shape[0] == 11, a[k].shape
      np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-5)
    print("OK")
""")


def test_inception_features_sharded_over_8_devices(tmp_path):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  script = tmp_path / "sharded.py"
  script.write_text(SCRIPT)
  result = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "OK" in result.stdout
