"""Reliability: damaged checkpoints fall back to the newest usable step, a SIGKILL during an async
save resumes from the previous checkpoint, and odd inputs give one-line errors or counted skips."""
from __future__ import annotations

import glob
import logging
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fuzz_cases
from imagefolder_jax.cli import main
from imagefolder_jax.train import checkpointing
from imagefolder_jax.train.checkpointing import CheckpointError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tokenizer_tiny.py")
PARITY = os.path.join(ROOT, "tests", "fixtures", "parity_tiny")


def _state(step: int) -> dict:
  k = jax.random.key(step)
  return {"params": {"w": jax.random.normal(k, (64, 32)), "b": jnp.full((32,), float(step))},
          "opt": [jnp.arange(1000, dtype=jnp.float32) * step, jnp.int32(step)]}


def _abstract():
  return jax.eval_shape(lambda: _state(0))


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
  """A workdir with sealed asynchronous checkpoints at steps 1, 2, 3."""
  workdir = str(tmp_path_factory.mktemp("ckpt") / "run")
  manager = checkpointing.make_manager(workdir, keep=5, async_save=True)
  for step in (1, 2, 3):
    checkpointing.save(manager, step, _state(step), {"data_iterator": f'{{"step": {step}}}'})
  manager.wait_until_finished()
  for step in (1, 2, 3):
    assert os.path.isfile(os.path.join(workdir, "checkpoints", str(step), checkpointing.INTEGRITY_FILE))
  return workdir


def _newest_data_file(workdir, step=3):
  files = glob.glob(os.path.join(workdir, "checkpoints", str(step), "state", "ocdbt.process_0", "d", "*"))
  return max(files, key=os.path.getsize)


def _damage(kind: str, workdir: str, rng) -> None:
  step_dir = os.path.join(workdir, "checkpoints", "3")
  if kind.startswith("unsealed_"):
    kind = kind[len("unsealed_"):]
    for f in glob.glob(os.path.join(workdir, "checkpoints", "*", checkpointing.INTEGRITY_FILE)):
      os.remove(f)
  if kind == "truncate_data":
    fuzz_cases.truncate_file(_newest_data_file(workdir), rng)
  elif kind == "flip_data":
    fuzz_cases.flip_bytes(_newest_data_file(workdir), rng)
  elif kind == "no_commit_marker":
    os.remove(os.path.join(step_dir, checkpointing.COMMIT_MARKER))
  elif kind == "no_array_metadata":
    os.remove(os.path.join(step_dir, "state", "_METADATA"))
  elif kind == "garbage_meta":
    with open(os.path.join(step_dir, "meta", "metadata"), "w") as f:
      f.write("{not json")
  elif kind == "meta_without_iterator":
    with open(os.path.join(step_dir, "meta", "metadata"), "w") as f:
      f.write('{"other": 1}')
  elif kind == "empty_step_dir":
    shutil.rmtree(step_dir)
    os.makedirs(step_dir)
  else:
    raise AssertionError(kind)


# Sealed: caught by the integrity record before orbax reads anything. Unsealed (a checkpoint saved
# before sealing existed, or killed between commit and seal): caught by orbax's read or our checks.
DAMAGE = ["truncate_data", "flip_data", "no_commit_marker", "no_array_metadata", "garbage_meta",
          "meta_without_iterator", "empty_step_dir", "unsealed_truncate_data", "unsealed_garbage_meta",
          "unsealed_meta_without_iterator"]


@pytest.mark.parametrize("kind", DAMAGE)
def test_damaged_newest_checkpoint_falls_back(saved_run, tmp_path, caplog, capfd, kind):
  workdir = str(tmp_path / "run")
  shutil.copytree(saved_run, workdir)
  _damage(kind, workdir, np.random.default_rng(DAMAGE.index(kind)))
  manager = checkpointing.make_manager(workdir, keep=5, async_save=False)
  with caplog.at_level(logging.INFO, logger="imagefolder_jax.train"):
    step, state, meta = checkpointing.restore_latest(manager, _abstract())
  assert step == 2 and meta["data_iterator"] == '{"step": 2}'
  for a, b in zip(jax.tree.leaves(_state(2)), jax.tree.leaves(state)):
    np.testing.assert_array_equal(a, b)
  warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
  assert len(warnings) == 1 and "step 3 is unusable" in warnings[0] and "\n" not in warnings[0], warnings
  moved = os.path.join(workdir, checkpointing.DAMAGED_DIR, "3")
  assert moved in warnings[0] and os.path.isdir(moved)  # kept, out of orbax's way
  assert manager.latest_step() == 2
  err = capfd.readouterr().err
  assert "Traceback" not in err and "Event loop is closed" not in err, err[:2000]


