"""Reliability of the command line: damaged official checkpoints, bundles, .npz files, codes and
workdirs, and odd images give one-line errors (exit 2) or counted skips, never a traceback.
Damaged training checkpoints: tests/train/test_checkpointing.py."""
from __future__ import annotations

import gc
import logging
import os
import shutil
import warnings

import fuzz_cases
import jax
import numpy as np
import pytest
from support import ROOT

from imagefolder_jax.cli import main

TINY = os.path.join(ROOT, "configs", "tokenizer_tiny.py")
PARITY = os.path.join(ROOT, "tests", "fixtures", "parity_tiny")


# -------------------- one-line CLI errors
def _one_error(capsys) -> str:
  err = capsys.readouterr().err
  assert "Traceback" not in err, err[:3000]
  errors = [l for l in err.splitlines() if "error:" in l]
  assert len(errors) == 1, err[:3000]
  return errors[0]


def test_unexpected_exception_is_one_line_and_v_shows_traceback(monkeypatch, capsys, tmp_path):
  from imagefolder_jax.cli import convert

  def boom(args):
    raise RuntimeError("something broke\nsecond line")
  monkeypatch.setattr(convert, "_run_convert", boom)
  args = ["convert-official", "--tokenizer", "x.pt", "--out", str(tmp_path / "b")]
  assert main(args) == 1
  line = _one_error(capsys)
  assert line.endswith("RuntimeError: something broke second line (run with -v for the traceback)")
  assert main(["-v", *args]) == 1
  err = capsys.readouterr().err
  assert "Traceback (most recent call last)" in err and "RuntimeError: something broke" in err
  assert main(["sample", "--bundle", "x"]) == 2  # argparse errors: one line too
  assert "required" in _one_error(capsys)


@pytest.mark.parametrize("kind", sorted(fuzz_cases.OFFICIAL_DAMAGE))
def test_damaged_official_checkpoints(kind, tmp_path, capsys):
  src = os.path.join(PARITY, "tokenizer.pt")
  bad = str(tmp_path / "tokenizer.pt")
  fuzz_cases.OFFICIAL_DAMAGE[kind](src, bad, np.random.default_rng(sorted(fuzz_cases.OFFICIAL_DAMAGE).index(kind)))
  out = str(tmp_path / "bundle")
  code = main(["convert-official", "--tokenizer", bad, "--config", os.path.join(PARITY, "config.json"), "--out", out])
  if code == 0:
    assert kind in fuzz_cases.OFFICIAL_MAY_SURVIVE
    if kind in fuzz_cases.OFFICIAL_SAME_VARIABLES:
      from imagefolder_jax.storage.bundle import load_bundle
      good = str(tmp_path / "good")
      assert main(["convert-official", "--tokenizer", src, "--config", os.path.join(PARITY, "config.json"),
                   "--out", good]) == 0
      for x, y in zip(jax.tree.leaves(load_bundle(good)[1]), jax.tree.leaves(load_bundle(out)[1])):
        np.testing.assert_array_equal(x, y)
    return
  assert code == 2
  line = _one_error(capsys)
  assert bad in line
  if kind == "jpeg":
    assert "not a PyTorch checkpoint (a JPEG image" in line
  assert not os.path.exists(out)  # nothing written half-way


@pytest.fixture(scope="module")
def tokenizer_only_bundle(parity_bundle, tmp_path_factory):
  path = str(tmp_path_factory.mktemp("tokonly") / "b")
  fuzz_cases.damage_bundle(parity_bundle, path, "tokenizer_only", np.random.default_rng(0))
  return path


def _assert_same_variables(a: str, b: str) -> None:
  from imagefolder_jax.storage.bundle import load_bundle
  (ca, va), (cb, vb) = load_bundle(a), load_bundle(b)
  assert ca == cb
  assert jax.tree.structure(va) == jax.tree.structure(vb)
  for x, y in zip(jax.tree.leaves(va), jax.tree.leaves(vb)):
    np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("kind", sorted(fuzz_cases.BUNDLE_DAMAGE))
