"""Discriminators for the tokenizer's adversarial loss (docs/design.md §2).

* `DinoDiscriminator`: the official "dino disc" (StyleGAN-T style, as in the official
  `tokenizer/tokenizer_image/discriminator_dino.py`). A frozen DINO ViT-S/16 gives token features at
  the patch embedding and after blocks {2, 5, 8, 11}; each tap gets a small trainable head
  (spectral-norm conv1d k=1 -> local batch norm -> LeakyReLU, a residual circular conv1d k=9 block,
  spectral-norm conv1d -> 1 logit per token). Output: the logits of every tap and token, concatenated.
* `PatchGANDiscriminator`: pix2pix / taming `NLayerDiscriminator`, the paper's simpler option.

Variable collections (both are threaded by the trainer, never hidden):
  'params'      trainable head weights, plus the frozen feature ViT under `features` (exclude it from
                the optimizer with `trainable_mask`; gradients never reach it anyway).
  'spectral'    power-iteration vectors `u` (C_out,) and `v` (k * C_in,) of every spectral-norm conv;
                updated by one power iteration per `train=True` call when the collection is mutable.
  'batch_stats' running mean/var of every batch norm (PatchGAN: used at eval; dino disc: kept for
                optional eval use only; the official local BN always normalises with group statistics).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from imagefolder_jax.models.layers import Dtype, partitioned
from imagefolder_jax.models.vit import ViTConfig, ViTTrunk
from imagefolder_jax.ops import resample

FEATURES = "features"


def _frozen_vit_trunk(initializing: bool) -> type[ViTTrunk]:
  """ViTTrunk with `stop_gradient` on its parameters (not on its activations).

  The generator's gradient still flows through the ViT into the images while the ViT weights get
  none, and XLA prunes their weight-gradient computation. `init` must follow `is_initializing()`
  (as in the flax `map_variables` docs): with init=True at apply time, flax re-runs the mapped
  module as an initialiser whenever another collection is mutable.
  """
  return nn.map_variables(ViTTrunk, "params", trans_in_fn=jax.lax.stop_gradient, init=initializing,
                          methods=["embed_patches", "blocks_and_norm"])


def _dino_vit_s16() -> ViTConfig:
  # DINO ViT-S/16 (timm `vit_small_patch16_224_dino`): no LayerScale, LayerNorm eps 1e-6 and a
  # tanh-approximated GELU (`MLPNoDrop`) as the official disc builds it.
  return ViTConfig(width=384, depth=12, num_heads=6, mlp_ratio=4.0, patch_size=16, image_size=224,
                   layerscale=False, norm_eps=1e-6, gelu_approximate=True)


@dataclasses.dataclass(frozen=True)
class DinoDiscConfig:
  """The official "dino disc".

  Attributes:
    vit: the frozen feature ViT; `vit.image_size` is the resolution images are fitted to.
    tap_blocks: blocks whose outputs get a head, strictly increasing, each < vit.depth.
    tap_embedding: also tap the embedding (cls + patches + position embedding, before block 0);
      the official disc does, and its head comes first (`heads_0`).
    kernel_size: the residual block's circular conv1d kernel.
    virtual_batch: local batch-norm group size; the batch is split into ceil(B / virtual_batch)
      equal groups (so B=12 gives two groups of 6, as the official `view` does).
    norm_eps: local batch-norm epsilon (official `norm_eps=1e-6`).
    negative_slope: LeakyReLU slope.
    spectral_eps: floor of the norm in the power iteration's normalisation (PyTorch 1e-12).
    crop_prob: probability of a random crop (one offset per batch) instead of a resize when the
      input is larger than vit.image_size and a crop key is given (official 0.5).
    pixel_mean, pixel_std: ImageNet normalisation of [0, 1] pixels.
    bn_momentum: running-statistics decay (flax convention: new = m * old + (1 - m) * batch).
    eval_uses_running_stats: at train=False normalise with 'batch_stats' instead of group
      statistics. The official local BN has no running statistics (always group statistics).
  """
  vit: ViTConfig = dataclasses.field(default_factory=_dino_vit_s16)
  tap_blocks: tuple[int, ...] = (2, 5, 8, 11)
  tap_embedding: bool = True
  kernel_size: int = 9
  virtual_batch: int = 8
  norm_eps: float = 1e-6
  negative_slope: float = 0.2
  spectral_eps: float = 1e-12
  crop_prob: float = 0.5
  pixel_mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
  pixel_std: tuple[float, float, float] = (0.229, 0.224, 0.225)
  bn_momentum: float = 0.9
  eval_uses_running_stats: bool = False

  @property
  def num_taps(self) -> int:
    return len(self.tap_blocks) + int(self.tap_embedding)

  @property
  def tokens_per_tap(self) -> int:
    return self.vit.grid * self.vit.grid

  def validate(self) -> None:
    self.vit.validate()
    taps = tuple(self.tap_blocks)
    if any(b < 0 or b >= self.vit.depth for b in taps):
      raise ValueError(f"tap_blocks {taps} must lie in [0, {self.vit.depth}) for a depth-{self.vit.depth} ViT")
    if any(b >= c for b, c in zip(taps, taps[1:])):
      raise ValueError(f"tap_blocks {taps} must be strictly increasing")
    if self.num_taps == 0:
      raise ValueError("the discriminator needs at least one tap (tap_blocks empty and tap_embedding False)")
    if self.kernel_size < 1 or self.kernel_size % 2 == 0:
      raise ValueError(f"kernel_size {self.kernel_size} must be odd and positive")
    if self.virtual_batch < 1:
      raise ValueError(f"virtual_batch {self.virtual_batch} must be >= 1")
    if not 0.0 <= self.crop_prob <= 1.0:
      raise ValueError(f"crop_prob {self.crop_prob} must lie in [0, 1]")


def trainable_mask(params: Any) -> Any:
  """Pytree of bools shaped like `params`: False under the frozen `features` ViT, True elsewhere.

  Accepts the 'params' collection (boxed or unboxed) of either discriminator; use it as
  `optax.masked(tx, trainable_mask(params))` or to zero updates.
  """
  def keep(path, _):
    return not (path and getattr(path[0], "key", None) == FEATURES)
  return jax.tree_util.tree_map_with_path(keep, params)


def _l2_normalize(x: jax.Array, eps: float) -> jax.Array:
  # torch.nn.functional.normalize: x / max(||x||, eps).
  return x / jnp.maximum(jnp.linalg.norm(x), eps)


def _torch_conv_uniform(fan_in: int):
  """PyTorch's default Conv weight and bias init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1.0 / math.sqrt(fan_in)
  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


