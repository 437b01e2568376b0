"""Inception features sharded over 8 fake CPU devices equal one device (random-weight network)."""
import os
import subprocess
import sys

from support import PROGRAMS


def test_inception_features_sharded_over_8_devices(tmp_path):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  script = os.path.join(PROGRAMS, "inception_sharded.py")
  result = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "OK" in result.stdout
