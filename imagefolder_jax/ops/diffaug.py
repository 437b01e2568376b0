"""DiffAugment (Zhao et al. 2020) as used by the official dino disc (StyleGAN-T's `diffaug.py`).

Differentiable, jittable, NHWC, explicit PRNG key. Every sample draws its own parameters (one
set per sample, applied to all its pixels and channels):
  translation  shift (t_h, t_w), each uniform on the integers [-d, d], d = round(side * ratio);
               output[y, x] = input[y + t_h, x + t_w], zero where that falls outside the image.
  color        brightness x + (u - 0.5); saturation (x - mean_c) * 2u + mean_c (mean over
               channels); contrast (x - mean) * (u + 0.5) + mean (mean over H, W, C).
  cutout       a zeroed rectangle of round(side * ratio) pixels per side whose centre is uniform
               over the image (clipped at the borders), same integer rules as the official code.
The official `DiffAug.aug` applies translation, then colour, then cutout; operations here run in
the order they appear in `policy` (Zhao's convention), so the default policy lists them in the
official order. The seven uniforms per sample come from one (7, B) draw, row i feeding the same
parameter whatever the policy, like the official `rand01`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

OFFICIAL_POLICY = "translation,color,cutout"
_OPS = ("translation", "color", "cutout")


def parse_policy(policy: str) -> tuple[str, ...]:
  """'translation,color,cutout' -> ('translation', 'color', 'cutout'); '' -> ()."""
  ops = tuple(p.strip() for p in policy.split(",") if p.strip())
  for op in ops:
    if op not in _OPS:
      raise ValueError(f"unknown DiffAugment operation {op!r} in policy {policy!r} (known: {_OPS})")
  if len(set(ops)) != len(ops):
    raise ValueError(f"DiffAugment policy {policy!r} repeats an operation")
  return ops


def _translate(x: jax.Array, u_h: jax.Array, u_w: jax.Array, ratio: float) -> jax.Array:
  b, h, w, _ = x.shape
  # Python round() as the official (banker's rounding on .5).
  d_h, d_w = round(h * ratio), round(w * ratio)
  t_h = jnp.floor(u_h * (2 * d_h + 1)).astype(jnp.int32) - d_h
  t_w = jnp.floor(u_w * (2 * d_w + 1)).astype(jnp.int32) - d_w
  rows = jnp.arange(h)[None, :] + t_h[:, None]  # (B, H)
  cols = jnp.arange(w)[None, :] + t_w[:, None]  # (B, W)
  x = jnp.take_along_axis(x, jnp.clip(rows, 0, h - 1)[:, :, None, None], axis=1)
  x = jnp.take_along_axis(x, jnp.clip(cols, 0, w - 1)[:, None, :, None], axis=2)
  inside = (((rows >= 0) & (rows < h))[:, :, None] & ((cols >= 0) & (cols < w))[:, None, :])
  return x * inside[..., None].astype(x.dtype)


def _color(x: jax.Array, u_bright: jax.Array, u_sat: jax.Array, u_contrast: jax.Array) -> jax.Array:
  per_sample = lambda u: u[:, None, None, None].astype(x.dtype)
  x = x + (per_sample(u_bright) - 0.5)
  mean = x.mean(axis=3, keepdims=True)
  x = (x - mean) * (per_sample(u_sat) * 2) + mean
  mean = x.mean(axis=(1, 2, 3), keepdims=True)
  return (x - mean) * (per_sample(u_contrast) + 0.5) + mean


def _cutout(x: jax.Array, u_h: jax.Array, u_w: jax.Array, ratio: float) -> jax.Array:
  b, h, w, _ = x.shape
  c_h, c_w = round(h * ratio), round(w * ratio)
  # Centre offsets as the official: floor(u * (side + (1 - size % 2))), window starts size // 2 earlier.
  start_h = jnp.floor(u_h * (h + (1 - c_h % 2))).astype(jnp.int32) - c_h // 2
  start_w = jnp.floor(u_w * (w + (1 - c_w % 2))).astype(jnp.int32) - c_w // 2
  rows = jnp.arange(h)[None, :]
  cols = jnp.arange(w)[None, :]
  in_h = (rows >= start_h[:, None]) & (rows < start_h[:, None] + c_h)
  in_w = (cols >= start_w[:, None]) & (cols < start_w[:, None] + c_w)
  keep = ~(in_h[:, :, None] & in_w[:, None, :])
  return x * keep[..., None].astype(x.dtype)


def diff_augment(key: jax.Array, images: jax.Array, policy: str = OFFICIAL_POLICY,
                 translation_ratio: float = 0.125, cutout_ratio: float = 0.2,
                 prob: float = 1.0) -> jax.Array:
  """Applies DiffAugment to a batch.

  Args:
    key: PRNG key; the same key and images give the same output.
    images: (B, H, W, C) float (the official feeds [-1, 1] pixels).
    policy: comma-separated subset of 'translation', 'color', 'cutout', applied in that order.
    translation_ratio: maximum shift as a fraction of each side (official 1/8).
    cutout_ratio: cutout side as a fraction of each side (official 0.2).
    prob: each listed operation is applied to the whole batch with this probability (official
      `aug_prob`, 1.0 in the released config).

  Returns:
    (B, H, W, C) augmented images, same dtype.
  """
  if images.ndim != 4:
    raise ValueError(f"images must be (B, H, W, C), got shape {images.shape}")
  if not 0.0 <= prob <= 1.0:
    raise ValueError(f"prob {prob} must lie in [0, 1]")
  ops = parse_policy(policy)
  if not ops or prob == 0.0:
    return images
  key_params, key_apply = jax.random.split(key)
  u = jax.random.uniform(key_params, (7, images.shape[0]), jnp.float32)
  apply = jax.random.uniform(key_apply, (len(_OPS),)) < prob
  x = images
  for op in ops:
    if op == "translation":
      y = _translate(x, u[0], u[1], translation_ratio)
    elif op == "color":
      y = _color(x, u[2], u[3], u[4])
    else:
      y = _cutout(x, u[5], u[6], cutout_ratio)
    x = y if prob >= 1.0 else jnp.where(apply[_OPS.index(op)], y, x)
  return x
