"""Analytic model FLOPs of a training step, chip peaks, and the CPU's measured matmul rate (MFU).

Counting convention (PaLM appendix B / MaxText's `calculate_tflops_training_per_device`):
  * a matmul (M, K) @ (K, N) costs 2·M·N·K FLOPs forward;
  * a trainable matmul costs 3× its forward in a training step (forward, grad w.r.t. the input,
    grad w.r.t. the weight);
  * attention's two score/value products (QKᵀ and PV) are counted apart, over the (query, key)
    pairs the mask keeps (the useful work; a dense kernel computes the masked pairs too), and
    are also ×3 in a trained network;
  * frozen networks (the generator step's tokenizer, the DINOv2 teacher, LPIPS-VGG, the DINO
    discriminator's feature ViT) are counted forward only, and the codebook look-up (an argmax, no
    gradient) forward only. Where a loss's gradient passes *through* a frozen network to the image
    (LPIPS, the discriminator in the generator loss) the real step does ~1 more forward's worth of
    work that this convention does not count, so MFU from these numbers is conservative.
  * element-wise work (norms, softmax, GELU, AdamW) is not counted: it is not model FLOPs.

`train_flops_per_example` returns FLOPs for ONE example; a step is × the global batch, a device's
share ÷ the device count.
"""
from __future__ import annotations

import functools
import math
import time
from typing import Any, Optional, Sequence

# Dense bf16 peak FLOP/s per chip (no structured sparsity), from the vendors' spec sheets:
PEAK_FLOPS: dict[str, float] = {
    "h100": 989.4e12,  # NVIDIA H100 SXM5 datasheet: 989.4 TFLOPS bf16 dense (1,979 with sparsity)
    "h200": 989.4e12,  # NVIDIA H200 SXM datasheet: same Hopper tensor cores as H100 SXM
    "a100": 312e12,  # NVIDIA A100 datasheet: 312 TFLOPS bf16 dense (624 with sparsity)
    "v4": 275e12,  # Google Cloud TPU v4 docs: 275 TFLOPS bf16 per chip
    "v5e": 197e12,  # Google Cloud TPU v5e docs: 197 TFLOPS bf16 per chip
    "v5p": 459e12,  # Google Cloud TPU v5p docs: 459 TFLOPS bf16 per chip
    "v6e": 918e12,  # Google Cloud TPU v6e (Trillium) docs: 918 TFLOPS bf16 per chip
}

# jax `device_kind` strings -> PEAK_FLOPS keys (checked in order, lowercase substring match).
_DEVICE_KINDS = (("h100", "h100"), ("h200", "h200"), ("a100", "a100"), ("v5 lite", "v5e"), ("v5e", "v5e"),
                 ("v5p", "v5p"), ("v5", "v5p"), ("v6", "v6e"), ("v4", "v4"))


def matmul(m: float, k: float, n: float) -> float:
  """Forward FLOPs of (m, k) @ (k, n)."""
  return 2.0 * m * k * n


# ----------------------------------------------------------------------------- building blocks
def vit_forward(width: int, depth: int, mlp_ratio: float, tokens: int) -> dict:
  """One pre-norm ViT trunk over `tokens` tokens (full attention): {'matmul', 'attention'} forward."""
  hidden = int(mlp_ratio * width)
  per_block = matmul(tokens, width, 3 * width) + matmul(tokens, width, width) + 2 * matmul(tokens, width, hidden)
  # QKᵀ and PV: each 2·T·T·head_dim per head -> 2·T²·width each.
  attention = 2 * matmul(tokens, width, tokens)
  return {"matmul": depth * per_block, "attention": depth * attention}


def resize_forward(n_in: int, n_out: int, channels: int) -> float:
  """`ops.resample.resize_with` on one (n_in, n_in, C) map: two separable matrix products."""
  return matmul(n_out, n_in, n_in * channels) + matmul(n_out, n_in, n_out * channels)


def _scale_pairs(scales) -> int:
  """(query, key) pairs the block-causal mask keeps: scale s attends to all positions of scales <= s."""
  pairs, seen = 0, 0
  for side in scales:
    seen += side * side
    pairs += side * side * seen
  return pairs