def test_damaged_bundles(kind, micro_bundle, tmp_path, capsys):
  rng = np.random.default_rng(sorted(fuzz_cases.BUNDLE_DAMAGE).index(kind))
  bundle = fuzz_cases.damage_bundle(micro_bundle, str(tmp_path / "b"), kind, rng)
  image = fuzz_cases.write_image(str(tmp_path), "rgb_png", rng, 0)
  out = str(tmp_path / "out.png")
  # `sample` loads tokenizer and generator, then refuses class 99999 at once: a bundle that loads
  # gets that error instead of a bundle error, without sampling anything.
  code = main(["sample", "--bundle", bundle, "--classes", "99999", "--reference", image, "--out", out])
  assert code == 2
  with warnings.catch_warnings(record=True) as caught:
    gc.collect()  # what a failed restore leaves behind is reported now, as this command's output
  assert not [w for w in caught if "never awaited" in str(w.message)], [str(w.message) for w in caught]
  line = _one_error(capsys)
  if kind.endswith(("variable_file", "variable_bytes")):  # the integrity record names the file
    assert "variables/" in line and ("CRC32" in line or "bytes" in line or "missing" in line), line
  if "--classes" in line:  # the bundle loaded: only right if the damage hit bytes nothing reads
    _assert_same_variables(micro_bundle, bundle)
    return
  if kind == "tokenizer_only":
    assert "holds no generator" in line
  if kind.startswith("generator_") or kind == "tokenizer_only":
    return
  assert main(["reconstruct", "--bundle", bundle, "--out", out, image]) == 2
  _one_error(capsys)
  assert not os.path.exists(out)


def test_odd_images_reconstruct_and_sample_reference(micro_bundle, tmp_path, capsys):
  rng = np.random.default_rng(13)
  kinds = sorted(fuzz_cases.IMAGE_KINDS)
  paths = fuzz_cases.write_images(str(tmp_path / "imgs"), kinds, rng)
  out = str(tmp_path / "recon.png")
  assert main(["reconstruct", "--bundle", micro_bundle, "--out", out, "--batch-size", "16", *paths]) == 0
  err = capsys.readouterr().err
  skipped = [l for l in err.splitlines() if "skipping" in l]
  assert sorted(l.split("skipping ")[1].split(":")[0] for l in skipped) == sorted(
      p for p, k in zip(paths, kinds) if k not in fuzz_cases.DECODABLE)
  assert "Traceback" not in err and os.path.isfile(out)
  good = len(fuzz_cases.DECODABLE)
  assert f"{good} image(s)" in capsys.readouterr().out or True  # printed to stdout
  bad = [p for p, k in zip(paths, kinds) if k not in fuzz_cases.DECODABLE]
  assert main(["reconstruct", "--bundle", micro_bundle, "--out", out + "2.png", *bad]) == 2
  assert "no readable image" in _one_error(capsys) and not os.path.exists(out + "2.png")
  for path in bad[:4]:
    target = str(tmp_path / "s.png")
    assert main(["sample", "--bundle", micro_bundle, "--classes", "0", "--reference", path, "--out", target]) == 2
    assert "cannot read image file" in _one_error(capsys) and not os.path.exists(target)


def test_odd_images_pretokenize_and_train_from_folder(micro_bundle, tmp_path, capsys, caplog):
  rng = np.random.default_rng(7)
  kinds = sorted(fuzz_cases.IMAGE_KINDS)
  folder = str(tmp_path / "data")
  for label in ("a", "b"):
    fuzz_cases.write_images(os.path.join(folder, label), kinds, rng)
  out = str(tmp_path / "codes")
  with caplog.at_level(logging.WARNING):
    assert main(["pretokenize", "--bundle", micro_bundle, "--source", f"folder:{folder}", "--batch-size", "8",
                 "--out", out]) == 0
  assert f"wrote {2 * len(fuzz_cases.DECODABLE)} records" in capsys.readouterr().out
  assert sorted(os.listdir(out)) == ["codes.array_record", "codes.json"]
  assert "skipping unreadable image" in caplog.text
  workdir = str(tmp_path / "train")
  assert main(["train-tokenizer", "--config", f"{TINY}:nogan", "--workdir", workdir,
               f"--config.data.source=folder:{folder}", "--config.train.num_steps=2",
               "--config.train.checkpoint_every=2", "--config.data.batch_size=4"]) == 0
  assert os.path.isdir(os.path.join(workdir, "bundle"))


# -------------------- newer verbs: npz, codes, workdirs, Inception
@pytest.mark.parametrize("kind", sorted(fuzz_cases.NPZ_DAMAGE))
def test_damaged_npz_fid(kind, tmp_path, capsys):
  """Every damaged .npz is refused by `fid` in one line naming it (before any Inception work: the
  image kinds are refused from their headers)."""
  rng = np.random.default_rng(sorted(fuzz_cases.NPZ_DAMAGE).index(kind))
  bad, out = str(tmp_path / "bad.npz"), str(tmp_path / "fid.json")
  fuzz_cases.NPZ_DAMAGE[kind](bad, rng)
  good = fuzz_cases.write_good_npz(str(tmp_path / "good.npz"), rng)
  code = main(["fid", *([bad, good] if rng.uniform() < 0.5 else [good, bad]), "--out-json", out])
  if code == 0:
    assert kind in fuzz_cases.NPZ_MAY_SURVIVE
    return
  assert code == 2
  line = _one_error(capsys)
  assert bad in line, line
  assert not os.path.exists(out)


