"""Speed rows of `bench/device_check.sh`: one markdown table for the device jax sees first.

  python bench/device_check.py            # released sizes (d17 sampler, d16 + ViT-B training steps)
  python bench/device_check.py --smoke    # tiny sizes, runs on a CPU in a minute or two

Rows: d17 sampling latency at batch 1 and throughput at batch 64 (float32 and bf16 compute), the
tokenizer's encode and decode throughput (ViT-B, 256 px), and one training step's achieved model
TFLOP/s and MFU for the generator at d16 and the tokenizer (L2 + LPIPS + vq/commitment). Random
weights (speed does not depend on them). Each timing: median of --reps runs after one warm-up,
compile time apart. MFU: analytic FLOPs (imagefolder_jax.planning.flops) ÷ the chip's bf16 peak
(flops.PEAK_FLOPS; on a CPU its measured float32 matmul rate).
"""
from __future__ import annotations

import argparse
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from imagefolder_jax.inference.sampling import SamplerSettings, make_sampler
from imagefolder_jax.models.generator import GeneratorConfig, NextScaleGenerator, generator_loss
from imagefolder_jax.models.quantizer import QuantizerConfig
from imagefolder_jax.models.tokenizer import ImageFolderTokenizer, TokenizerConfig
from imagefolder_jax.models.vit import ViTConfig
from imagefolder_jax.planning import flops
from imagefolder_jax.train import losses, optim


def tokenizer_config(smoke: bool) -> TokenizerConfig:
  if smoke:
    return TokenizerConfig(vit=ViTConfig(width=64, depth=2, num_heads=2, patch_size=8, image_size=32),
                           quantizer=QuantizerConfig(codebook_size=256, latent_dim=8, scales=(1, 2, 4), num_phi=2,
                                                     codebook_update="gradient"))
  return TokenizerConfig(vit=ViTConfig(), quantizer=QuantizerConfig(codebook_size=4096, latent_dim=32,
                                                                    scales=(1, 1, 2, 3, 3, 4, 5, 6, 8, 11), num_phi=4,
                                                                    codebook_update="gradient"))


def generator_config(tc: TokenizerConfig, depth: int, dtype: str, smoke: bool) -> GeneratorConfig:
  q = tc.quantizer
  return GeneratorConfig(depth=2 if smoke else depth, width=64 if smoke else None, num_heads=2 if smoke else None,
                         num_classes=10 if smoke else 1000, codebook_size=q.codebook_size, latent_dim=q.latent_dim,
                         scales=q.scales, num_branches=tc.num_branches, dtype=dtype)


def timed(fn, reps: int) -> float:
  jax.block_until_ready(fn(0))
  times = []
  for i in range(reps):
    t = time.perf_counter()
    jax.block_until_ready(fn(i + 1))
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def compile_s(jitted, *args):
  t = time.perf_counter()
  compiled = jitted.lower(*args).compile()
  return compiled, time.perf_counter() - t


def init_tokenizer(tc):
  model = ImageFolderTokenizer(tc)
  size = tc.image_size
  variables = nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, size, size, 3))))
  variables.pop("intermediates", None)
  return model, variables


def sampling_rows(tc, tok, tok_vars, smoke: bool, reps: int) -> list:
  rows = []
  for dtype in ("float32", "bfloat16"):
    gc = generator_config(tc, 17, dtype, smoke)
    gen = NextScaleGenerator(gc)
    length = gc.num_tokens - gc.scales[0] ** 2
    gen_vars = nn.unbox(gen.init(jax.random.key(1), jnp.zeros((1,), jnp.int32), jnp.zeros((1, length, gc.input_dim))))
    sampler = make_sampler(gen, tok, SamplerSettings(top_k=750 if not smoke else 10, top_p=0.95))
    for batch in (1, 64 if not smoke else 4):
      labels = jnp.arange(batch, dtype=jnp.int32) % gc.num_classes
      args = (gen_vars, tok_vars, labels, jax.random.key(0), jnp.float32(3.25), jnp.float32(1.0), {})
      compiled, c = compile_s(sampler, *args)
      s = timed(lambda i: compiled(*args[:3], jax.random.key(i), *args[4:]), reps)
      what = "latency" if batch == 1 else "throughput"
      rows.append((f"sample d{gc.depth} {dtype} batch {batch} ({what})", f"{s * 1e3:.1f} ms/batch",
                   f"{batch / s:.1f} img/s", "", f"{c:.1f}"))
  return rows


def tokenizer_codec_rows(tc, tok, tok_vars, batch: int, reps: int) -> list:
  size = tc.image_size
  images = jax.random.uniform(jax.random.key(0), (batch, size, size, 3), minval=-1, maxval=1)
  encode = jax.jit(lambda v, x: tok.apply(v, x, method=ImageFolderTokenizer.encode_ids))
  compiled_encode, c_enc = compile_s(encode, tok_vars, images)
  ids = compiled_encode(tok_vars, images)
  decode = jax.jit(lambda v, i: tok.apply(v, i, method=ImageFolderTokenizer.decode_ids))
  compiled_decode, c_dec = compile_s(decode, tok_vars, ids)
  s_enc = timed(lambda i: compiled_encode(tok_vars, images), reps)
  s_dec = timed(lambda i: compiled_decode(tok_vars, ids), reps)
  return [(f"tokenizer encode batch {batch}", f"{s_enc * 1e3:.1f} ms/batch", f"{batch / s_enc:.1f} img/s", "",
           f"{c_enc:.1f}"),
          (f"tokenizer decode batch {batch}", f"{s_dec * 1e3:.1f} ms/batch", f"{batch / s_dec:.1f} img/s", "",
           f"{c_dec:.1f}")]


