"""Frozen DINO / DINOv2 feature networks on the shared `ViTTrunk`.

Two roles (docs/design.md §2): the tokenizer's semantic teacher (DINOv2-B, 256 px,
patch 16: its CLS after the final norm) and the discriminator's frozen DINO
ViT-S/16 (the patch embedding output and the outputs of blocks {2, 5, 8, 11}).

`DinoV2` subclasses `ViTTrunk`, so its parameter tree is the trunk's:
`patch_embed/proj/{kernel (p,p,3,C), bias}`, `cls_token (1,1,C)`,
`pos_embed (1,1+g*g,C)`, `blocks_{i}/…`, `norm/{scale,bias}`
(converters: `imagefolder_jax.convert.dinov2`).

Images are fed as they are: normalise them as the weights expect (the released
DINO/DINOv2 weights use ImageNet mean/std on [0, 1] pixels) before calling.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from imagefolder_jax.models.vit import ViTConfig, ViTTrunk
from imagefolder_jax.ops.resample import antialiased_bicubic_matrix

# Released shapes. Heads are 64 wide in every DINO/DINOv2 ViT (S: 6, B: 12).
PRESETS: dict[str, ViTConfig] = {
    # Official DINOv2 hub / timm weights: trained tables at 518 px (37×37 patches).
    "dinov2_vits14": ViTConfig(width=384, depth=12, num_heads=6, patch_size=14, image_size=518),
    "dinov2_vitb14": ViTConfig(width=768, depth=12, num_heads=12, patch_size=14, image_size=518),
    # What the tokenizer builds (timm `img_size=256, patch_size=16`: kernel and table resampled).
    "dinov2_vits16_256": ViTConfig(width=384, depth=12, num_heads=6, patch_size=16, image_size=256),
    "dinov2_vitb16_256": ViTConfig(width=768, depth=12, num_heads=12, patch_size=16, image_size=256),
    # The official discriminator's frozen DINO (v1) ViT-S/16 at 224 px: no LayerScale, and its
    # re-implemented FFN uses tanh-approximated GELU (FrozenDINOSmallNoDrop / MLPNoDrop).
    "dino_vits16": ViTConfig(width=384, depth=12, num_heads=6, patch_size=16, image_size=224,
                             layerscale=False, gelu_approximate=True),
}


def dinov2_config(name: str, **overrides) -> ViTConfig:
  """A preset from `PRESETS`, optionally with fields replaced (e.g. `depth=2` for tests)."""
  if name not in PRESETS:
    raise ValueError(f"unknown DINO preset {name!r}; known: {sorted(PRESETS)}")
  return dataclasses.replace(PRESETS[name], **overrides)


def resample_pos_embed(pos_embed: jax.Array, grid: tuple[int, int],
                       num_prefix_tokens: int = 1) -> jax.Array:
  """Resamples a square position table to `grid` with antialiased bicubic (timm's rule).

  pos_embed: (1, P + g*g, C) with P prefix (cls) rows kept as they are; returns
  (1, P + grid[0]*grid[1], C) in the input dtype. Same-size grids are returned
  unchanged. Matches `timm.layers.resample_abs_pos_embed(..., 'bicubic', antialias=True)`.
  """
  rows = pos_embed.shape[1] - num_prefix_tokens
  side = int(round(rows ** 0.5))
  if side * side != rows:
    raise ValueError(f"position table has {rows} grid rows, not a square")
  gh, gw = grid
  if (gh, gw) == (side, side):
    return pos_embed
  prefix, table = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
  table = table.reshape(side, side, -1).astype(jnp.float32)
  mh = jnp.asarray(antialiased_bicubic_matrix(side, gh), jnp.float32)
  mw = jnp.asarray(antialiased_bicubic_matrix(side, gw), jnp.float32)
  table = jnp.einsum("oh,hwc,pw->opc", mh, table, mw, precision="highest")
  table = table.reshape(1, gh * gw, -1).astype(pos_embed.dtype)
  return jnp.concatenate([prefix, table], axis=1)


class DinoV2Features(NamedTuple):
  """What a `DinoV2` forward exposes.

  cls: (B, C) CLS token after the final norm (the semantic teacher's feature).
  patch_tokens: (B, N, C) patch tokens after the final norm, row-major over the grid.
  embedding: (B, 1 + N, C) cls + patch embeddings plus position table, before block 0.
  blocks: outputs (B, 1 + N, C), not normed, of the blocks named in `collect`, in order.
  """
  cls: jax.Array
  patch_tokens: jax.Array
  embedding: jax.Array
  blocks: tuple[jax.Array, ...]


class DinoV2(ViTTrunk):
  """DINO / DINOv2 ViT feature extractor (frozen teacher / discriminator trunk).

  `__call__(images, collect=())`: images (B, H, W, 3) float, normalised as the
  weights expect, H and W multiples of the patch size. When (H/p, W/p) differs
  from the stored table's grid the table is resampled (antialiased bicubic, cls
  row kept) on the fly, as timm does. Returns `DinoV2Features`.
  """

  def embed(self, images: jax.Array) -> jax.Array:
    """(B, H, W, 3) -> (B, 1 + N, C): cls + patches plus the (resampled) position table."""
    p = self.config.patch_size
    h, w = images.shape[1], images.shape[2]
    if h % p or w % p:
      raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {p}")
    patches = self.patch_embed(images)
    pos = resample_pos_embed(self.pos_embed(), (h // p, w // p))
    cls = jnp.broadcast_to(self.cls_token(), (patches.shape[0], 1, patches.shape[-1]))
    return jnp.concatenate([cls.astype(patches.dtype), patches], axis=1) + pos.astype(patches.dtype)

  def __call__(self, images: jax.Array, collect: tuple[int, ...] = ()) -> DinoV2Features:
    bad = [i for i in collect if not 0 <= i < self.config.depth]
    if bad:
      raise ValueError(f"collect indices {bad} out of range for depth {self.config.depth}")
    embedding = self.embed(images)
    tokens, taps = self.blocks_and_norm(embedding, collect=tuple(collect))
    return DinoV2Features(cls=tokens[:, 0], patch_tokens=tokens[:, 1:], embedding=embedding,
                          blocks=tuple(taps))
