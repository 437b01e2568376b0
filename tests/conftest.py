"""Shared fixtures: the official tiny parity model and small random tokenizers."""
# ruff: noqa: E402  (XLA_FLAGS are set before jax is imported)
from __future__ import annotations

# isort: off
import os

# XLA:CPU's compile time, not the arithmetic, dominates a suite of tiny models: LLVM's cheap
# pipeline and the classic fusion emitters halve the suite's CPU time (docs/development.md). Both
# change how XLA:CPU generates code, not what a program computes (no fast math); set before any
# backend starts, inherited by the processes the tests launch, and overridable through XLA_FLAGS.
TEST_XLA_FLAGS = {"--xla_backend_optimization_level": "0", "--xla_cpu_use_fusion_emitters": "false"}
_given = os.environ.get("XLA_FLAGS", "").split()
os.environ["XLA_FLAGS"] = " ".join(_given + [f"{k}={v}" for k, v in TEST_XLA_FLAGS.items()
                                             if not any(f.split("=")[0] == k for f in _given)])
import imagefolder_jax  # noqa: F401  # first import of jax: quietly beside the compiler extras (_startup)
# isort: on

import jax
import numpy as np
import pytest
from support import FAULTS_DIR, PARITY_DIR, ROOT


@pytest.fixture(scope="session")
def parity_expected():
  return dict(np.load(os.path.join(PARITY_DIR, "expected.npz")))


@pytest.fixture(scope="session")
def parity_bundle(tmp_path_factory):
  """The official tiny tokenizer (+ generator when its converter exists) converted into a bundle."""
  from imagefolder_jax.cli import main
  out = str(tmp_path_factory.mktemp("parity") / "bundle")
  args = ["convert-official", "--tokenizer", os.path.join(PARITY_DIR, "tokenizer.pt"),
          "--config", os.path.join(PARITY_DIR, "config.json"), "--out", out]
  try:
    import imagefolder_jax.convert.official_generator  # noqa: F401
    args += ["--generator", os.path.join(PARITY_DIR, "generator.pt")]
  except ImportError:
    pass
  assert main(args) == 0
  return out


def pytest_configure(config):
  # Persistent XLA cache: subprocess tests (CLI runs, 8-device runs) reuse each other's compiles.
  cache = os.path.join(ROOT, ".jax_cache")
  os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.abspath(cache))
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
  jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


@pytest.fixture(scope="session")
def faults():
  """faults(fail_at_step=3, fail_process=1, block_save="4:/tmp/m") -> environment variables that make
  the Python processes a test starts inject those faults (tests/programs/faults/sitecustomize.py)."""
  def env(**items) -> dict:
    path = os.environ.get("PYTHONPATH", "")
    return {"IFJ_FAULTS": ",".join(f"{k}={v}" for k, v in items.items()),
            "PYTHONPATH": FAULTS_DIR + (os.pathsep + path if path else "")}
  return env


# Rough seconds per test file in .ci/run on the 2-core CI machine (docs/development.md). Files are
# handed to the two xdist workers (--dist loadfile, no reordering: pyproject.toml) heaviest first,
# so that the workers finish together instead of one ending on a long file the other has no share of.
FILE_SECONDS = {
    "parallel/test_multihost.py": 235, "planning/test_plan_topology.py": 210,
    "evaluation/test_cli_evaluation.py": 90, "ops/test_filtering.py": 70, "train/test_train_tokenizer.py": 60,
    "convert/test_export_official.py": 55, "parallel/test_eight_devices_training.py": 55,
    "train/test_checkpointing.py": 55, "cli/test_reliability.py": 50, "parallel/test_eight_devices.py": 45,
    "inference/test_sampling.py": 45, "inference/test_bf16_sampling.py": 35, "models/test_discriminator.py": 25,
    "train/test_train_generator.py": 25, "models/test_generator.py": 25,
}


def pytest_collection_modifyitems(config, items):
  # A test that reads the official tiny model or its outputs is a parity test, wherever it lives.
  for item in items:
    if {"parity_bundle", "parity_expected"} & set(getattr(item, "fixturenames", ())):
      item.add_marker("parity")
  tests_dir = os.path.dirname(os.path.abspath(__file__))
  weight = lambda item: FILE_SECONDS.get(os.path.relpath(str(item.path), tests_dir).replace(os.sep, "/"), 0)
  items.sort(key=weight, reverse=True)   # stable: a file's tests keep their order


@pytest.fixture(scope="session")
def micro_bundle(tmp_path_factory):
  """The micro tokenizer + generator pair as a bundle (support.micro_configs: 64 px, scales 1, 2, 3,
  10 classes, random weights)."""
  from support import save_micro_bundle
  return save_micro_bundle(str(tmp_path_factory.mktemp("micro") / "bundle"))


@pytest.fixture(scope="session")
def tiny_tokenizer_bundle(tmp_path_factory):
  """configs/tokenizer_tiny.py's tokenizer with random weights, as a bundle (32 px, scales 1, 2, 4):
  for generator training and plans, which need a tokenizer but not a trained one."""
  from imagefolder_jax.storage.bundle import save_bundle
  from imagefolder_jax.train.configuration import load_config
  from imagefolder_jax.train.tokenizer_task import TokenizerTask
  task = TokenizerTask(load_config(os.path.join(ROOT, "configs", "tokenizer_tiny.py"), [
      "--config.loss.lpips=0.0", "--config.loss.semantic=0.0", "--config.loss.gan=0.0"]), load_frozen=False)
  out = str(tmp_path_factory.mktemp("tiny_tok") / "bundle")
  state = jax.jit(task.init_state)(jax.random.key(0), {"image": np.zeros((1, 32, 32, 3), np.float32)})
  save_bundle(out, *task.export(state))
  return out
