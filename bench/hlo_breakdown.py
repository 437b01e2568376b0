"""Where a compiled plan's HBM bytes go: per top-level instruction of the optimized HLO, its operand
and output bytes (TPU tile padding included, on-chip `S(1)` buffers left out) times its executions,
grouped by the jax op name (module path) that made it; a Pallas kernel with a cost estimate by
its estimate, as the cost model prices it. An approximation of the TPU cost model's
`bytes accessed` (it counts a sliced operand whole, and a while body as often as its known trip
count, else once): for the d16 sampler on v5e at batch 64 it gives 379 GB against the model's 372.

  # compile (as `imagefolder-jax plan`), keep the HLO text, print the breakdown
  python bench/hlo_breakdown.py --save runs/s64 -- --program sample --config configs/generator_imagenet.py:16 \\
      --topology v5e-1 --batch 64
  python bench/hlo_breakdown.py --hlo runs/s64.hlo.txt --depth 4     # again from the saved text
  python bench/hlo_breakdown.py --hlo runs/s64.hlo.txt --sampler     # the sampler's parts
  python bench/hlo_breakdown.py --hlo runs/t.hlo.txt --flops --depth 2  # dot / convolution FLOPs by source
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import sys

from imagefolder_jax.planning.hlo_costs import instruction_bytes, instruction_flops


def op_group(op_name: str, depth: int) -> str:
  """'jit(fn)/Module.method/blocks_3/attn/dot' -> 'Module.method/blocks_N/attn' (depth 3)."""
  s = re.sub(r"blocks_\d+", "blocks_N", re.sub(r"^jit\(\w+\)/", "", op_name))
  s = re.sub(r"(while/(body|cond)|cond/branch_\d+_fun|closed_call|checkpoint|rematted_computation)/", "", s)
  return "/".join(s.split("/")[:depth]) or "(no op name: the compiler's prefetches and copies)"


def sampler_part(row: dict) -> str:
  """The sampler's parts (`inference.sampling.sample`)."""
  o = row["op_name"]
  if "NextScaleGenerator" in o and "/attn/" in o:
    if "dynamic_update_slice" in o:
      return "generator: KV-cache dynamic-update-slices"
    if any(x in o for x in ("/transpose", "/slice", "/concatenate", "/reshape")):
      return "generator: KV-cache prefix slices and transposes"
    if "mat_qkv" not in o and "/proj" not in o:
      return "generator: attention scores, softmax, PV"
  if "NextScaleGenerator" in o:
    return "generator: matmuls, norms, head"
  if "ImageFolderTokenizer.decode" in o:
    return "tokenizer decode"
  if "ImageFolderTokenizer" in o:
    return "tokenizer embed_scale"
  if "cond/branch" in o:
    return "filter: exact top-p fallback (lax.cond)"
  if o:
    return "filter: top-k search, retries, draws"
  if row["op"] in ("slice-start", "slice-done", "copy-start", "copy-done") and re.match(r"\(*(bf16|f32)\[\d+,\d+\]\{",
                                                                                       row["type"]):
    return "no op name: 2-D slices / copies (the weights)"
  return "no op name: other prefetches and copies"


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--hlo", help="a saved optimized HLO text")
  parser.add_argument("--save", help="compile `plan` with the arguments after --, save PREFIX.hlo.txt / .plan.json")
  parser.add_argument("--depth", type=int, default=3, help="op-name components per group")
  parser.add_argument("--sampler", action="store_true", help="group by the sampler's parts")
  parser.add_argument("--flops", action="store_true", help="dot / convolution FLOPs by source instead of bytes")
  parser.add_argument("--top", type=int, default=25)
  args, plan_args = parser.parse_known_args()
  if args.save:
    from imagefolder_jax.planning import planner, sampler
    compile_for = planner.compile_for

    def saving(lowered, compiler, warnings=None):
      compiled, refusal = compile_for(lowered, compiler, warnings)
      if compiled is not None:
        with open(args.save + ".hlo.txt", "w") as f:
          f.write(compiled.as_text())
      return compiled, refusal

    planner.compile_for = sampler.compile_for = saving
    import contextlib
    import io

    from imagefolder_jax.cli import main as cli
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
      cli(["plan", *[a for a in plan_args if a != "--"], "--json"])
    with open(args.save + ".plan.json", "w") as f:
      f.write(out.getvalue())
    args.hlo = args.save + ".hlo.txt"
    if not os.path.exists(args.hlo):
      sys.exit(f"not compiled: {out.getvalue()[-400:]}")
  with open(args.hlo) as f:
    text = f.read()
  rows = instruction_flops(text) if args.flops else instruction_bytes(text)
  measure, unit, scale = ("flops", "GFLOP", 1e9) if args.flops else ("bytes", "GB", 1e9)
  groups: collections.Counter = collections.Counter()
  for row in rows:
    groups[sampler_part(row) if args.sampler else op_group(row["op_name"], args.depth)] += row[measure]
  total = sum(groups.values())
  print(f"{total / scale:.1f} {unit} over {len(rows)} instructions")
  for key, size in groups.most_common(args.top):
    print(f"{size / scale:9.1f} {unit} {100 * size / total:5.1f}%  {key}")


if __name__ == "__main__":
  main()
