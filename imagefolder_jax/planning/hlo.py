"""Reading a compiled program's optimized HLO text (`compiled.as_text()`): its collectives and the
custom calls the TPU cost model cannot price.

Collectives are counted once per execution of the computation that holds them: while bodies count
x their trip count (GPU/CPU keep `known_trip_count`; TPU drops it, so the `i < C` bound is read
from the loop condition). What the compilers write, and this reader handles:
* TPU splits one collective over a chain of `async_collective_fusion`s, each repeating it with the
  same `channel_id`: one logical collective per (kind, channel_id).
* Async pairs: `X-start` is counted, `X-done` not.
* replica_groups as explicit lists `{{0,1},{2,3}}`, iota `[2,8]<=[16]T(1,0)` and the mesh form
  `mesh['axis_0'=2,...], device_ids=(...) {'axis_1'}` (the named axes vary inside a group).
* TPU multi-slice programs move the cross-slice (DCN) part of a reduction as host-transfer `send`s
  with `_xla_megascale_transfer_type`: reported as kind 'dcn-all-reduce' etc.
* TPU reduce-scatters made by the SPMD partitioner appear as an all-reduce and a dynamic-slice of
  each device's shard inside an `all-reduce-scatter` fusion: reported as 'reduce-scatter'.
Bytes are the collective's result bytes (the issue's "bytes a step"); `wire_bytes` the ring estimate
one device sends: all-gather (n-1)/n x the gathered size, reduce-scatter (n-1) x the shard,
all-reduce 2(n-1)/n x the size, all-to-all (n-1)/n, collective-permute 1x.
"""
from __future__ import annotations

import collections
import math
import re
from typing import Any, Callable, Optional, Sequence

import numpy as np

DTYPE_BYTES = {"pred": 1, "s2": 0.25, "u2": 0.25, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2,
               "s32": 4, "u32": 4, "s64": 8, "u64": 8, "f16": 2, "bf16": 2, "f32": 4, "f64": 8, "c64": 8,
               "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1, "f8e4m3": 1, "f8e4m3b11fnuz": 1, "f8e4m3fnuz": 1,
               "f8e5m2fnuz": 1, "f8e3m4": 1, "f8e8m0fnu": 1, "f4e2m1fn": 0.5, "token": 0, "tf32": 4}
COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "ragged-all-to-all",
               "collective-permute", "collective-broadcast")
# Custom calls the TPU cost model prices (every other top-level custom call adds -1.0 to its
# `optimal_seconds`), and those that cost next to nothing (layout glue the compiler inserts).
PRICED_CUSTOM_CALLS = frozenset({"AssumeGatherIndicesInBound", "GatherScatterIndicesBitpacked", "AllocateBuffer"})
NEGLIGIBLE_CUSTOM_CALLS = frozenset({"ConcatBitcast", "ZeroCrop", "SliceId"})

