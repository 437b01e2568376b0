"""Tokenizer encode/decode with the batch sharded over 8 fake CPU devices equals one device."""
import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np, jax
    import imagefolder_jax as ifj
    from imagefolder_jax.parallel import make_mesh
    bundle, expected = sys.argv[1], np.load(sys.argv[2])
    assert jax.device_count() == 8, jax.devices()
    images = np.concatenate([expected["images"]] * 4).transpose(0, 2, 3, 1)   # B = 8
    single = ifj.Tokenizer.load(bundle)
    mesh = make_mesh()
    sharded = ifj.Tokenizer.load(bundle, mesh=mesh)
    a, b = single.encode(images), sharded.encode(images)
    np.testing.assert_array_equal(a.flat(), b.flat())
    assert len(b.ids[0][-1].sharding.device_set) == 8
    ra, rb = single.decode(a), sharded.decode(b)
    np.testing.assert_allclose(np.asarray(ra), np.asarray(rb), atol=1e-5)
    assert len(rb.sharding.device_set) == 8
    np.testing.assert_allclose(np.asarray(sharded.reconstruct(images)), np.asarray(ra), atol=1e-5)
    print("OK")
""")


def test_tokenizer_sharded_over_8_devices(parity_bundle, tmp_path):
  from conftest import PARITY_DIR
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  script = tmp_path / "sharded.py"
  script.write_text(SCRIPT)
  result = subprocess.run([sys.executable, str(script), parity_bundle, os.path.join(PARITY_DIR, "expected.npz")],
                          env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "OK" in result.stdout
