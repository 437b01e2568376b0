"""Vision Transformer in the DINOv2 / timm layout (LayerScale, cls token, pre-norm blocks).

This one module serves as the tokenizer's encoder and decoder trunk, the frozen
DINOv2 semantic teacher and the discriminator's frozen DINO feature network.
Parameter names mirror timm's so that converters stay one-to-one:
`patch_embed`, `cls_token`, `pos_embed`, `blocks_{i}/{norm1,attn/{qkv,proj},ls1,norm2,mlp/{fc1,fc2},ls2}`, `norm`.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from imagefolder_jax.models.layers import (
  TRUNC_NORMAL_02,
  Dtype,
  attention,
  constrain,
  dense,
  layer_norm,
  partitioned,
  remat_block,
)
from imagefolder_jax.ops import packed_attention


@dataclasses.dataclass(frozen=True)
class ViTConfig:
  """Shape of a DINOv2-layout ViT.

  Attributes:
    width: token width C.
    depth: number of blocks.
    num_heads: attention heads (head dim = width / num_heads).
    mlp_ratio: FFN hidden = mlp_ratio * width.
    patch_size: pixels per patch side.
    image_size: input side in pixels (the position table has (image_size/patch_size)^2 + 1 rows).
    layerscale: LayerScale gammas after attention and FFN.
    pos_init: 'trunc_normal' (timm; right when loading weights) or 'sincos' (2-D sine-cosine table:
      from scratch, spatial structure is there from step 0, and the tokenizer's latent tables,
      resampled from it, line up with the image grid).
    linear_init: 'trunc_normal' (timm, std 0.02) or 'xavier' (MAE's from-scratch choice: with std 0.02
      attention starts uniform and small models pass almost no per-token signal for hundreds of steps).
    layerscale_init: initial gamma (timm/DINOv2 1e-5, right when loading pretrained weights; from
      scratch a small model learns far faster with ~0.1-1, since gamma scales the block's gradient).
    norm_eps: LayerNorm epsilon.
    gelu_approximate: tanh-approximated GELU in the FFN (the official discriminator's
      frozen DINO ViT-S/16 uses it); exact erf GELU otherwise (DINOv2 / timm).
  """
  width: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_ratio: float = 4.0
  patch_size: int = 16
  image_size: int = 256
  layerscale: bool = True
  layerscale_init: float = 1e-5
  pos_init: str = "trunc_normal"
  linear_init: str = "trunc_normal"
  norm_eps: float = 1e-6
  gelu_approximate: bool = False

  @property
  def grid(self) -> int:
    return self.image_size // self.patch_size

  def validate(self) -> None:
    if self.width % self.num_heads:
      raise ValueError(f"ViT width {self.width} is not divisible by num_heads {self.num_heads}")
    if self.image_size % self.patch_size:
      raise ValueError(f"image_size {self.image_size} is not divisible by patch_size {self.patch_size}")


def linear_initializer(name: str):
  if name == "trunc_normal":
    return TRUNC_NORMAL_02
  if name == "xavier":
    return nn.initializers.xavier_uniform()
  raise ValueError(f"linear_init must be 'trunc_normal' or 'xavier', got {name!r}")


class Attention(nn.Module):
  width: int
  num_heads: int
  dtype: Dtype = jnp.float32
  kernel_init: Any = TRUNC_NORMAL_02

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, l, _ = x.shape
    head_dim = self.width // self.num_heads
    qkv = dense(3 * self.width, ("embed", "qkv"), kernel_init=self.kernel_init, dtype=self.dtype, name="qkv")(x)
    if packed_attention.applies(qkv.dtype, self.num_heads, head_dim):
      out = packed_attention.packed_attention(qkv, heads=self.num_heads, head_dim=head_dim, scale=head_dim ** -0.5)
    else:
      qkv = qkv.reshape(b, l, 3, self.num_heads, head_dim)
      q, k, v = (constrain(qkv[:, :, i], ("batch", "length", "heads", "head_dim")) for i in range(3))
      out = attention(q, k, v, scale=head_dim ** -0.5).reshape(b, l, self.width)
    return dense(self.width, ("qkv", "embed"), kernel_init=self.kernel_init, dtype=self.dtype, name="proj")(out)


class Mlp(nn.Module):
  hidden: int
  width: int
  dtype: Dtype = jnp.float32
  gelu_approximate: bool = False
  kernel_init: Any = TRUNC_NORMAL_02

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = dense(self.hidden, ("embed", "mlp"), kernel_init=self.kernel_init, dtype=self.dtype, name="fc1")(x)
    x = constrain(nn.gelu(x, approximate=self.gelu_approximate), ("batch", "length", "mlp"))
    return dense(self.width, ("mlp", "embed"), kernel_init=self.kernel_init, dtype=self.dtype, name="fc2")(x)


class LayerScale(nn.Module):
  init_value: float = 1e-5

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    gamma = self.param("gamma", partitioned(nn.initializers.constant(self.init_value), ("embed",)),
                       (x.shape[-1],))
    return x * gamma.astype(x.dtype)


class Block(nn.Module):
  config: ViTConfig
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = self.config
    identity = (lambda name: (lambda y: y))
    ls = (lambda name: LayerScale(c.layerscale_init, name=name)) if c.layerscale else identity
    init = linear_initializer(c.linear_init)
    y = Attention(c.width, c.num_heads, dtype=self.dtype, kernel_init=init, name="attn")(
        layer_norm(c.norm_eps, dtype=self.dtype, name="norm1")(x))
    x = x + ls("ls1")(y)
    y = Mlp(int(c.width * c.mlp_ratio), c.width, dtype=self.dtype, kernel_init=init,
            gelu_approximate=c.gelu_approximate, name="mlp")(
        layer_norm(c.norm_eps, dtype=self.dtype, name="norm2")(x))
    return constrain(x + ls("ls2")(y), ("batch", "length", "embed"))


class PatchEmbed(nn.Module):
  """(B, H, W, 3) -> (B, H/p * W/p, C), row-major patches."""
  width: int
  patch_size: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    x = nn.Conv(self.width, (self.patch_size, self.patch_size), strides=self.patch_size,
                padding="VALID", dtype=self.dtype,
                kernel_init=partitioned(nn.initializers.lecun_normal(), (None, None, None, "embed")),
                bias_init=partitioned(nn.initializers.zeros, ("embed",)), name="proj")(images)
    return x.reshape(x.shape[0], -1, self.width)


def sincos_position_init(key, shape, dtype=jnp.float32) -> jax.Array:
  """(1, 1 + g*g, C) table: zero cls row, then MAE-style 2-D sine-cosine over a g x g grid."""
  del key
  _, n, width = shape
  g = int(round((n - 1) ** 0.5))
  if g * g != n - 1 or width % 4:
    raise ValueError(f"sincos position table needs 1 + square rows and width % 4 == 0, got {shape}")
  omega = 1.0 / 10000 ** (jnp.arange(width // 4) / (width // 4))
  ys, xs = jnp.meshgrid(jnp.arange(g), jnp.arange(g), indexing="ij")
  ang_y, ang_x = ys.reshape(-1, 1) * omega, xs.reshape(-1, 1) * omega
  table = jnp.concatenate([jnp.sin(ang_y), jnp.cos(ang_y), jnp.sin(ang_x), jnp.cos(ang_x)], axis=1)
  return jnp.concatenate([jnp.zeros((1, width)), table])[None].astype(dtype)


class ViTTrunk(nn.Module):
  """The blocks and final norm of a ViT, plus its cls token and position table as parameters.

  Callers assemble the token sequence (the tokenizer adds latent tokens and
  level embeddings) and call `blocks_and_norm`; `cls_token()` / `pos_embed()`
  expose the learned tables. `__call__` is the plain image ViT:
  images (B, H, W, 3) -> tokens (B, 1 + N, C) after the final norm.
  """
  config: ViTConfig
  with_patch_embed: bool = True
  dtype: Dtype = jnp.float32
  remat: str = "none"   # per-block rematerialisation policy (layers.REMAT_POLICIES)

  def setup(self):
    c = self.config
    c.validate()
    if self.with_patch_embed:
      self.patch_embed = PatchEmbed(c.width, c.patch_size, dtype=self.dtype)
    self.cls = self.param("cls_token", partitioned(nn.initializers.normal(1e-6), (None, None, "embed")),
                          (1, 1, c.width))
    if c.pos_init not in ("trunc_normal", "sincos"):
      raise ValueError(f"pos_init must be 'trunc_normal' or 'sincos', got {c.pos_init!r}")
    pos_init = TRUNC_NORMAL_02 if c.pos_init == "trunc_normal" else sincos_position_init
    self.pos = self.param("pos_embed", partitioned(pos_init, (None, None, "embed")),
                          (1, c.grid * c.grid + 1, c.width))
    block = remat_block(Block, self.remat)
    self.blocks = [block(c, dtype=self.dtype, name=f"blocks_{i}") for i in range(c.depth)]
    self.norm = layer_norm(c.norm_eps, dtype=self.dtype)

  def cls_token(self) -> jax.Array:
    return self.cls

  def pos_embed(self) -> jax.Array:
    return self.pos

  def embed_patches(self, images: jax.Array) -> jax.Array:
    """(B, H, W, 3) -> (B, 1 + N, C): cls + patches, each plus its position embedding."""
    patches = self.patch_embed(images)
    cls = jnp.broadcast_to(self.cls, (patches.shape[0], 1, patches.shape[-1])).astype(patches.dtype)
    return jnp.concatenate([cls, patches], axis=1) + self.pos.astype(patches.dtype)

  def blocks_and_norm(self, x: jax.Array, collect: tuple[int, ...] = ()) -> tuple[jax.Array, list]:
    """Runs every block then the final norm. Returns (normed tokens, [block outputs at `collect`])."""
    taps = []
    for i, block in enumerate(self.blocks):
      x = block(x)
      if i in collect:
        taps.append(x)
    return self.norm(x), taps

  def __call__(self, images: jax.Array) -> jax.Array:
    return self.blocks_and_norm(self.embed_patches(images))[0]
