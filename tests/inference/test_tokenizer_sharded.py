"""Tokenizer encode/decode with the batch sharded over 8 fake CPU devices equals one device."""
import os
import subprocess
import sys

from support import PROGRAMS


def test_tokenizer_sharded_over_8_devices(parity_bundle, tmp_path):
  from support import PARITY_DIR
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  script = os.path.join(PROGRAMS, "tokenizer_sharded.py")
  result = subprocess.run([sys.executable, script, parity_bundle, os.path.join(PARITY_DIR, "expected.npz")],
                          env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "OK" in result.stdout
