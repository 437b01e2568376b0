"""The largest global batch that fits a topology: a bisection over compiles.

Each probe is a full plan (one compile by the TPU or GPU compiler), so the search is kept short: it
doubles (or halves) from the starting batch until it brackets the limit, then bisects in multiples
of `step` until the bracket is one step wide. The answer is the compiler's verdict at each probe;
memory need not be monotone in the batch at the last few MiB (the compiler picks other layouts), so
the bracket is what was compiled, not a proof about the batches between.
"""
from __future__ import annotations

import dataclasses
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
    """Stable keys; at_largest: the peak bytes per chip and roofline seconds of the plan at `largest`."""
    at_largest = None
    if self.largest is not None:
      at_largest = {"peak_bytes": float(self.plan.peak_bytes), "step_seconds": float(self.plan.step_seconds)}
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


def largest_fitting_batch(plan_at: Callable[[int], object], start: int, step: int, limit: int) -> BatchSearch:
  """Bisection for the largest global batch b (a multiple of `step`, `step` <= b <= `limit`) whose
  plan fits. plan_at(b) -> a plan with a `.fits` attribute (planning.Plan)."""
  if step < 1 or start < step or start % step or limit < start:
    raise PlanError(f"batch search: need step >= 1 dividing the start batch {start} and a limit >= it "
                    f"(step {step}, limit {limit})")
  tried: dict = {}
  plans: dict = {}

  def fits(batch: int) -> bool:
    p = plan_at(batch)
    tried[batch], plans[batch] = bool(p.fits), p
    return bool(p.fits)

  lo: Optional[int] = None
  hi: Optional[int] = None
  top = limit // step * step
  if fits(start):
    lo = start
    while hi is None and lo < top:
      probe = min(2 * lo, top)
      if fits(probe):
        lo = probe
      else:
        hi = probe
  else:
    hi = start
    while lo is None and hi > step:
      probe = max(step, hi // 2 // step * step)
      if fits(probe):
        lo = probe
      else:
        hi = probe
  if lo is not None and hi is not None:
    while hi - lo > step:
      probe = (lo + hi) // 2 // step * step
      if fits(probe):
        lo = probe
      else:
        hi = probe
  return BatchSearch(largest=lo, smallest_refused=hi, step=step, limit=limit, tried=tried,
                     plan=plans[lo if lo is not None else hi])
