"""Generator.sample over 8 devices equals 1 (the micro bundle).

Run by tests/programs/eight_devices.py with 8 fake CPU devices."""
import numpy as np

from imagefolder_jax.inference.generator import Generator
from imagefolder_jax.parallel import make_mesh


def run(bundle: str) -> None:
  single = Generator.load(bundle)
  sharded = Generator.load(bundle, mesh=make_mesh())
  labels = np.arange(8) % 10
  rng = np.random.default_rng(0)
  detail = [rng.integers(0, 64, (8, s, s)) for s in (1, 2, 3)]
  a = single.sample(labels, seed=3, cfg=2.0, top_k=8, top_p=0.9, force={0: detail})
  b = sharded.sample(labels, seed=3, cfg=2.0, top_k=8, top_p=0.9, force={0: detail})
  np.testing.assert_array_equal(a.codes.flat(), b.codes.flat())
  np.testing.assert_allclose(np.asarray(a.images), np.asarray(b.images), atol=1e-5)
  assert len(b.images.sharding.device_set) == 8
