"""The compiled plan tables of docs/planning.md: `imagefolder-jax plan --topology ... --json` for the
ImageNet recipes on TPU and GPU topologies, one subprocess per case (not a test).

  python bench/plan_tables.py --out runs/plans.jsonl            # every case (hours on 2 cores)
  python bench/plan_tables.py --out runs/plans.jsonl --only d16 # cases whose name holds 'd16'
  python bench/plan_tables.py --out runs/plans.jsonl --table    # the markdown tables of what is done
                                                                # (all rows; the largest batches)

Finished cases are kept in --out (JSON lines) and skipped on a rerun. Each line holds the command,
the CPU, the date and compile seconds beside the plan (all compiles of a `--largest-batch` search).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GEN, TOK = "configs/generator_imagenet.py", "configs/tokenizer_imagenet.py"

# name -> plan arguments. Generator batch 768, tokenizer 1024 (the papers' recipes).
CASES = {
    "tokenizer v5p-64 data=4,fsdp=8": ["--stage", "tokenizer", "--config", TOK, "--topology", "v5p-64",
                                        "--mesh", "data=4,fsdp=8", "--largest-batch", "--largest-batch-from", "6144"],
    "tokenizer v5p-64 data=4,fsdp=8 remat=full": ["--stage", "tokenizer", "--config", TOK, "--topology", "v5p-64",
                                                   "--mesh", "data=4,fsdp=8", "--config.train.remat=full"],
    "tokenizer v5e-256 data=32,fsdp=8": ["--stage", "tokenizer", "--config", TOK, "--topology", "v5e-256",
                                          "--mesh", "data=32,fsdp=8", "--largest-batch",
                                          "--largest-batch-from", "14336"],
    "tokenizer v6e-64 data=8,fsdp=8": ["--stage", "tokenizer", "--config", TOK, "--topology", "v6e-64",
                                        "--mesh", "data=8,fsdp=8", "--largest-batch",
                                        "--largest-batch-from", "6144"],
    "tokenizer h100-8 fsdp=8": ["--stage", "tokenizer", "--config", TOK, "--topology", "h100-8", "--mesh", "fsdp=8",
                                "--largest-batch"],
    "tokenizer h100-16 fsdp=8": ["--stage", "tokenizer", "--config", TOK, "--topology", "h100-16", "--mesh", "fsdp=8",
                                 "--largest-batch", "--largest-batch-from", "1920"],   # 2 x one node's
    "tokenizer h100-32 fsdp=8": ["--stage", "tokenizer", "--config", TOK, "--topology", "h100-32", "--mesh", "fsdp=8",
                                 "--largest-batch"],
    # d20-d30 search from d16's 19200 scaled by the activations per example (depth x width).
    **{f"generator d{d} v5p-64 data=4,fsdp=8": ["--stage", "generator", "--config", f"{GEN}:{d}", "--pretokenized",
                                                 "--topology", "v5p-64", "--mesh", "data=4,fsdp=8", "--largest-batch",
                                                 *(["--largest-batch-from", str(start)] if start else [])]
       for d, start in ((16, None), (20, 12288), (24, 8448), (30, 5376))},
    **{f"generator d{d} h100-8 fsdp=8": ["--stage", "generator", "--config", f"{GEN}:{d}", "--pretokenized",
                                         "--topology", "h100-8", "--mesh", "fsdp=8", "--largest-batch"]
       for d in (16, 20, 24, 30)},
    # v5e / v6e: d16's start is the batch at which the temporaries, growing per example as on v5p from the
    # config's compile at batch 768, would reach the chip's memory (rounded down to the step); on v5e it was
    # 20% long (20480 fit, 0.174 GiB per example per chip). The others start one step below where the peak
    # at 768, growing by that slope scaled with the activations per example (depth x width), meets it;
    # on v6e the slope is d16's there (0.25 GiB per example per chip, 768 to 7168, with XLA's attention,
    # which v6e programs ran before the lane-dense attention kernels: they need less per example).
    **{f"generator d{d} v5e-256 data=32,fsdp=8": ["--stage", "generator", "--config", f"{GEN}:{d}", "--pretokenized",
                                                   "--topology", "v5e-256", "--mesh", "data=32,fsdp=8",
                                                   "--largest-batch", "--largest-batch-from", str(start)]
       for d, start in ((16, 24576), (20, 12288), (24, 8192), (30, 2048))},
    **{f"generator d{d} v6e-64 data=8,fsdp=8": ["--stage", "generator", "--config", f"{GEN}:{d}", "--pretokenized",
                                                 "--topology", "v6e-64", "--mesh", "data=8,fsdp=8", "--largest-batch",
                                                 "--largest-batch-from", str(start)]
       for d, start in ((16, 10240), (20, 13824), (24, 9216), (30, 1536))},
    "generator d16 v5p-64 x2 slices fsdp=8": ["--stage", "generator", "--config", f"{GEN}:16", "--pretokenized",
                                              "--topology", "v5p-64", "--slices", "2", "--mesh", "data=4,fsdp=8",
                                              "--largest-batch", "--largest-batch-from", "38400"],   # 2 x one slice's
    # The search from twice one node's largest batch (the same batch per GPU).
    **{f"generator d{d} h100-16 fsdp=8": ["--stage", "generator", "--config", f"{GEN}:{d}", "--pretokenized",
                                          "--topology", "h100-16", "--mesh", "fsdp=8", "--largest-batch",
                                          "--largest-batch-from", str(2 * one_node)]
       for d, one_node in ((16, 1792), (20, 1152), (24, 832), (30, 512))},
    **{f"sampler d{d} {chip} batch {b}": ["--program", "sample", "--config", f"{GEN}:{d}", "--topology", chip,
                                           "--batch", str(b)]
       for chip in ("v5e-1", "v5p-2") for d in (16, 30) for b in (64, 256)},
}


def cpu_name() -> str:
  try:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
  except (OSError, StopIteration):
    return platform.processor() or "unknown CPU"


def run_case(name: str, args: list) -> dict:
  command = [sys.executable, "-m", "imagefolder_jax.cli", "plan", *args, "--json"]
  t0 = time.perf_counter()
  r = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  seconds = time.perf_counter() - t0
  record = {"case": name, "command": "imagefolder-jax plan " + " ".join(args), "cpu": cpu_name(),
            "date": datetime.date.today().isoformat(), "compile_seconds": round(seconds, 1)}
  if r.returncode != 0:
    # A plan that dies without a word was killed: the ImageNet tokenizer's TPU compile at batch 3584
    # holds 11 GB of host memory, and the kernel's OOM killer stops it beside another compile.
    record["error"] = (r.stderr.strip().splitlines() or [f"killed by signal {-r.returncode} (host memory?)"
                                                         if r.returncode < 0 else f"exit code {r.returncode}"])[-1]
  else:
    record["plan"] = json.loads(r.stdout.strip().splitlines()[-1])
  return record


def table(records: list) -> str:
  gib = lambda b: "—" if b is None else f"{b / 2 ** 30:.1f}"
  rows = ["| case | peak / chip memory (GiB) | fits | largest global batch that fits | arguments / temporaries (GiB) "
          "| FLOPs/step analytic, compiled x chips | collectives per step | roofline step | MFU | compile |",
          "|---|---|---|---|---|---|---|---|---|---|"]
  for r in records:
    if "error" in r:
      rows.append(f"| {r['case']} | error: {r['error'][:120]} | | | | | | | | |")
      continue
    p = r["plan"]
    coll = ", ".join(f"{k} x{v['count']} {v['bytes'] / 2 ** 20:.0f} MiB" for k, v in p["collectives"].items()
                     if isinstance(v, dict)) or "—"
    # the compiler's count plus its Pallas kernels' (the generator's attention on TPU)
    kernels = p.get("kernel_flops_per_device") or 0.0
    compiled = "" if p["flops_per_chip"] is None else f", {(p['flops_per_chip'] + kernels) * p['chips']:.2e}"
    fits = "yes" if p["fits"] else ("**no**: " + p["out_of_memory"] if p["out_of_memory"] else "**no**")
    roof = p["roofline"]
    parts = "" if not roof else " (" + " / ".join(
        f"{label} {roof[key] * 1e3:.0f}" for label, key in (("compute", "compute_seconds"), ("HBM", "memory_seconds"),
                                                              ("ICI", "ici_seconds"), ("DCN", "dcn_seconds"))
        if roof.get(key)) + ")"
    step = "—" if not p["roofline_seconds"] else f"{p['roofline_seconds'] * 1e3:.0f} ms{parts}"
    mfu = "—" if not p["roofline_seconds"] else f"{p['implied_mfu']:.0%}"
    peak = max(p["peak_bytes"] or 0, (p["argument_bytes"] or 0) + (p["output_bytes"] or 0) - (p["alias_bytes"] or 0)
               + (p["temp_bytes"] or 0))
    fits = fits if (peak <= p["memory_limit"] or not p["fits"]) else "**no**"
    search = p.get("largest_batch")
    largest = "—" if not search else (f"{search['largest']} (not {search['smallest_refused']}; "
                                       f"{search['compiles']} compiles)" if search["largest"] else "none")
    if search and search["largest"] and search.get("smallest_refused") is None:
      largest = f"≥ {search['largest']} ({search['compiles']} compiles, none refused)"
    if search and search.get("earlier_program") and search["largest"]:
      # a search made on an earlier program of the row: where that program's peak was higher (at the
      # config's batch), what fit then fits now
      largest = (f"≥ {search['largest']} (searched with {search['earlier_program']}: {largest})"
                 if search.get("lower_bound", True) else
                 f"{largest} with {search['earlier_program']} (not searched again)")
    compile_time = "—" if r.get("compile_seconds") is None else f"{r['compile_seconds']:.0f} s"
    rows.append(f"| {r['case']} | {gib(peak)} / {gib(p['memory_limit'])} | {fits} | {largest} | "
                f"{gib(p['argument_bytes'])} / {gib(p['temp_bytes'])} | {p['analytic_flops_per_step']:.2e}{compiled} | "
                f"{coll} | {step} | {mfu} | {compile_time} |")
  return "\n".join(rows)


def largest_table(records: list) -> str:
  """The rows with a `--largest-batch` search, at their largest batch: per chip, peak, roofline step,
  images/s and MFU there (GPU rows: compute and network only, so their MFU is an upper bound)."""
  rows = ["| case | largest global batch (per chip) | peak / chip | roofline step | images/s | MFU | searched with "
          "| compiles |",
          "|---|---|---|---|---|---|---|---|"]
  for r in records:
    p = r.get("plan") or {}
    search = p.get("largest_batch") or {}
    at = search.get("at_largest")
    if not at:
      continue
    largest, seconds = search["largest"], at["step_seconds"]
    mfu = p["analytic_flops_per_step"] * largest / p["global_batch"] / (p["chips"] * p["peak_flops"] * seconds)
    program = search.get("earlier_program") or "the row's program"
    bound = "≥ " if search.get("smallest_refused") is None else ""
    rows.append(f"| {r['case']} | {bound}{largest} ({largest // p['chips']}) | {at['peak_bytes'] / 2 ** 30:.1f} GiB | "
                f"{seconds * 1e3:.0f} ms | {largest / seconds:,.0f} | {mfu:.0%} | {program} | {search['compiles']} |")
  return "\n".join(rows)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", required=True, help="JSON lines file (cases with a plan there are skipped)")
  parser.add_argument("--only", default="", help="run the cases whose name holds this text")
  parser.add_argument("--table", action="store_true", help="print the markdown table of --out and stop")
  args = parser.parse_args()
  done = []
  if os.path.exists(args.out):
    with open(args.out) as f:
      done = [json.loads(line) for line in f if line.strip()]
  if args.table:
    print(table(done))
    print()
    print(largest_table(done))
    return
  finished = {r["case"] for r in done if "plan" in r}   # a case that failed (e.g. killed) runs again
  for name, case_args in CASES.items():
    if args.only not in name or name in finished:
      continue
    print(f"{name} ...", flush=True)
    record = run_case(name, case_args)
    with open(args.out, "a") as f:
      f.write(json.dumps(record) + "\n")
    print(table([record]).splitlines()[-1], flush=True)


if __name__ == "__main__":
  main()