# ----------------------------------------------------------------------------- the tokenizer
def tokenizer_parts(tc) -> dict:
  """Forward FLOPs of one image through the tokenizer (`models.tokenizer.TokenizerConfig`), by part."""
  v, q = tc.vit, tc.quantizer
  g2, n2, p, c = v.grid ** 2, q.grid ** 2, v.patch_size, v.width
  branches = tc.num_branches
  enc = vit_forward(c, v.depth, v.mlp_ratio, 1 + g2 + branches * n2)
  dec = vit_forward(c, v.depth, v.mlp_ratio, 1 + g2 + 1 + n2)
  # The quantizer per branch and scale: cosine similarity to every code, the upsample of the picked
  # rows, phi (3x3 conv), and (all but the last scale) the area downsample of the residual.
  lookup = resample = phi = 0.0
  for si, side in enumerate(q.scales):
    lookup += matmul(side * side, q.latent_dim, q.codebook_size)
    resample += resize_forward(side, q.grid, q.latent_dim)
    if si < len(q.scales) - 1:
      resample += resize_forward(q.grid, side, q.latent_dim)
    phi += matmul(n2, 9 * q.latent_dim, q.latent_dim)
  return {
      "encoder_matmul": matmul(g2, p * p * 3, c) + enc["matmul"] + matmul(branches * n2, c, q.latent_dim),
      "encoder_attention": enc["attention"],
      "quantizer_lookup": branches * lookup,
      "quantizer_resample": branches * resample,
      "quantizer_phi": branches * phi,
      "decoder_matmul": matmul(n2, branches * q.latent_dim, c) + dec["matmul"] + matmul(g2, c, p * p * 3),
      "decoder_attention": dec["attention"],
  }


def lpips_forward(image_size: int) -> float:
  """LPIPS-VGG16 on ONE image (features to relu5_3 + the five 1x1 heads)."""
  from imagefolder_jax.models.lpips import VGG16_STAGES
  total, side, cin = 0.0, image_size, 3
  for si, stage in enumerate(VGG16_STAGES):
    if si:
      side //= 2
    for cout in stage:
      total += matmul(side * side, 9 * cin, cout)
      cin = cout
    total += matmul(side * side, cin, 1)
  return total


def patchgan_forward(image_size: int, base: int, num_layers: int = 3, kernel: int = 4) -> float:
  """PatchGAN (taming NLayerDiscriminator, pad 1) on one image."""
  total, side, cin = 0.0, image_size, 3
  widths = [(base * min(2 ** n, 8), 2) for n in range(num_layers)] + [(base * min(2 ** num_layers, 8), 1), (1, 1)]
  for cout, stride in widths:
    side = (side + 2 - kernel) // stride + 1
    total += matmul(side * side, kernel * kernel * cin, cout)
    cin = cout
  return total


def tokenizer_train_flops(tc, *, lpips: bool = False, teacher=None, discriminator: Optional[str] = None,
                          patchgan_features: int = 64) -> dict:
  """Model FLOPs of one tokenizer training example (TokenizerTask.train_step).

  tc: TokenizerConfig; lpips: LPIPS on (recon, image); teacher: the DINOv2 ViTConfig of the semantic
  loss or None; discriminator: None, 'patchgan' or 'dino' (GAN on).
  """
  parts = tokenizer_parts(tc)
  out = {}
  for name, value in parts.items():
    # The look-up (argmax) and the resampling of codes (constant matrices off the gradient path: the
    # straight-through f_hat passes the gradient to the latent directly) are forward only; phi is
    # trained through the vq loss.
    out[name] = value if name in ("quantizer_lookup", "quantizer_resample") else 3 * value
  if lpips:
    out["lpips_forward"] = 2 * lpips_forward(tc.image_size)  # recon and target
  if teacher is not None:
    t = vit_forward(teacher.width, teacher.depth, teacher.mlp_ratio, 1 + teacher.grid ** 2)
    out["teacher_forward"] = matmul(teacher.grid ** 2, teacher.patch_size ** 2 * 3, teacher.width) + sum(t.values())
  if discriminator == "patchgan":
    d = patchgan_forward(tc.image_size, patchgan_features)
    # G step: the adaptive weight's pass and the G loss's pass (forward); D step: real + fake, trained.
    out["discriminator"] = 2 * d + 2 * 3 * d
  elif discriminator == "dino":
    from imagefolder_jax.models.discriminator import DinoDiscConfig
    v = DinoDiscConfig().vit
    f = vit_forward(v.width, v.depth, v.mlp_ratio, 1 + v.grid ** 2)
    out["discriminator"] = 4 * (matmul(v.grid ** 2, v.patch_size ** 2 * 3, v.width) + sum(f.values()))
  out["total"] = sum(out.values())
  return out