def _mfu_cell(model_flops: float, seconds: float, peak: float) -> str:
  m = flops.mfu(model_flops, seconds, 1, peak)
  return f"{m['tflops_per_device']:.3g} TFLOP/s, MFU {100 * m['mfu']:.1f}%"


def generator_step_row(tc, batch: int, dtype: str, smoke: bool, reps: int, peak: float) -> tuple:
  gc = generator_config(tc, 16, dtype, smoke)
  gen = NextScaleGenerator(gc)
  length = gc.num_tokens - gc.scales[0] ** 2
  params = nn.unbox(gen.init(jax.random.key(1), jnp.zeros((1,), jnp.int32), jnp.zeros((1, length, gc.input_dim))))
  params = params["params"]
  tx = optim.adamw(optax.constant_schedule(1e-4), weight_decay=0.05, clip_norm=2.0)
  state = dict(params=params, opt=tx.init(params))
  key = jax.random.key(0)
  labels = jax.random.randint(key, (batch,), 0, gc.num_classes)
  inputs = jax.random.normal(key, (batch, length, gc.input_dim))
  targets = jax.random.randint(key, (batch, gc.num_tokens, gc.num_branches), 0, gc.codebook_size)

  def step(state, labels, inputs, targets):
    loss, grads = jax.value_and_grad(lambda p: generator_loss(
        gen.apply({"params": p}, labels, inputs, train=True, rngs={"dropout": key}), targets))(state["params"])
    updates, opt = tx.update(grads, state["opt"], state["params"])
    return dict(params=optax.apply_updates(state["params"], updates), opt=opt), loss

  compiled, c = compile_s(jax.jit(step, donate_argnums=(0,)), state, labels, inputs, targets)
  holder = [state]

  def run(_):
    holder[0], loss = compiled(holder[0], labels, inputs, targets)
    return loss

  s = timed(run, reps)
  model_flops = flops.generator_train_flops(gc)["total"] * batch
  return (f"train generator d{gc.depth} {dtype} batch {batch}", f"{s * 1e3:.1f} ms/step", f"{batch / s:.1f} img/s",
          _mfu_cell(model_flops, s, peak), f"{c:.1f}")


def tokenizer_step_row(tc, batch: int, dtype: str, reps: int, peak: float) -> tuple:
  from imagefolder_jax.models.lpips import LPIPS
  model = ImageFolderTokenizer(tc, dtype=jnp.bfloat16 if dtype == "bfloat16" else jnp.float32)
  _, variables = init_tokenizer(tc)
  variables = dict(variables)
  params = variables.pop("params")
  lpips = LPIPS()
  size = tc.image_size
  images = jax.random.uniform(jax.random.key(0), (batch, size, size, 3), minval=-1, maxval=1)
  lpips_params = nn.unbox(lpips.init(jax.random.key(2), images[:1], images[:1]))["params"]
  tx = optim.adamw(optax.constant_schedule(1e-4))
  state = dict(params=params, opt=tx.init(params))

  def step(state, images):
    def loss_fn(p):
      out, _ = model.apply({"params": p, **variables}, images, train=True, mutable=["quantizer_stats", "intermediates"])
      recon = out["recon"]
      return (losses.l2_pixel_loss(recon, images) + jnp.mean(lpips.apply({"params": lpips_params}, recon, images))
              + out["vq_loss"] + out["commit_loss"])
    loss, grads = jax.value_and_grad(loss_fn)(state["params"])
    updates, opt = tx.update(grads, state["opt"], state["params"])
    return dict(params=optax.apply_updates(state["params"], updates), opt=opt), loss

  compiled, c = compile_s(jax.jit(step, donate_argnums=(0,)), state, images)
  holder = [state]

  def run(_):
    holder[0], loss = compiled(holder[0], images)
    return loss

  s = timed(run, reps)
  model_flops = flops.tokenizer_train_flops(tc, lpips=True)["total"] * batch
  return (f"train tokenizer {dtype} batch {batch}", f"{s * 1e3:.1f} ms/step", f"{batch / s:.1f} img/s",
          _mfu_cell(model_flops, s, peak), f"{c:.1f}")


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--smoke", action="store_true", help="tiny sizes (a CPU check of the script itself)")
  parser.add_argument("--reps", type=int, default=5)
  parser.add_argument("--train-batch", type=int, default=0, help="per-device training batch (default 32; smoke 2)")
  args = parser.parse_args(argv)
  device = jax.devices()[0]
  name, peak = flops.peak_flops_per_device(device)
  train_batch = args.train_batch or (2 if args.smoke else 32)
  print(f"device: {device.device_kind} ({device.platform}), {jax.device_count()} devices; peak used for MFU: "
        f"{name} {peak / 1e12:.3g} TFLOP/s; jax {jax.__version__}; "
        f"{'SMOKE (tiny sizes)' if args.smoke else 'released sizes'}\n")
  tc = tokenizer_config(args.smoke)
  tok, tok_vars = init_tokenizer(tc)
  print("| what | time | rate | model TFLOP/s, MFU | compile s |")
  print("|---|---|---|---|---|", flush=True)

  def show(rows):  # row by row, so a run cut short still leaves its finished rows
    for row in rows:
      print("| " + " | ".join(row) + " |", flush=True)

  show(sampling_rows(tc, tok, tok_vars, args.smoke, args.reps))
  show(tokenizer_codec_rows(tc, tok, tok_vars, 4 if args.smoke else 64, args.reps))
  for dtype in ("float32", "bfloat16"):
    show([generator_step_row(tc, train_batch, dtype, args.smoke, args.reps, peak)])
    show([tokenizer_step_row(tc, train_batch, dtype, args.reps, peak)])


if __name__ == "__main__":
  main()
