"""Tokenizer encode/decode with the batch sharded over 8 fake CPU devices equals one device."""
import os

from support import PARITY_DIR, run_program


def test_tokenizer_sharded_over_8_devices(parity_bundle):
  result = run_program("tokenizer_sharded.py", parity_bundle, os.path.join(PARITY_DIR, "expected.npz"), devices=8)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "OK" in result.stdout
