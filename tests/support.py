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


# Compiler options for a program that a test runs long (tens of thousands of draws, many training
# steps): XLA:CPU's full LLVM pipeline, which tests/conftest.py switches off for the suite (compile
# time dominates elsewhere). For jax.jit(..., compiler_options=RUN_LONG).
RUN_LONG = {"xla_backend_optimization_level": 3}


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


def eight_device_checks(*names: str, **paths: str) -> dict:
  """Runs tests/programs/eight_devices.py's checks `names` in one 8-device process; paths:
  parity_bundle, parity_expected, micro_bundle, configs, work (as the checks need them).
  -> {'sections': {name: stdout}, 'status': {name: 'OK' | 'FAILED'}, 'stderr', 'returncode'}."""
  import re
  flags = [x for k, v in paths.items() for x in ("--" + k.replace("_", "-"), v)]
  result = run_program("eight_devices.py", *flags, *names, devices=8, timeout=1800)
  sections = dict(re.findall(r"^=== (\w+)\n(.*?)^=== \1 (?:OK|FAILED)$", result.stdout, re.S | re.M))
  status = dict(re.findall(r"^=== (\w+) (OK|FAILED)$", result.stdout, re.M))
  return {"sections": sections, "status": status, "stderr": result.stderr, "returncode": result.returncode}


def eight_device_check_passed(checks: dict, name: str) -> str:
  """The check's output; fails with its traceback (or the process's stderr) unless it passed."""
  status = checks["status"].get(name)
  assert status == "OK", checks["sections"].get(name, "") + "\n" + checks["stderr"][-4000:]
  return checks["sections"][name]


# A micro tokenizer + generator pair (64 px, 3 scales, 64-entry codebooks, random weights) keeps
# compiles to a few seconds: for tests whose property does not depend on the model (sampling
# mechanics, multi-process equality, launchers). Parity with the official model uses parity_tiny.
MICRO_SCALES = (1, 2, 3)


def micro_configs():
  """(TokenizerConfig, GeneratorConfig) of the micro pair."""
  from imagefolder_jax.models.generator import GeneratorConfig
  from imagefolder_jax.models.quantizer import QuantizerConfig
  from imagefolder_jax.models.tokenizer import TokenizerConfig
  from imagefolder_jax.models.vit import ViTConfig
  tokenizer = TokenizerConfig(
      vit=ViTConfig(width=32, depth=1, num_heads=2, patch_size=16, image_size=64),
      quantizer=QuantizerConfig(codebook_size=64, latent_dim=8, scales=MICRO_SCALES, num_phi=2,
                                codebook_update="gradient"),
      num_branches=2)
  generator = GeneratorConfig(depth=2, width=32, num_heads=2, num_classes=10, num_branches=2, codebook_size=64,
                              latent_dim=8, scales=MICRO_SCALES)
  return tokenizer, generator


def random_variables(module, *args, scale: float, seed: int):
  """Variables of `module` with N(0, scale^2) entries (peaked logits; the official init is near-uniform)."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  shapes = nn.unbox(jax.eval_shape(module.init, jax.random.key(0), *args))
  rng = np.random.default_rng(seed)
  # Integer state (codebook usage step counters) keeps its dtype: bundles check dtypes on load.
  return jax.tree.map(lambda x: (scale * rng.standard_normal(x.shape)).astype(np.float32)
                      if jnp.issubdtype(x.dtype, jnp.floating) else np.zeros(x.shape, x.dtype), shapes)


def micro_models():
  """(tokenizer module, its variables, generator module, its variables) of the micro pair."""
  import jax.numpy as jnp

  from imagefolder_jax.models.generator import NextScaleGenerator
  from imagefolder_jax.models.tokenizer import ImageFolderTokenizer
  tok_config, gen_config = micro_configs()
  tok, gen = ImageFolderTokenizer(tok_config), NextScaleGenerator(gen_config)
  tok_vars = random_variables(tok, jnp.zeros((1, 64, 64, 3)), scale=0.3, seed=1)
  n = gen_config.num_tokens
  gen_vars = random_variables(gen, jnp.zeros((1,), jnp.int32), jnp.zeros((1, n - 1, 16)), scale=0.2, seed=2)
  return tok, tok_vars, gen, gen_vars


def save_micro_bundle(path: str) -> str:
  """Writes the micro pair as a bundle (tokenizer + generator) at `path`; returns `path`."""
  from imagefolder_jax.inference.generator import Generator
  from imagefolder_jax.inference.tokenizer import Tokenizer
  tok_config, gen_config = micro_configs()
  _, tok_vars, _, gen_vars = micro_models()
  Generator(Tokenizer(tok_config, tok_vars), gen_config, gen_vars).save(path)
  return path
