"""Tokenizer training losses (docs/design.md §2): pixel, quantizer, semantic, adversarial.

Pure functions of arrays; no module state. Conventions follow the official
`tokenizer/tokenizer_image/vq_loss.py` and `quant.py`:

* D loss: `hinge_d_loss` = 0.5 * (mean relu(1 - real) + mean relu(1 + fake)) (the official keeps
  taming's 0.5), plus `lecam_weight * lecam_loss` (0.001) where the LeCam EMA is updated with the
  current batch *before* the regulariser is computed; the sum is multiplied by the GAN on/off weight.
* G loss: mse + LPIPS + disc_weight (0.5) * adaptive_weight * hinge_g_loss + vq + commit + 0.1 * semantic.

Means are over whatever array is passed: under `jax.jit` with globally sharded inputs they are
global-batch means (the semantic loss in particular must see the whole global batch, docs/design.md §2).
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp


def l2_pixel_loss(reconstructions: jax.Array, images: jax.Array) -> jax.Array:
  """mean((x̂ - x)^2) over all elements (PyTorch `F.mse_loss`). Both (B, H, W, 3) -> () float32."""
  diff = reconstructions.astype(jnp.float32) - images.astype(jnp.float32)
  return jnp.mean(jnp.square(diff))


# ----------------------------------------------------------------------------------------------
# Adversarial losses.


def hinge_d_loss(logits_real: jax.Array, logits_fake: jax.Array) -> jax.Array:
  """0.5 * (mean relu(1 - real) + mean relu(1 + fake)) -> () float32.

  logits_*: any shape, e.g. (B, N) dino-disc token logits or (B, h, w, 1) PatchGAN maps; each mean
  runs over all its elements. The 0.5 factor is the official (taming-style) convention.
  """
  real = jnp.mean(jax.nn.relu(1.0 - logits_real.astype(jnp.float32)))
  fake = jnp.mean(jax.nn.relu(1.0 + logits_fake.astype(jnp.float32)))
  return 0.5 * (real + fake)


def hinge_g_loss(logits_fake: jax.Array) -> jax.Array:
  """-mean(fake logits) -> () float32."""
  return -jnp.mean(logits_fake.astype(jnp.float32))


class LeCamState(NamedTuple):
  """EMAs of the mean real and fake discriminator logits (scalars, float32; official init 0)."""
  real_ema: jax.Array
  fake_ema: jax.Array


def lecam_init() -> LeCamState:
  return LeCamState(jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))


def lecam_update(state: LeCamState, logits_real: jax.Array, logits_fake: jax.Array,
                 decay: float = 0.999) -> LeCamState:
  """ema <- decay * ema + (1 - decay) * mean(logits), for real and fake; no gradient flows.

  The official (`LeCAM_EMA.update`) calls this on the current batch before `lecam_loss`.
  """
  real = jax.lax.stop_gradient(jnp.mean(logits_real.astype(jnp.float32)))
  fake = jax.lax.stop_gradient(jnp.mean(logits_fake.astype(jnp.float32)))
  return LeCamState(real_ema=decay * state.real_ema + (1 - decay) * real,
                    fake_ema=decay * state.fake_ema + (1 - decay) * fake)


def lecam_loss(logits_real: jax.Array, logits_fake: jax.Array, state: LeCamState) -> jax.Array:
  """LeCam regulariser (Yu et al. 2021, official `lecam_reg`) -> () float32.

  mean(relu(real - ema_fake)^2) + mean(relu(ema_real - fake)^2); the 0.001 weight is the caller's.
  """
  real = logits_real.astype(jnp.float32)
  fake = logits_fake.astype(jnp.float32)
  ema_real = jax.lax.stop_gradient(state.real_ema)
  ema_fake = jax.lax.stop_gradient(state.fake_ema)
  return (jnp.mean(jnp.square(jax.nn.relu(real - ema_fake)))
          + jnp.mean(jnp.square(jax.nn.relu(ema_real - fake))))


def adaptive_weight(rec_grad_norm: jax.Array, gan_grad_norm: jax.Array, max_weight: float = 1e4,
                    eps: float = 1e-4) -> jax.Array:
  """clip(‖∇rec‖ / (‖∇gan‖ + eps), 0, max_weight), without gradient -> () float32 (taming/official)."""
  weight = rec_grad_norm.astype(jnp.float32) / (gan_grad_norm.astype(jnp.float32) + eps)
  return jax.lax.stop_gradient(jnp.clip(weight, 0.0, max_weight))


def global_norm(tree) -> jax.Array:
  """sqrt of the sum of squares of every leaf (the Frobenius norm for one array) -> () float32."""
  leaves = jax.tree_util.tree_leaves(tree)
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves))


def last_layer_grad_norm(last_layer_fn: Callable, last_layer, output_grad: jax.Array) -> jax.Array:
  """‖∂L/∂W‖ of the last pixel layer's parameters W (an array or a pytree), from ∂L/∂output.

  last_layer_fn(W) -> the layer's output (e.g. the reconstruction from the stopped input `h` of the
  decoder's last layer); output_grad: ∂L/∂output of a loss L of that output (the same shape). Since
  `h` does not depend on W, this is the full model's gradient w.r.t. W, at the cost of the last
  layer's backward alone: the trainer gets ∂L/∂recon from the one backward of the loss networks
  (LPIPS, the discriminator) that also serves the parameters' gradient. The official differentiates
  the weighted reconstruction loss (mse + LPIPS) and the hinge G loss w.r.t. that weight."""
  _, vjp = jax.vjp(last_layer_fn, jax.lax.stop_gradient(last_layer))
  return global_norm(vjp(output_grad)[0])


# ----------------------------------------------------------------------------------------------
# Semantic regularisation.


def semantic_contrastive_loss(student: jax.Array, teacher: jax.Array,
                              valid: Optional[jax.Array] = None) -> jax.Array:
  """CLIP-style symmetric cross-entropy, logit scale 1, no l2 normalisation -> () float32.

  Args:
    student: (B, D) spatial mean of the semantic branch's f̂.
    teacher: (B, D) frozen DINOv2 CLS after the shared trainable 1×1 conv.
    valid: (B,) bool; False marks samples hit by quantizer dropout. They are removed entirely: not
      scored as rows and not used as negatives (columns). None = all valid.

  logits[i, j] = teacher_i · student_j (the official `ClipLoss(teacher, student)`); the loss is
  ½ (CE over rows + CE over columns) with targets on the diagonal, each averaged over the valid
  samples. Returns 0 when no sample is valid. Pass the global batch (B = global batch size).
  """
  if student.ndim != 2 or student.shape != teacher.shape:
    raise ValueError(f"student {student.shape} and teacher {teacher.shape} must both be (B, D)")
  b = student.shape[0]
  if valid is None:
    valid = jnp.ones((b,), bool)
  if valid.shape != (b,):
    raise ValueError(f"valid must be ({b},), got {valid.shape}")
  logits = jnp.dot(teacher.astype(jnp.float32), student.astype(jnp.float32).T, precision="highest")
  pair_ok = valid[:, None] & valid[None, :]
  # A large finite negative (not -inf) keeps logsumexp and its gradient finite when a row has no
  # valid entries; such rows get zero weight below.
  masked = jnp.where(pair_ok, logits, jnp.finfo(jnp.float32).min / 4)
  diag = jnp.diagonal(logits)
  ce_rows = jax.nn.logsumexp(masked, axis=1) - diag
  ce_cols = jax.nn.logsumexp(masked, axis=0) - diag
  weight = valid.astype(jnp.float32)
  count = jnp.sum(weight)
  per_sample = 0.5 * (ce_rows + ce_cols)
  total = jnp.sum(jnp.where(valid, per_sample, 0.0))
  return jnp.where(count > 0, total / jnp.maximum(count, 1.0), 0.0)


# ----------------------------------------------------------------------------------------------
# Quantizer losses.


class VQLosses(NamedTuple):
  """vq (codebook side) and commit (encoder side, β included), each already divided by #scales."""
  vq: jax.Array
  commit: jax.Array

  @property
  def total(self) -> jax.Array:
    return self.vq + self.commit


