"""What tests share besides fixtures: repository paths, tolerances helpers, CLI subprocess helpers.

Importable from every test folder (`pythonpath` in pyproject.toml's pytest section)."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures")
PARITY_DIR = os.path.join(FIXTURES, "parity_tiny")
PROGRAMS = os.path.join(ROOT, "tests", "programs")
FAULTS_DIR = os.path.join(PROGRAMS, "faults")
CONFIGS = os.path.join(ROOT, "configs")


def relative_error(actual, expected) -> float:
  """max |actual - expected| / max |expected| in float64."""
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  return float(np.abs(actual - expected).max() / max(np.abs(expected).max(), 1e-12))


def nchw(x):
  return np.asarray(x).transpose(0, 3, 1, 2)


def run_program(name: str, *args: str, devices: int = 1, timeout: int = 900, **env) -> subprocess.CompletedProcess:
  """Runs tests/programs/NAME with `devices` fake CPU devices; returns the completed process."""
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "force_host_platform_device_count" not in f]
  full_env = dict(os.environ, JAX_PLATFORMS="cpu", **env)
  full_env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices}"])
  return subprocess.run([sys.executable, os.path.join(PROGRAMS, name), *args], cwd=ROOT, env=full_env,
                        capture_output=True, text=True, timeout=timeout)
