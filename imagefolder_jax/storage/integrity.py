"""Telling a complete write from a damaged one, and failing a damaged read in one line.

`file_record` is written beside a checkpoint or bundle when it is saved; `record_problem` compares
the directory with it before a restore. `quiet_orbax` keeps orbax's logging and the asyncio leftovers
of a failed read out of the one-line error that explains it.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import zlib
from typing import Optional

_CRC_CHUNK = 1 << 22


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