def vq_losses(f_hat_per_scale: Sequence[jax.Array], f: jax.Array, beta: float = 0.25,
              scale_mask: Optional[jax.Array] = None) -> VQLosses:
  """Multi-scale residual quantizer losses (official `VectorQuantizer2.forward`).

  Args:
    f_hat_per_scale: S arrays (B, h, w, C): f̂ accumulated after scales 0..s (before the
      straight-through), as the quantizer produced them (carrying gradients to the codebook and φ).
    f: (B, h, w, C) encoder latent (carrying gradients to the encoder).
    beta: commitment weight.
    scale_mask: optional (B, S) bool, True where scale s contributes for sample b (quantizer
      dropout: s < n_b). Each scale's mse then averages over its contributing samples only
      (official `mse.mul(mask).mean() / ratio`); a scale no sample uses contributes 0.

  Returns:
    VQLosses(vq = Σ_s mse(f̂_s, sg f) / S, commit = β Σ_s mse(sg f̂_s, f) / S); total = vq + commit
    (docs/design.md §2: "(commit + vq) / 10" with S = 10).
  """
  num_scales = len(f_hat_per_scale)
  if num_scales == 0:
    raise ValueError("f_hat_per_scale is empty")
  b = f.shape[0]
  if scale_mask is not None and scale_mask.shape != (b, num_scales):
    raise ValueError(f"scale_mask must be ({b}, {num_scales}), got {scale_mask.shape}")
  f32 = f.astype(jnp.float32)
  f_sg = jax.lax.stop_gradient(f32)
  vq = jnp.zeros((), jnp.float32)
  commit = jnp.zeros((), jnp.float32)
  for s, f_hat in enumerate(f_hat_per_scale):
    if f_hat.shape != f.shape:
      raise ValueError(f"f_hat_per_scale[{s}] has shape {f_hat.shape}, expected {f.shape}")
    f_hat = f_hat.astype(jnp.float32)
    err_codebook = jnp.mean(jnp.square(f_hat - f_sg), axis=tuple(range(1, f.ndim)))  # (B,)
    err_commit = jnp.mean(jnp.square(jax.lax.stop_gradient(f_hat) - f32), axis=tuple(range(1, f.ndim)))
    if scale_mask is None:
      vq = vq + jnp.mean(err_codebook)
      commit = commit + jnp.mean(err_commit)
    else:
      m = scale_mask[:, s].astype(jnp.float32)
      n = jnp.sum(m)
      denom = jnp.maximum(n, 1.0)
      vq = vq + jnp.where(n > 0, jnp.sum(m * err_codebook) / denom, 0.0)
      commit = commit + jnp.where(n > 0, jnp.sum(m * err_commit) / denom, 0.0)
  return VQLosses(vq=vq / num_scales, commit=beta * commit / num_scales)
