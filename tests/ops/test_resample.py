"""Resampling matrices against PIL-style (jax.image antialiased), PyTorch bicubic and adaptive pooling."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imagefolder_jax.ops import resample

torch = pytest.importorskip("torch")
F = torch.nn.functional


@pytest.mark.parametrize("n_in,n_out", [(16, 11), (37, 16), (11, 5), (8, 8)])
def test_antialiased_bicubic_matches_jax_image_resize(n_in, n_out):
  x = np.random.RandomState(0).randn(2, n_in, n_in, 3).astype(np.float32)
  ours = resample.antialiased_bicubic_resize(jnp.asarray(x), n_out)
  ref = jax.image.resize(jnp.asarray(x), (2, n_out, n_out, 3), "bicubic", antialias=True)
  np.testing.assert_allclose(ours, ref, atol=2e-6)


@pytest.mark.parametrize("n_in", [16, 37])
def test_antialiased_bicubic_matches_torch(n_in):
  x = np.random.RandomState(1).randn(1, n_in, n_in, 4).astype(np.float32)
  ref = F.interpolate(torch.tensor(x).permute(0, 3, 1, 2), size=(11, 11), mode="bicubic",
                      antialias=True, align_corners=False).permute(0, 2, 3, 1).numpy()
  np.testing.assert_allclose(resample.antialiased_bicubic_resize(jnp.asarray(x), 11), ref, atol=2e-6)


@pytest.mark.parametrize("n_in", [1, 2, 3, 4, 5, 6, 8])
def test_bicubic_upsample_matches_torch(n_in):
  x = np.random.RandomState(n_in).randn(2, n_in, n_in, 5).astype(np.float32)
  ref = F.interpolate(torch.tensor(x).permute(0, 3, 1, 2), size=(11, 11), mode="bicubic",
                      align_corners=False).permute(0, 2, 3, 1).numpy()
  np.testing.assert_allclose(resample.bicubic_upsample(jnp.asarray(x), 11), ref, atol=3e-6)


def test_bicubic_differs_from_jax_image_resize():
  # The reason the matrix exists: jax.image's bicubic (a=-0.5) is not PyTorch's (a=-0.75).
  x = np.random.RandomState(0).randn(1, 3, 3, 1).astype(np.float32)
  ours = resample.bicubic_upsample(jnp.asarray(x), 11)
  theirs = jax.image.resize(jnp.asarray(x), (1, 11, 11, 1), "bicubic")
  assert np.abs(np.asarray(ours) - np.asarray(theirs)).max() > 1e-2


@pytest.mark.parametrize("n_out", [1, 2, 3, 4, 5, 6, 8, 11])
def test_area_matches_adaptive_avg_pool(n_out):
  x = np.random.RandomState(n_out).randn(2, 11, 11, 3).astype(np.float32)
  ref = F.adaptive_avg_pool2d(torch.tensor(x).permute(0, 3, 1, 2), n_out).permute(0, 2, 3, 1).numpy()
  np.testing.assert_allclose(resample.area_downsample(jnp.asarray(x), n_out), ref, atol=1e-6)


def test_area_overlapping_windows_by_hand():
  # 11 -> 3: windows [0,4), [3,8), [7,11) overlap at 3 and 7.
  m = resample.area_matrix(11, 3)
  np.testing.assert_allclose(m[0, :4], 0.25)
  np.testing.assert_allclose(m[1, 3:8], 0.2)
  np.testing.assert_allclose(m[2, 7:], 0.25)
  np.testing.assert_allclose(m.sum(1), 1.0)


def test_bad_sizes_raise():
  with pytest.raises(ValueError, match="positive"):
    resample.area_matrix(0, 3)
