"""Shared fixtures: the official tiny parity model and small random tokenizers."""
from __future__ import annotations

import os

import jax
import numpy as np
import pytest

import imagefolder_jax  # noqa: F401  # first: imports jax quietly beside the compiler extras (_startup)

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
PARITY_DIR = os.path.join(FIXTURES, "parity_tiny")


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


def relative_error(actual, expected) -> float:
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  return float(np.abs(actual - expected).max() / max(np.abs(expected).max(), 1e-12))


def nchw(x):
  return np.asarray(x).transpose(0, 3, 1, 2)


def pytest_configure(config):
  # Persistent XLA cache: subprocess tests (CLI runs, 8-device runs) reuse each other's compiles.
  cache = os.path.join(os.path.dirname(__file__), "..", ".jax_cache")
  os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.abspath(cache))
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
  jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


FAULTS_DIR = os.path.join(os.path.dirname(__file__), "programs", "faults")


@pytest.fixture(scope="session")
def faults():
  """faults(fail_at_step=3, fail_process=1, block_save="4:/tmp/m") -> environment variables that make
  the Python processes a test starts inject those faults (tests/programs/faults/sitecustomize.py)."""
  def env(**items) -> dict:
    path = os.environ.get("PYTHONPATH", "")
    return {"IFJ_FAULTS": ",".join(f"{k}={v}" for k, v in items.items()),
            "PYTHONPATH": FAULTS_DIR + (os.pathsep + path if path else "")}
  return env