_ARRAY = re.compile(r"\b(" + "|".join(sorted(DTYPE_BYTES, key=len, reverse=True)) + r")\[([\d,]*)\]")
_HEADER = re.compile(r"^(ENTRY\s+)?%?([^\s(]+)\s*(\(.*)?\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_DEVICE_IDS = r"(?:,\s*device_ids=\((?:[^()]|\([^()]*\))*\))?"
_MESH_GROUPS = re.compile(r"replica_groups=(mesh\[[^\]]*\]" + _DEVICE_IDS + r"\s*\{[^}]*\})")
_IOTA_GROUPS = re.compile(r"replica_groups=(\[[\d,]+\]<=\[[\d,]+\](?:T\([\d,]+\))?)")
_LIST_GROUPS = re.compile(r"replica_groups=(\{(?:\{[\d,\s]*\},?\s*)*\})")
_PAIRS = re.compile(r"source_target_pairs=(\{(?:\{\d+,\d+\},?)*\})")
_CALLEE_KEYS = ("calls", "to_apply", "body", "condition", "branch_computations", "called_computations")
_REDUCERS = ("reduce", "all-reduce", "reduce-scatter", "scatter", "sort", "map", "reduce-window",
             "select-and-scatter", "all-reduce-start")


def _split_type_and_op(rest: str) -> tuple[str, Optional[str], str]:
  """'f32[2]{0} all-gather(%a), ...' -> ('f32[2]{0}', 'all-gather', '%a), ...'); tuple types too."""
  if rest.startswith("("):
    depth = 0
    for i, ch in enumerate(rest):
      depth += (ch == "(") - (ch == ")")
      if depth == 0:
        break
    typ, tail = rest[:i + 1], rest[i + 1:].lstrip()
  else:
    typ, _, tail = rest.partition(" ")
  m = re.match(r"([a-z][\w\-]*)\((.*)$", tail)
  return (typ, m.group(1), m.group(2)) if m else (typ, None, tail)


def array_bytes(typ: str) -> list[float]:
  """Bytes of each array in an HLO type ('f32[2,3]{1,0}' or a tuple of them)."""
  return [DTYPE_BYTES[d] * math.prod(int(x) for x in dims.split(",") if x) for d, dims in _ARRAY.findall(typ)]


def parse(text: str) -> tuple[dict[str, list[dict]], Optional[str]]:
  """{computation name: [instructions {name, type, op, tail}]} and the entry computation's name."""
  computations: dict[str, list[dict]] = {}
  entry, current = None, None
  for line in text.splitlines():
    if not line.startswith((" ", "\t")) and line.rstrip().endswith("{"):
      header = _HEADER.match(line.strip())
      if header:
        current = header.group(2).lstrip("%")
        computations[current] = []
        entry = current if header.group(1) else entry
      continue
    if line.strip() == "}":
      current = None
      continue
    m = _INSTRUCTION.match(line) if current is not None else None
    if m:
      typ, op, tail = _split_type_and_op(m.group(3))
      computations[current].append(dict(name=m.group(2), type=typ, op=op, tail=tail or ""))
  return computations, entry


def _iota(dims: Sequence[int], perm: Optional[Sequence[int]] = None) -> np.ndarray:
  a = np.arange(math.prod(dims)).reshape(dims)
  return a.transpose(perm) if perm else a


def _ints(text: Optional[str]) -> Optional[list[int]]:
  return [int(x) for x in text.split(",")] if text else None


def replica_groups(attrs: str) -> Optional[list[list[int]]]:
  """The device-id groups of a collective's attributes (collective-permute: each pair), or None."""
  m = _MESH_GROUPS.search(attrs)
  if m:
    text = m.group(1)
    names_sizes = re.findall(r"'([^']+)'=(\d+)", text.split("]")[0])
    names, shape = [n for n, _ in names_sizes], [int(v) for _, v in names_sizes]
    grouped = re.findall(r"'([^']+)'", text.rsplit("{", 1)[1])
    d = re.search(r"device_ids=\(\[([\d,]+)\](?:T\(([\d,]+)\))?\)", text)
    ids = (_iota(_ints(d.group(1)), _ints(d.group(2))) if d else _iota(shape)).reshape(shape)
    inner = [names.index(g) for g in grouped if g in names]
    outer = [i for i in range(len(shape)) if i not in inner]
    return ids.transpose(outer + inner).reshape(-1, math.prod(shape[i] for i in inner)).tolist()
  m = _IOTA_GROUPS.search(attrs)
  if m:
    g = re.match(r"\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", m.group(1))
    return _iota(_ints(g.group(2)), _ints(g.group(3))).reshape(_ints(g.group(1))[0], -1).tolist()
  m = _LIST_GROUPS.search(attrs)
  if m:
    groups = [[int(x) for x in grp.split(",") if x.strip()] for grp in re.findall(r"\{([\d,\s]*)\}", m.group(1)[1:-1])]
    return groups if groups and groups[0] else None
  m = _PAIRS.search(attrs)
  if m:
    return [[int(a), int(b)] for a, b in re.findall(r"\{(\d+),(\d+)\}", m.group(1))]
  return None


def _constant(instructions: dict, name: str, depth: int = 0) -> Optional[int]:
  ins = instructions.get(name)
  if ins is None or depth > 4:
    return None
  if ins["op"] == "constant":
    m = re.match(r"\s*(-?\d+)\)", ins["tail"])
    return int(m.group(1)) if m else None
  if ins["op"] in ("copy", "bitcast", "convert"):
    m = re.match(r"\s*%?([\w.\-]+)", ins["tail"])
    return _constant(instructions, m.group(1), depth + 1) if m else None
  return None


def _trip_count(computations: dict, outer: str, loop: dict) -> Optional[int]:
  """A while loop's trip count: `known_trip_count`, else `i < C` read from its condition with i's
  start from the loop's operand tuple (TPU drops known_trip_count)."""
  known = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', loop["tail"])
  if known:
    return int(known.group(1))
  cond = re.search(r"condition=%?([\w.\-]+)", loop["tail"])
  if not cond or cond.group(1) not in computations:
    return None
  body = {i["name"]: i for i in computations[cond.group(1)]}
  compares = [i for i in computations[cond.group(1)] if i["op"] == "compare" and "direction=LT" in i["tail"]]
  if len(compares) != 1:
    return None
  operands = re.findall(r"%([\w.\-]+)", compares[0]["tail"].split(")")[0])
  if len(operands) != 2 or body.get(operands[0], {}).get("op") != "get-tuple-element":
    return None
  limit = _constant(body, operands[1])
  index = re.search(r"index=(\d+)", body[operands[0]]["tail"])
  if limit is None or not index:
    return None
  caller = {i["name"]: i for i in computations[outer]}
  arg = re.match(r"\s*%?([\w.\-]+)", loop["tail"])
  packed = caller.get(arg.group(1)) if arg else None
  start = 0
  if packed is not None and packed["op"] == "tuple":
    elements = re.findall(r"%([\w.\-]+)", packed["tail"].split("), ")[0])
    if int(index.group(1)) < len(elements):
      start = _constant(caller, elements[int(index.group(1))]) or 0
  return max(limit - start, 0)


def executions(computations: dict, entry: str) -> tuple[collections.Counter, list[str], list[str]]:
  """(times each computation runs per program execution, while loops of unknown trip count, every
  while loop's name), reducer sub-computations left out."""
  counts: collections.Counter = collections.Counter()
  unknown, loops = [], []

  def visit(name: str, k: int) -> None:
    counts[name] += k
    for ins in computations.get(name, []):
      tail = ins["tail"]
      callees = []
      for key in _CALLEE_KEYS:
        m = re.search(key + r"=(\{[^}]*\}|%?[\w.\-]+)", tail)
        if m:
          callees += [x.strip().lstrip("%") for x in m.group(1).strip("{}").split(",") if x.strip()]
      if ins["op"] in _REDUCERS:
        callees = [x for x in callees if not re.search(r"to_apply=%?" + re.escape(x), tail)]
      n = 1
      if ins["op"] == "while":
        loops.append(ins["name"])
        trips = _trip_count(computations, name, ins)
        if trips is None:
          unknown.append(ins["name"])
        else:
          n = trips
      for callee in callees:
        if callee in computations:
          visit(callee, k * n)

  if entry is not None:
    visit(entry, 1)
  return counts, unknown, loops


def _fused_reduce_scatter(computation: str, instructions: list[dict], name: str) -> bool:
  """Whether the all-reduce `name` is the TPU's reduce-scatter: the SPMD partitioner's all-reduce
  followed by each device's dynamic-slice, fused by the TPU compiler into an `all-reduce-scatter`
  fusion and run as a reduce-scatter (each device receives its shard only)."""
  if not computation.startswith("all-reduce-scatter"):
    return False
  def reads(ins: dict, operand: str) -> bool:
    return re.search(r"%" + re.escape(operand) + r"\b", ins["tail"]) is not None

  # its result, or a tuple element of it, is sliced
  taken = {i["name"] for i in instructions if i["op"] in ("dynamic-slice", "get-tuple-element") and reads(i, name)}
  return any(i["op"] == "dynamic-slice" and (i["name"] in taken or any(reads(i, t) for t in taken))
             for i in instructions)


def collectives(text: str, devices: Optional[Sequence[Any]] = None) -> dict:
  """Per kind {'count', 'bytes', 'wire_bytes', 'cross_bytes', 'group_sizes'} per step, plus
  'unknown_trip_counts' (loops whose collectives were counted once).

  devices: the program's devices in mesh order (`list(mesh.devices.flat)`): collectives whose groups
  span TPU slices or GPU nodes (processes) count into 'cross_bytes' (the DCN's / network's)."""
  computations, entry = parse(text)
  counts, unknown, _ = executions(computations, entry)
  granule: Optional[Callable] = None
  if devices is not None:
    # TPU hosts of one slice talk over ICI: only slices are apart. GPU nodes are processes.
    if len({getattr(d, "slice_index", 0) for d in devices}) > 1:
      granule = lambda i: devices[i].slice_index
    elif devices and devices[0].platform != "tpu":
      granule = lambda i: devices[i].process_index
  merged: dict = {}
  for computation, instructions in computations.items():
    runs = counts.get(computation, 0)
    if not runs:
      continue
    for ins in instructions:
      op = ins["op"] or ""
      megascale = re.search(r'_xla_megascale_transfer_type="(\w+)"', ins["tail"]) if op == "send" else None
      if megascale:
        size = float(array_bytes(ins["type"])[0])
        kind = "dcn-" + megascale.group(1).lower().replace("_", "-")
        merged[(kind, computation, ins["name"])] = dict(kind=kind, runs=runs, bytes=size, wire=size, cross=size,
                                                        group=None)
        continue
      base = op[:-6] if op.endswith("-start") else op
      if base not in COLLECTIVES or op.endswith("-done"):
        continue
      sizes = array_bytes(ins["type"])
      if op.endswith("-start") and ins["type"].startswith("("):  # (operands..., outputs..., context)
        sizes = sizes[1:2] if base == "collective-permute" else sizes[len(sizes) // 2:2 * (len(sizes) // 2)]
      groups = replica_groups(ins["tail"])
      n = len(groups[0]) if groups else None
      size = float(sum(sizes))
      if base == "all-reduce" and n and _fused_reduce_scatter(computation, instructions, ins["name"]):
        base, size = "reduce-scatter", size / n
      wire = size
      if n:
        wire = {"all-gather": size * (n - 1) / n, "reduce-scatter": size * (n - 1),
                "all-reduce": 2 * size * (n - 1) / n, "all-to-all": size * (n - 1) / n,
                "ragged-all-to-all": size * (n - 1) / n}.get(base, size)
      crosses = bool(granule and groups and any(len({granule(i) for i in g if i < len(devices)}) > 1
                                                for g in groups))
      channel = re.search(r"channel_id=(\d+)", ins["tail"])
      key = (base, int(channel.group(1))) if channel else (base, computation, ins["name"])
      if key in merged:
        merged[key]["runs"] = max(merged[key]["runs"], runs)
      else:
        merged[key] = dict(kind=base, runs=runs, bytes=size, wire=wire, cross=wire if crosses else 0.0, group=n)
  out: dict = {}
  for row in merged.values():
    o = out.setdefault(row["kind"], {"count": 0, "bytes": 0.0, "wire_bytes": 0.0, "cross_bytes": 0.0,
                                     "group_sizes": []})
    o["count"] += row["runs"]
    o["bytes"] += row["bytes"] * row["runs"]
    o["wire_bytes"] += row["wire"] * row["runs"]
    o["cross_bytes"] += row["cross"] * row["runs"]
    if row["group"] is not None and row["group"] not in o["group_sizes"]:
      o["group_sizes"].append(row["group"])
  result = {k: out[k] for k in sorted(out, key=lambda k: (k.startswith("dcn-"), k))}
  if unknown:
    result["unknown_trip_counts"] = unknown
  return result


def top_level_custom_calls(text: str) -> collections.Counter:
  """Targets of the custom calls outside fusion computations (the ones the TPU cost model prices
  or counts -1 each), with their counts."""
  computations, _ = parse(text)
  fused = set()
  for instructions in computations.values():
    for ins in instructions:
      if ins["op"] in ("fusion", "async-start", "call"):
        for m in re.finditer(r"calls=%?([\w.\-]+)", ins["tail"]):
          fused.add(m.group(1))
  found: collections.Counter = collections.Counter()
  for name, instructions in computations.items():
    if name in fused:
      continue
    for ins in instructions:
      if ins["op"] == "custom-call":
        target = re.search(r'custom_call_target="([^"]+)"', ins["tail"])
        if target:
          found[target.group(1)] += 1
  return found


def custom_calls_named(text: str, prefix: str) -> list[tuple[str, list[list[int]], int]]:
  """[(instruction name, result array shapes, executions per program run)] of the custom calls whose
  instruction name starts with `prefix` (Pallas kernels are named after their function, e.g.
  'splash_mha_fwd_residuals.1'), fusion bodies and loops included."""
  computations, entry = parse(text)
  runs, _, _ = executions(computations, entry)
  found = []
  for name, instructions in computations.items():
    if not runs.get(name):
      continue
    for ins in instructions:
      if ins["op"] == "custom-call" and ins["name"].startswith(prefix):
        shapes = [[int(x) for x in dims.split(",") if x] for _, dims in _ARRAY.findall(ins["type"])]
        found.append((ins["name"], shapes, runs[name]))
  return found


def repaired_optimal_seconds(raw: Optional[float], text: str) -> tuple[Optional[float], str]:
  """The TPU cost model's `optimal_seconds` made a time, or None with the reason.

  The model adds -1.0 for each top-level custom call it cannot price; when all of those are layout
  glue that costs next to nothing (`NEGLIGIBLE_CUSTOM_CALLS`), adding their count back gives the
  priced program's time. Loops make it invalid: a while body is priced once, whatever its trip count.
  """
  if raw is None:
    return None, "the compiler gives no cost model time"
  unpriced = {k: v for k, v in top_level_custom_calls(text).items() if k not in PRICED_CUSTOM_CALLS}
  unknown = sorted(k for k in unpriced if k not in NEGLIGIBLE_CUSTOM_CALLS)
  if unknown:
    return None, f"custom calls the cost model cannot price: {', '.join(unknown)}"
  _, _, loops = executions(*parse(text))
  if loops:
    return None, f"{len(loops)} while loop(s): the cost model prices a loop body once"
  repaired = raw + sum(unpriced.values())
  if repaired < 0:
    return None, f"negative after adding back {sum(unpriced.values())} unpriced custom call(s)"
  return repaired, (f"{sum(unpriced.values())} unpriced layout custom call(s) added back" if unpriced else "")
