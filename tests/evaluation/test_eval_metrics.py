"""ADM-evaluator metrics against a direct NumPy/SciPy transcription of `evaluations/evaluator.py`
(openai/guided-diffusion) on random features; ADM .npz round trip; corrupt images skipped."""
import numpy as np
import pytest
from scipy import linalg

from imagefolder_jax.evaluation import fid, inception_score, precision_recall, reference
from imagefolder_jax.evaluation.images import ImageStream


# ----------------------------------------------------------------------------- ADM transcription
def adm_frechet(mu1, sigma1, mu2, sigma2):
  diff = mu1 - mu2
  covmean = linalg.sqrtm(sigma1.dot(sigma2))
  if np.iscomplexobj(covmean):
    covmean = covmean.real
  return diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean)


def adm_inception_score(preds, split_size=5000):
  scores = []
  for i in range(0, len(preds), split_size):
    part = preds[i:i + split_size]
    kl = part * (np.log(part) - np.log(np.expand_dims(np.mean(part, 0), 0)))
    scores.append(np.exp(np.mean(np.sum(kl, 1))))
  return float(np.mean(scores))


def adm_distances(u, v, half):
  if half:
    u16, v16 = u.astype(np.float16), v.astype(np.float16)
    nu = np.sum(np.square(u16).astype(np.float32), 1).astype(np.float16).reshape(-1, 1)
    nv = np.sum(np.square(v16).astype(np.float32), 1).astype(np.float16).reshape(1, -1)
    dots = (u16.astype(np.float32) @ v16.astype(np.float32).T).astype(np.float16)
    d = np.maximum(nu - np.float16(2) * dots + nv, np.float16(0))
    if np.isfinite(d).all():
      return d.astype(np.float32)
  nu = np.sum(np.square(u), 1).reshape(-1, 1)
  nv = np.sum(np.square(v), 1).reshape(1, -1)
  return np.maximum(nu - 2 * u @ v.T + nv, 0.0)


def adm_precision_recall(ref, smp, k=3, half=False):
  def radii(f):
    d = adm_distances(f, f, half)
    return np.partition(d, np.arange(k + 1), axis=1)[:, k]
  r1, r2 = radii(ref), radii(smp)
  d = adm_distances(ref, smp, half)
  ref_in = np.any(d <= r2[None, :], axis=1)
  smp_in = np.any(d <= r1[:, None], axis=0)
  return float(np.mean(smp_in)), float(np.mean(ref_in))


# ----------------------------------------------------------------------------- tests
@pytest.fixture(scope="module")
def features():
  rng = np.random.default_rng(0)
  a = rng.normal(size=(300, 32)).astype(np.float32)
  b = (rng.normal(size=(200, 32)) * 1.3 + 0.4).astype(np.float32)
  return a, b


def test_fid_matches_adm(features):
  a, b = features
  sa, sb = fid.compute_statistics(a), fid.compute_statistics(b)
  np.testing.assert_allclose(sa.mu, np.mean(a.astype(np.float64), 0), rtol=1e-12)
  np.testing.assert_allclose(sa.sigma, np.cov(a.astype(np.float64), rowvar=False), rtol=1e-12)
  expected = adm_frechet(sb.mu, sb.sigma, sa.mu, sa.sigma)
  assert fid.frechet_distance(sb, sa) == pytest.approx(expected, rel=1e-12)
  assert fid.frechet_distance(sa, sa) == pytest.approx(0.0, abs=1e-8)
  with pytest.raises(fid.FIDError, match="dimension"):
    fid.frechet_distance(sa, fid.compute_statistics(a[:, :8]))


def test_inception_score_matches_adm():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(2500, 50)).astype(np.float32) * 3
  probs = inception_score.softmax(logits)
  np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-6)
  got = inception_score.inception_score(probs, split_size=500)   # 5 splits
  assert got == pytest.approx(adm_inception_score(probs, 500), rel=1e-6)
  assert got > 1.0
  assert inception_score.inception_score(np.full((10, 4), 0.25, np.float32)) == pytest.approx(1.0)


@pytest.mark.parametrize("block", [10000, 37])
def test_precision_recall_float32_matches_adm(features, block):
  a, b = features
  got = precision_recall.precision_recall(a, b, block=block, distance_dtype="float32")
  expected = adm_precision_recall(a, b, half=False)
  assert got == pytest.approx(expected, abs=1e-12)
  assert 0.0 < got[0] < 1.0 and 0.0 < got[1] < 1.0


def test_precision_recall_float16_matches_adm(features):
  a, b = features
  got = precision_recall.precision_recall(a, b, block=64)
  expected = adm_precision_recall(a, b, half=True)
  # float32 sums before the float16 rounding may differ in order: allow one point of each side.
  assert abs(got[0] - expected[0]) <= 1 / len(b) + 1e-12
  assert abs(got[1] - expected[1]) <= 1 / len(a) + 1e-12


def test_manifold_radii_are_kth_neighbour(features):
  a, _ = features
  radii = precision_recall.manifold_radii(a, k=3, block=50, distance_dtype="float32")
  d = adm_distances(a, a, half=False)
  np.testing.assert_allclose(radii, np.sort(d, axis=1)[:, 3], rtol=1e-6)


def test_npz_round_trip(tmp_path, features):
  a, _ = features
  rng = np.random.default_rng(2)
  images = rng.integers(0, 256, (5, 8, 6, 3), dtype=np.uint8)
  stats = fid.compute_statistics(a)
  path = str(tmp_path / "batch.npz")
  reference.save_reference(path, images=images, pool=stats, spatial=stats, pool_3=a,
                           labels=np.arange(5))
  with np.load(path, allow_pickle=False) as raw:   # ADM's keys, plain arrays
    assert {"arr_0", "mu", "sigma", "mu_s", "sigma_s"} <= set(raw.files)
  back = reference.load_reference(path)
  assert back.num_images == 5 and back.image_shape == (8, 6, 3)
  np.testing.assert_array_equal(back.pool.mu, stats.mu)
  np.testing.assert_array_equal(back.spatial.sigma, stats.sigma)
  np.testing.assert_array_equal(back.pool_3, a)
  np.testing.assert_array_equal(back.labels, np.arange(5))
  streamed = np.concatenate(list(reference.iter_npz_images(path, 2)))
  np.testing.assert_array_equal(streamed, images)
  bad = str(tmp_path / "bad.npz")
  np.savez(bad, arr_0=images.astype(np.float32))
  with pytest.raises(reference.ReferenceBatchError, match="uint8"):
    reference.load_reference(bad)


def test_corrupt_image_in_folder_is_skipped_and_counted(tmp_path):
  from PIL import Image
  rng = np.random.default_rng(3)
  for i in range(3):
    Image.fromarray(rng.integers(0, 256, (299, 299, 3), dtype=np.uint8)).save(tmp_path / f"ok{i}.png")
  Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(tmp_path / "small.png")
  (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
  stream = ImageStream(f"folder:{tmp_path}", batch_size=2)
  batches = list(stream)
  assert stream.skipped == 1
  assert sum(len(b) for b in batches) == 4
  assert all(b.shape[1:] == (299, 299, 3) for b in batches)
