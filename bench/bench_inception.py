"""Inception features images/s: ours (jitted, every local device) vs the shipped TorchScript, same CPU,
alternating rounds. Usage: python bench/bench_inception.py [--batch 16] [--rounds 3]"""
import argparse
import time

import numpy as np


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--rounds", type=int, default=3)
  args = parser.parse_args()
  import jax
  import torch

  from imagefolder_jax.convert.inception import convert_inception, load_torchscript
  from imagefolder_jax.evaluation.features import InceptionFeatures
  config, variables = convert_inception()
  ours = InceptionFeatures(config, variables, per_device_batch=args.batch // jax.device_count())
  theirs = load_torchscript()
  images = np.random.default_rng(0).integers(0, 256, (args.batch, 299, 299, 3), dtype=np.uint8)
  x = torch.from_numpy(((images.astype(np.float32) - 128) / 128).transpose(0, 3, 1, 2).copy())
  t0 = time.perf_counter()
  ours(images)
  compile_s = time.perf_counter() - t0
  with torch.no_grad():
    theirs(x)
  rows = {"ours": [], "torchscript": []}
  for _ in range(args.rounds):
    t0 = time.perf_counter()
    ours(images)
    rows["ours"].append(time.perf_counter() - t0)
    with torch.no_grad():
      t0 = time.perf_counter()
      theirs(x)
      rows["torchscript"].append(time.perf_counter() - t0)
  print(f"batch {args.batch}, {args.rounds} alternating rounds, torch threads {torch.get_num_threads()}, "
        f"our first call (compile) {compile_s:.1f} s")
  print("| network | median s/batch | images/s |\n|---|---|---|")
  for name, times in rows.items():
    med = float(np.median(times))
    print(f"| {name} | {med:.2f} | {args.batch / med:.1f} |")


if __name__ == "__main__":
  main()