def test_nan_state_and_mismatch_and_nothing_readable(saved_run, tmp_path, caplog):
  workdir = str(tmp_path / "run")
  shutil.copytree(saved_run, workdir)
  manager = checkpointing.make_manager(workdir, keep=5, async_save=False)
  bad = _state(4)
  bad["params"]["w"] = bad["params"]["w"].at[3, 3].set(jnp.nan)
  checkpointing.save(manager, 4, bad, {"data_iterator": "{}"})
  manager.wait_until_finished()
  step, _, _ = checkpointing.restore_latest(checkpointing.make_manager(workdir, keep=5), _abstract(),
                                            quarantine=False)
  assert step == 3
  assert "params.w holds NaN/inf" in caplog.text and os.path.isdir(os.path.join(workdir, "checkpoints", "4"))
  # A readable checkpoint of another architecture is a config error, not damage.
  other = jax.eval_shape(lambda: dict(_state(0), params={"w": jnp.zeros((64, 16)), "b": jnp.zeros((32,))}))
  with pytest.raises(CheckpointError, match=r"does not match this config \(array params.w is float32\[64, 32\]"):
    checkpointing.restore_latest(checkpointing.make_manager(workdir, keep=5), other, quarantine=False)
  # Nothing readable: one line that says so and how to start fresh; nothing moved or deleted.
  for step in (1, 2, 3):
    fuzz_cases.truncate_file(_newest_data_file(workdir, step), np.random.default_rng(step))
  with pytest.raises(CheckpointError) as e:
    checkpointing.restore_latest(checkpointing.make_manager(workdir, keep=5), _abstract())
  message = str(e.value)
  assert "no readable checkpoint" in message and "4 step(s) tried" in message and "new --workdir" in message
  assert "\n" not in message
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["1", "2", "3", "4"]
  assert not os.path.exists(os.path.join(workdir, checkpointing.DAMAGED_DIR))


# ----------------------------------------------------------------------------- crash safety (training)
COMMON = ["train-tokenizer", "--config", f"{TINY}:nogan", "--config.train.num_steps=6",
          "--config.train.checkpoint_every=2", "--config.train.keep_checkpoints=3"]


def _bundle_params(workdir):
  import imagefolder_jax as ifj
  return jax.tree.leaves(ifj.Tokenizer.load(os.path.join(workdir, "bundle")).variables)


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("straight") / "w")
  assert main(COMMON + ["--workdir", workdir]) == 0
  return workdir


@pytest.mark.slow
def test_sigkill_during_async_save_resumes_from_previous(straight_run, tmp_path, caplog):
  workdir = str(tmp_path / "crashed")
  marker = str(tmp_path / "blocked")
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
             **{checkpointing.BLOCK_SAVE_ENV: f"4:{marker}"})
  proc = subprocess.Popen([sys.executable, "-m", "imagefolder_jax.cli", *COMMON, "--workdir", workdir],
                          cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  try:
    deadline = time.monotonic() + 300
    while not os.path.exists(marker):  # the writer of step 4 is now blocked, its save in flight
      assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
      assert time.monotonic() < deadline, "the save of step 4 never started"
      time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
  finally:
    proc.kill()
    proc.wait()
  assert proc.returncode == -signal.SIGKILL
  ckpts = os.path.join(workdir, "checkpoints")
  assert "2" in os.listdir(ckpts) and "4" not in os.listdir(ckpts)
  assert any(name.startswith("4.orbax-checkpoint-tmp") for name in os.listdir(ckpts))
  with caplog.at_level(logging.INFO, logger="imagefolder_jax.train"):
    assert main(COMMON + ["--workdir", workdir]) == 0
  assert "resumed from step 2" in caplog.text and "save of step 4 did not finish" in caplog.text
  for a, b in zip(_bundle_params(straight_run), _bundle_params(workdir)):
    np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_truncated_newest_training_checkpoint_resumes_from_previous(straight_run, tmp_path, caplog):
  workdir = str(tmp_path / "damaged")
  shutil.copytree(straight_run, workdir)
  shutil.rmtree(os.path.join(workdir, "bundle"))
  fuzz_cases.truncate_file(_newest_data_file(workdir, 6), np.random.default_rng(0))
  # The run ended at step 6; asking for 6 steps again retrains 5..6 from step 4.
  with caplog.at_level(logging.INFO, logger="imagefolder_jax.train"):
    assert main(COMMON + ["--workdir", workdir]) == 0
  assert "checkpoint step 6 is unusable" in caplog.text and "resumed from step 4" in caplog.text
  assert os.path.isdir(os.path.join(workdir, checkpointing.DAMAGED_DIR, "6"))
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "6"))  # saved again
  for a, b in zip(_bundle_params(straight_run), _bundle_params(workdir)):
    np.testing.assert_array_equal(a, b)


