"""Progress lines for long evaluation loops: count, images/s and ETA, at most every `every` seconds."""
from __future__ import annotations

import logging
import time
from typing import Callable, Optional


def _duration(seconds: float) -> str:
  seconds = int(round(seconds))
  h, rest = divmod(seconds, 3600)
  m, s = divmod(rest, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class Progress:
  """`update(n)` after each batch; logs '<what>: done/total images, X images/s, ETA ...'."""

  def __init__(self, what: str, total: Optional[int] = None, every: float = 10.0,
               log: Callable[[str], None] = logging.info, clock: Callable[[], float] = time.perf_counter):
    self.what, self.total, self.every, self.log, self.clock = what, total, every, log, clock
    self.start = self.last = clock()
    self.done = 0

  def rate(self) -> float:
    elapsed = self.clock() - self.start
    return self.done / elapsed if elapsed > 0 else 0.0

  def line(self) -> str:
    rate = self.rate()
    total = f"/{self.total}" if self.total else ""
    eta = ""
    if self.total and rate > 0:
      eta = f", ETA {_duration(max(self.total - self.done, 0) / rate)}"
    return f"{self.what}: {self.done}{total} images, {rate:.1f} images/s{eta}"

  def update(self, n: int) -> None:
    self.done += int(n)
    now = self.clock()
    if now - self.last >= self.every or (self.total and self.done >= self.total):
      self.last = now
      self.log(self.line())
