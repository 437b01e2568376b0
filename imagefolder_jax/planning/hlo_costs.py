"""HBM bytes and matmul FLOPs of a compiled program, per instruction of its optimized HLO text,
times the executions of the computation that holds it (while bodies x their trip count).

The TPU cost model (`compiled.cost_analysis()`) prices a while body once whatever its trip count:
a `train.grad_accum=2` step's FLOPs come back halved. `loop_scales` measures by how much, from
these counts: the program's FLOPs (or bytes) with every computation counted as often as it runs,
over the same with each counted once. Multiplying the cost model's totals by them gives its count
of the program as run: a matmul loop of 8 trips scaled this way equals the cost model's count of
the same loop unrolled (`tests/planning/test_hlo_costs.py`). Loops of unknown trip count (the
sampler's filter retries) count once either way.
"""
from __future__ import annotations

import math
import re
from typing import Optional

from imagefolder_jax.planning import hlo

# Instructions that move no HBM bytes of their own (control flow, tuples, views).
_FREE = {"parameter", "get-tuple-element", "tuple", "bitcast", "constant", "while", "conditional", "call",
         "after-all", "partition-id", "replica-id", "iota", "opt-barrier", None}
_ARRAY = re.compile(r"\b(" + "|".join(sorted(hlo.DTYPE_BYTES, key=len, reverse=True)) + r")\[([\d,]*)\](\{[^}]*\})?")


