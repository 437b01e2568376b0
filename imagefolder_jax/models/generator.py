"""Next-scale autoregressive generator with folded tokens (paper §3.2, docs/design.md §3).

The official VAR transformer (ImageFolder's released "d17"): position p of scale s carries the
*pair* (id_branch0, id_branch1, ...) of P product-quantized branches, so one forward predicts
P x V logits per position. Sequence (docs/design.md §3):

  x = [class_emb[label] + pos_start | word_embed(next_scale_inputs)] + lvl_embed[scale] + pos_1LC
  per block:  x += gamma1 * attn(LN(x) (1 + scale1) + shift1)
              x += gamma2 * ffn(LN(x) (1 + scale2) + shift2)
              (gamma1, gamma2, scale1, scale2, shift1, shift2) = ada_lin(silu(class_emb[label]))
  logits = head(LN(x) (1 + scale) + shift),  (scale, shift) = head_nm.ada_lin(silu(cond))

Attention: q/k l2-normalised per head, q times exp(min(scale_mul, log 100)), softmax scale 1,
block-causal over scales. Two call paths share every parameter:
  * `__call__`: teacher forcing over all L positions (training, parity).
  * `decode_scale`: one scale at a time against a preallocated KV cache (sampling);
    `decode_scale_features` stops before the head, so the sampler can mix guidance on the head's input.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from imagefolder_jax.models.layers import (
  Dtype,
  Initializer,
  attention,
  constrain,
  dense,
  layer_norm,
  partitioned,
  remat_block,
)
from imagefolder_jax.ops import block_causal_attention, cached_attention
from imagefolder_jax.ops.masks import block_causal_mask, scale_begin_ends, scale_of_position

RELEASED_SCALES = (1, 1, 2, 3, 3, 4, 5, 6, 8, 11)
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}

# One KV cache per block: {'k': (B, Lc, H * D), 'v': (B, Lc, H * D)}, Lc = `cache_length` (all scales but the last).
KVCache = list[dict[str, jax.Array]]


@dataclasses.dataclass(frozen=True)
class GeneratorConfig:
  """Architecture and initialisation of the next-scale generator.

  Attributes:
    depth: number of AdaLN blocks (released: 17).
    width: token width C; None -> 64 * depth (the official VAR rule).
    num_heads: attention heads; None -> depth (the official VAR rule).
    mlp_ratio: FFN hidden = round(mlp_ratio * width).
    num_classes: class labels; id `num_classes` is the unconditional class (table has +1 rows).
    num_branches: P, tokens folded into one position (one softmax each).
    codebook_size: V, vocabulary of each branch; the head emits P * V logits.
    latent_dim: Cq, quantizer channels per branch; the input projection reads P * Cq.
    scales: side of each scale's token grid (L = sum of squares).
    norm_eps: epsilon of the affine-free LayerNorms.
    attn_l2_norm: l2-normalised q/k with a learnable per-head scale (else scale 0.25/sqrt(D)).
    scale_mul_init: initial log scale of the l2-normalised attention (log 4).
    max_scale_mul: clamp of the log scale (log 100).
    label_dropout: probability of replacing a label by the unconditional class in training.
    drop_path_rate: stochastic depth of the last block (linear from 0); None -> 0.1 * depth / 24
      (the official `build_vae_var` rule).
    init_std: std of every linear / embedding initialisation; None -> sqrt(1 / (3 width)).
    init_head: the head kernel is initialised at init_std * init_head.
    init_adaln: AdaLN scale/shift rows (and the head's AdaLN) are initialised at init_std * this.
    init_adaln_gamma: AdaLN gate rows are initialised at init_std * this.
    dtype: compute dtype name ('float32', 'bfloat16', 'float16'); parameters stay float32 and
      logits are always float32.
  """
  depth: int = 17
  width: Optional[int] = None
  num_heads: Optional[int] = None
  mlp_ratio: float = 4.0
  num_classes: int = 1000
  num_branches: int = 2
  codebook_size: int = 4096
  latent_dim: int = 32
  scales: tuple[int, ...] = RELEASED_SCALES
  norm_eps: float = 1e-6
  attn_l2_norm: bool = True
  scale_mul_init: float = math.log(4.0)
  max_scale_mul: float = math.log(100.0)
  label_dropout: float = 0.1
  drop_path_rate: Optional[float] = None
  init_std: Optional[float] = None
  init_head: float = 0.02
  init_adaln: float = 0.5
  init_adaln_gamma: float = 1e-4
  dtype: str = "float32"

  def __post_init__(self):
    # Resolve the depth-derived defaults once so that to_dict() records concrete numbers.
    set_ = lambda k, v: object.__setattr__(self, k, v)
    if self.width is None:
      set_("width", 64 * self.depth)
    if self.num_heads is None:
      set_("num_heads", self.depth)
    if self.drop_path_rate is None:
      set_("drop_path_rate", 0.1 * self.depth / 24)
    if self.init_std is None:
      set_("init_std", math.sqrt(1.0 / (3.0 * self.width)) if self.width > 0 else 0.0)
    set_("scales", tuple(int(s) for s in self.scales))

  def validate(self) -> None:
    if self.depth < 1:
      raise ValueError(f"generator depth must be >= 1, got {self.depth}")
    if self.width < 1 or self.num_heads < 1 or self.width % self.num_heads:
      raise ValueError(f"generator width {self.width} is not a positive multiple of num_heads {self.num_heads}")
    if not self.scales or any(s < 1 for s in self.scales):
      raise ValueError(f"scales must be positive ints, got {self.scales}")
    if self.num_classes < 1:
      raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")
    if self.num_branches < 1 or self.codebook_size < 1 or self.latent_dim < 1:
      raise ValueError(f"num_branches, codebook_size and latent_dim must be >= 1, got "
                       f"{self.num_branches}, {self.codebook_size}, {self.latent_dim}")
    if not 0.0 <= self.label_dropout <= 1.0:
      raise ValueError(f"label_dropout must be in [0, 1], got {self.label_dropout}")
    if not 0.0 <= self.drop_path_rate < 1.0:
      raise ValueError(f"drop_path_rate must be in [0, 1), got {self.drop_path_rate}")
    if self.dtype not in DTYPES:
      raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")

  @property
  def num_tokens(self) -> int:
    """L, positions per image (each carries P folded tokens)."""
    return sum(s * s for s in self.scales)

  @property
  def num_scales(self) -> int:
    return len(self.scales)

  @property
  def head_dim(self) -> int:
    return self.width // self.num_heads

  @property
  def input_dim(self) -> int:
    """P * Cq, channels of the folded next-scale input."""
    return self.num_branches * self.latent_dim

  @property
  def uncond_label(self) -> int:
    return self.num_classes

  @property
  def begin_ends(self) -> tuple[tuple[int, int], ...]:
    return scale_begin_ends(self.scales)

  @property
  def compute_dtype(self) -> Dtype:
    return DTYPES[self.dtype]

  def to_dict(self) -> dict:
    d = dataclasses.asdict(self)
    d["scales"] = list(self.scales)
    return d

  @classmethod
  def from_dict(cls, d: dict) -> "GeneratorConfig":
    d = dict(d)
    unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
      raise ValueError(f"unknown GeneratorConfig fields: {sorted(unknown)}")
    if "scales" in d:
      d["scales"] = tuple(d["scales"])
    return cls(**d)


def torch_trunc_normal(std: float, multiplier: float = 1.0) -> Initializer:
  """PyTorch `trunc_normal_(std=std)` (cut at +-2 *absolute*, i.e. a plain normal for std << 1), x multiplier."""

  def init(key, shape, dtype=jnp.float32):
    x = jnp.clip(jax.random.normal(key, shape, jnp.float32) * std, -2.0, 2.0)
    return (x * multiplier).astype(dtype)

  return init


def adaln_init(std: float, width: int, gate_multiplier: float, other_multiplier: float,
               num_gates: int) -> Initializer:
  """AdaLN kernel (C, k*C): the first `num_gates` C-wide column groups scaled by gate_multiplier."""

  def init(key, shape, dtype=jnp.float32):
    x = torch_trunc_normal(std)(key, shape, jnp.float32)
    col = np.where(np.arange(shape[-1]) < num_gates * width, gate_multiplier, other_multiplier)
    return (x * jnp.asarray(col, jnp.float32)).astype(dtype)

  return init


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  """x / max(||x||, eps) over the last axis, as torch.nn.functional.normalize."""
  norm = jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True))
  return x / jnp.maximum(norm, eps)


def drop_path(x: jax.Array, rate: float, rng: jax.Array) -> jax.Array:
  """Per-sample stochastic depth (timm `drop_path`, scale_by_keep)."""
  keep = 1.0 - rate
  mask = jax.random.bernoulli(rng, keep, (x.shape[0],) + (1,) * (x.ndim - 1))
  return jnp.where(mask, x / keep, jnp.zeros_like(x))


class SelfAttention(nn.Module):
  """Official VAR attention: fused qkv without bias + (q_bias, 0, v_bias), l2-normalised q/k."""
  config: GeneratorConfig

  def setup(self):
    c = self.config
    std = c.init_std
    self.mat_qkv = dense(3 * c.width, ("embed", "qkv"), use_bias=False, kernel_init=torch_trunc_normal(std),
                         dtype=c.compute_dtype)
    self.q_bias = self.param("q_bias", partitioned(nn.initializers.zeros, ("qkv",)), (c.width,))
    self.v_bias = self.param("v_bias", partitioned(nn.initializers.zeros, ("qkv",)), (c.width,))
    if c.attn_l2_norm:
      self.scale_mul = self.param("scale_mul", partitioned(nn.initializers.constant(c.scale_mul_init), ("heads",)),
                                  (c.num_heads,))
    self.proj = dense(c.width, ("qkv", "embed"), kernel_init=torch_trunc_normal(std, 1 / math.sqrt(2 * c.depth)),
                      dtype=c.compute_dtype)

  def __call__(self, x: jax.Array, *, mask: Optional[jax.Array] = None, cache: Optional[dict] = None,
               begin: int = 0) -> tuple[jax.Array, Optional[dict]]:
    """x: (B, l, C). With `cache` ({'k','v'}: (B, Lc, H * D), `init_cache`), x holds positions
    [begin, begin + l): their k/v are written there (or, for the positions right after the cache's,
    the last scale's, used without being written) and the queries attend to positions [0, begin + l),
    which is exactly the block-causal mask when x is one whole scale. Returns (out (B, l, C), updated
    cache or None)."""
    c = self.config
    b, l, _ = x.shape
    zeros = jnp.zeros_like(self.q_bias)
    qkv = self.mat_qkv(x) + jnp.concatenate([self.q_bias, zeros, self.v_bias]).astype(c.compute_dtype)
    if cache is not None and cache["k"].dtype == qkv.dtype and cached_attention.applies(qkv.dtype, c.num_heads,
                                                                                           c.head_dim):
      return self._cached_kernel_attention(qkv, cache, begin)
    qkv = qkv.reshape(b, l, 3, c.num_heads, c.head_dim)
    q, k, v = (constrain(qkv[:, :, i], ("batch", "length", "heads", "head_dim")) for i in range(3))
    if c.attn_l2_norm:
      scale_mul = jnp.exp(jnp.minimum(self.scale_mul, c.max_scale_mul)).reshape(1, 1, c.num_heads, 1)
      q = (l2_normalize(q.astype(jnp.float32)) * scale_mul).astype(c.compute_dtype)
      k = l2_normalize(k.astype(jnp.float32)).astype(c.compute_dtype)
      softmax_scale = 1.0
    else:
      softmax_scale = 0.25 / math.sqrt(c.head_dim)
    new_cache = None
    if cache is not None:
      # The cache keeps heads and head_dim as one minor axis (B, L, H * D): TPU tiles the minor axis
      # to 128 lanes, and head_dim 64 alone would double the cache and every write into it.
      end, flat = begin + l, c.num_heads * c.head_dim
      as_cached = lambda new: new.reshape(b, l, flat).astype(cache["k"].dtype)
      if _writes_cache(cache, begin, l):
        write = lambda cached, new: jax.lax.dynamic_update_slice_in_dim(cached, as_cached(new), begin, axis=1)
        k_all, v_all = write(cache["k"], k), write(cache["v"], v)
        new_cache = {"k": k_all, "v": v_all}
      else:  # the last scale: attends to the cache and itself, and no later scale reads its keys
        new_cache = cache
        k_all, v_all = (jnp.concatenate([cached[:, :begin], as_cached(new)], axis=1)
                        for cached, new in ((cache["k"], k), (cache["v"], v)))
      k, v = (x[:, :end].reshape(b, end, c.num_heads, c.head_dim).astype(c.compute_dtype) for x in (k_all, v_all))
    if cache is None and mask is not None and block_causal_attention.applies(q.shape):
      # Teacher forcing on TPU: the mask is block_causal_mask(c.scales) (head_inputs), fused in a kernel.
      out = block_causal_attention.block_causal_attention(q, k, v, scales=c.scales, scale=softmax_scale)
    else:
      out = attention(q, k, v, mask=mask, scale=softmax_scale)
    return self.proj(out.reshape(b, l, c.width)), new_cache

  def _cached_kernel_attention(self, qkv: jax.Array, cache: dict, begin: int) -> tuple[jax.Array, dict]:
    """Cached decoding through `ops.cached_attention`'s TPU kernel. q, k and v stay lane-dense
    (B, l, H * D) column slices of the projection (B, l, 3 * H * D): split into heads of 64, each
    would be padded to 128 lanes and relaid out around the l2 normalization. The cache holds k
    before the normalization, which the kernel applies per head with q's scale: the same values
    in the same dtype as `__call__`'s XLA path."""
    c = self.config
    b, l, _ = qkv.shape
    flat = c.num_heads * c.head_dim
    q, k, v = (qkv[..., i * flat:(i + 1) * flat] for i in range(3))
    if c.attn_l2_norm:
      head_scale, softmax_scale = jnp.exp(jnp.minimum(self.scale_mul, c.max_scale_mul)), 1.0
    else:
      head_scale, softmax_scale = None, 0.25 / math.sqrt(c.head_dim)
    attend = functools.partial(cached_attention.cached_attention, head_dim=c.head_dim, scale=softmax_scale,
                               head_scale=head_scale)
    if not _writes_cache(cache, begin, l):  # the last scale: its own keys go to the kernel beside the cache
      return self.proj(attend(q, cache["k"], cache["v"], end=begin, fresh_k=k, fresh_v=v)), cache
    write = lambda cached, new: jax.lax.dynamic_update_slice_in_dim(cached, new, begin, axis=1)
    k_all, v_all = write(cache["k"], k), write(cache["v"], v)
    return self.proj(attend(q, k_all, v_all, end=begin + l)), {"k": k_all, "v": v_all}


def _writes_cache(cache: dict, begin: int, length: int) -> bool:
  """Whether positions [begin, begin + length) go into the cache (`init_cache`: every scale's but the
  last); if not, they must be the ones right after it (the last scale's)."""
  rows = cache["k"].shape[1]
  if begin + length <= rows:
    return True
  if begin != rows:
    raise ValueError(f"KV cache of {rows} positions: positions [{begin}, {begin + length}) neither fit in it "
                     f"nor follow it")
  return False


class FFN(nn.Module):
  config: GeneratorConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = self.config
    hidden = round(c.width * c.mlp_ratio)
    x = dense(hidden, ("embed", "mlp"), kernel_init=torch_trunc_normal(c.init_std), dtype=c.compute_dtype,
              name="fc1")(x)
    x = constrain(nn.gelu(x, approximate=True), ("batch", "length", "mlp"))
    return dense(c.width, ("mlp", "embed"), kernel_init=torch_trunc_normal(c.init_std, 1 / math.sqrt(2 * c.depth)),
                 dtype=c.compute_dtype, name="fc2")(x)


class AdaLNBlock(nn.Module):
  """One AdaLN self-attention block (official `AdaLNSelfAttn`, shared_aln=False)."""
  config: GeneratorConfig
  drop_path_rate: float = 0.0

  def setup(self):
    c = self.config
    self.attn = SelfAttention(c)
    self.ffn = FFN(c)
    self.norm = layer_norm(c.norm_eps, use_affine=False)
    self.ada_lin = dense(6 * c.width, ("embed", None), dtype=c.compute_dtype,
                         kernel_init=adaln_init(c.init_std, c.width, c.init_adaln_gamma, c.init_adaln, num_gates=2))

  # Called positionally: under `nn.remat` begin and train are static arguments (5, 6; self is 0).
  def __call__(self, x: jax.Array, cond: jax.Array, mask: Optional[jax.Array] = None,
               cache: Optional[dict] = None, begin: int = 0, train: bool = False):
    """x: (B, l, C) float32 residual stream; cond: (B, C) class embedding. Returns (x, cache)."""
    c = self.config
    ada = self.ada_lin(nn.silu(cond)).astype(jnp.float32).reshape(-1, 1, 6, c.width)
    gamma1, gamma2, scale1, scale2, shift1, shift2 = (ada[:, :, i] for i in range(6))
    h = self.norm(x) * (1.0 + scale1) + shift1
    h, cache = self.attn(h.astype(c.compute_dtype), mask=mask, cache=cache, begin=begin)
    h = h.astype(jnp.float32) * gamma1
    if train and self.drop_path_rate > 0:
      h = drop_path(h, self.drop_path_rate, self.make_rng("dropout"))
    x = x + h
    h = self.ffn((self.norm(x) * (1.0 + scale2) + shift2).astype(c.compute_dtype)).astype(jnp.float32) * gamma2
    if train and self.drop_path_rate > 0:
      h = drop_path(h, self.drop_path_rate, self.make_rng("dropout"))
    return constrain(x + h, ("batch", "length", "embed")), cache


class AdaLNBeforeHead(nn.Module):
  config: GeneratorConfig

  @nn.compact
  def __call__(self, x: jax.Array, cond: jax.Array) -> jax.Array:
    c = self.config
    # The head runs in float32 whatever the compute dtype (official `get_logits` casts with .float()).
    ada = dense(2 * c.width, ("embed", None), name="ada_lin",
                kernel_init=torch_trunc_normal(c.init_std, c.init_adaln))(nn.silu(cond.astype(jnp.float32)))
    ada = ada.reshape(-1, 1, 2, c.width)
    scale, shift = ada[:, :, 0], ada[:, :, 1]
    return layer_norm(c.norm_eps, use_affine=False, name="norm")(x.astype(jnp.float32)) * (1.0 + scale) + shift


class NextScaleGenerator(nn.Module):
  """The folded-token next-scale transformer. See the module docstring.

  Variables: 'params' only. Randomness (training only): the 'dropout' rng stream for label
  dropout and stochastic depth. `remat` ('none' / 'dots_saveable' / 'full') rematerialises each
  block in the backward pass (a training memory lever; the parameter tree is the same).
  """
  config: GeneratorConfig
  remat: str = "none"

  def setup(self):
    c = self.config
    c.validate()
    std = c.init_std
    embed_init = partitioned(torch_trunc_normal(std), (None, "embed"))
    self.class_emb = nn.Embed(c.num_classes + 1, c.width, embedding_init=embed_init)
    self.lvl_embed = nn.Embed(c.num_scales, c.width, embedding_init=embed_init)
    self.pos_start = self.param("pos_start", partitioned(torch_trunc_normal(std), (None, None, "embed")),
                                (1, c.scales[0] ** 2, c.width))
    self.pos_1LC = self.param("pos_1LC", partitioned(torch_trunc_normal(std), (None, None, "embed")),
                              (1, c.num_tokens, c.width))
    self.word_embed = dense(c.width, ("latent", "embed"), kernel_init=torch_trunc_normal(std))
    rates = np.linspace(0.0, c.drop_path_rate, c.depth)
    block = remat_block(AdaLNBlock, self.remat, static_argnums=(5, 6))
    self.blocks = [block(c, drop_path_rate=float(rates[i]), name=f"blocks_{i}") for i in range(c.depth)]
    self.head_nm = AdaLNBeforeHead(c)
    self.head = dense(c.num_branches * c.codebook_size, ("embed", "vocab"),
                      kernel_init=torch_trunc_normal(std, c.init_head))

  # --- pieces shared by both paths -----------------------------------------------------------
  def condition(self, labels: jax.Array) -> jax.Array:
    """labels (B,) int in [0, num_classes] -> class embedding (B, C) float32 (also the start token)."""
    return self.class_emb(labels).astype(jnp.float32)

  def _level_position(self, begin: int, end: int) -> jax.Array:
    level = jnp.asarray(scale_of_position(self.config.scales)[begin:end])
    return self.lvl_embed(level)[None].astype(jnp.float32) + self.pos_1LC[:, begin:end]

  def first_scale_tokens(self, cond: jax.Array) -> jax.Array:
    """Scale-0 input tokens (B, n_0^2, C): class embedding + start position + level/position."""
    n0 = self.config.scales[0] ** 2
    return cond[:, None, :] + self.pos_start + self._level_position(0, n0)

  def scale_tokens(self, scale_index: int, inputs: jax.Array) -> jax.Array:
    """Input tokens of scale s >= 1 (B, n_s^2, C) from its folded input (B, n_s^2, P * Cq)."""
    begin, end = self.config.begin_ends[scale_index]
    return self.word_embed(inputs.astype(jnp.float32)) + self._level_position(begin, end)

  def logits_from_hidden(self, hidden: jax.Array, cond: jax.Array) -> jax.Array:
    """Head: (B, l, C) -> folded logits (B, l, P, V) float32 ([..., b, :] = branch b's vocabulary)."""
    c = self.config
    logits = self.head(self.head_nm(hidden, cond))
    return logits.reshape(*logits.shape[:-1], c.num_branches, c.codebook_size).astype(jnp.float32)

  def drop_labels(self, labels: jax.Array) -> jax.Array:
    """Label dropout: each label becomes the unconditional class with probability `label_dropout`."""
    c = self.config
    drop = jax.random.uniform(self.make_rng("dropout"), labels.shape) < c.label_dropout
    return jnp.where(drop, c.uncond_label, labels)

  # --- teacher forcing -----------------------------------------------------------------------
  def head_inputs(self, labels: jax.Array, next_scale_inputs: jax.Array, *, train: bool = False) -> tuple:
    """Teacher-forced trunk. Returns (AdaLN-before-head output (B, L, C) float32, cond (B, C))."""
    c = self.config
    if train and c.label_dropout > 0:
      labels = self.drop_labels(labels)
    cond = self.condition(labels)
    x = jnp.concatenate([self.first_scale_tokens(cond),
                         self.word_embed(next_scale_inputs.astype(jnp.float32))
                         + self._level_position(c.scales[0] ** 2, c.num_tokens)], axis=1)
    mask = jnp.asarray(block_causal_mask(c.scales))[None, None]
    for block in self.blocks:
      x, _ = block(x, cond, mask, None, 0, train)
    return self.head_nm(x, cond), cond

  def __call__(self, labels: jax.Array, next_scale_inputs: jax.Array, *, train: bool = False) -> jax.Array:
    """Teacher-forced folded logits.

    Args:
      labels: (B,) int class ids in [0, num_classes] (num_classes = unconditional).
      next_scale_inputs: (B, L - n_0^2, P * Cq) float, the tokenizer's `next_scale_inputs(ids)`.
      train: label dropout and stochastic depth (needs the 'dropout' rng).

    Returns logits (B, L, P, V) float32.
    """
    c = self.config
    head_in, _ = self.head_inputs(labels, next_scale_inputs, train=train)
    logits = self.head(head_in)
    return logits.reshape(*logits.shape[:-1], c.num_branches, c.codebook_size).astype(jnp.float32)

  # --- cached decoding -----------------------------------------------------------------------
  def decode_scale_features(self, scale_index: int, tokens: jax.Array, cond: jax.Array,
                            cache: KVCache) -> tuple[jax.Array, KVCache]:
    """One scale against the KV cache, up to the head's input (sampling).

    Args:
      scale_index: static scale index s.
      tokens: (B, n_s^2, C) input tokens of scale s (`first_scale_tokens` / `scale_tokens`).
      cond: (B, C) class embedding.
      cache: per block {'k', 'v'}: (B, Lc, H * D) (`init_cache`); positions < begin_s must be filled
        (the last scale's own positions are not cached: its cache comes back unchanged).

    Returns (AdaLN-before-head output (B, n_s^2, C) float32, updated cache). The head is affine, so
    guidance can mix these features instead of the logits: (1 + t) head(a) - t head(b) =
    head((1 + t) a - t b), half the head's FLOPs.
    """
    begin, _ = self.config.begin_ends[scale_index]
    x = tokens.astype(jnp.float32)
    new_cache = []
    for block, block_cache in zip(self.blocks, cache):
      x, block_cache = block(x, cond, None, block_cache, begin, False)
      new_cache.append(block_cache)
    return self.head_nm(x, cond), new_cache

  def head_logits(self, head_in: jax.Array) -> jax.Array:
    """(B, l, C) AdaLN-before-head output -> folded logits (B, l, P, V) float32."""
    c = self.config
    logits = self.head(head_in.astype(jnp.float32))
    return logits.reshape(*logits.shape[:-1], c.num_branches, c.codebook_size).astype(jnp.float32)

  def decode_scale(self, scale_index: int, tokens: jax.Array, cond: jax.Array,
                   cache: KVCache) -> tuple[jax.Array, KVCache]:
    """`decode_scale_features` then the head: (logits (B, n_s^2, P, V) float32, updated cache)."""
    head_in, cache = self.decode_scale_features(scale_index, tokens, cond, cache)
    return self.head_logits(head_in), cache


def cache_length(config: GeneratorConfig) -> int:
  """Positions a KV cache holds: every scale's but the last, which no later scale attends to (its
  keys and values are used where they are made; for the released scales 165 of 286 positions)."""
  return config.num_tokens - config.scales[-1] ** 2


def init_cache(config: GeneratorConfig, batch: int, dtype: Optional[Dtype] = None) -> KVCache:
  """Zero KV cache: per block {'k', 'v'}: (batch, cache_length(config), H * D) in the compute dtype
  (heads and head_dim in one lane-dense minor axis). Where cached decoding takes the TPU kernel
  (`ops.cached_attention`), k is cached before its l2 normalization, which the kernel applies;
  elsewhere after it: a cache belongs to the programs of one platform."""
  dtype = dtype or config.compute_dtype
  shape = (batch, cache_length(config), config.num_heads * config.head_dim)
  return [{"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)} for _ in range(config.depth)]


def flatten_ids(ids: Sequence[Sequence[jax.Array]]) -> jax.Array:
  """ids[branch][scale] (B, n_s, n_s) -> folded targets (B, L, P) int32 (scales in order, row-major)."""
  per_branch = [jnp.concatenate([jnp.reshape(s, (s.shape[0], -1)) for s in branch], axis=1) for branch in ids]
  return jnp.stack(per_branch, axis=-1).astype(jnp.int32)


def unflatten_ids(flat: jax.Array, scales: Sequence[int]) -> list[list[jax.Array]]:
  """Folded (B, L, P) ids -> ids[branch][scale] (B, n_s, n_s)."""
  out = []
  for b in range(flat.shape[-1]):
    out.append([flat[:, begin:end, b].reshape(flat.shape[0], side, side)
                for side, (begin, end) in zip(scales, scale_begin_ends(scales))])
  return out


def generator_loss(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Mean over branches of the per-branch cross-entropy averaged over all positions.

  logits: (B, L, P, V) float; targets: (B, L, P) int. Returns a float32 scalar.
  """
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  picked = jnp.take_along_axis(log_probs, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
  return -jnp.mean(picked)


def count_params(variables: Any) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(variables)))
