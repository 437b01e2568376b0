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

from imagefolder_jax.errors import ImageFolderError
from imagefolder_jax.storage.integrity import exception_summary, file_record, quiet_orbax, record_problem

BUNDLE_FORMAT = 1
BUNDLE_JSON = "bundle.json"
VARIABLES_DIR = "variables"


class BundleError(ImageFolderError):
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
  from imagefolder_jax.parallel import sync
  sync(f"bundle variables {directory}")  # every process's files are on disk before they are summed
  if jax.process_index() == 0:
    meta = {"format": BUNDLE_FORMAT, "configs": configs,
            "files": {k: list(v) for k, v in sorted(file_record(target).items())}}
    tmp = os.path.join(directory, BUNDLE_JSON + ".tmp")
    with open(tmp, "w") as f:
      json.dump(meta, f, indent=1)
    os.replace(tmp, os.path.join(directory, BUNDLE_JSON))
  sync(f"bundle {directory}")


def read_bundle_configs(directory: str) -> dict[str, dict]:
  return _read_bundle_json(directory)["configs"]


def _read_bundle_json(directory: str) -> dict:
  path = os.path.join(directory, BUNDLE_JSON)
  if not os.path.isfile(path):
    raise BundleError(f"{directory}: not an imagefolder-jax bundle (no {BUNDLE_JSON}); "
                      "create one with `imagefolder-jax convert-official` or `imagefolder-jax export`")
  try:
    with open(path, "rb") as f:
      meta = json.loads(f.read().decode("utf-8"))
  except (OSError, UnicodeDecodeError, ValueError) as e:
    raise BundleError(f"{path}: unreadable ({exception_summary(e)})") from e
  if not isinstance(meta, dict):
    raise BundleError(f"{path}: expected a JSON object, got {type(meta).__name__}")
  if meta.get("format") != BUNDLE_FORMAT:
    raise BundleError(f"{directory}: bundle format {meta.get('format')} is not supported (expected {BUNDLE_FORMAT})")
  configs = meta.get("configs")
  if not isinstance(configs, dict) or not all(isinstance(c, dict) for c in configs.values()):
    raise BundleError(f"{path}: 'configs' must map model names to config objects")
  files = meta.get("files")
  if files is not None:
    try:
      meta["files"] = {str(k): (int(v[0]), int(v[1])) for k, v in files.items()}
    except (AttributeError, TypeError, ValueError, IndexError) as e:
      raise BundleError(f"{path}: 'files' must map file names to [bytes, crc32] ({exception_summary(e)})") from e
  return meta


def load_bundle(directory: str) -> tuple[dict[str, dict], dict[str, Any]]:
  """Reads a bundle: (configs, variables as NumPy trees).

  Raises `BundleError` (one line) when bundle.json or the variables are unreadable, when configs
  and variables name different models, or when an array holds NaN/inf (weights never do).
  """
  import orbax.checkpoint as ocp
  meta = _read_bundle_json(directory)
  configs = meta["configs"]
  target = os.path.join(os.path.abspath(directory), VARIABLES_DIR)
  if not os.path.isdir(target):
    raise BundleError(f"{directory}: no {VARIABLES_DIR}/ directory (an incomplete copy?)")
  if meta.get("files") is not None:
    problem = record_problem(target, meta["files"], checksums=True)
    if problem is not None:
      raise BundleError(f"{directory}: {VARIABLES_DIR}/{problem}")
  try:
    with quiet_orbax():
      variables = ocp.StandardCheckpointer().restore(target)
  except Exception as e:  # orbax/tensorstore raise bare Exception, ValueError, KeyError, JSON errors
    raise BundleError(f"{directory}: variables are unreadable ({exception_summary(e)})") from e
  variables = jax.tree.map(np.asarray, variables)
  if not isinstance(variables, dict) or set(variables) != set(configs):
    found = sorted(variables) if isinstance(variables, dict) else type(variables).__name__
    raise BundleError(f"{directory}: configs name models {sorted(configs)} but variables hold {found}")
  for path, x in jax.tree_util.tree_leaves_with_path(variables):
    if np.issubdtype(x.dtype, np.inexact) and not np.all(np.isfinite(x)):
      raise BundleError(f"{directory}: array {dotted_path(path)} holds NaN/inf")
  return configs, variables


def check_variables(source: str, variables: Any, expected: Any) -> None:
  """Raises `BundleError` naming the first array of `expected` (abstract arrays, e.g. from
  `jax.eval_shape(module.init, ...)`) that `variables` lacks or holds with another shape or dtype
  kind (float / int / bool), or the first array `variables` holds that `expected` does not."""
  want = {dotted_path(p): x for p, x in jax.tree_util.tree_leaves_with_path(nn_unbox(expected))}
  have = {dotted_path(p): x for p, x in jax.tree_util.tree_leaves_with_path(variables)}
  for name, x in want.items():
    if name not in have:
      raise BundleError(f"{source}: array {name} is missing")
    got = have[name]
    if tuple(np.shape(got)) != tuple(x.shape):
      raise BundleError(f"{source}: array {name} has shape {tuple(np.shape(got))}, expected {tuple(x.shape)}")
    if np.dtype(got.dtype).kind != np.dtype(x.dtype).kind:
      raise BundleError(f"{source}: array {name} is {np.dtype(got.dtype).name}, expected {np.dtype(x.dtype).name}")
  extra = sorted(set(have) - set(want))
  if extra:
    raise BundleError(f"{source}: unexpected array {extra[0]} ({len(extra)} in all)")


def dotted_path(path) -> str:
  """A pytree key path as `a.b.0.c`."""
  parts = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return ".".join(parts)


def nn_unbox(tree):
  return _unbox(tree)


def _unbox(tree):
  import flax.linen as nn
  return nn.unbox(tree)
