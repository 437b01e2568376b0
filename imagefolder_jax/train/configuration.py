"""Loading `ml_collections` config files with command-line overrides.

  load_config("configs/tokenizer_demo.py:full", ["--config.train.num_steps=100", "--config.data.batch_size", "16"])

A config file defines `get_config(arg: str = "")`; `path:arg` passes `arg`. Overrides are
`--config.a.b=value` (or `--config.a.b value`); values are parsed as Python literals and must
keep the type of the field they replace (ints widen to floats).
"""
from __future__ import annotations

import ast
import importlib.util
import os
import sys
from typing import Sequence

import ml_collections

from imagefolder_jax.errors import ImageFolderError


class ConfigFileError(ImageFolderError):
  """A config file or override is invalid."""


def load_config(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise ConfigFileError(f"config file not found: {path}")
  directory = os.path.dirname(os.path.abspath(path))
  # Config files may import their siblings as `from configs import x`.
  for p in (os.path.dirname(directory), directory):
    if p not in sys.path:
      sys.path.insert(0, p)
  module_spec = importlib.util.spec_from_file_location(f"_ifj_config_{abs(hash(path))}", path)
  module = importlib.util.module_from_spec(module_spec)
  try:
    module_spec.loader.exec_module(module)
  except Exception as e:
    raise ConfigFileError(f"{path}: cannot load ({type(e).__name__}: {e})") from e
  if not hasattr(module, "get_config"):
    raise ConfigFileError(f"{path}: defines no get_config()")
  config = module.get_config(arg) if arg else module.get_config()
  apply_overrides(config, overrides)
  return config


def _pairs(overrides: Sequence[str]):
  items = list(overrides)
  i = 0
  while i < len(items):
    item = items[i]
    if not item.startswith("--config."):
      raise ConfigFileError(f"unrecognized argument {item!r} (overrides look like --config.a.b=value)")
    if "=" in item:
      key, value = item[len("--config."):].split("=", 1)
      i += 1
    else:
      if i + 1 >= len(items):
        raise ConfigFileError(f"{item} needs a value")
      key, value = item[len("--config."):], items[i + 1]
      i += 2
    yield key, value


def apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[str]) -> None:
  for key, raw in _pairs(overrides):
    *parents, leaf = key.split(".")
    node = config
    for p in parents:
      if p not in node:
        raise ConfigFileError(f"--config.{key}: unknown field {p!r}")
      node = node[p]
    if leaf not in node:
      raise ConfigFileError(f"--config.{key}: unknown field (known: {', '.join(sorted(node.keys()))})")
    old = node[leaf]
    try:
      value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
      value = raw
    if isinstance(old, bool):
      if not isinstance(value, bool):
        raise ConfigFileError(f"--config.{key}={raw}: expected True or False")
    elif isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
      value = float(value)
    elif isinstance(old, str) and not isinstance(value, str):
      value = raw
    elif isinstance(old, (tuple, list)) and isinstance(value, (tuple, list)):
      value = type(old)(value)
    elif old is not None and not isinstance(value, type(old)):
      raise ConfigFileError(f"--config.{key}={raw}: expected {type(old).__name__}, got {type(value).__name__}")
    node[leaf] = value
