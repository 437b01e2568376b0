"""Tokenizer encode/decode over 8 devices equals 1 (the official tiny bundle and its inputs).

Run by tests/programs/eight_devices.py with 8 fake CPU devices."""
import numpy as np

import imagefolder_jax as ifj
from imagefolder_jax.parallel import make_mesh


def run(bundle: str, expected_npz: str) -> None:
  expected = np.load(expected_npz)
  images = np.concatenate([expected["images"]] * 4).transpose(0, 2, 3, 1)   # B = 8
  single = ifj.Tokenizer.load(bundle)
  sharded = ifj.Tokenizer.load(bundle, mesh=make_mesh())
  a, b = single.encode(images), sharded.encode(images)
  np.testing.assert_array_equal(a.flat(), b.flat())
  assert len(b.ids[0][-1].sharding.device_set) == 8
  ra, rb = single.decode(a), sharded.decode(b)
  np.testing.assert_allclose(np.asarray(ra), np.asarray(rb), atol=1e-5)
  assert len(rb.sharding.device_set) == 8
  np.testing.assert_allclose(np.asarray(sharded.reconstruct(images)), np.asarray(ra), atol=1e-5)
