"""Inception features sharded over 8 fake CPU devices equal one device (random-weight network)."""
from support import run_program


def test_inception_features_sharded_over_8_devices():
  result = run_program("inception_sharded.py", devices=8)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "OK" in result.stdout