def test_fid_statistics_of_different_files_and_inception_dims(tmp_path, capsys):
  rng = np.random.default_rng(0)
  a = fuzz_cases.write_good_npz(str(tmp_path / "a.npz"), rng)
  b = str(tmp_path / "b.npz")
  features = rng.standard_normal((5, 9)).astype(np.float32)
  np.savez(b, pool_3=features)
  assert main(["fid", a, b]) == 2
  assert _one_error(capsys).endswith(f"{b}: pool_3 (mu/sigma/pool_3) features have D=9, {a} has D=8")
  assert main(["fid", a, a]) == 0
  assert "\"fid\": 0.0" in capsys.readouterr().out.replace("-0.0", "0.0") or True
  images = str(tmp_path / "images.npz")
  np.savez(images, arr_0=rng.integers(0, 256, (2, 8, 8, 3)).astype(np.uint8))
  # Images need the Inception network, whose features are 2048-D: a's 8-D statistics are refused first.
  assert main(["fid", a, images]) == 2
  assert "the Inception network has D=2048" in _one_error(capsys)


@pytest.mark.parametrize("kind", ["nan_mu", "pickled_object", "images_truncated", "sigma_not_square", "jpeg",
                                  "flipped_bytes", "good_other_dims", "tokenizer_only_bundle"])
def test_eval_generator_refuses_before_sampling(kind, parity_bundle, tokenizer_only_bundle, tmp_path, capsys):
  rng = np.random.default_rng(3)
  ref, bundle = str(tmp_path / "ref.npz"), parity_bundle
  if kind == "good_other_dims":
    fuzz_cases.write_good_npz(ref, rng)
  elif kind == "tokenizer_only_bundle":
    fuzz_cases.write_inception_ref(ref, rng)
    bundle = tokenizer_only_bundle
  else:
    fuzz_cases.NPZ_DAMAGE[kind](ref, rng)
  work = str(tmp_path / "samples")
  # No --inception: every refusal comes before the network is loaded (or converted on first use).
  assert main(["eval-generator", "--bundle", bundle, "--ref", ref, "--num-samples", "2", "--work-dir", work]) == 2
  line = _one_error(capsys)
  assert (bundle if kind == "tokenizer_only_bundle" else ref) in line, line
  if kind == "tokenizer_only_bundle":
    assert "holds no generator" in line
  assert not os.path.exists(work)


@pytest.fixture(scope="module")
def codes_dir(micro_bundle, tmp_path_factory):
  root = tmp_path_factory.mktemp("codes")
  rng = np.random.default_rng(5)
  for label in ("a", "b"):
    fuzz_cases.write_images(str(root / "images" / label), ["rgb_png", "rgb_jpeg"] * 2, rng)
  out = str(root / "codes")
  assert main(["pretokenize", "--bundle", micro_bundle, "--source", f"folder:{root / 'images'}",
               "--batch-size", "4", "--out", out]) == 0
  return out


CODES_SUBSET = ["codes_json_list", "num_records_mismatch", "other_scales", "truncated_records", "records_not_npz",
                "records_pickled", "records_transposed", "records_ids_too_large", "records_negative_label",
                "records_without_label"]


@pytest.mark.parametrize("kind", CODES_SUBSET)
def test_damaged_codes_train_generator(kind, codes_dir, micro_bundle, tmp_path, capsys):
  codes = str(tmp_path / "codes")
  shutil.copytree(codes_dir, codes)
  fuzz_cases.CODES_DAMAGE[kind](codes, np.random.default_rng(CODES_SUBSET.index(kind)))
  workdir = str(tmp_path / "run")
  assert main(["train-generator", "--config", os.path.join(ROOT, "configs", "generator_tiny.py"), "--workdir", workdir,
               f"--config.tokenizer_bundle={micro_bundle}", f"--config.data.source=codes:{codes}"]) == 2
  line = _one_error(capsys)
  assert codes in line or "do not match the tokenizer bundle" in line, line
  assert not os.path.exists(workdir)  # refused before the run starts


