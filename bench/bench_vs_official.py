"""Our jitted sampler side by side with the official PyTorch sampler, same weights, same machine.

  python bench/bench_vs_official.py --sizes tiny,d17 --batches 1,4

For each size: random weights are drawn in the official state-dict layout (bench/torch_reference.py,
the official op sequence in eager PyTorch, pinned to the official parity fixture by
tests/convert/test_torch_reference.py) and converted to ours with the official-checkpoint converters. Then:

  * check (first batch): both samplers run with the ids the official one drew; the max relative
    error of the guided logits of every scale and the max abs difference of the images are printed;
  * time: median wall time of a whole batch (cfg 3.25, top-k 750, top-p 0.95, decode included),
    in alternating blocks of runs, each block after a warm-up run (see `blocked_medians`); our
    compile time is reported apart. Threads: PyTorch's default (one per core) and XLA's.

Prints a markdown table with the speed-up, FLOP/s and the FLOP/s of a large matmul from the same run.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import stage_breakdown  # noqa: E402
import torch
import torch_reference as ref  # noqa: E402
from bench_sampling import cpu_name, decoder_flops, generator_flops, matmul_flops_per_s  # noqa: E402

from imagefolder_jax.convert.common import StateDict  # noqa: E402
from imagefolder_jax.convert.official import infer_tokenizer_config, tokenizer_variables  # noqa: E402
from imagefolder_jax.convert.official_generator import generator_variables, infer_generator_config  # noqa: E402
from imagefolder_jax.inference.sampling import SamplerSettings, make_sampler  # noqa: E402
from imagefolder_jax.models.generator import NextScaleGenerator  # noqa: E402
from imagefolder_jax.models.tokenizer import ImageFolderTokenizer  # noqa: E402

SHAPES = {
    "tiny": ref.OfficialShape(var_depth=2, vit_width=64, vit_depth=2, vit_heads=2),
    # What people iterate with: the tiny tokenizer under a VAR of depth 4 (width 256, 4 heads).
    "small": ref.OfficialShape(var_depth=4, vit_width=64, vit_depth=2, vit_heads=2),
    # Where the generator's matmuls start to dominate both samplers (VAR width 384 / 512).
    "d6": ref.OfficialShape(var_depth=6, vit_width=64, vit_depth=2, vit_heads=2),
    "d8": ref.OfficialShape(var_depth=8, vit_width=64, vit_depth=2, vit_heads=2),
    "d17": ref.OfficialShape(),
}
CFG, TOP_K, TOP_P = 3.25, 750, 0.95


def convert(shape: ref.OfficialShape, var: ref.Var, tok: ref.SamplingTokenizer):
  """The official-layout state dicts -> our (generator, tokenizer, their variables)."""
  tok_sd = StateDict({**ref.tokenizer_state_dict(tok), **ref.encoder_state_dict(shape)}, "random tokenizer")
  arch = {"tokenizer": {"vit": {"num_heads": shape.vit_heads}, "v_patch_nums": list(shape.scales)},
          "generator": {"num_heads": shape.var_depth}}
  tok_config = infer_tokenizer_config(tok_sd, arch)
  tok_vars = tokenizer_variables(tok_sd, tok_config)
  var_sd = StateDict(ref.var_state_dict(var), "random VAR")
  gen_config = infer_generator_config(var_sd, arch, tokenizer_config=tok_config)
  gen_vars = generator_variables(var_sd, gen_config)
  # On the device, as `Generator` holds them: NumPy trees would be copied in on every timed call.
  return NextScaleGenerator(gen_config), ImageFolderTokenizer(tok_config), *jax.device_put((gen_vars, tok_vars))


def blocked_medians(fns: dict, reps: int, blocks: int = 2) -> dict:
  """Median wall time of each callable fn(rep) over `reps` timed calls, run in `blocks` alternating
  blocks (A..A B..B A..A B..B), each opened by an untimed warm-up call. Alternating spreads a shared
  machine's load over both sides; whole blocks keep one side's idle-spinning worker threads
  (OpenMP's, XLA's) out of the other's timed calls, which the warm-up call absorbs."""
  times = {name: [] for name in fns}
  per_block = -(-reps // blocks)
  for _ in range(blocks):
    for name, fn in fns.items():
      fn(0)
      for i in range(per_block):
        t = time.perf_counter()
        fn(i + 1)
        times[name].append(time.perf_counter() - t)
  return {name: statistics.median(ts) for name, ts in times.items()}


def check_same_function(shape, var, tok, gen, jtok, gen_vars, tok_vars, labels: np.ndarray) -> tuple[float, float]:
  """Runs the official sampler, then ours forced to the ids it drew. Returns (max relative error of
  the guided logits over all scales, max abs difference of the images in [0, 1])."""
  record: list = []
  official = ref.autoregressive_infer_cfg(var, tok, torch.from_numpy(labels), seed=0, cfg=CFG, top_k=TOP_K,
                                          top_p=TOP_P, record=record)
  forced = {b: [jnp.asarray(ids.numpy().reshape(len(labels), n, n), jnp.int32)
                for ids, n in zip(official["ids"][b], shape.scales)] for b in range(shape.num_branches)}
  sampler = make_sampler(gen, jtok, SamplerSettings(top_k=TOP_K, top_p=TOP_P, return_logits=True))
  ours = sampler(gen_vars, tok_vars, jnp.asarray(labels, jnp.int32), jax.random.key(0), jnp.float32(CFG),
                 jnp.float32(1.0), forced)
  want = torch.cat(record, dim=1).numpy().reshape(len(labels), -1, shape.num_branches, shape.codebook_size)
  got = np.asarray(ours["logits"])
  logit_error = float(np.abs(got - want).max() / np.abs(want).max())
  images = (np.asarray(ours["images"]).transpose(0, 3, 1, 2) + 1) / 2
  return logit_error, float(np.abs(images - official["images"].numpy()).max())


def bench_size(name: str, batches, reps: int, check: bool, peak: float, breakdown: bool = False) -> list[dict]:
  shape = SHAPES[name]
  var, tok = ref.build(shape, seed=0)
  gen, jtok, gen_vars, tok_vars = convert(shape, var, tok)
  rows = []
  if check:
    labels = np.arange(batches[0], dtype=np.int64) * 7 % shape.num_classes
    logit_error, image_error = check_same_function(shape, var, tok, gen, jtok, gen_vars, tok_vars, labels)
    # stderr: keeps the table on stdout whole.
    print(f"check {name}: same weights, the official draws forced into ours: guided logits max rel. error "
          f"{logit_error:.2e}, images max abs diff {image_error:.2e}", file=sys.stderr, flush=True)
  sampler = make_sampler(gen, jtok, SamplerSettings(top_k=TOP_K, top_p=TOP_P))
  ours_flops = generator_flops(gen.config) + decoder_flops(jtok.config)
  official_flops = generator_flops(gen.config, fold_guided_head=False) + decoder_flops(jtok.config)
  for batch in batches:
    labels = np.arange(batch, dtype=np.int64) * 7 % shape.num_classes
    torch_labels = torch.from_numpy(labels)
    args = (gen_vars, tok_vars, jnp.asarray(labels, jnp.int32), jax.random.key(0), jnp.float32(CFG),
            jnp.float32(1.0), {})
    t = time.perf_counter()
    compiled = sampler.lower(*args).compile()
    compile_s = time.perf_counter() - t
    medians = blocked_medians({
        "official": lambda i: ref.autoregressive_infer_cfg(var, tok, torch_labels, seed=i, cfg=CFG, top_k=TOP_K,
                                                           top_p=TOP_P),
        "ours": lambda i: jax.block_until_ready(compiled(*args[:3], jax.random.key(i), *args[4:])),
    }, reps)
    official_s, ours_s = medians["official"], medians["ours"]
    rows.append(dict(size=name, batch=batch, official_s=official_s, ours_s=ours_s, compile_s=compile_s,
                     speedup=official_s / ours_s,
                     ours_tflops=ours_flops * batch / ours_s / 1e12,
                     official_tflops=official_flops * batch / official_s / 1e12, peak=peak))
    r = rows[-1]
    print(f"| {name} | {batch} | {official_s:.3f} | {ours_s:.3f} | {r['speedup']:.2f}x | {compile_s:.1f} "
          f"| {r['official_tflops']:.3f} ({100 * r['official_tflops'] * 1e12 / peak:.0f}%) "
          f"| {r['ours_tflops']:.3f} ({100 * r['ours_tflops'] * 1e12 / peak:.0f}%) |", flush=True)
    if breakdown:
      r["official_stages"], r["official_whole"] = stage_breakdown.official(
          ref, var, tok, torch_labels, cfg=CFG, top_k=TOP_K, top_p=TOP_P)
      r["ours_stages"] = stage_breakdown.ours(gen, jtok, gen_vars, tok_vars, batch, cfg=CFG, top_k=TOP_K,
                                              top_p=TOP_P, reps=3)
  return rows


OFFICIAL_STAGES = ("blocks", "head", "filter", "draw", "f_hat update", "downsample", "decode", "other")


def print_breakdown(rows) -> None:
  """Stage table: official (one instrumented eager call) and ours (stages jitted apart, the
  'other' column = whole program - sum of the stages: negative where fusing them in one program
  saves time)."""
  print("\nper stage, ms per batch (official: one instrumented call; ours: each stage its own jitted program, "
        "summed over scales; 'other' = whole - stages):\n")
  print("| size | batch | sampler | whole | " + " | ".join(OFFICIAL_STAGES) + " |")
  print("|---|---|---|---|" + "---|" * len(OFFICIAL_STAGES))
  for r in rows:
    o = r["official_stages"]
    print(f"| {r['size']} | {r['batch']} | official | {1e3 * r['official_whole']:.1f} | "
          + " | ".join(f"{1e3 * o.get(k, 0.0):.1f}" for k in OFFICIAL_STAGES) + " |")
    u = dict(r["ours_stages"])
    whole = r["ours_s"]
    cells = [u["blocks"], u["head"], u["filter+draw"], None, u["f_hat update"], u["downsample"], u["decode"],
             whole - sum(u.values())]
    print(f"| {r['size']} | {r['batch']} | ours | {1e3 * whole:.1f} | "
          + " | ".join("(with filter)" if v is None else f"{1e3 * v:.1f}" for v in cells) + " |", flush=True)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--sizes", default="tiny", help="comma-separated: tiny, small, d6, d8, d17")
  parser.add_argument("--batches", default="1,4", help="comma-separated batch sizes")
  parser.add_argument("--reps", type=int, default=5, help="timed repetitions per batch (median reported)")
  parser.add_argument("--breakdown", action="store_true",
                      help="also print the per-stage time of both samplers (bench/stage_breakdown.py)")
  parser.add_argument("--no-check", dest="check", action="store_false",
                      help="skip the same-weights, same-draws equality check")
  args = parser.parse_args(argv)
  sizes = [s for s in args.sizes.split(",") if s]
  for s in sizes:
    if s not in SHAPES:
      parser.error(f"unknown size {s!r}; choose from {sorted(SHAPES)}")
  try:
    batches = [int(b) for b in args.batches.split(",") if b]
  except ValueError:
    parser.error(f"--batches must be comma-separated integers, got {args.batches!r}")
  if not batches or min(batches) < 1 or args.reps < 1:
    parser.error("batches and --reps must be >= 1")
  peak = matmul_flops_per_s(jnp.float32)
  print(f"CPU: {cpu_name()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}; torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), jax {jax.__version__} ({jax.devices()[0].device_kind}); float32; "
        f"4096^2 matmul {peak / 1e12:.3f} TFLOP/s\n")
  print("| size | batch | official s | ours s | speed-up | our compile s | official TFLOP/s (% matmul) "
        "| ours TFLOP/s (% matmul) |")
  print("|---|---|---|---|---|---|---|---|")
  rows = []
  for size in sizes:
    rows += bench_size(size, batches, args.reps, args.check, peak, args.breakdown)
  if args.breakdown:
    print_breakdown(rows)


if __name__ == "__main__":
  main()