# ----------------------------------------------------------------------------- the generator
def generator_parts(gc, *, dense_attention: bool = False) -> dict:
  """Forward FLOPs of one example through the teacher-forced generator (`GeneratorConfig`).
  dense_attention: count every (query, key) pair, as a dense kernel computes them (for comparing
  with XLA's cost analysis), instead of the pairs the block-causal mask keeps."""
  c, length = gc.width, gc.num_tokens
  hidden = round(c * gc.mlp_ratio)
  per_block = (matmul(1, c, 6 * c) + matmul(length, c, 3 * c) + matmul(length, c, c)
               + 2 * matmul(length, c, hidden))
  return {
      "embed_matmul": matmul(length - gc.scales[0] ** 2, gc.input_dim, c),
      "blocks_matmul": gc.depth * per_block,
      # QKᵀ and PV over the pairs the block-causal mask keeps.
      "attention": gc.depth * 2 * 2.0 * (length * length if dense_attention else _scale_pairs(gc.scales)) * c,
      "head_matmul": matmul(1, c, 2 * c) + matmul(length, c, gc.num_branches * gc.codebook_size),
  }


def generator_train_flops(gc, tc=None, *, pretokenized: bool = False) -> dict:
  """Model FLOPs of one generator training example (GeneratorTask.train_step): the trained
  transformer x3, plus (forward only) the frozen tokenizer's encode (skipped with pre-tokenized
  codes) and the teacher-forcing inputs (phi + resampling per branch and scale)."""
  out = {name: 3 * value for name, value in generator_parts(gc).items()}
  if tc is not None:
    parts = tokenizer_parts(tc)
    q = tc.quantizer
    if not pretokenized:
      out["tokenizer_encode"] = (parts["encoder_matmul"] + parts["encoder_attention"] + parts["quantizer_lookup"]
                                 + parts["quantizer_resample"] + parts["quantizer_phi"])
    inputs = 0.0
    for si in range(len(q.scales) - 1):
      inputs += (resize_forward(q.scales[si], q.grid, q.latent_dim)
                 + matmul(q.grid ** 2, 9 * q.latent_dim, q.latent_dim)
                 + resize_forward(q.grid, q.scales[si + 1], q.latent_dim))
    out["next_scale_inputs"] = tc.num_branches * inputs
  out["total"] = sum(out.values())
  return out


def sample_flops(gc, tc, *, guidance: bool = True) -> dict:
  """Model FLOPs of one sample (`sampling.sample`): the generator over every position once (the KV
  cache), twice with guidance (conditional and unconditional rows), the next-scale inputs per
  branch (phi and resampling) and the tokenizer's decode."""
  rows = 2 if guidance else 1
  out = {"generator": rows * sum(generator_parts(gc).values())}
  parts = tokenizer_parts(tc)
  out["next_scale_inputs"] = parts["quantizer_resample"] + parts["quantizer_phi"]
  out["decode"] = parts["decoder_matmul"] + parts["decoder_attention"]
  out["total"] = sum(out.values())
  return out


def attention_kernel_flops(hlo_text: str, scales: Sequence[int], head_dim: int) -> float:
  """FLOPs per device of the block-causal attention kernels (`ops.block_causal_attention`) in a
  compiled program's HLO, each call priced by its kind and a (..., Lq or Lk, head_dim) result: its
  leading dimensions are the sequences x heads it ran over (the compiler may drop a batch of 1)."""
  from imagefolder_jax.ops import block_causal_attention as kernel
  from imagefolder_jax.planning import hlo
  lq, lk, _ = kernel.tiling(sum(s * s for s in scales))
  tails = {(lq, head_dim), (lk, head_dim)}
  total = 0.0
  for name, shapes, runs in hlo.custom_calls_named(hlo_text, "splash_mha_"):
    kind = next((k for k in kernel.KERNEL_PAIR_FLOPS if f"_{k}" in name), None)
    rows = [math.prod(s[:-2]) for s in shapes if len(s) >= 3 and tuple(s[-2:]) in tails]
    if kind is None or not rows:
      raise ValueError(f"unrecognised attention kernel {name} with results {shapes}")
    total += runs * kernel.kernel_flops(kind, scales, max(rows), 1, head_dim)
  return total


