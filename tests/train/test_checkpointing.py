"""Training checkpoints: a damaged newest checkpoint falls back to the newest usable step (moved
aside, one warning line), NaN states and other architectures are refused, and a real training run
killed (SIGKILL during an asynchronous save) or left with a truncated newest checkpoint resumes to
the uninterrupted run's parameters, bit for bit. The multi-process kill/resume is in
tests/parallel/test_multihost.py."""
from __future__ import annotations

import glob
import logging
import os
import shutil
import signal
import subprocess
import sys
import time

import fuzz_cases
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from support import ROOT

import imagefolder_jax as ifj
from imagefolder_jax.cli import main
from imagefolder_jax.train import checkpointing
from imagefolder_jax.train.checkpointing import CheckpointError

TINY = os.path.join(ROOT, "configs", "tokenizer_tiny.py")


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


# -------------------- crash safety (training)
COMMON = ["train-tokenizer", "--config", f"{TINY}:nogan", "--config.train.num_steps=6",
          "--config.train.checkpoint_every=2", "--config.train.keep_checkpoints=3"]


def _bundle_params(workdir):
  return jax.tree.leaves(ifj.Tokenizer.load(os.path.join(workdir, "bundle")).variables)


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("straight") / "w")
  assert main(COMMON + ["--workdir", workdir]) == 0
  return workdir


@pytest.mark.slow
def test_sigkill_during_async_save_resumes_equal_to_uninterrupted(straight_run, tmp_path, caplog, capsys, faults):
  """SIGKILL while step 4's asynchronous save is in flight: the rerun resumes from step 2 and ends with
  the uninterrupted run's parameters bit for bit; `export --workdir` gives that bundle; rerunning the
  finished run does nothing; another architecture in the same workdir is refused."""
  workdir = str(tmp_path / "crashed")
  marker = str(tmp_path / "blocked")
  env = dict(os.environ, JAX_PLATFORMS="cpu", **faults(block_save=f"4:{marker}"))
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
  assert not os.path.exists(os.path.join(workdir, "bundle"))
  with caplog.at_level(logging.INFO, logger="imagefolder_jax.train"):
    assert main(COMMON + ["--workdir", workdir]) == 0
  assert "resumed from step 2" in caplog.text and "save of step 4 did not finish" in caplog.text
  expected = _bundle_params(straight_run)
  for a, b in zip(expected, _bundle_params(workdir)):
    np.testing.assert_array_equal(a, b)
  # Export from the workdir gives the bundle written at the end of training.
  out = str(tmp_path / "exported")
  assert main(["export", "--workdir", workdir, "--out", out]) == 0
  tok = ifj.Tokenizer.load(out)
  for a, b in zip(expected, jax.tree.leaves(tok.variables)):
    np.testing.assert_array_equal(a, b)
  images = np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
  assert tok.reconstruct(images).shape == (2, 32, 32, 3)
  # Rerunning a finished run does nothing and succeeds; a changed architecture is refused in one line.
  capsys.readouterr()
  assert main(COMMON + ["--workdir", workdir]) == 0
  assert main(COMMON + ["--workdir", workdir, "--config.model.vit.width=64"]) == 2
  err = capsys.readouterr().err.strip()
  assert "different model" in err and len(err.splitlines()) == 1, err


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