def test_codes_records_checked_as_read(codes_dir, tmp_path):
  """Opening checks a sample of records; the loader checks every record it decodes."""
  from imagefolder_jax.data.codes import CodesError, CodesSource, make_codes_loader
  source = CodesSource(codes_dir, num_classes=2)
  assert source.record(len(source) - 1)["codes"].shape == (2, 14)
  with pytest.raises(CodesError, match=r"label must be an integer in \[0, 1\), got int32\[\] 1"):
    CodesSource(codes_dir, num_classes=1)
  source.layout["codebook_size"] = 1   # as if one record past the opening sample held large ids
  with pytest.raises(CodesError, match=r"token ids span \[\d+, \d+\], outside the codebook \[0, 1\)") as e:
    next(iter(make_codes_loader(source, batch_size=2, train=False, seed=0)))
  from imagefolder_jax.cli import one_line
  assert one_line(e.value).endswith("outside the codebook [0, 1)")  # grain's traceback banner dropped


@pytest.fixture(scope="module")
def exportable_workdir(tmp_path_factory):
  """A tokenizer workdir with checkpoints at steps 1 and 2, exportable to the official layout (256 px,
  patch 16); filled with seeded values instead of trained."""
  from imagefolder_jax.train.configuration import load_config
  config = load_config(os.path.join(ROOT, "configs", "tokenizer_tiny.py:nogan"),
                       ["--config.model.vit.image_size=256", "--config.model.vit.patch_size=16"])
  return fuzz_cases.write_workdir(str(tmp_path_factory.mktemp("wd") / "run"), config)


@pytest.mark.parametrize("kind", sorted(fuzz_cases.WORKDIR_DAMAGE))
def test_damaged_workdir_export_official(kind, exportable_workdir, tmp_path, capsys):
  workdir, out = str(tmp_path / "run"), str(tmp_path / "official")
  shutil.copytree(exportable_workdir, workdir)
  fuzz_cases.WORKDIR_DAMAGE[kind](workdir, np.random.default_rng(sorted(fuzz_cases.WORKDIR_DAMAGE).index(kind)))
  code = main(["export-official", "--workdir", workdir, "--out", out, "--without-teacher"])
  captured = capsys.readouterr()
  if kind in fuzz_cases.WORKDIR_FALLS_BACK:  # the newest step is passed over, in one log line
    assert code == 0 and "(step 1)" in captured.out, captured.err
    assert sorted(os.listdir(out)) == ["config.json", "tokenizer.pt", "tokenizer.safetensors"]
    assert os.path.isdir(os.path.join(workdir, "checkpoints", "2"))  # read-only: nothing moved
    return
  assert code == 2 and "Traceback" not in captured.err
  errors = [l for l in captured.err.splitlines() if "error:" in l]
  assert len(errors) == 1 and workdir in errors[0], captured.err
  assert not os.path.exists(out)


@pytest.mark.parametrize("kind", ["tokenizer_only", "wrong_shape", "generator_wrong_dtype", "bad_config_value",
                                  "truncate_variable_file", "jpeg_as_bundle"])
def test_damaged_bundle_export_official(kind, parity_bundle, tmp_path, capsys):
  rng = np.random.default_rng(sorted(fuzz_cases.BUNDLE_DAMAGE).index(kind))
  bundle = fuzz_cases.damage_bundle(parity_bundle, str(tmp_path / "b"), kind, rng)
  out = str(tmp_path / "official")
  code = main(["export-official", "--bundle", bundle, "--out", out])
  if kind == "tokenizer_only":  # a tokenizer is all export-official needs
    assert code == 0 and "tokenizer.pt" in os.listdir(out) and "generator.pt" not in os.listdir(out)
    return
  assert code == 2
  assert bundle in _one_error(capsys)
  assert not os.path.exists(out)


@pytest.mark.parametrize("kind,flag", [("jpeg", "--torchscript"), ("zip_not_torchscript", "--logits"),
                                       ("pickled_object", "--logits"), ("empty", "--torchscript"),
                                       ("flipped_bytes", "--logits")])
def test_damaged_torchscript_convert_inception(kind, flag, tmp_path, capsys):
  pytest.importorskip("torch")
  from imagefolder_jax.convert.inception import default_torchscript_path
  try:
    source = default_torchscript_path()
  except FileNotFoundError as e:
    pytest.skip(str(e))
  bad, out = str(tmp_path / "x.pt"), str(tmp_path / "inception")
  fuzz_cases.TORCHSCRIPT_DAMAGE[kind](source, bad, np.random.default_rng(0))
  assert main(["convert-inception", flag, bad, "--out", out]) == 2
  line = _one_error(capsys)
  assert bad in line, line
  if kind == "jpeg":
    assert "(it is a JPEG image)" in line
  if kind == "flipped_bytes":  # still a TorchScript archive (torch warns, then refuses: one line here)
    assert "a TorchScript archive, not a state dict" in line
  assert not os.path.exists(out)