class SpectralConv1d(nn.Module):
  """Conv1d over tokens with spectral normalisation (PyTorch `spectral_norm(dim=0)` semantics).

  Our own module rather than `nn.SpectralNorm` so the names stay one-to-one with the official
  `weight_orig`/`weight_u`/`weight_v` and `u`, `v` sit in a 'spectral' collection.
  W is the kernel reshaped to (C_out, k * C_in) (flattened in (k, C_in) order; the converter
  permutes PyTorch's (C_in, k) order of `weight_v`). With train=True one power iteration runs from
  the stored u (v = n(Wᵀu), u = n(Wv), no gradient) and the new u, v are stored when 'spectral' is
  mutable; with train=False the stored u, v are used as they are. In both modes
  sigma = uᵀ W v (gradient flows through W) and the kernel used is W / sigma.

  Input x: (B, L, C_in) -> (B, L, features). Padding is circular with k // 2 on each side.
  """
  features: int
  kernel_size: int = 1
  eps: float = 1e-12

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    k, c_in = self.kernel_size, x.shape[-1]
    init = _torch_conv_uniform(c_in * k)
    kernel = self.param("kernel", partitioned(init, (None, "conv_in", "conv_out")), (k, c_in, self.features))
    bias = self.param("bias", partitioned(init, ("conv_out",)), (self.features,))
    u_var = self.variable("spectral", "u", lambda: _l2_normalize(
        jax.random.normal(self.make_rng("params"), (self.features,)), self.eps))
    v_var = self.variable("spectral", "v", lambda: _l2_normalize(
        jax.random.normal(self.make_rng("params"), (k * c_in,)), self.eps))

    w_mat = kernel.reshape(k * c_in, self.features).T.astype(jnp.float32)
    u, v = u_var.value, v_var.value
    if train:
      w_sg = jax.lax.stop_gradient(w_mat)
      v = _l2_normalize(jnp.dot(w_sg.T, u, precision="highest"), self.eps)
      u = _l2_normalize(jnp.dot(w_sg, v, precision="highest"), self.eps)
      if self.is_mutable_collection("spectral") and not self.is_initializing():
        u_var.value, v_var.value = u, v
    sigma = jnp.dot(u, jnp.dot(w_mat, v, precision="highest"), precision="highest")
    kernel = (kernel / sigma).astype(x.dtype)

    if k > 1:
      x = jnp.pad(x, ((0, 0), (k // 2, k // 2), (0, 0)), mode="wrap")
    y = jax.lax.conv_general_dilated(x, kernel, window_strides=(1,), padding="VALID",
                                     dimension_numbers=("NWC", "WIO", "NWC"))
    return y + bias.astype(y.dtype)


class LocalBatchNorm(nn.Module):
  """Batch norm over virtual batches ("BatchNormLocal" of StyleGAN-T / the official disc).

  The batch of B samples is split into G = ceil(B / virtual_batch) equal consecutive groups; each
  group is normalised per channel with its own mean and biased variance over (samples, tokens), in
  float32. x: (B, L, C) -> (B, L, C). Running statistics (mean over groups of the group statistics)
  are kept in 'batch_stats' when that collection is mutable at train=True.
  """
  virtual_batch: int = 8
  eps: float = 1e-6
  momentum: float = 0.9
  eval_uses_running_stats: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    b, l, c = x.shape
    scale = self.param("scale", partitioned(nn.initializers.ones, ("conv_out",)), (c,))
    bias = self.param("bias", partitioned(nn.initializers.zeros, ("conv_out",)), (c,))
    ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
    ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
    x32 = x.astype(jnp.float32)
    if not train and self.eval_uses_running_stats:
      y = (x32 - ra_mean.value) / jnp.sqrt(ra_var.value + self.eps)
    else:
      groups = -(-b // self.virtual_batch)
      if b % groups:
        raise ValueError(f"batch size {b} does not split into {groups} equal virtual batches "
                         f"(virtual_batch={self.virtual_batch})")
      xg = x32.reshape(groups, b // groups, l, c)
      mean = xg.mean(axis=(1, 2), keepdims=True)
      var = jnp.square(xg - mean).mean(axis=(1, 2), keepdims=True)
      y = ((xg - mean) / jnp.sqrt(var + self.eps)).reshape(b, l, c)
      if train and self.is_mutable_collection("batch_stats") and not self.is_initializing():
        m = self.momentum
        ra_mean.value = m * ra_mean.value + (1 - m) * jax.lax.stop_gradient(mean.mean(axis=(0, 1, 2)))
        ra_var.value = m * ra_var.value + (1 - m) * jax.lax.stop_gradient(var.mean(axis=(0, 1, 2)))
    return (y * scale + bias).astype(x.dtype)


class _ConvNormAct(nn.Module):
  """Official `make_block`: spectral conv1d (circular) -> local BN -> LeakyReLU."""
  config: DinoDiscConfig
  kernel_size: int

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    c = self.config
    x = SpectralConv1d(x.shape[-1], self.kernel_size, eps=c.spectral_eps, name="conv")(x, train=train)
    x = LocalBatchNorm(c.virtual_batch, c.norm_eps, c.bn_momentum, c.eval_uses_running_stats,
                       name="norm")(x, train=train)
    return nn.leaky_relu(x, c.negative_slope)


class DinoDiscHead(nn.Module):
  """One tap's head. tokens: (B, N, C) float32 -> logits (B, N).

  Names mirror the official `heads.{i}` Sequential: `block` = `.0` (conv k=1 + BN),
  `residual` = `.1.fn` (conv k + BN; output (fn(x) + x) / sqrt 2), `cls` = `.2` (conv C -> 1).
  """
  config: DinoDiscConfig

  @nn.compact
  def __call__(self, tokens: jax.Array, *, train: bool) -> jax.Array:
    c = self.config
    x = _ConvNormAct(c, 1, name="block")(tokens, train=train)
    x = (_ConvNormAct(c, c.kernel_size, name="residual")(x, train=train) + x) * (1 / math.sqrt(2))
    return SpectralConv1d(1, 1, eps=c.spectral_eps, name="cls")(x, train=train)[..., 0]


def fit_to_resolution(x: jax.Array, size: int, crop_key: Optional[jax.Array], crop_prob: float) -> jax.Array:
  """Fits (B, H, W, C) images to (B, size, size, C) as the official frozen DINO does.

  With a `crop_key`, H > size and W > size: with probability `crop_prob` one random size×size crop
  (one offset for the whole batch, like torchvision `RandomCrop` on a batch tensor). Otherwise
  (and always without a key): area resize (= adaptive average pooling, exact matrix) when H > size,
  PyTorch bicubic (a=-0.75, no antialias) when H < size, identity when H == size. The official
  chooses the mode from H alone and applies it to both sides; so do we.
  """
  h, w = x.shape[1], x.shape[2]
  matrix = resample.area_matrix if h > size else resample.bicubic_matrix
  resize = lambda y: resample.resize_with(matrix, y, size)
  if crop_key is None or crop_prob <= 0.0 or h <= size or w <= size:
    return resize(x)
  k_coin, k_row, k_col = jax.random.split(crop_key, 3)
  row = jax.random.randint(k_row, (), 0, h - size + 1)
  col = jax.random.randint(k_col, (), 0, w - size + 1)
  crop = lambda y: jax.lax.dynamic_slice(y, (0, row, col, 0), (y.shape[0], size, size, y.shape[3]))
  return jax.lax.cond(jax.random.uniform(k_coin) < crop_prob, crop, resize, x)


class DinoDiscriminator(nn.Module):
  """The official "dino disc" (docs/design.md §2).

  images: (B, H, W, 3) float in [-1, 1] (real or fake, after DiffAugment) -> logits
  (B, num_taps * N) float32 with N = (vit.image_size / vit.patch_size)^2, ordered tap-major
  ([embedding tap, then tap_blocks in order]) and row-major over patches within a tap.

  Pixels are mapped to ImageNet normalisation ((x + 1) / 2 - mean) / std, then fitted to the
  ViT's resolution by `fit_to_resolution` (random crop with `crop_key`, else exact area resize).
  Each tap's tokens get the official "readout": patch tokens plus the cls token, (B, N, C).
  `train` selects the heads' mode (power iteration in spectral norm, running-stat updates); the
  frozen ViT has no train mode. `dtype` is the ViT's compute dtype; heads run in float32.
  """
  config: DinoDiscConfig = dataclasses.field(default_factory=DinoDiscConfig)
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool, crop_key: Optional[jax.Array] = None) -> jax.Array:
    c = self.config
    c.validate()
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"images must be (B, H, W, 3), got shape {images.shape}")
    mean = jnp.asarray(c.pixel_mean, jnp.float32)
    std = jnp.asarray(c.pixel_std, jnp.float32)
    x = (images.astype(jnp.float32) * 0.5 + 0.5 - mean) / std
    x = fit_to_resolution(x, c.vit.image_size, crop_key, c.crop_prob)

    features = _frozen_vit_trunk(self.is_initializing())(c.vit, dtype=self.dtype, name=FEATURES)
    tokens = features.embed_patches(x.astype(self.dtype))
    _, block_taps = features.blocks_and_norm(tokens, collect=tuple(c.tap_blocks))
    taps = ([tokens] if c.tap_embedding else []) + list(block_taps)

    logits = []
    for i, tap in enumerate(taps):
      tap = tap.astype(jnp.float32)
      readout = tap[:, 1:] + tap[:, :1]
      logits.append(DinoDiscHead(c, name=f"heads_{i}")(readout, train=train))
    return jnp.concatenate(logits, axis=1)


class PatchGANDiscriminator(nn.Module):
  """pix2pix / taming `NLayerDiscriminator` (the paper's simpler option), NHWC.

  images: (B, H, W, 3) in [-1, 1] -> logits (B, H', W', 1) float32; for H=256 and 3 layers H'=30.
  conv4x4 s2 -> LeakyReLU; (num_layers - 1) × [conv4x4 s2 (no bias) -> BN -> LeakyReLU] with
  widths base·min(2^n, 8); conv4x4 s1 (no bias) -> BN -> LeakyReLU; conv4x4 s1 -> 1 channel.
  All convs pad 1. Module names follow the PyTorch `main.{index}` Sequential (`main_{index}`).
  Init as taming: conv kernels N(0, 0.02), BN scale N(1, 0.02), biases 0.
  BN uses batch statistics at train=True (update 'batch_stats' by making it mutable) and running
  statistics at train=False.
  """
  base_features: int = 64
  num_layers: int = 3
  kernel_size: int = 4
  negative_slope: float = 0.2
  bn_momentum: float = 0.9
  bn_eps: float = 1e-5
  init_std: float = 0.02

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool) -> jax.Array:
    if self.num_layers < 1:
      raise ValueError(f"num_layers {self.num_layers} must be >= 1")
    kernel_init = partitioned(nn.initializers.normal(self.init_std), (None, None, "conv_in", "conv_out"))
    bias_init = partitioned(nn.initializers.zeros, ("conv_out",))
    std = self.init_std

    def scale_init(key, shape, dtype=jnp.float32):
      return 1.0 + std * jax.random.normal(key, shape, dtype)

    index = 0

    def conv(features: int, stride: int, use_bias: bool):
      nonlocal index
      layer = nn.Conv(features, (self.kernel_size, self.kernel_size), strides=stride,
                      padding=((1, 1), (1, 1)), use_bias=use_bias, kernel_init=kernel_init,
                      bias_init=bias_init, name=f"main_{index}")
      index += 1
      return layer

    def norm():
      nonlocal index
      layer = nn.BatchNorm(use_running_average=not train, momentum=self.bn_momentum, epsilon=self.bn_eps,
                           scale_init=partitioned(scale_init, ("conv_out",)),
                           bias_init=partitioned(nn.initializers.zeros, ("conv_out",)), name=f"main_{index}")
      index += 1
      return layer

    def act(y):
      nonlocal index
      index += 1
      return nn.leaky_relu(y, self.negative_slope)

    # Layers are created in PyTorch Sequential order so that `main_{index}` matches `main.{index}`.
    x = conv(self.base_features, 2, True)(images.astype(jnp.float32))
    x = act(x)
    for n in range(1, self.num_layers):
      x = conv(self.base_features * min(2 ** n, 8), 2, False)(x)
      x = act(norm()(x))
    x = conv(self.base_features * min(2 ** self.num_layers, 8), 1, False)(x)
    x = act(norm()(x))
    return conv(1, 1, True)(x)