def padded_bytes(typ: str) -> float:
  """HBM bytes of an HLO type: each array's dims padded to its layout's first tile (e.g. T(8,128) on
  the two most minor dims); arrays in on-chip memory (`S(1)`) count 0."""
  total = 0.0
  for dtype, dims, layout in _ARRAY.findall(typ):
    shape = [int(x) for x in dims.split(",") if x]
    body = layout[1:-1] if layout else ""
    minor_to_major, _, rest = body.partition(":")
    if "S(1)" in rest:
      continue
    order = [int(x) for x in minor_to_major.split(",") if x.strip().isdigit()]
    tile = re.match(r"T\(([\d,]+)\)", rest)
    if tile and order:
      for dim, size in zip(order, reversed([int(x) for x in tile.group(1).split(",")])):
        shape[dim] = -(-shape[dim] // size) * size
    total += hlo.DTYPE_BYTES[dtype] * math.prod(shape)
  return total


def _operands(tail: str) -> list[str]:
  depth = 1
  for i, ch in enumerate(tail):
    depth += (ch == "(") - (ch == ")")
    if depth == 0:
      return re.findall(r"%([\w.\-]+)", tail[:i])
  return re.findall(r"%([\w.\-]+)", tail)


def instruction_bytes(text: str) -> list[dict]:
  """[{op, type, op_name, target, estimated, runs, bytes}] for every top-level instruction (outside
  fusion bodies); target: a custom call's target, else None; estimated: a kernel's cost estimate is in
  its backend config (its bytes are then the estimate's, else its operands' and results')."""
  computations, entry = hlo.parse(text)
  runs, _, _ = hlo.executions(computations, entry)
  fused = {m.group(1) for instructions in computations.values() for ins in instructions
           if ins["op"] == "fusion" or (ins["op"] or "").endswith("-start")
           for m in re.finditer(r"calls=%?([\w.\-]+)", ins["tail"])}
  rows = []
  for name, instructions in computations.items():
    if not runs.get(name) or name in fused:
      continue
    types = {ins["name"]: ins["type"] for ins in instructions}
    for ins in instructions:
      if ins["op"] in _FREE:
        continue
      operands = _operands(ins["tail"])
      estimate = re.search(r'"cost_estimate":\{[^}]*"bytes_accessed":"(\d+)"', ins["tail"])
      if ins["op"] == "dynamic-update-slice" and len(operands) > 1:
        # In place (the TPU cost model agrees): the update is read and written, not the whole buffer.
        size = 2 * padded_bytes(types.get(operands[1], ""))
      elif estimate:
        # A kernel with a cost estimate, priced by it as the TPU cost model does: it may read only
        # part of an operand (a cache's prefix).
        size = int(estimate.group(1))
      else:
        size = padded_bytes(ins["type"]) + sum(padded_bytes(types.get(n, "")) for n in operands)
      op_name = re.search(r'op_name="([^"]+)"', ins["tail"])
      target = re.search(r'custom_call_target="([^"]+)"', ins["tail"]) if ins["op"] == "custom-call" else None
      rows.append(dict(op=ins["op"], type=ins["type"], op_name=op_name.group(1) if op_name else "",
                       target=target.group(1) if target else None, estimated='"cost_estimate"' in ins["tail"],
                       runs=runs[name], bytes=size * runs[name]))
  return rows


# The custom-call target of Pallas TPU (Mosaic) kernels.
KERNEL_TARGET = "tpu_custom_call"


def kernel_bytes(text: str) -> float:
  """HBM bytes of the program's Pallas kernels that carry no cost estimate, per run: each call's
  operands and results (with the TPU's tile padding) times its executions. The TPU cost model prices
  such a kernel at 0 bytes and 0 FLOPs, and one with a `pl.CostEstimate` by that estimate
  (`tests/planning/test_hlo_costs.py`). A kernel that reads all of its operands once moves this; one
  that re-reads blocks (splash attention's key tiles per query tile) moves more."""
  if KERNEL_TARGET not in text:   # most programs: skip the count (~1.5 s for the d16 step)
    return 0.0
  return float(sum(r["bytes"] for r in instruction_bytes(text) if r["target"] == KERNEL_TARGET and not r["estimated"]))


def _dims(typ: str) -> list[int]:
  m = _ARRAY.search(typ)
  return [int(x) for x in m.group(2).split(",") if x] if m else []


def instruction_flops(text: str) -> list[dict]:
  """[{op, op_name, runs, flops}] for every dot and convolution, fusion bodies included, times the
  executions of its computation: 2 x output elements x the contracted size (a dot's contracting
  dims; a convolution's kernel elements per output feature, i.e. window x input features per group,
  over its lhs dilation)."""
  computations, entry = hlo.parse(text)
  runs, _, _ = hlo.executions(computations, entry)
  rows = []
  for name, instructions in computations.items():
    if not runs.get(name):
      continue
    types = {ins["name"]: ins["type"] for ins in instructions}
    for ins in instructions:
      if ins["op"] not in ("dot", "convolution"):
        continue
      operands = _operands(ins["tail"])
      out = math.prod(_dims(ins["type"]))
      if ins["op"] == "dot":
        lhs = _dims(types.get(operands[0], ""))
        contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", ins["tail"])
        k = math.prod(lhs[int(d)] for d in contracting.group(1).split(",") if d) if contracting else 1
      else:
        kernel = _dims(types.get(operands[1], ""))
        labels = re.search(r"dim_labels=\w+_(\w+)->", ins["tail"])
        o = kernel[labels.group(1).index("o")] if labels and kernel else 1
        k = math.prod(kernel) / max(o, 1)
        # Batched matmuls are convolutions whose batch dims are a window over an lhs-dilated input
        # (size=24x16 lhs_dilate=24x16): only 1 / lhs_dilate of each window's taps meet real inputs.
        dilate = re.search(r"lhs_dilate=([\dx]+)", ins["tail"])
        if dilate:
          k /= math.prod(int(x) for x in dilate.group(1).split("x"))
      op_name = re.search(r'op_name="([^"]+)"', ins["tail"])
      rows.append(dict(op=ins["op"], op_name=op_name.group(1) if op_name else "", runs=runs[name],
                       flops=2.0 * out * k * runs[name]))
  return rows


def loop_scales(text: str) -> Optional[dict]:
  """{'flops', 'bytes'}: the program's dot/convolution FLOPs and instruction bytes counted per
  execution, over the same counted once per computation; None when no computation runs more than
  once (no while loop of a known trip count above 1)."""
  runs, _, _ = hlo.executions(*hlo.parse(text))
  if max(runs.values(), default=0) <= 1:   # most programs: no loop, so skip the two counts (~1.5 s for d16)
    return None
  # The cost model's totals leave kernels without an estimate out (`kernel_bytes`), so its ratio does too.
  flops = instruction_flops(text)
  bytes_ = [r for r in instruction_bytes(text) if r["target"] != KERNEL_TARGET or r["estimated"]]
  if not any(r["runs"] > 1 for r in flops + bytes_):
    return None

  def ratio(rows: list, key: str) -> float:
    once = sum(r[key] / r["runs"] for r in rows if r["runs"])
    return sum(r[key] for r in rows) / once if once else 1.0

  return {"flops": ratio(flops, "flops"), "bytes": ratio(bytes_, "bytes")}
