"""Sampling throughput and latency of the jitted sampler (random weights; not a test).

  python bench/bench_sampling.py --sizes tiny,d17 --batches 1,16,64 --dtype float32

For each size and batch: compile time (lower + compile, reported apart), median wall time of a
whole batch (cfg 3.25, top-k 750, top-p 0.95, KV cache, tokenizer decode included), images/s,
analytic FLOPs per image and achieved FLOP/s; plus the FLOP/s of a large matmul measured in the
same run, as the machine's attainable reference. Prints a markdown table.

Sizes: 'tiny' = the parity fixture (VAR d2 / width 128, ViT width 64 depth 2); 'small' = the same
tokenizer under VAR d4 / width 256; 'd17' = the released
model (VAR d17 / width 1088, ViT-B tokenizer).
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp

from imagefolder_jax.inference.sampling import SamplerSettings, make_sampler
from imagefolder_jax.models.generator import GeneratorConfig, NextScaleGenerator
from imagefolder_jax.models.quantizer import QuantizerConfig
from imagefolder_jax.models.tokenizer import ImageFolderTokenizer, TokenizerConfig
from imagefolder_jax.models.vit import ViTConfig

SIZES = {
    "tiny": (TokenizerConfig(vit=ViTConfig(width=64, depth=2, num_heads=2),
                             quantizer=QuantizerConfig(codebook_update="gradient")),
             dict(depth=2)),
    "small": (TokenizerConfig(vit=ViTConfig(width=64, depth=2, num_heads=2),
                              quantizer=QuantizerConfig(codebook_update="gradient")),
              dict(depth=4)),
    "d17": (TokenizerConfig(quantizer=QuantizerConfig(codebook_update="gradient")), dict(depth=17)),
}


def generator_flops(c: GeneratorConfig, guidance: bool = True, fold_guided_head: bool = True) -> float:
  """Multiply-adds x 2 of one image's generator passes (KV cache: each scale attends to its prefix).

  With guidance the trunk runs twice (cond, uncond); the head too unless `fold_guided_head` (ours:
  the head is affine, so the guided mix is taken on its input and the head runs once).
  """
  w, hidden = c.width, round(c.width * c.mlp_ratio)
  per_token_block = 2 * (3 * w * w + w * w + 2 * w * hidden)
  per_token = c.depth * per_token_block + 2 * c.input_dim * w
  head = c.num_tokens * 2 * w * c.num_branches * c.codebook_size
  per_sample = c.depth * 2 * w * 6 * w + 2 * w * 2 * w
  attention = sum(c.depth * 2 * 2 * (e - b) * e * w for b, e in c.begin_ends)
  trunk = c.num_tokens * per_token + c.num_scales * per_sample + attention
  runs = 2 if guidance else 1
  return trunk * runs + head * (1 if fold_guided_head else runs)


def decoder_flops(t: TokenizerConfig) -> float:
  """One image's decode: post-quant projection, decoder ViT over 1 + N + 1 + n^2 tokens, to_pixel."""
  v = t.vit
  w, hidden = v.width, int(v.width * v.mlp_ratio)
  n_img = v.grid ** 2
  tokens = 1 + n_img + 1 + t.latent_grid ** 2
  block = 2 * tokens * (4 * w * w + 2 * w * hidden) + 2 * 2 * tokens * tokens * w
  return (v.depth * block + 2 * t.latent_grid ** 2 * t.num_branches * t.quantizer.latent_dim * w
          + 2 * n_img * w * v.patch_size ** 2 * 3)


