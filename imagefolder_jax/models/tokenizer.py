"""The ImageFolder tokenizer: ViT encoder, P product-quantized branches, ViT decoder (docs/design.md §1-2).

Product quantization splits *tokens*, not channels: the encoder emits P sets of n x n latent
tokens (n = last scale), each projected to Cq channels by one shared 1x1 conv and quantized by
its own branch (branch 0 = detail, branch 1 = semantic in the paper's P = 2 model). The decoder
reads the channel concatenation of the P f_hats through a 1x1 conv.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from imagefolder_jax.models.layers import TRUNC_NORMAL_02, Dtype, dense, partitioned
from imagefolder_jax.models.quantizer import QuantizerConfig, ResidualQuantizer
from imagefolder_jax.models.vit import ViTConfig, ViTTrunk
from imagefolder_jax.ops.resample import antialiased_bicubic_resize


@dataclasses.dataclass(frozen=True)
class TokenizerConfig:
  """Architecture of the tokenizer.

  Attributes:
    vit: shape of the encoder and decoder ViTs (DINOv2-B layout, patch 16 at 256 px by default).
    quantizer: per-branch quantizer (its last scale is the latent grid side n).
    num_branches: P, product-quantization branches (1, 2 or 4 ...).
    dropout_start: quantizer dropout keeps n ~ U{dropout_start .. S} scales (official `start_drop`).
    dropout_fraction: fraction of each batch hit by quantizer dropout (official `codebook_drop`).
    patch_skip: not in the paper (off by default; the CPU demo turns it on). With the latent grid equal
      to the patch grid, the encoder adds each patch's embedding to its latent tokens and the decoder
      adds each latent token to its patch's mask token. From scratch, attention needs thousands of
      steps to learn this one-to-one routing, and until then both ViTs blur across patches.
  """
  vit: ViTConfig = ViTConfig()
  quantizer: QuantizerConfig = QuantizerConfig()
  num_branches: int = 2
  dropout_start: int = 3
  dropout_fraction: float = 0.1
  patch_skip: bool = False

  def validate(self) -> None:
    self.vit.validate()
    self.quantizer.validate()
    if self.num_branches < 1:
      raise ValueError(f"num_branches must be >= 1, got {self.num_branches}")
    if not 1 <= self.dropout_start <= len(self.quantizer.scales):
      raise ValueError(f"dropout_start must be in [1, {len(self.quantizer.scales)}], got {self.dropout_start}")
    if not 0.0 <= self.dropout_fraction <= 1.0:
      raise ValueError(f"dropout_fraction must be in [0, 1], got {self.dropout_fraction}")
    if self.patch_skip and self.latent_grid != self.vit.grid:
      raise ValueError(f"patch_skip needs the latent grid ({self.latent_grid}) to equal the patch grid "
                       f"({self.vit.grid})")

  @property
  def latent_grid(self) -> int:
    return self.quantizer.grid

  @property
  def image_size(self) -> int:
    return self.vit.image_size

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict) -> "TokenizerConfig":
    d = dict(d)
    vit = ViTConfig(**d.pop("vit", {}))
    q = dict(d.pop("quantizer", {}))
    if "scales" in q:
      q["scales"] = tuple(q["scales"])
    return cls(vit=vit, quantizer=QuantizerConfig(**q), **d)


def latent_position_embedding(pos_embed: jax.Array, grid: int, latent_grid: int) -> jax.Array:
  """Resamples the image position table (1, 1 + g*g, C) to the latent grid: (1, n*n, C), cls dropped.

  Antialiased bicubic (PIL-style a=-0.5), as timm's `resample_abs_pos_embed` on every forward.
  """
  c = pos_embed.shape[-1]
  table = pos_embed[:, 1:].reshape(1, grid, grid, c)
  return antialiased_bicubic_resize(table, latent_grid).reshape(1, latent_grid * latent_grid, c)


class Encoder(nn.Module):
  """images (B, H, W, 3) -> latent tokens (B, P * n*n, C) after the final norm.

  Sequence: [cls + pos0, patches + pos | P sets of n*n latent tokens + resampled pos], plus a level
  embedding (0 for cls/patches, 1 + b for branch b's set).
  """
  config: TokenizerConfig
  dtype: Dtype = jnp.float32
  remat: str = "none"   # per-block rematerialisation of the ViTs (layers.REMAT_POLICIES)

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    c = self.config
    vit = ViTTrunk(c.vit, with_patch_embed=True, dtype=self.dtype, remat=self.remat, name="model")
    n2 = c.latent_grid ** 2
    latent_tokens = self.param("latent_tokens", partitioned(TRUNC_NORMAL_02, (None, None, "embed")),
                               (1, c.num_branches * n2, c.vit.width))
    lvl_embed = nn.Embed(c.num_branches + 1, c.vit.width, name="lvl_embed",
                         embedding_init=partitioned(TRUNC_NORMAL_02, (None, "embed")))
    x = vit.embed_patches(images.astype(self.dtype))
    b = x.shape[0]
    pos = latent_position_embedding(vit.pos_embed(), c.vit.grid, c.latent_grid)
    latents = latent_tokens.reshape(c.num_branches, n2, c.vit.width) + pos
    latents = jnp.broadcast_to(latents.reshape(1, -1, c.vit.width), (b, c.num_branches * n2, c.vit.width))
    if c.patch_skip:  # (B, g*g, C) patches (with their positions) onto every branch's same-place token
      latents = latents + jnp.tile(x[:, 1:], (1, c.num_branches, 1)).astype(latents.dtype)
    levels = jnp.concatenate([jnp.zeros((x.shape[1],), jnp.int32)] +
                             [jnp.full((n2,), 1 + i, jnp.int32) for i in range(c.num_branches)])
    x = jnp.concatenate([x, latents.astype(x.dtype)], axis=1) + lvl_embed(levels)[None].astype(x.dtype)
    x, _ = vit.blocks_and_norm(x)
    return x[:, -c.num_branches * n2:]


class Decoder(nn.Module):
  """latent tokens (B, n*n, C) (after post_quant_conv) -> pixels (B, H, W, 3), not clamped.

  Sequence: [cls + pos0, mask_token + pos (one per patch) | cls + pos0, latents + resampled pos],
  plus a level embedding (0 for the first 1 + N tokens, 1 for the rest). Tokens 1..N after the
  final norm go through `to_pixel` (C -> p*p*3) and are unpatchified channel-last.
  """
  config: TokenizerConfig
  dtype: Dtype = jnp.float32
  remat: str = "none"   # per-block rematerialisation of the ViTs (layers.REMAT_POLICIES)

  @nn.compact
  def __call__(self, latents: jax.Array) -> jax.Array:
    c = self.config
    vit = ViTTrunk(c.vit, with_patch_embed=False, dtype=self.dtype, remat=self.remat, name="model")
    mask_token = self.param("mask_token", partitioned(nn.initializers.normal(0.02), (None, None, "embed")),
                            (1, 1, c.vit.width))
    lvl_embed = nn.Embed(2, c.vit.width, name="lvl_embed",
                         embedding_init=partitioned(TRUNC_NORMAL_02, (None, "embed")))
    b = latents.shape[0]
    width, g, p = c.vit.width, c.vit.grid, c.vit.patch_size
    pos = vit.pos_embed().astype(self.dtype)
    cls = vit.cls_token().astype(self.dtype) + pos[:, :1]
    image_side = jnp.broadcast_to(mask_token.astype(self.dtype), (1, g * g, width)) + pos[:, 1:]
    latent_pos = latent_position_embedding(vit.pos_embed(), g, c.latent_grid).astype(self.dtype)
    first = jnp.broadcast_to(jnp.concatenate([cls, image_side], axis=1), (b, 1 + g * g, width))
    if c.patch_skip:  # each latent token onto its patch's mask token (grids equal: validated)
      first = first + jnp.pad(latents.astype(self.dtype), ((0, 0), (1, 0), (0, 0)))
    second = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, width)), latents.astype(self.dtype) + latent_pos],
                             axis=1)
    levels = jnp.concatenate([jnp.zeros((1 + g * g,), jnp.int32), jnp.ones((second.shape[1],), jnp.int32)])
    x = jnp.concatenate([first, second], axis=1) + lvl_embed(levels)[None].astype(self.dtype)
    x, _ = vit.blocks_and_norm(x)
    h = x[:, 1:1 + g * g]
    # The adaptive GAN weight differentiates w.r.t. `to_pixel`; its input is all that needs.
    self.sow("intermediates", "to_pixel_input", h)
    return unpatchify(dense(p * p * 3, ("embed", None), dtype=self.dtype, name="to_pixel")(h), p)


def unpatchify(tokens: jax.Array, patch_size: int) -> jax.Array:
  """(B, g*g, p*p*3) -> (B, g*p, g*p, 3) float32; official channel-last order: index (py*p+px)*3+c."""
  b, n, _ = tokens.shape
  g = int(round(n ** 0.5))
  p = patch_size
  x = tokens.reshape(b, g, g, p, p, 3).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, g * p, g * p, 3).astype(jnp.float32)


class ImageFolderTokenizer(nn.Module):
  """Encoder -> 1x1 conv -> P residual quantizers -> concat -> 1x1 conv -> decoder.

  Variables: 'params' (+ 'codebook' in EMA mode) and 'quantizer_stats'. Randomness: the 'dropout'
  rng stream for quantizer dropout, 'codebook_restart' for EMA dead-code restarts.
  """
  config: TokenizerConfig
  dtype: Dtype = jnp.float32
  remat: str = "none"   # per-block rematerialisation of the ViTs (layers.REMAT_POLICIES)

  def setup(self):
    c = self.config
    c.validate()
    self.encoder = Encoder(c, dtype=self.dtype, remat=self.remat)
    self.decoder = Decoder(c, dtype=self.dtype, remat=self.remat)
    # PyTorch's Conv2d default init (uniform, std 1/sqrt(3 fan_in)), as the official 1x1 convs: with
    # a 0.02-std init the reconstruction gradient reaching the latents is ~50x weaker than the
    # commitment pull, and from scratch the latents collapse to zero.
    torch_default = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
    self.quant_conv = dense(c.quantizer.latent_dim, ("embed", "latent"), dtype=jnp.float32,
                            kernel_init=torch_default)
    self.post_quant_conv = dense(c.vit.width, ("latent", "embed"), dtype=jnp.float32, kernel_init=torch_default)
    self.quantizers = [ResidualQuantizer(c.quantizer, name=f"quantizer_{i}") for i in range(c.num_branches)]

  def latents(self, images: jax.Array) -> list[jax.Array]:
    """images (B, H, W, 3) in [-1, 1] -> per-branch latents [(B, n, n, Cq) float32]."""
    c = self.config
    tokens = self.encoder(images)
    z = self.quant_conv(tokens.astype(jnp.float32))
    n = c.latent_grid
    return [z[:, i * n * n:(i + 1) * n * n].reshape(z.shape[0], n, n, -1) for i in range(c.num_branches)]

  def quantize(self, latents: Sequence[jax.Array], *, num_active_scales: Optional[jax.Array] = None,
               train: bool = False, update_codebook: bool = False) -> list[dict]:
    """Per-branch quantizer outputs (see `ResidualQuantizer.__call__`)."""
    return [q(f, num_active_scales=num_active_scales, train=train, update_codebook=update_codebook)
            for q, f in zip(self.quantizers, latents)]

  def decode(self, f_hats: Sequence[jax.Array]) -> jax.Array:
    """Per-branch f_hat [(B, n, n, Cq)] -> images (B, H, W, 3), not clamped."""
    z = jnp.concatenate([f.astype(jnp.float32) for f in f_hats], axis=-1)
    z = self.post_quant_conv(z)
    return self.decoder(z.reshape(z.shape[0], -1, z.shape[-1]))

  def ids_to_f_hats(self, ids: Sequence[Sequence[jax.Array]]) -> list[jax.Array]:
    """ids[branch][scale] (B, n_s, n_s) -> per-branch f_hat (B, n, n, Cq)."""
    return [q.ids_to_f_hat(branch_ids) for q, branch_ids in zip(self.quantizers, ids)]

  def decode_ids(self, ids: Sequence[Sequence[jax.Array]]) -> jax.Array:
    """ids[branch][scale] -> images (B, H, W, 3), not clamped."""
    return self.decode(self.ids_to_f_hats(ids))

  def encode_ids(self, images: jax.Array) -> list[list[jax.Array]]:
    """images -> ids[branch][scale] (B, n_s, n_s) int32 (no dropout)."""
    return [out["ids"] for out in self.quantize(self.latents(images))]

  def next_scale_inputs(self, ids: Sequence[Sequence[jax.Array]]) -> jax.Array:
    """Folded teacher-forcing input of the generator: (B, L - n_0^2, P * Cq), branches concatenated."""
    return jnp.concatenate([q.next_scale_inputs(branch_ids) for q, branch_ids in zip(self.quantizers, ids)],
                           axis=-1)

  def embed_scale(self, scale_index: int, ids: Sequence[jax.Array]) -> list[jax.Array]:
    """One scale's f_hat contribution per branch; ids: per branch (B, n_s, n_s)."""
    return [q.embed_scale(scale_index, branch_ids) for q, branch_ids in zip(self.quantizers, ids)]

  def sample_num_active_scales(self, batch: int) -> jax.Array:
    """Quantizer dropout draw: (B,) int; n ~ U{start..S} for a `dropout_fraction` of the batch, else S."""
    c = self.config
    num_scales = len(c.quantizer.scales)
    key_pick, key_n = jax.random.split(self.make_rng("dropout"))
    hit = jax.random.uniform(key_pick, (batch,)) < c.dropout_fraction
    n = jax.random.randint(key_n, (batch,), c.dropout_start, num_scales + 1)
    return jnp.where(hit, n, num_scales)

  def __call__(self, images: jax.Array, *, train: bool = False, quantizer_dropout: bool = False,
               update_codebook: bool = False) -> dict:
    """Full training forward.

    Returns a dict: recon (B, H, W, 3) not clamped; latents, f_hat (straight-through) and f_hat_raw
    per branch; ids[branch][scale]; vq_loss, commit_loss (summed over branches); usage (P, S);
    num_active_scales (B,) (S where no dropout).
    """
    c = self.config
    latents = self.latents(images)
    num_scales = len(c.quantizer.scales)
    if quantizer_dropout and c.dropout_fraction > 0:
      num_active = self.sample_num_active_scales(images.shape[0])
    else:
      num_active = jnp.full((images.shape[0],), num_scales, jnp.int32)
    outs = self.quantize(latents, num_active_scales=num_active if quantizer_dropout else None,
                         train=train, update_codebook=update_codebook)
    f_hat = [o["f_hat"] for o in outs]
    return dict(
        recon=self.decode(f_hat),
        latents=latents,
        f_hat=f_hat,
        f_hat_raw=[o["f_hat_raw"] for o in outs],
        ids=[o["ids"] for o in outs],
        vq_loss=sum(o["vq_loss"] for o in outs),
        commit_loss=sum(o["commit_loss"] for o in outs),
        usage=jnp.stack([o["usage"] for o in outs]),
        perplexity=jnp.stack([o["perplexity"] for o in outs]),
        num_active_scales=num_active,
    )
