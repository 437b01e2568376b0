"""bf16 sampling against float32: token agreement, logits error and speed (not a test).

  python bench/bench_bf16.py --models fixture,d17 --batch 4 --reps 3

For each model (the official parity fixture, and d17-sized random weights in the official layout
from bench/torch_reference.py), the float32 and the bfloat16 generator (`GeneratorConfig.dtype`;
parameters, head, filtering, draws and tokenizer stay float32) sample the same labels with the same
key, so they use the same uniforms:

  * agreement: share of the 2 x 286 sampled tokens per image equal to the float32 sampler's (once
    one token differs the contexts differ, so later scales diverge more);
  * logits: bf16 run with every id forced to the float32 sampler's draws, max relative error
    (max |a - b| / max |b|) and relative L2 of the guided logits over all scales;
  * time: median wall time per batch, float32 and bf16 runs alternating, after compile.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_sampling import cpu_name  # noqa: E402

from imagefolder_jax.models.generator import NextScaleGenerator  # noqa: E402
from imagefolder_jax.models.tokenizer import ImageFolderTokenizer  # noqa: E402
from imagefolder_jax.sampling import SamplerSettings, make_sampler  # noqa: E402

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "parity_tiny")


def load(model: str):
  """(generator module, tokenizer module, generator variables, tokenizer variables)."""
  if model == "fixture":
    from imagefolder_jax.convert.official import convert_tokenizer
    from imagefolder_jax.convert.official_generator import convert_generator
    arch = os.path.join(FIXTURE, "config.json")
    tok_config, tok_vars, _ = convert_tokenizer(os.path.join(FIXTURE, "tokenizer.pt"), arch)
    gen_config, gen_vars = convert_generator(os.path.join(FIXTURE, "generator.pt"), tok_config, arch)
    return NextScaleGenerator(gen_config), ImageFolderTokenizer(tok_config), gen_vars, tok_vars
  import torch_reference as ref
  from bench_vs_official import SHAPES, convert
  shape = SHAPES[model]
  var, tok = ref.build(shape, seed=0)
  return convert(shape, var, tok)


def compare(model: str, batch: int, reps: int, seed: int = 0) -> dict:
  gen, tok, gen_vars, tok_vars = load(model)
  gen16 = NextScaleGenerator(dataclasses.replace(gen.config, dtype="bfloat16"))
  settings = SamplerSettings(top_k=750, top_p=0.95, guidance=True, return_logits=True)
  s32, s16 = make_sampler(gen, tok, settings), make_sampler(gen16, tok, settings)
  labels = jnp.arange(batch, dtype=jnp.int32) * 7 % gen.config.num_classes
  args = lambda k: (gen_vars, tok_vars, labels, jax.random.key(k), jnp.float32(3.25), jnp.float32(1.0), {})
  out32, out16 = s32(*args(seed)), s16(*args(seed))
  ids32 = np.stack([np.concatenate([x.reshape(batch, -1) for x in b], 1) for b in out32["ids"]], -1)
  ids16 = np.stack([np.concatenate([x.reshape(batch, -1) for x in b], 1) for b in out16["ids"]], -1)
  forced = {b: out32["ids"][b] for b in range(gen.config.num_branches)}
  f16 = s16(gen_vars, tok_vars, labels, jax.random.key(seed), jnp.float32(3.25), jnp.float32(1.0), forced)
  a, b = np.asarray(f16["logits"], np.float64), np.asarray(out32["logits"], np.float64)
  first_scale_agree = float((ids16[:, :1] == ids32[:, :1]).mean())
  times = {"float32": [], "bfloat16": []}
  for r in range(reps):
    for name, fn in (("float32", s32), ("bfloat16", s16)) if r % 2 == 0 else (("bfloat16", s16), ("float32", s32)):
      t = time.perf_counter()
      jax.block_until_ready(fn(*args(r + 1)))
      times[name].append(time.perf_counter() - t)
  return dict(model=model, batch=batch, agree=float((ids16 == ids32).mean()), first_scale_agree=first_scale_agree,
              max_rel=float(np.abs(a - b).max() / np.abs(b).max()),
              rel_l2=float(np.linalg.norm(a - b) / np.linalg.norm(b)),
              t32=statistics.median(times["float32"]), t16=statistics.median(times["bfloat16"]))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--models", default="fixture", help="comma-separated: fixture, tiny, small, d17")
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--reps", type=int, default=3)
  args = parser.parse_args(argv)
  print(f"CPU: {cpu_name()} ({os.cpu_count()} cores), load {os.getloadavg()[0]:.1f}; jax {jax.__version__}, "
        f"device {jax.devices()[0].device_kind}")
  print("| model | batch | tokens equal to fp32 | of scale 0 | logits max rel err | logits rel L2 "
        "| fp32 s | bf16 s | bf16 speed-up |")
  print("|---|---|---|---|---|---|---|---|---|")
  for model in [m for m in args.models.split(",") if m]:
    r = compare(model, args.batch, args.reps)
    print(f"| {r['model']} | {r['batch']} | {100 * r['agree']:.1f}% | {100 * r['first_scale_agree']:.0f}% "
          f"| {r['max_rel']:.2e} | {r['rel_l2']:.2e} | {r['t32']:.3f} | {r['t16']:.3f} | {r['t32'] / r['t16']:.2f}× |",
          flush=True)


if __name__ == "__main__":
  main()
