"""Tokenizer encode/decode over 8 devices equals 1 (the micro bundle, random images).

Run by tests/programs/eight_devices.py with 8 fake CPU devices."""
import numpy as np

import imagefolder_jax as ifj
from imagefolder_jax.parallel import make_mesh


def run(bundle: str) -> None:
  single = ifj.Tokenizer.load(bundle)
  sharded = ifj.Tokenizer.load(bundle, mesh=make_mesh())
  r = single.resolution
  images = np.random.default_rng(0).uniform(-1, 1, (8, r, r, 3)).astype(np.float32)
  a, b = single.encode(images), sharded.encode(images)
  np.testing.assert_array_equal(a.flat(), b.flat())
  assert len(b.ids[0][-1].sharding.device_set) == 8
  ra, rb = single.decode(a), sharded.decode(b)
  np.testing.assert_allclose(np.asarray(ra), np.asarray(rb), atol=1e-5)
  assert len(rb.sharding.device_set) == 8
  np.testing.assert_allclose(np.asarray(sharded.reconstruct(images)), np.asarray(ra), atol=1e-5)
