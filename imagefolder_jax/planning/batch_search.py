"""The largest global batch that fits a topology: a search over compiles, guided by memory.

Each probe is a full plan (one compile by the TPU or GPU compiler, minutes for the ImageNet
recipes), so the search spends as few as it can. A train step's peak memory per chip is close to
affine in the batch (state and parameters fixed, activations per example), so each probe after the
first aims at the batch where the line through the fitting probes meets the chip's limit: through
the largest two, or, with one, through it and a plan made before the search (`known`: `plan`'s own
plan at the config's batch, whose peak holds the fixed state), else through it and zero (which
overestimates the slope, so the first aim falls short rather than long). The aim is kept inside the
bracket (largest fitting, smallest refused) on the grid of `step`, and a probe that fails to halve
the bracket is followed by a plain bisection, so the search never needs more than about twice
bisection's compiles; on an affine memory curve it ends in three or four. The TPU and GPU compilers
rematerialize as a program nears the chip's memory, so real peaks bend under the line and the aim
falls short there: the generator d16's searches took 8 compiles on h100-8 and 10 on v5p-64, where
doubling and bisection take 8 and 11. Once an aim one step above the largest fitting batch fits too
(the peaks have left the line) and no batch was refused, the next probe is an eighth larger: the
generator d24's search on v5p-64 had crept 8448, 8704, 8960, then doubled to 17920 and bisected back
to 9216 in 9 compiles. Without a fitting probe it halves; without a refused one and no usable line
it doubles. The answer is the compiler's verdict at each probe; memory need not be monotone in the
batch at the last few MiB (the compiler picks other layouts), so the bracket is what was compiled,
not a proof about the batches between.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional

from imagefolder_jax.planning.errors import PlanError


@dataclasses.dataclass
class BatchSearch:
  """largest: the largest probed global batch that fits (None: not even the smallest probe).
  smallest_refused: the smallest probed batch that does not fit (None: every probe up to `limit`
  fits). tried: {global batch: fits} in probe order. plan: the plan at `largest` (else at the
  smallest refused batch)."""
  largest: Optional[int]
  smallest_refused: Optional[int]
  step: int
  limit: int
  tried: dict
  plan: object

  def to_dict(self) -> dict:
    """Stable keys; at_largest: the peak bytes per chip, roofline seconds and the roofline's terms
    (`planner.roofline`) of the plan at `largest`."""
    at_largest = None
    if self.largest is not None:
      at_largest = {"peak_bytes": float(self.plan.peak_bytes), "step_seconds": float(self.plan.step_seconds),
                    "roofline": dict(getattr(self.plan, "roofline", None) or {})}
    return {"largest": self.largest, "smallest_refused": self.smallest_refused, "step": self.step,
            "limit": self.limit, "compiles": len(self.tried), "tried": {str(k): v for k, v in self.tried.items()},
            "at_largest": at_largest}

  def describe(self) -> str:
    probes = ", ".join(f"{b} {'yes' if ok else 'no'}" for b, ok in self.tried.items())
    if self.largest is None:
      head = f"none: {self.smallest_refused} does not fit"
    elif self.smallest_refused is None:
      head = f"{self.largest} fits (the search stops at --largest-batch-limit {self.limit})"
    else:
      head = f"{self.largest} fits, {self.smallest_refused} does not"
    if self.largest is not None:
      head += (f" (at {self.largest}: peak {self.plan.peak_bytes / 2 ** 30:.2f} GiB per chip, "
               f"roofline {self.plan.step_seconds * 1e3:.1f} ms)")
    return f"{head}; step {self.step}, {len(self.tried)} compiles: {probes}"


def _aim(fitting: dict, memory_limit: float, step: int) -> Optional[int]:
  """The batch (floored to `step`) where the line through the two largest fitting probes (or the
  largest and the origin) reaches memory_limit; None without a usable line. fitting: {batch: peak bytes}."""
  if not fitting or not math.isfinite(memory_limit):
    return None
  points = sorted((b, p) for b, p in fitting.items() if math.isfinite(p))[-2:]
  if not points:
    return None
  (b0, p0), (b1, p1) = ([(0, 0.0)] + points)[-2:]
  slope = (p1 - p0) / (b1 - b0)
  if slope <= 0:
    return None
  return int((b1 + (memory_limit - p1) / slope) // step * step)


def largest_fitting_batch(plan_at: Callable[[int], object], start: int, step: int, limit: int,
                          known: Optional[dict] = None) -> BatchSearch:
  """The largest global batch b (a multiple of `step`, `step` <= b <= `limit`) whose plan fits.
  plan_at(b) -> a plan with `.fits`, and for the memory-guided aim `.peak_bytes` and `.memory_limit`
  (bytes per chip; planning.Plan); without them the search doubles, halves and bisects.
  known: {batch: plan} made before the search; those that fit, below `start`, are points of the
  aim's line (not probes: they are in neither `tried` nor the bracket)."""
  if step < 1 or start < step or start % step or limit < start:
    raise PlanError(f"batch search: need step >= 1 dividing the start batch {start} and a limit >= it "
                    f"(step {step}, limit {limit})")
  tried: dict = {}
  plans: dict = {}
  fitting: dict = {}     # batch -> peak bytes per chip, for the probes that fit
  memory_limit = float("nan")
  top = limit // step * step

  def fits(batch: int) -> bool:
    nonlocal memory_limit
    p = plan_at(batch)
    tried[batch], plans[batch] = bool(p.fits), p
    memory_limit = float(getattr(p, "memory_limit", float("nan")))
    if p.fits:
      fitting[batch] = float(getattr(p, "peak_bytes", float("nan")))
    return bool(p.fits)

  for batch, plan in (known or {}).items():
    peak = float(getattr(plan, "peak_bytes", float("nan")))
    if batch < start and getattr(plan, "fits", False) and math.isfinite(peak):
      fitting[batch] = peak
  lo: Optional[int] = start if fits(start) else None
  hi: Optional[int] = None if lo is not None else start
  bisect_next = False
  crept = False                  # the last probe, aimed one step above the largest fitting one, fit too
  while True:
    if lo is None:               # nothing fits yet: halve towards the smallest batch
      if hi <= step:
        break
      probe = max(step, hi // 2 // step * step)
    else:
      ceiling = top if hi is None else hi - step
      if lo >= ceiling:
        break
      aim = None if bisect_next else _aim(fitting, memory_limit, step)
      if crept and hi is None:
        # The line put the limit within a step and the step still fit: near the limit the peaks
        # leave the line (the compiler rematerializes), so its aims creep one step per compile or,
        # once a peak drops, give way to doubling far past the limit. An eighth more bounds it.
        probe = min(lo + max(step, lo // 8 // step * step), ceiling)
      elif aim is None:
        probe = min(2 * lo, top) if hi is None else (lo + hi) // 2 // step * step
      else:
        probe = min(max(aim, lo + step), ceiling)
    width = None if lo is None or hi is None else hi - lo
    lined = len(fitting) >= 2     # the aim came from a line through two fitting probes
    crept = False
    if fits(probe):
      crept = lined and probe == lo + step   # lined: two fitting probes, so lo is set
      lo = probe
    else:
      hi = probe
    # a probe that did not halve a known bracket hands the next one to bisection
    bisect_next = not bisect_next and width is not None and hi - lo > width / 2
  return BatchSearch(largest=lo, smallest_refused=hi, step=step, limit=limit, tried=tried,
                     plan=plans[lo if lo is not None else hi])