def train_flops_per_example(task_or_config: Any, *, pretokenized: bool = False) -> dict:
  """Model FLOPs of one training example: {'total': float, <part>: float, ...}.

  task_or_config: a `GeneratorTask` / `TokenizerTask` (reads its model configs and losses), or a
  `GeneratorConfig` / `TokenizerConfig` (the model alone: no frozen tokenizer, no losses' networks).
  """
  from imagefolder_jax.models.generator import GeneratorConfig
  from imagefolder_jax.models.tokenizer import TokenizerConfig
  x = task_or_config
  if isinstance(x, GeneratorConfig):
    return generator_train_flops(x)
  if isinstance(x, TokenizerConfig):
    return tokenizer_train_flops(x)
  name = getattr(x, "name", None)
  if name == "generator":
    return generator_train_flops(x.model_config, x.tokenizer_config, pretokenized=pretokenized)
  if name == "tokenizer":
    lc = x.config.loss
    # The teacher module exists once the frozen networks are loaded (training) or laid out
    # (`abstract_frozen`, planning); its forward is counted from its config either way.
    teacher = x.teacher.config if lc.semantic > 0 and getattr(x, "teacher", None) is not None else None
    return tokenizer_train_flops(x.model_config, lpips=lc.lpips > 0, teacher=teacher,
                                 discriminator=lc.discriminator if lc.gan > 0 else None,
                                 patchgan_features=lc.get("patchgan_features", 64))
  raise TypeError(f"train_flops_per_example: expected a task or a model config, got {type(x).__name__}")


# ----------------------------------------------------------------------------- peaks
def peak_flops_per_device(device: Any = None, *, cpu_rate: Optional[float] = None) -> tuple[str, float]:
  """(name, peak FLOP/s) of `device` (default: jax.devices()[0]). GPUs/TPUs: the PEAK_FLOPS entry of
  their kind; CPU: `cpu_rate` or the float32 matmul rate measured here (once per process)."""
  import jax
  device = device or jax.devices()[0]
  if device.platform == "cpu":
    return "cpu", cpu_rate if cpu_rate is not None else measure_cpu_matmul_rate()
  kind = device.device_kind.lower()
  for needle, key in _DEVICE_KINDS:
    if needle in kind:
      return key, PEAK_FLOPS[key]
  raise KeyError(f"no peak FLOP/s known for device kind {device.device_kind!r}; known: {sorted(PEAK_FLOPS)}")


@functools.lru_cache(maxsize=None)
def measure_cpu_matmul_rate(n: int = 1024, seconds: float = 0.15) -> float:
  """float32 FLOP/s of a jitted (n, n) @ (n, n) on the CPU device, the best of repeated timings
  over about `seconds` (the best, since the CPU is shared: that is the rate the machine can give).
  Every CPU training run and plan pays it at start: 0.15 s gave the rate of 0.5 s (2.18e11 against
  2.21e11 FLOP/s on a 2-core AMD EPYC) for a third of the CPU time (0.35 against 1.04 CPU-s)."""
  import jax
  import numpy as np
  cpu = jax.devices("cpu")[0]
  a = jax.device_put(np.random.default_rng(0).standard_normal((n, n), np.float32), cpu)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  best, deadline = float("inf"), time.perf_counter() + seconds
  while True:
    t0 = time.perf_counter()
    f(a).block_until_ready()
    best = min(best, time.perf_counter() - t0)
    if time.perf_counter() > deadline:
      break
  return matmul(n, n, n) / best


def mfu(flops_per_step: float, step_seconds: float, num_devices: int, peak_per_device: float) -> dict:
  """{'tflops_per_device': achieved model TFLOP/s per device, 'mfu': that ÷ the device peak}."""
  per_device = flops_per_step / max(step_seconds, 1e-12) / num_devices
  return {"tflops_per_device": per_device / 1e12, "mfu": per_device / peak_per_device}