def cpu_name() -> str:
  """The CPU's model name (what `lscpu | grep 'Model name'` shows)."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  import platform
  return platform.processor() or platform.machine()


def matmul_flops_per_s(dtype, n: int = 4096, reps: int = 5) -> float:
  a = jnp.ones((n, n), dtype)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    f(a).block_until_ready()
    times.append(time.perf_counter() - t)
  return 2 * n ** 3 / statistics.median(times)


def build(size: str, dtype: str):
  tok_config, gen_kwargs = SIZES[size]
  gen_config = GeneratorConfig(dtype=dtype, num_branches=tok_config.num_branches,
                               codebook_size=tok_config.quantizer.codebook_size,
                               latent_dim=tok_config.quantizer.latent_dim, scales=tok_config.quantizer.scales,
                               **gen_kwargs)
  tok, gen = ImageFolderTokenizer(tok_config), NextScaleGenerator(gen_config)
  r = tok_config.image_size
  tok_vars = jax.jit(tok.init)(jax.random.key(0), jnp.zeros((1, r, r, 3)))
  gen_vars = jax.jit(gen.init)(jax.random.key(1), jnp.zeros((1,), jnp.int32),
                               jnp.zeros((1, gen_config.num_tokens - 1, gen_config.input_dim)))
  import flax.linen as nn
  return tok, gen, nn.unbox(tok_vars), nn.unbox(gen_vars)


def bench(size: str, batches, dtype: str, reps: int):
  tok, gen, tok_vars, gen_vars = build(size, dtype)
  sampler = make_sampler(gen, tok, SamplerSettings(top_k=750, top_p=0.95, guidance=True))
  flops = generator_flops(gen.config) + decoder_flops(tok.config)
  rows = []
  for batch in batches:
    args = (gen_vars, tok_vars, jnp.arange(batch, dtype=jnp.int32) % 1000, jax.random.key(0), jnp.float32(3.25),
            jnp.float32(1.0), {})
    t = time.perf_counter()
    compiled = sampler.lower(*args).compile()
    compile_s = time.perf_counter() - t
    jax.block_until_ready(compiled(*args))  # warm-up
    times = []
    for i in range(reps):
      args = args[:3] + (jax.random.key(i + 1),) + args[4:]
      t = time.perf_counter()
      jax.block_until_ready(compiled(*args))
      times.append(time.perf_counter() - t)
    median = statistics.median(times)
    rows.append(dict(size=size, batch=batch, compile_s=compile_s, seconds=median, images_per_s=batch / median,
                     gflop_per_image=flops / 1e9, tflop_per_s=flops * batch / median / 1e12))
  return rows


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--sizes", default="tiny", help="comma-separated: tiny, small, d17")
  parser.add_argument("--batches", default="1,16,64", help="comma-separated batch sizes")
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                      help="generator compute dtype (the tokenizer's quantizer stays float32)")
  parser.add_argument("--reps", type=int, default=3, help="timed repetitions per batch (median reported)")
  parser.add_argument("--breakdown", action="store_true",
                      help="also time every stage apart (bench/stage_breakdown.py) and print a table")
  args = parser.parse_args(argv)
  sizes = [s for s in args.sizes.split(",") if s]
  for s in sizes:
    if s not in SIZES:
      parser.error(f"unknown size {s!r}; choose from {sorted(SIZES)}")
  batches = [int(b) for b in args.batches.split(",") if b]
  peak = matmul_flops_per_s(jnp.dtype(args.dtype))
  print(f"CPU: {cpu_name()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}; "
        f"device: {jax.devices()[0].device_kind} x{jax.device_count()}, jax {jax.__version__}, "
        f"dtype {args.dtype}; 4096^2 matmul: {peak / 1e12:.3f} TFLOP/s\n")
  print("| size | batch | compile s | batch s | images/s | GFLOP/image | TFLOP/s | % of matmul |")
  print("|---|---|---|---|---|---|---|---|")
  for size in sizes:
    for r in bench(size, batches, args.dtype, args.reps):
      print(f"| {r['size']} | {r['batch']} | {r['compile_s']:.1f} | {r['seconds']:.3f} | {r['images_per_s']:.2f} "
            f"| {r['gflop_per_image']:.1f} | {r['tflop_per_s']:.3f} | {100 * r['tflop_per_s'] * 1e12 / peak:.0f}% |",
            flush=True)
  if args.breakdown:
    import stage_breakdown
    print("\nper stage, ms per batch (each stage its own jitted program, summed over scales):\n")
    print("| size | batch | " + " | ".join(stage_breakdown.STAGES) + " |")
    print("|---|---|" + "---|" * len(stage_breakdown.STAGES))
    for size in sizes:
      tok, gen, tok_vars, gen_vars = build(size, args.dtype)
      for batch in batches:
        st = stage_breakdown.ours(gen, tok, gen_vars, tok_vars, batch, reps=args.reps)
        print(f"| {size} | {batch} | " + " | ".join(f"{1e3 * st[k]:.1f}" for k in stage_breakdown.STAGES) + " |",
              flush=True)
  print("\nbatch-1 latency = 'batch s' of the batch-1 row; cfg 3.25 doubles the generator batch.")


if __name__ == "__main__":
  main()
