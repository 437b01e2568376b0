"""planning/batch_search.py: the largest fitting batch by bisection (fake plans: fits below a threshold)."""
import types

import pytest

from imagefolder_jax.planning.batch_search import largest_fitting_batch
from imagefolder_jax.planning.errors import PlanError


def _fake(threshold):
  calls = []

  def plan_at(batch):
    calls.append(batch)
    return types.SimpleNamespace(fits=batch <= threshold, batch=batch, peak_bytes=batch * 2.0 ** 20, step_seconds=1e-3)
  return plan_at, calls


@pytest.mark.parametrize("start", [64, 768, 4096, 65536])
@pytest.mark.parametrize("threshold", [32, 64, 1000, 5000, 300000])
def test_finds_the_largest_multiple_of_step_that_fits(start, threshold):
  plan_at, calls = _fake(threshold)
  search = largest_fitting_batch(plan_at, start, 32, 64 * start)
  top = 64 * start
  if threshold >= top:
    assert search.largest == top and search.smallest_refused is None
  else:
    assert search.largest == threshold // 32 * 32 and search.smallest_refused == search.largest + 32
  assert search.plan.batch == search.largest and len(calls) == len(set(calls)) == len(search.tried)
  assert all(b % 32 == 0 and 32 <= b <= top for b in calls)
  assert len(calls) <= 20   # doubling/halving then bisection: logarithmic in the range


def test_nothing_fits_and_bad_arguments():
  plan_at, calls = _fake(10)
  search = largest_fitting_batch(plan_at, 256, 32, 1024)
  assert search.largest is None and search.smallest_refused == 32 and search.plan.batch == 32
  assert calls == [256, 128, 64, 32] and "none: 32 does not fit" in search.describe()
  for start, step, limit in ((100, 32, 1000), (64, 0, 128), (64, 32, 32)):
    with pytest.raises(PlanError, match="batch search"):
      largest_fitting_batch(plan_at, start, step, limit)


def test_limit_not_a_multiple_of_step_ends():
  plan_at, calls = _fake(10 ** 9)
  search = largest_fitting_batch(plan_at, 96, 32, 200)
  assert search.largest == 192 and search.smallest_refused is None and calls == [96, 192]
  assert search.to_dict()["compiles"] == 2 and "stops at --largest-batch-limit 200" in search.describe()
  assert search.to_dict()["at_largest"] == {"peak_bytes": 192 * 2.0 ** 20, "step_seconds": 1e-3, "roofline": {}}
  assert "at 192: peak 0.19 GiB per chip, roofline 1.0 ms" in search.describe()


def _memory(peak_of_batch, limit_bytes):
  """A fake compiler whose plans carry a peak and the chip's limit (the guided search's inputs)."""
  calls = []

  def plan_at(batch):
    calls.append(batch)
    peak = peak_of_batch(batch)
    return types.SimpleNamespace(fits=peak <= limit_bytes, batch=batch, peak_bytes=peak, memory_limit=limit_bytes,
                                 step_seconds=1e-3)
  return plan_at, calls


@pytest.mark.parametrize("fixed,per_example", [(2e9, 1e7), (40e9, 3e6), (0.5e9, 1e8), (90e9, 1e5)])
def test_affine_memory_is_found_in_a_few_compiles(fixed, per_example):
  limit_bytes = 95e9
  plan_at, calls = _memory(lambda b: fixed + per_example * b, limit_bytes)
  search = largest_fitting_batch(plan_at, 768, 256, 10 ** 9)
  expected = int((limit_bytes - fixed) // per_example) // 256 * 256
  assert search.largest == expected and search.smallest_refused == expected + 256
  plain, plain_calls = _fake(expected)   # the same answer by doubling and bisection only
  assert largest_fitting_batch(plain, 768, 256, 10 ** 9).largest == expected
  assert len(calls) <= min(4, len(plain_calls))


@pytest.mark.parametrize("threshold", [300, 1000, 5000, 77000])
@pytest.mark.parametrize("shape", ["convex", "concave", "stairs"])
def test_curved_memory_still_ends_at_the_boundary(threshold, shape):
  # Peaks far from a line (the compiler changing layouts, remat kicking in): the answer is still the
  # compiled boundary, and the bisection safeguard bounds the compiles.
  curve = {"convex": lambda b: b * b, "concave": lambda b: b ** 0.5 * 1e3, "stairs": lambda b: (b // 1000 + 1) * 1e6}
  peak = curve[shape]
  plan_at, calls = _memory(lambda b: peak(b) * (1 if b <= threshold else 1e9), peak(threshold))
  search = largest_fitting_batch(plan_at, 64, 32, 64 * 2048)
  assert search.largest == threshold // 32 * 32 and search.smallest_refused == search.largest + 32
  assert len(calls) == len(set(calls)) <= 2 * 22 and all(b % 32 == 0 for b in calls)


def test_peaks_leaving_the_line_near_the_limit_bound_the_search_by_an_eighth():
  # The generator d24's search on v5p-64 from 8448: near the limit the TPU compiler rematerializes,
  # so the peaks leave the line. Every aim landed one step up and fit (8704, 8960), the peak at 8960
  # dropped (no line: doubling to 17920) and bisection came back: 9 compiles. Once a step aimed by
  # two fitting probes fits, the search now probes an eighth more.
  peaks = {8448: 97.0, 8704: 99.0, 8960: 98.5, 9216: 99.5}
  plan_at, calls = _memory(lambda b: peaks.get(b, 99.0 if b < 9216 else 1e9), 100.0)
  search = largest_fitting_batch(plan_at, 8448, 256, 768 * 704)
  assert search.largest == 9216 and search.smallest_refused == 9472
  assert calls[:4] == [8448, 8704, 8960, 9984] and len(calls) <= 6, calls


def test_a_plan_made_before_the_search_puts_the_first_aim_on_the_line():
  # The generator d16 on v5e-256: the config's plan at 768 (1.8 GiB per chip) is made anyway; with it
  # the line through the first fitting probe hits the limit at once instead of falling short.
  limit_bytes, fixed, per_example = 15.75, 1.8, (15.75 - 1.8) / 21000
  plan_at, calls = _memory(lambda b: fixed + per_example * b, limit_bytes)
  expected = int((limit_bytes - fixed) / per_example) // 2048 * 2048
  seeded = largest_fitting_batch(plan_at, 12288, 2048, 10 ** 6, known={768: plan_at(768)})
  seeded_calls = calls[1:]
  calls.clear()
  alone = largest_fitting_batch(plan_at, 12288, 2048, 10 ** 6)
  assert seeded.largest == alone.largest == expected and seeded.smallest_refused == expected + 2048
  assert 768 not in seeded.tried and len(seeded_calls) == len(seeded.tried) == 3 < len(calls), (seeded_calls, calls)
  alone_calls = list(calls)
  # a refused plan, or one not below the start, is not a point of the line: the same probes as alone
  ignored = {10 ** 6: plan_at(10 ** 6), 12288: plan_at(12288)}
  calls.clear()
  assert largest_fitting_batch(plan_at, 12288, 2048, 10 ** 6, known=ignored).largest == expected
  assert calls == alone_calls
