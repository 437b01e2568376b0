"""Progress lines of long jobs.

  Progress          counted work (sampling, feature extraction, evaluation): done/total images,
                    images/s and ETA, at most every `every` seconds
  TrainingProgress  training steps: losses, images/s, steps/s, MFU against the device's peak, ETA

Hand-written rather than `clu.periodic_actions.ReportProgress`: that reports steps/s and ETA to a
metric writer, while these lines need images/s and MFU from the analytic FLOP model, and a count
of images where there are no steps.
"""
from __future__ import annotations

import logging
import sys
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


class TrainingProgress:
  """Step/s, images/s, ETA and MFU; a live line on an interactive terminal, log lines otherwise.

  flops_per_step: analytic model FLOPs of one global step (`imagefolder_jax.planning.flops`); peak_per_device:
  the device's peak FLOP/s (CPU: its measured matmul rate). MFU uses the rate since the previous
  `rates` call, so the first interval (which holds compilation) is not mixed into later ones.
  """

  def __init__(self, total_steps: int, start_step: int, global_batch: int, *, flops_per_step: float = 0.0,
               num_devices: int = 1, peak_per_device: float = 0.0):
    self.total, self.start, self.batch = total_steps, start_step, global_batch
    self.flops_per_step, self.num_devices, self.peak = flops_per_step, num_devices, peak_per_device
    self.t0 = time.perf_counter()
    self.last = (self.t0, start_step)
    self.tty = sys.stderr.isatty()

  def rates(self, step: int) -> dict:
    now = time.perf_counter()
    elapsed = max(now - self.t0, 1e-9)
    done = max(step - self.start, 1)
    steps_per_s = done / elapsed
    out = dict(steps_per_s=steps_per_s, images_per_s=steps_per_s * self.batch,
               eta_s=(self.total - step) / steps_per_s)
    last_time, last_step = self.last
    self.last = (now, step)
    if self.flops_per_step > 0 and step > last_step and self.peak > 0:
      from imagefolder_jax.planning import flops
      interval = (now - last_time) / (step - last_step)
      out.update(flops.mfu(self.flops_per_step, interval, self.num_devices, self.peak))
      out["model_tflops_per_step"] = self.flops_per_step / 1e12
    return out

  def line(self, step: int, metrics: dict) -> str:
    r = self.rates(step) if "steps_per_s" not in metrics else metrics
    shown = " ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items()) if k.endswith("loss"))
    eta = time.strftime("%H:%M:%S", time.gmtime(r["eta_s"]))
    mfu = (f" | {r['tflops_per_device']:.3g} TFLOP/s/device MFU {100 * r['mfu']:.1f}%"
           if "mfu" in r else "")
    return (f"step {step}/{self.total} {shown} | {r['images_per_s']:.1f} img/s "
            f"{r['steps_per_s']:.2f} step/s{mfu} | ETA {eta}")

  def tick(self, step: int, metrics: dict) -> None:
    if self.tty:
      elapsed = max(time.perf_counter() - self.t0, 1e-9)
      steps_per_s = max(step - self.start, 1) / elapsed
      eta = time.strftime("%H:%M:%S", time.gmtime((self.total - step) / steps_per_s))
      print(f"\rstep {step}/{self.total} | {steps_per_s * self.batch:.1f} img/s | ETA {eta}"[:160], end="",
            file=sys.stderr, flush=True)
