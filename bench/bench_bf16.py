"""bf16 sampling against float32: token agreement, logits error and speed (not a test).

  python bench/bench_bf16.py --models fixture,d17 --batch 4 --reps 3

For each model (the official parity fixture, and d17-sized random weights in the official layout
from bench/torch_reference.py), the float32 and the bfloat16 generator (`GeneratorConfig.dtype`;
parameters, head, filtering, draws and tokenizer stay float32) sample the same labels with the same
key, so they use the same uniforms:

  * agreement: share of the 2 x 286 sampled tokens per image equal to the float32 sampler's (once
    one token differs the contexts differ, so later scales diverge more), of scale 0 alone, and
    'same context': bf16 logits of the float32 run's own prefix drawn with the same uniforms;
  * logits: bf16 run with every id forced to the float32 sampler's draws, max relative error
    (max |a - b| / max |b|) and relative L2 of the guided logits over all scales;
  * time: median wall time per batch, float32 and bf16 runs alternating, after compile.

--teacher-forced: only conditional teacher-forced logits of random ids (no sampler compiles; what
fits a loaded 2-core machine at d17): same-context draws, logits error, forward time.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from bench_sampling import cpu_name  # noqa: E402

from imagefolder_jax.inference.sampling import SamplerSettings, make_sampler  # noqa: E402
from imagefolder_jax.models.generator import NextScaleGenerator  # noqa: E402
from imagefolder_jax.models.tokenizer import ImageFolderTokenizer  # noqa: E402
from imagefolder_jax.ops.filtering import sample_with_retries  # noqa: E402

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "parity_tiny")


def load(model: str):
  """(generator module, tokenizer module, generator variables, tokenizer variables)."""
  if model == "fixture":
    from imagefolder_jax.convert.official import convert_tokenizer
    from imagefolder_jax.convert.official_generator import convert_generator
    arch = os.path.join(FIXTURE, "config.json")
    tok_config, tok_vars, _ = convert_tokenizer(os.path.join(FIXTURE, "tokenizer.pt"), arch)
    gen_config, gen_vars = convert_generator(os.path.join(FIXTURE, "generator.pt"), tok_config, arch)
    return NextScaleGenerator(gen_config), ImageFolderTokenizer(tok_config), *jax.device_put((gen_vars, tok_vars))
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
  # Same context: the bf16 logits of the float32 run's prefix, drawn with that run's uniforms (as
  # `sampling.sample` makes them); differs from the float32 ids only where bf16 rounding moves a draw.
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(seed), i))(jnp.arange(batch, dtype=jnp.int32))
  uniforms = jax.vmap(lambda k: jax.random.uniform(k, (gen.config.num_tokens, gen.config.num_branches,
                                                       settings.top_p_rounds + 1)))(keys)
  same_context = np.asarray(jax.jit(lambda u, x: sample_with_retries(u, x, 750, 0.95))(uniforms, f16["logits"]))
  first_scale_agree = float((ids16[:, :1] == ids32[:, :1]).mean())
  times = {"float32": [], "bfloat16": []}
  for r in range(reps):
    for name, fn in (("float32", s32), ("bfloat16", s16)) if r % 2 == 0 else (("bfloat16", s16), ("float32", s32)):
      t = time.perf_counter()
      jax.block_until_ready(fn(*args(r + 1)))
      times[name].append(time.perf_counter() - t)
  return dict(model=model, batch=batch, agree=float((ids16 == ids32).mean()), first_scale_agree=first_scale_agree,
              same_context=float((same_context == ids32).mean()),
              max_rel=float(np.abs(a - b).max() / np.abs(b).max()),
              rel_l2=float(np.linalg.norm(a - b) / np.linalg.norm(b)),
              t32=statistics.median(times["float32"]), t16=statistics.median(times["bfloat16"]))


def forward_compare(model: str, batch: int, reps: int, seed: int = 0) -> dict:
  """Teacher-forced variant (no sampler compile, for d17 on a slow machine): conditional logits of
  random token ids, float32 vs bf16 compute; same-context draws with shared uniforms; forward time."""
  gen, tok, gen_vars, tok_vars = load(model)
  c = gen.config
  gen16 = NextScaleGenerator(dataclasses.replace(c, dtype="bfloat16"))
  key_ids, key_u = jax.random.split(jax.random.key(seed))
  ids = [[jax.random.randint(jax.random.fold_in(key_ids, 100 * b + si), (batch, n, n), 0, c.codebook_size)
          for si, n in enumerate(c.scales)] for b in range(c.num_branches)]
  labels = jnp.arange(batch, dtype=jnp.int32) * 7 % c.num_classes
  inputs = jax.jit(lambda v, i: tok.apply(v, i, method=ImageFolderTokenizer.next_scale_inputs))(tok_vars, ids)
  f32 = jax.jit(lambda v, l, x: gen.apply(v, l, x))
  f16 = jax.jit(lambda v, l, x: gen16.apply(v, l, x))
  a, b = f32(gen_vars, labels, inputs), f16(gen_vars, labels, inputs)
  uniforms = jax.random.uniform(key_u, (batch, c.num_tokens, c.num_branches, 5))
  draw = jax.jit(lambda u, x: sample_with_retries(u, x, 750, 0.95))
  same = float((np.asarray(draw(uniforms, a)) == np.asarray(draw(uniforms, b))).mean())
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  times = {"float32": [], "bfloat16": []}
  for r in range(reps):
    for name, fn in (("float32", f32), ("bfloat16", f16)) if r % 2 == 0 else (("bfloat16", f16), ("float32", f32)):
      t = time.perf_counter()
      jax.block_until_ready(fn(gen_vars, labels, inputs))
      times[name].append(time.perf_counter() - t)
  return dict(model=model, batch=batch, same_context=same, max_rel=float(np.abs(a - b).max() / np.abs(a).max()),
              rel_l2=float(np.linalg.norm(a - b) / np.linalg.norm(a)),
              t32=statistics.median(times["float32"]), t16=statistics.median(times["bfloat16"]))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--models", default="fixture", help="comma-separated: fixture, tiny, small, d17")
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--reps", type=int, default=3)
  parser.add_argument("--teacher-forced", action="store_true",
                      help="only the teacher-forced comparison (conditional logits of random ids, forward time)")
  args = parser.parse_args(argv)
  if args.teacher_forced:
    print(f"CPU: {cpu_name()} ({os.cpu_count()} cores), load {os.getloadavg()[0]:.1f}; jax {jax.__version__}")
    print("| model | batch | same-context draws equal | logits max rel err | logits rel L2 | fp32 forward s "
          "| bf16 forward s | bf16 speed-up |")
    print("|---|---|---|---|---|---|---|---|")
    for model in [m for m in args.models.split(",") if m]:
      r = forward_compare(model, args.batch, args.reps)
      print(f"| {r['model']} | {r['batch']} | {100 * r['same_context']:.1f}% | {r['max_rel']:.2e} | {r['rel_l2']:.2e} "
            f"| {r['t32']:.3f} | {r['t16']:.3f} | {r['t32'] / r['t16']:.2f}× |", flush=True)
    return
  print(f"CPU: {cpu_name()} ({os.cpu_count()} cores), load {os.getloadavg()[0]:.1f}; jax {jax.__version__}, "
        f"device {jax.devices()[0].device_kind}")
  print("| model | batch | tokens equal to fp32 | of scale 0 | same context | logits max rel err | logits rel L2 "
        "| fp32 s | bf16 s | bf16 speed-up |")
  print("|---|---|---|---|---|---|---|---|---|---|")
  for model in [m for m in args.models.split(",") if m]:
    r = compare(model, args.batch, args.reps)
    print(f"| {r['model']} | {r['batch']} | {100 * r['agree']:.1f}% | {100 * r['first_scale_agree']:.0f}% "
          f"| {100 * r['same_context']:.1f}% | {r['max_rel']:.2e} | {r['rel_l2']:.2e} | {r['t32']:.3f} "
          f"| {r['t16']:.3f} | {r['t32'] / r['t16']:.2f}× |",
          flush=True)


if __name__ == "__main__":
  main()