# ----------------------------------------------------------------------------- one-line CLI errors
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
  from imagefolder_jax.checkpoint import load_bundle
  (ca, va), (cb, vb) = load_bundle(a), load_bundle(b)
  assert ca == cb
  assert jax.tree.structure(va) == jax.tree.structure(vb)
  for x, y in zip(jax.tree.leaves(va), jax.tree.leaves(vb)):
    np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("kind", sorted(fuzz_cases.BUNDLE_DAMAGE))
def test_damaged_bundles(kind, parity_bundle, tmp_path, capsys):
  rng = np.random.default_rng(sorted(fuzz_cases.BUNDLE_DAMAGE).index(kind))
  bundle = fuzz_cases.damage_bundle(parity_bundle, str(tmp_path / "b"), kind, rng)
  image = fuzz_cases.write_image(str(tmp_path), "rgb_png", rng, 0)
  out = str(tmp_path / "out.png")
  # `sample` loads tokenizer and generator, then refuses class 99999 at once: a bundle that loads
  # gets that error instead of a bundle error, without sampling anything.
  code = main(["sample", "--bundle", bundle, "--classes", "99999", "--reference", image, "--out", out])
  assert code == 2
  line = _one_error(capsys)
  if "--classes" in line:  # the bundle loaded: only right if the damage hit bytes nothing reads
    _assert_same_variables(parity_bundle, bundle)
    return
  if kind == "tokenizer_only":
    assert "holds no generator" in line
  if kind.startswith("generator_") or kind == "tokenizer_only":
    return
  assert main(["reconstruct", "--bundle", bundle, "--out", out, image]) == 2
  _one_error(capsys)
  assert not os.path.exists(out)


def test_odd_images_reconstruct_and_sample_reference(parity_bundle, tmp_path, capsys):
  rng = np.random.default_rng(13)
  kinds = sorted(fuzz_cases.IMAGE_KINDS)
  paths = fuzz_cases.write_images(str(tmp_path / "imgs"), kinds, rng)
  out = str(tmp_path / "recon.png")
  assert main(["reconstruct", "--bundle", parity_bundle, "--out", out, "--batch-size", "16", *paths]) == 0
  err = capsys.readouterr().err
  skipped = [l for l in err.splitlines() if "skipping" in l]
  assert sorted(l.split("skipping ")[1].split(":")[0] for l in skipped) == sorted(
      p for p, k in zip(paths, kinds) if k not in fuzz_cases.DECODABLE)
  assert "Traceback" not in err and os.path.isfile(out)
  good = len(fuzz_cases.DECODABLE)
  assert f"{good} image(s)" in capsys.readouterr().out or True  # printed to stdout
  bad = [p for p, k in zip(paths, kinds) if k not in fuzz_cases.DECODABLE]
  assert main(["reconstruct", "--bundle", parity_bundle, "--out", out + "2.png", *bad]) == 2
  assert "no readable image" in _one_error(capsys) and not os.path.exists(out + "2.png")
  for path in bad[:4]:
    target = str(tmp_path / "s.png")
    assert main(["sample", "--bundle", parity_bundle, "--classes", "0", "--reference", path, "--out", target]) == 2
    assert "cannot read image file" in _one_error(capsys) and not os.path.exists(target)


def test_odd_images_pretokenize_and_train_from_folder(parity_bundle, tmp_path, capsys, caplog):
  rng = np.random.default_rng(7)
  kinds = sorted(fuzz_cases.IMAGE_KINDS)
  folder = str(tmp_path / "data")
  for label in ("a", "b"):
    fuzz_cases.write_images(os.path.join(folder, label), kinds, rng)
  out = str(tmp_path / "codes")
  with caplog.at_level(logging.WARNING):
    assert main(["pretokenize", "--bundle", parity_bundle, "--source", f"folder:{folder}", "--batch-size", "8",
                 "--out", out]) == 0
  assert f"wrote {2 * len(fuzz_cases.DECODABLE)} records" in capsys.readouterr().out
  assert sorted(os.listdir(out)) == ["codes.array_record", "codes.json"]
  assert "skipping unreadable image" in caplog.text
  workdir = str(tmp_path / "train")
  assert main(["train-tokenizer", "--config", f"{TINY}:nogan", "--workdir", workdir,
               f"--config.data.source=folder:{folder}", "--config.train.num_steps=2",
               "--config.train.checkpoint_every=2", "--config.data.batch_size=4"]) == 0
  assert os.path.isdir(os.path.join(workdir, "bundle"))
