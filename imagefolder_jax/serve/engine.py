"""The serving engine: one worker thread owns the device; requests wait in a bounded queue.

* Sample requests are cut into rows (one per image). When the worker is free it takes the oldest
  request and fills one sampler call with rows from it and from every other waiting request that
  shares its static settings (top-k, top-p, guidance, forced branches), up to `max_batch` rows; the
  call is padded to the next compiled batch size (`batch_sizes`), so concurrent requests share calls
  and no request shape triggers a compile at run time.
* Other device work (encode, reconstruct, decode, per-scale decode) runs as single jobs in order.
* At most `max_queue` requests are admitted (waiting or running); one more raises `Busy` (HTTP 503)
  instead of letting the queue grow without end.
* Every request has a deadline (`request_timeout` seconds): a waiting request whose deadline passed
  is dropped unrun; the caller stops waiting at the deadline and raises `TimedOut` (HTTP 504).
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import logging
import threading
import time
from typing import Any, Callable, Optional, Sequence

import numpy as np

from imagefolder_jax.serve.programs import Rows, RowSampler, warm_progressive

log = logging.getLogger("imagefolder_jax.serve")


class Busy(Exception):
  """The queue is full: retry later (HTTP 503)."""


class TimedOut(Exception):
  """The request passed its time limit (HTTP 504)."""


@dataclasses.dataclass(frozen=True)
class EngineSettings:
  """batch_sizes: compiled sampler batch sizes, ascending; a call is padded up to the next one and
  max(batch_sizes) is the largest call. max_queue: requests admitted at once (waiting + running).
  request_timeout: seconds from admission to answer. top_k, top_p: the settings whose programs
  are compiled at start (others compile on first use); the page and the API default to them."""
  batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16)
  max_queue: int = 64
  request_timeout: float = 120.0
  top_k: int = 750
  top_p: float = 0.95

  def __post_init__(self):
    sizes = tuple(sorted(set(int(b) for b in self.batch_sizes)))
    if not sizes or sizes[0] < 1:
      raise ValueError(f"batch sizes must be positive ints, got {self.batch_sizes}")
    object.__setattr__(self, "batch_sizes", sizes)
    if self.max_queue < 1:
      raise ValueError(f"max_queue must be >= 1, got {self.max_queue}")
    if not self.request_timeout > 0:
      raise ValueError(f"request_timeout must be > 0 seconds, got {self.request_timeout}")

  @property
  def max_batch(self) -> int:
    return self.batch_sizes[-1]


@dataclasses.dataclass
class _Job:
  deadline: float
  future: concurrent.futures.Future
  # A sample job: rows plus the static settings; otherwise `call` (a function of no arguments).
  rows: Optional[Rows] = None
  static: Optional[tuple] = None
  call: Optional[Callable[[], Any]] = None
  done_rows: int = 0
  outputs: list = dataclasses.field(default_factory=list)
  finished: bool = False

  @property
  def remaining(self) -> int:
    return len(self.rows) - self.done_rows if self.rows is not None else 0


def _take(rows: Rows, start: int, stop: int) -> Rows:
  forced = {b: [s[start:stop] for s in scales] for b, scales in rows.forced.items()}
  return Rows(rows.labels[start:stop], rows.seeds[start:stop], rows.cfg[start:stop],
              rows.temperature[start:stop], rows.indices[start:stop], forced)


def _concat(parts: Sequence[Rows]) -> Rows:
  if len(parts) == 1:
    return parts[0]
  cat = lambda name: np.concatenate([getattr(p, name) for p in parts])  # noqa: E731
  forced = {b: [np.concatenate([p.forced[b][s] for p in parts]) for s in range(len(parts[0].forced[b]))]
            for b in parts[0].forced}
  return Rows(cat("labels"), cat("seeds"), cat("cfg"), cat("temperature"), cat("indices"), forced)


class Engine:
  """Owns a loaded `Generator` (and its tokenizer) and the worker thread that runs every program.

  Use `start()` (compiles the warm programs, starts the worker), then `await sample(...)` /
  `await run(fn)` from the event loop, and `stop()` at shutdown. Counters for /api/health: `stats`.
  """

  def __init__(self, generator, settings: EngineSettings = EngineSettings(),
               sampler: Optional[RowSampler] = None):
    """sampler: a `RowSampler` of `generator` to share (its compiled programs) with another engine."""
    self.generator = generator
    self.tokenizer = generator.tokenizer
    self.settings = settings
    self.sampler = sampler if sampler is not None else RowSampler(generator)
    self._pending: collections.deque[_Job] = collections.deque()
    self._admitted = 0
    self._cond = threading.Condition()
    self._stopping = False
    self._thread: Optional[threading.Thread] = None
    self.stats = collections.Counter()

  # ----------------------------------------------------------------------------- life cycle
  def warm(self) -> float:
    """Compiles the sampler for every batch size (default top-k/top-p, guidance on, nothing forced)
    and the tokenizer programs the page uses (encode, decode, per-scale decode; all batch 1: the
    page sends one image at a time). Returns seconds spent."""
    start = time.perf_counter()
    s = self.settings
    for size in s.batch_sizes:
      rows = Rows(np.zeros(1, np.int32), np.zeros(1, np.int64), np.ones(1, np.float32),
                  np.ones(1, np.float32), np.zeros(1, np.int32), {})
      self.sampler(rows, s.top_k, s.top_p, True, size)
      log.info("serve: sampler for batch %d compiled (%.0f s so far)", size, time.perf_counter() - start)
    r = self.tokenizer.resolution
    np.asarray(self.tokenizer.decode(self.tokenizer.encode(np.zeros((1, r, r, 3), np.float32))))
    warm_progressive(self.tokenizer, 1)
    return time.perf_counter() - start

  def start(self, warm: bool = True) -> None:
    if warm:
      log.info("serve: programs compiled in %.1f s", self.warm())
    self._thread = threading.Thread(target=self._work, name="imagefolder-serve-worker", daemon=True)
    self._thread.start()

  def stop(self) -> None:
    with self._cond:
      self._stopping = True
      self._cond.notify_all()
    if self._thread is not None:
      self._thread.join(timeout=30)

  # ----------------------------------------------------------------------------- submission
  def check_capacity(self) -> None:
    """Raises Busy when no request can be admitted now (a cheap check before costly preparation)."""
    with self._cond:
      full = self._admitted >= self.settings.max_queue
      if full:
        self.stats["busy"] += 1
    if full:
      raise Busy(f"busy: {self.settings.max_queue} requests queued (the limit); retry shortly")

  def _admit(self, job: _Job) -> None:
    with self._cond:
      if self._stopping:
        raise Busy("the server is shutting down")
      if self._admitted >= self.settings.max_queue:
        self.stats["busy"] += 1
        raise Busy(f"busy: {self._admitted} requests queued (limit {self.settings.max_queue}); retry shortly")
      self._admitted += 1
      self._pending.append(job)
      self._cond.notify()

  async def _wait(self, job: _Job):
    remaining = job.deadline - time.monotonic()
    try:
      # shield: giving up on the answer must not cancel the job's future under the worker.
      answer = asyncio.shield(asyncio.wrap_future(job.future))
      return await asyncio.wait_for(answer, timeout=max(remaining, 0.0))
    except asyncio.TimeoutError:
      self.stats["timed_out"] += 1
      raise TimedOut(f"the request took longer than the {self.settings.request_timeout:g} s limit") from None

  async def sample(self, rows: Rows, top_k: int, top_p: float, guidance: bool) -> dict:
    """Samples `rows` (any count; split over calls of at most max_batch rows). Returns ids[branch][scale]
    (R, n_s, n_s) int32 and images (R, H, W, 3) float32 in [-1, 1], host arrays."""
    static = (int(top_k), float(top_p), bool(guidance), tuple(sorted(rows.forced)))
    job = _Job(deadline=time.monotonic() + self.settings.request_timeout, future=concurrent.futures.Future(),
               rows=rows, static=static)
    self._admit(job)
    return await self._wait(job)

  async def run(self, call: Callable[[], Any]) -> Any:
    """Runs `call()` on the worker (device work other than sampling); its exceptions propagate."""
    job = _Job(deadline=time.monotonic() + self.settings.request_timeout, future=concurrent.futures.Future(),
               call=call)
    self._admit(job)
    return await self._wait(job)

  def queued(self) -> int:
    with self._cond:
      return self._admitted

  # ----------------------------------------------------------------------------- worker
  def _finish(self, job: _Job, result=None, error: Optional[BaseException] = None) -> None:
    with self._cond:
      if job.finished:  # answered already (an error after part of a batch was delivered)
        return
      job.finished = True
      self._admitted -= 1
    if job.future.done():  # cancelled: nobody waits for it
      return
    if error is not None:
      job.future.set_exception(error)
    else:
      job.future.set_result(result)

  def _next_batch(self) -> Optional[list[_Job]]:
    """Waits for work; drops expired jobs; returns [call job] or the sample jobs of the next call
    (None when stopping)."""
    while True:
      with self._cond:
        while not self._pending and not self._stopping:
          self._cond.wait()
        if self._stopping:
          return None
        now = time.monotonic()
        expired = [j for j in self._pending if j.deadline <= now]
        for job in expired:
          self._pending.remove(job)
        picked = []
        head = self._pending[0] if self._pending else None
        if head is not None and head.call is not None:
          picked.append(self._pending.popleft())
        elif head is not None:
          free = self.settings.max_batch
          for job in self._pending:
            if free == 0:
              break
            if job.static == head.static:
              picked.append(job)
              free -= min(job.remaining, free)
      # Outside the lock: failing a future runs its callbacks.
      for job in expired:
        self.stats["expired"] += 1
        self._finish(job, error=TimedOut(f"the request waited longer than the "
                                         f"{self.settings.request_timeout:g} s limit"))
      if picked:
        return picked

  def _work(self) -> None:
    while True:
      picked = self._next_batch()
      if picked is None:
        break
      try:
        if picked[0].call is not None:
          self._run_call(picked[0])
        else:
          self._run_sample(picked)
      except Exception as e:  # the worker survives anything one request does
        log.exception("serve: a request failed")
        for job in picked:
          with self._cond:
            if job in self._pending:
              self._pending.remove(job)
          self._finish(job, error=e)
    with self._cond:
      leftover = list(self._pending)
      self._pending.clear()
    for job in leftover:
      self._finish(job, error=Busy("the server is shutting down"))

  def _run_call(self, job: _Job) -> None:
    self.stats["calls"] += 1
    try:
      result = job.call()
    except Exception as e:
      self._finish(job, error=e)
      return
    self._finish(job, result=result)

  def _run_sample(self, jobs: list[_Job]) -> None:
    free = self.settings.max_batch
    parts, spans = [], []
    for job in jobs:
      count = min(job.remaining, free)
      parts.append(_take(job.rows, job.done_rows, job.done_rows + count))
      spans.append((job, count))
      free -= count
    rows = _concat(parts)
    padded = next(b for b in self.settings.batch_sizes if b >= len(rows))
    top_k, top_p, guidance, _ = jobs[0].static
    started = time.perf_counter()
    out = self.sampler(rows, top_k, top_p, guidance, padded)
    self.stats["sampler_calls"] += 1
    self.stats["sampler_rows"] += len(rows)
    self.stats["sampler_padded_rows"] += padded
    self.stats["sampler_ms"] += int(1000 * (time.perf_counter() - started))
    start = 0
    for job, count in spans:
      job.outputs.append({"ids": [[s[start:start + count] for s in branch] for branch in out["ids"]],
                          "images": out["images"][start:start + count]})
      start += count
      job.done_rows += count
      if job.remaining == 0:
        with self._cond:
          self._pending.remove(job)
        result = {"ids": [[np.concatenate([o["ids"][b][s] for o in job.outputs])
                           for s in range(len(job.outputs[0]["ids"][b]))]
                          for b in range(len(job.outputs[0]["ids"]))],
                  "images": np.concatenate([o["images"] for o in job.outputs])}
        job.outputs = []
        self._finish(job, result=result)
