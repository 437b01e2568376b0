"""eval-generator's sampling loop: labels round-robin, uint8 by rounding, resumable shards whose
content does not depend on the batch size (a deterministic stand-in for Generator.sample)."""
import types

import numpy as np
import pytest

from imagefolder_jax.evaluation import generation


class FakeGenerator:
  """Image of sample i = a constant (i * 0.37 mod 2) - 1 image; counts calls."""
  def __init__(self):
    self.config = types.SimpleNamespace(num_classes=5)
    self.mesh = None
    self.calls = 0

  def sample(self, labels, seed, cfg, top_k, top_p, temperature, indices, force=None, dtype=None):
    self.calls += 1
    values = ((np.asarray(indices) * 0.37 + seed) % 2.0) - 1.0
    images = np.broadcast_to(values[:, None, None, None], (len(labels), 4, 4, 3)).astype(np.float32)
    return types.SimpleNamespace(images=images)


class FakeFeatures:
  """`InceptionFeatures`' interface: at most `local_batch` images per call (one process: its own)."""
  local_batch = 2

  def __call__(self, images):
    images = np.asarray(images, np.float32)
    assert len(images) <= self.local_batch
    flat = images.reshape(len(images), int(np.prod(images.shape[1:])))
    return {"pool_3": flat[:, :8], "spatial": flat[:, :4]}


def test_to_uint8_rounds_half_up():
  x = np.array([-1.0, 1.0, 2.0, -2.0, (0.5 / 127.5) - 1.0, (1.4999 / 127.5) - 1.0], np.float32)
  np.testing.assert_array_equal(generation.to_uint8(x), [0, 255, 255, 0, 1, 1])


def test_shards_resume_and_do_not_depend_on_batch_size(tmp_path):
  run = generation.SampleRun(num_samples=7, shard_size=3, classes=(1, 3))
  gen = FakeGenerator()
  a = generation.generate_samples(gen, FakeFeatures(), run, str(tmp_path / "a"), batch_size=2)
  np.testing.assert_array_equal(a["labels"], [1, 3, 1, 3, 1, 3, 1])
  first_calls = gen.calls
  again = generation.generate_samples(gen, FakeFeatures(), run, str(tmp_path / "a"), batch_size=2)
  assert gen.calls == first_calls                     # every shard was on disk
  np.testing.assert_array_equal(again["pool_3"], a["pool_3"])
  b = generation.generate_samples(FakeGenerator(), FakeFeatures(), run, str(tmp_path / "b"), batch_size=5)
  np.testing.assert_array_equal(b["pool_3"], a["pool_3"])
  images = generation.read_shards(str(tmp_path / "a"), 7, 3, with_images=True)["images"]
  expected = generation.to_uint8(((np.arange(7) * 0.37) % 2.0) - 1.0)
  np.testing.assert_array_equal(images[:, 0, 0, 0], expected)
  with pytest.raises(generation.SettingsError, match="cfg"):
    generation.generate_samples(FakeGenerator(), FakeFeatures(), generation.SampleRun(7, cfg=1.0, shard_size=3,
                                classes=(1, 3)), str(tmp_path / "a"))


def test_every_process_makes_the_same_number_of_feature_calls(monkeypatch):
  """Each call is a collective: processes whose interleaved slices of a shard differ in length
  (5 images over 2 processes: 3 and 2) still call as often as the longest slice needs."""
  sizes = {}
  for process in (0, 1):
    calls = []

    class Recording(FakeFeatures):
      def __call__(self, images):
        calls.append(len(images))
        return super().__call__(images)

    monkeypatch.setattr(generation.jax, "process_count", lambda: 2)
    monkeypatch.setattr(generation.jax, "process_index", lambda p=process: p)
    out = generation._shard_features(Recording(), np.zeros((5, 2, 2, 3), np.uint8))
    sizes[process] = calls
    assert len(out["pool_3"]) == (3 if process == 0 else 2)
  assert sizes == {0: [2, 1], 1: [2, 0]}
