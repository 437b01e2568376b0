"""Inference bundles: a directory holding model configs (JSON) and variables (orbax).

Layout::

  BUNDLE/
    bundle.json          {"format": 1, "configs": {"tokenizer": {...}, "generator": {...}}}
    variables/           orbax StandardCheckpointer tree {"tokenizer": {...}, "generator": {...}, ...}

The training checkpoint manager (resumable training state) lives in `imagefolder_jax.train.checkpointing`.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import zlib
from typing import Any, Optional

import jax
import numpy as np

BUNDLE_FORMAT = 1
BUNDLE_JSON = "bundle.json"
VARIABLES_DIR = "variables"
_CRC_CHUNK = 1 << 22


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
      raise BundleError(f"{directory}: array {_dotted(path)} holds NaN/inf")
  return configs, variables


def check_variables(source: str, variables: Any, expected: Any) -> None:
  """Raises `BundleError` naming the first array of `expected` (abstract arrays, e.g. from
  `jax.eval_shape(module.init, ...)`) that `variables` lacks or holds with another shape or dtype
  kind (float / int / bool), or the first array `variables` holds that `expected` does not."""
  want = {_dotted(p): x for p, x in jax.tree_util.tree_leaves_with_path(nn_unbox(expected))}
  have = {_dotted(p): x for p, x in jax.tree_util.tree_leaves_with_path(variables)}
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


# ----------------------------------------------------------------------------- integrity records
def file_record(path: str, exclude: tuple[str, ...] = ()) -> dict[str, tuple[int, int]]:
  """{path relative to `path`: (bytes, CRC32)} of every file under directory `path`, except the
  relative paths in `exclude`."""
  out = {}
  for root, _, names in os.walk(path):
    for name in names:
      full = os.path.join(root, name)
      rel = os.path.relpath(full, path)
      if rel not in exclude:
        out[rel] = (os.path.getsize(full), crc32(full))
  return out


def crc32(path: str) -> int:
  crc = 0
  with open(path, "rb") as f:
    while chunk := f.read(_CRC_CHUNK):
      crc = zlib.crc32(chunk, crc)
  return crc


def record_problem(path: str, files: dict[str, tuple[int, int]], checksums: bool) -> Optional[str]:
  """Why directory `path` does not match its integrity record `files` (see `file_record`), as
  "file REL ..." text, or None. Sizes are always compared; CRC32s when `checksums`."""
  for rel, (size, crc) in files.items():
    full = os.path.join(path, rel)
    if not os.path.isfile(full):
      return f"{rel} is missing"
    actual = os.path.getsize(full)
    if actual != size:
      return f"{rel} has {actual} bytes, {size} were written"
    if checksums and crc32(full) != crc:
      return f"{rel} fails its CRC32 check (damaged since it was written)"
  return None


def exception_summary(e: BaseException, limit: int = 240) -> str:
  """`Type: message` of the innermost exception in a chain, first line only (for one-line errors:
  tensorstore's reason rather than orbax's multi-line wrapper)."""
  chain, seen = [], set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    chain.append(e)
    e = e.__cause__ or e.__context__
  inner = chain[-1]
  text = " ".join((str(inner).strip().splitlines() or [""])[0].split())
  text = f"{type(inner).__name__}: {text}" if text else type(inner).__name__
  return text if len(text) <= limit else text[:limit - 3] + "..."


class _FailedReadLogFilter(logging.Filter):
  """Drops asyncio's "exception was never retrieved" records left by a failed orbax read (the
  failure itself is already reported once)."""

  def filter(self, record: logging.LogRecord) -> bool:
    if "exception was never retrieved" not in record.getMessage() or not record.exc_info:
      return True
    tb = record.exc_info[2]
    while tb is not None:
      if f"{os.sep}orbax{os.sep}" in tb.tb_frame.f_code.co_filename:
        return False
      tb = tb.tb_next
    return "OCDBT" not in str(record.exc_info[1])


def _is_failed_read_noise(unraisable) -> bool:
  """Leftovers of a failed orbax read that Python reports as unraisable exceptions.

  When one array of a restore fails, orbax's asyncio loop ends while tensorstore still completes
  the other reads: each completion then reports "Event loop is closed", and each read coroutine
  that failed after the loop ended reports its own (already reported) error.
  """
  value = getattr(unraisable, "exc_value", None)
  if isinstance(value, RuntimeError) and str(value) == "Event loop is closed":
    return True
  code = getattr(getattr(unraisable, "object", None), "cr_code", None)
  return code is not None and f"{os.sep}orbax{os.sep}" in code.co_filename


def _install_noise_filters() -> None:
  """Process-wide (the leftovers arrive after the failed call returns) and idempotent."""
  asyncio_log = logging.getLogger("asyncio")
  if not any(isinstance(f, _FailedReadLogFilter) for f in asyncio_log.filters):
    asyncio_log.addFilter(_FailedReadLogFilter())
  previous = sys.unraisablehook
  if getattr(previous, "_imagefolder_filter", False):
    return

  def hook(unraisable):
    if _is_failed_read_noise(unraisable):
      logging.getLogger(__name__).debug("ignored after a failed orbax read: %s", unraisable.exc_value)
      return
    previous(unraisable)

  hook._imagefolder_filter = True
  sys.unraisablehook = hook


@contextlib.contextmanager
def quiet_orbax():
  """Silences orbax/absl logging (unless DEBUG logging is on) and the asyncio leftovers of failed
  reads, so that a damaged checkpoint or bundle costs one line, not hundreds."""
  _install_noise_filters()
  loggers = [logging.getLogger(n) for n in ("absl", "orbax")]
  levels = [l.level for l in loggers]
  if not logging.getLogger().isEnabledFor(logging.DEBUG):
    for l in loggers:
      l.setLevel(logging.CRITICAL)
  try:
    yield
  finally:
    for l, level in zip(loggers, levels):
      l.setLevel(level)


def _dotted(path) -> str:
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
