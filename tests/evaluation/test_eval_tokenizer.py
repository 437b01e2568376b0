"""eval-tokenizer pieces: SSIM / PSNR against float64 restatements (and skimage), codebook usage
numbers, and the whole evaluation on 8 fake devices equal to one device."""

import numpy as np
import pytest

from imagefolder_jax.evaluation import image_metrics
from imagefolder_jax.evaluation.tokenizer import usage_summary


def ssim_float64(a, b, window=11, sigma=1.5, k1=0.01, k2=0.03, data_range=255.0):
  """Wang et al. 2004 written out: a 2-D Gaussian window slid over every valid position (no
  separability), population moments, per channel, mean over positions and channels."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  r = np.arange(window) - (window - 1) / 2
  g = np.exp(-(r[:, None] ** 2 + r[None, :] ** 2) / (2 * sigma ** 2))
  g /= g.sum()
  h, w = a.shape[0] - window + 1, a.shape[1] - window + 1

  def filt(x):
    out = np.zeros((h, w) + x.shape[2:])
    for i in range(window):
      for j in range(window):
        out += g[i, j] * x[i:i + h, j:j + w]
    return out

  mx, my = filt(a), filt(b)
  vx, vy, cxy = filt(a * a) - mx ** 2, filt(b * b) - my ** 2, filt(a * b) - mx * my
  c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
  s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
  return s.mean()


def image_pairs():
  rng = np.random.default_rng(0)
  base = rng.integers(0, 256, (3, 37, 45, 3)).astype(np.float64)
  smooth = np.cumsum(rng.normal(0, 8, (3, 37, 45, 3)), axis=1).clip(-120, 120) + 128
  noisy = np.clip(smooth + rng.normal(0, 20, smooth.shape), 0, 255).round()
  bright = np.clip(base * 0.6 + 90, 0, 255).round()
  bright[2] = rng.integers(0, 256, bright[2].shape)      # an unrelated pair: SSIM near 0
  return np.concatenate([smooth.round(), base]), np.concatenate([noisy, bright])


def test_ssim_and_psnr_match_float64_restatement():
  a, b = image_pairs()
  got = np.asarray(image_metrics.ssim(a.astype(np.float32), b.astype(np.float32)))
  expected = np.asarray([ssim_float64(x, y) for x, y in zip(a, b)])
  assert expected.min() < 0.3 and expected.max() > 0.5       # the pairs span a useful range
  np.testing.assert_allclose(got, expected, atol=2e-6)
  same = a[:1].astype(np.float32)
  assert float(image_metrics.ssim(same, same)[0]) == pytest.approx(1.0, abs=1e-6)
  mse = ((a - b) ** 2).mean(axis=(1, 2, 3))
  np.testing.assert_allclose(np.asarray(image_metrics.psnr(a, b)), 10 * np.log10(255.0 ** 2 / mse), rtol=1e-6)


def test_ssim_matches_skimage():
  metrics = pytest.importorskip("skimage.metrics")
  a, b = image_pairs()
  got = np.asarray(image_metrics.ssim(a.astype(np.float32), b.astype(np.float32)))
  expected = [metrics.structural_similarity(x, y, data_range=255, channel_axis=-1, gaussian_weights=True,
                                            sigma=1.5, use_sample_covariance=False) for x, y in zip(a, b)]
  np.testing.assert_allclose(got, expected, atol=2e-6)


def test_ssim_refuses_images_smaller_than_the_window():
  with pytest.raises(ValueError, match="at least 11 pixels"):
    image_metrics.ssim(np.zeros((1, 10, 20, 3), np.float32), np.zeros((1, 10, 20, 3), np.float32))


def test_usage_summary_numbers():
  counts = np.zeros((2, 2, 8), np.int64)
  counts[0, 0, :4] = 5                   # 4 of 8 codes, uniform: perplexity 4
  counts[0, 1, 7] = 3                    # one code: perplexity 1
  counts[1, 0] = [1, 1, 2, 0, 0, 0, 0, 0]
  summary = usage_summary(counts, (1, 2))["branches"]
  assert [b["name"] for b in summary] == ["detail", "semantic"]
  s0 = summary[0]["scales"]
  assert s0[0]["used"] == 0.5 and s0[0]["perplexity"] == pytest.approx(4.0)
  assert s0[1]["used"] == 0.125 and s0[1]["perplexity"] == pytest.approx(1.0)
  p = np.asarray([5, 5, 5, 5, 3]) / 23.0   # branch 0 over both scales: codes 0..3 hold 5 each, code 7 holds 3
  assert summary[0]["used"] == 5 / 8 and summary[0]["perplexity"] == pytest.approx(np.exp(-(p * np.log(p)).sum()))
  q = np.asarray([0.25, 0.25, 0.5])
  assert summary[1]["scales"][0]["perplexity"] == pytest.approx(np.exp(-(q * np.log(q)).sum()))
  assert summary[1]["scales"][1] == {"side": 2, "used": 0.0, "perplexity": None}
