"""Inference bundles: a directory holding model configs (JSON) and variables (orbax).

Layout::

  BUNDLE/
    bundle.json          {"format": 1, "configs": {"tokenizer": {...}, "generator": {...}}}
    variables/           orbax StandardCheckpointer tree {"tokenizer": {...}, "generator": {...}, ...}

The training checkpoint manager (resumable training state) lives in `imagefolder_jax.train.checkpointing`.
"""
from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np

BUNDLE_FORMAT = 1
BUNDLE_JSON = "bundle.json"
VARIABLES_DIR = "variables"


class BundleError(ValueError):
  """A directory is not a readable imagefolder-jax bundle, or lacks a needed model."""


def save_bundle(directory: str, configs: dict[str, dict], variables: dict[str, Any]) -> None:
  """Writes configs and variables (host arrays) to `directory` (replaced if present).

  On several processes every process calls this with the same values (orbax writes collectively;
  process 0 writes the metadata); `directory` must then be on storage all processes share."""
  import orbax.checkpoint as ocp
  if set(configs) != set(variables):
    raise BundleError(f"configs {sorted(configs)} and variables {sorted(variables)} name different models")
  directory = os.path.abspath(directory)
  os.makedirs(directory, exist_ok=True)
  target = os.path.join(directory, VARIABLES_DIR)
  variables = jax.tree.map(np.asarray, _unbox(variables))
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(target, variables, force=True)
  checkpointer.wait_until_finished()
  if jax.process_index() == 0:
    with open(os.path.join(directory, BUNDLE_JSON), "w") as f:
      json.dump({"format": BUNDLE_FORMAT, "configs": configs}, f, indent=1)
  from imagefolder_jax.parallel import sync
  sync(f"bundle {directory}")


def read_bundle_configs(directory: str) -> dict[str, dict]:
  path = os.path.join(directory, BUNDLE_JSON)
  if not os.path.isfile(path):
    raise BundleError(f"{directory}: not an imagefolder-jax bundle (no {BUNDLE_JSON}); "
                      "create one with `imagefolder-jax convert-official` or `imagefolder-jax export`")
  with open(path) as f:
    meta = json.load(f)
  if meta.get("format") != BUNDLE_FORMAT:
    raise BundleError(f"{directory}: bundle format {meta.get('format')} is not supported (expected {BUNDLE_FORMAT})")
  return meta["configs"]


def load_bundle(directory: str) -> tuple[dict[str, dict], dict[str, Any]]:
  """Reads a bundle: (configs, variables as NumPy trees)."""
  import orbax.checkpoint as ocp
  configs = read_bundle_configs(directory)
  checkpointer = ocp.StandardCheckpointer()
  variables = checkpointer.restore(os.path.join(os.path.abspath(directory), VARIABLES_DIR))
  return configs, jax.tree.map(np.asarray, variables)


def _unbox(tree):
  import flax.linen as nn
  return nn.unbox(tree)
