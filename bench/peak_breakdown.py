"""What is live at a compiled train step's memory peak, grouped by the jax op (module path) that made
each buffer: read from the TPU compiler's dump (`XLA_FLAGS=--xla_dump_to=DIR`), whose
`*-live-range.txt` lists the buffers live at the peak of its heap simulation and whose optimized
HLO names their instructions. Compile-only, like `plan`:

  # compile the step as `imagefolder-jax plan` does, dumping into runs/d16, and print the breakdown
  python bench/peak_breakdown.py --dump runs/d16 -- --stage generator --pretokenized \\
      --config configs/generator_imagenet.py:16 --topology v5p-8 --mesh data=2,fsdp=2 --config.data.batch_size=256
  python bench/peak_breakdown.py --dump runs/d16 --depth 3      # again from the dump
  python bench/peak_breakdown.py --dump runs/d16 --against runs/d16x2   # what grows from one dump to another

The listed buffers are the compiler's temporaries at the peak instruction (parameters and
donated state appear under their `state[...]` names); their sum is below `memory_analysis()`'s
peak by what the heap's layout adds.
"""
from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import subprocess
import sys

from hlo_breakdown import op_group


def _one(pattern: str) -> str:
  found = sorted(glob.glob(pattern), key=os.path.getsize)
  if not found:
    sys.exit(f"no {os.path.basename(pattern)} in {os.path.dirname(pattern)}: compile with --xla_dump_to first")
  return found[-1]      # the train step's module is the largest of the dump


def live_at_peak(dump: str) -> list[tuple[str, int, str]]:
  """[(buffer name, bytes, op_name)] of the buffers live at the peak of the largest dumped module."""
  text = open(_one(os.path.join(dump, "*-live-range.txt"))).read()
  start = text.find("(peak):")
  if start < 0:
    sys.exit(f"{dump}: the live-range dump has no peak section")
  section = text[start:]
  section = section[:section.find("Stack trace")] if "Stack trace" in section else section
  live = re.findall(r"^\s+([\w.\-]+)\{[\d,]*\}: (\d+) bytes", section, re.M)
  hlo = open(_one(os.path.join(dump, "*after_optimizations.txt"))).read()
  op_names = {}
  for m in re.finditer(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*([^\n]*)$", hlo, re.M):
    name = re.search(r'op_name="([^"]+)"', m.group(2))
    shape = re.search(r"\w+\[[\d,]*\]", m.group(2))
    op_names.setdefault(m.group(1), name.group(1) if name else f"(no op name) {shape.group(0) if shape else ''}")
  return [(name, int(size), op_names.get(name, "(unknown)")) for name, size in live]


def grouped(dump: str, depth: int) -> tuple[collections.Counter, collections.Counter]:
  sizes, counts = collections.Counter(), collections.Counter()
  for _, size, op_name in live_at_peak(dump):
    key = op_name if op_name.startswith("(") else op_group(op_name, depth)
    sizes[key] += size
    counts[key] += 1
  return sizes, counts


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--dump", required=True, help="the compiler's dump directory (made here with -- PLAN ARGS)")
  parser.add_argument("--against", help="a second dump: print what differs from it to --dump, by source")
  parser.add_argument("--depth", type=int, default=4, help="op-name components per group")
  parser.add_argument("--top", type=int, default=20)
  args, plan_args = parser.parse_known_args()
  plan_args = [a for a in plan_args if a != "--"]
  if plan_args:
    env = dict(os.environ, XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} --xla_dump_to={args.dump}".strip())
    subprocess.run([sys.executable, "-m", "imagefolder_jax.cli", "plan", *plan_args], env=env, check=True)
  sizes, counts = grouped(args.dump, args.depth)
  print(f"{args.dump}: {sum(counts.values())} buffers live at the peak, {sum(sizes.values()) / 2 ** 30:.2f} GiB")
  if args.against:
    base, _ = grouped(args.against, args.depth)
    print(f"against {args.against}: {sum(base.values()) / 2 ** 30:.2f} GiB")
    keys = sorted(set(sizes) | set(base), key=lambda k: -abs(sizes[k] - base[k]))
    for key in keys[:args.top]:
      print(f"  {(sizes[key] - base[key]) / 2 ** 20:+9.0f} MiB  {key}")
    return
  for key, size in sizes.most_common(args.top):
    print(f"  {size / 2 ** 20:8.0f} MiB x{counts[key]:<4d} {key}")


if __name__ == "__main__":
  main()
