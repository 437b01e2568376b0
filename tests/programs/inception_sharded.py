"""Inception features over 8 devices equal 1 (random weights).

Run by tests/programs/eight_devices.py with 8 fake CPU devices."""
import jax
import numpy as np

from imagefolder_jax.evaluation.features import InceptionFeatures
from imagefolder_jax.models.inception import FIDInception, InceptionConfig
from imagefolder_jax.parallel import make_mesh


def run() -> None:
  config = InceptionConfig(with_logits=True)
  variables = jax.jit(FIDInception(config).init)(jax.random.key(0), np.zeros((1, 299, 299, 3), np.float32))
  images = np.random.default_rng(0).integers(0, 256, (11, 64, 64, 3), dtype=np.uint8)
  one = InceptionFeatures(config, variables, mesh=make_mesh(devices=jax.devices()[:1]), per_device_batch=4)
  eight = InceptionFeatures(config, variables, mesh=make_mesh(), per_device_batch=1)
  assert eight.global_batch == 8
  a = one.extract([images[:5], images[5:]])          # 11 images: the last batch is padded
  b = eight.extract([images])
  for k in ("pool_3", "spatial", "logits"):
    assert a[k].shape[0] == 11, a[k].shape
    np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-5)
