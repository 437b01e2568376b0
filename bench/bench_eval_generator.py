"""eval-generator throughput: samples/s of the sampler alone and of the whole loop (sampling, uint8,
Inception features, shard files), on a bundle with a generator (not a test).

  python bench/bench_eval_generator.py --bundle BUNDLE --inception DIR --num-samples 64 --batch-size 16

The first shard pays the compiles; the timed rows are the later shards (median of their seconds per
sample). Prints a markdown table.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--bundle", required=True, help="bundle with tokenizer and generator (e.g. convert-official "
                                                      "of tests/fixtures/parity_tiny)")
  parser.add_argument("--inception", help="Inception bundle (default: the default one)")
  parser.add_argument("--num-samples", type=int, default=64)
  parser.add_argument("--batch-size", type=int, default=16)
  args = parser.parse_args()
  import jax

  from imagefolder_jax.evaluation.features import InceptionFeatures
  from imagefolder_jax.evaluation.generation import SampleRun, generate_samples
  from imagefolder_jax.inference.generator import Generator
  from imagefolder_jax.parallel import make_mesh
  mesh = make_mesh()
  gen = Generator.load(args.bundle, mesh=mesh)
  net = InceptionFeatures.load(args.inception, mesh=mesh, per_device_batch=args.batch_size // jax.device_count())
  rows = []
  with tempfile.TemporaryDirectory() as work:
    for start in range(0, args.num_samples, args.batch_size):
      run = SampleRun(num_samples=start + args.batch_size, shard_size=args.batch_size, classes=(0, 1, 2, 3))
      t0 = time.perf_counter()
      out = generate_samples(gen, net, run, work, bundle=args.bundle, batch_size=args.batch_size)
      rows.append((time.perf_counter() - t0, out["samples_per_s"]))
  timed = rows[1:] or rows
  whole = args.batch_size / statistics.median(t for t, _ in timed)
  sampler = statistics.median(r for _, r in timed)
  print(f"{len(timed)} timed shards of {args.batch_size} samples after one compile shard; devices {jax.devices()}")
  print("| part | samples/s |\n|---|---|")
  print(f"| sampler + decode | {sampler:.2f} |")
  print(f"| whole eval-generator loop (+ uint8, Inception, shard files) | {whole:.2f} |")


if __name__ == "__main__":
  main()
