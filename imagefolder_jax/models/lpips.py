"""LPIPS-VGG perceptual distance (v0.1, as defined by the `lpips` package).

d(x, y) = sum over the five VGG16 taps l of
          mean_{h,w} sum_c w_{l,c} * (f̂_l(x) - f̂_l(y))²_{h,w,c},
where f̂ is the tap normalised over channels, f / (sqrt(Σ_c f²) + eps) (eps on
the norm, not under the root), and w_l are the non-negative per-channel
weights of the 1×1 heads (no bias). The spatial mean is taken at each tap's
own resolution. docs/design.md §2.

Parameter tree (top level): `vgg/conv{s}_{i}/{kernel (3,3,I,O), bias (O,)}` for
the 13 convolutions (conv1_1 … conv5_3), `lin{l}/kernel (C_l, 1)` for the five
heads. Converters: `imagefolder_jax.convert.lpips`. Training adds `grad_kernel`s
(`with_input_grad_kernels`) so that backpropagating through the frozen network is cheaper.
"""
from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from imagefolder_jax.models.layers import Dtype, partitioned

# torchvision VGG16 `features` up to relu5_3: channel counts per conv, stages split by max-pools.
VGG16_STAGES: tuple[tuple[int, ...], ...] = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512),
                                            (512, 512, 512))


@dataclasses.dataclass(frozen=True)
class LPIPSConfig:
  """LPIPS-VGG constants (v0.1).

  Attributes:
    shift: per-channel shift applied to inputs in [-1, 1] (the `lpips` ScalingLayer).
    scale: per-channel divisor applied after the shift.
    stages: VGG16 conv widths per stage; a tap (ReLU output) closes every stage.
    eps: added to the channel norm before dividing.
  """
  shift: tuple[float, float, float] = (-0.030, -0.088, -0.188)
  scale: tuple[float, float, float] = (0.458, 0.448, 0.450)
  stages: tuple[tuple[int, ...], ...] = VGG16_STAGES
  eps: float = 1e-10


def vgg_conv_names(stages: tuple[tuple[int, ...], ...] = VGG16_STAGES) -> list[str]:
  """['conv1_1', 'conv1_2', 'conv2_1', …, 'conv5_3'] in network order."""
  return [f"conv{s + 1}_{i + 1}" for s, widths in enumerate(stages) for i in range(len(widths))]


def _conv3x3(x: jax.Array, kernel: jax.Array, precision) -> jax.Array:
  """3x3 stride-1 convolution with one pixel of zero padding. x (B, H, W, I), kernel (3, 3, I, O)."""
  return jax.lax.conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)), precision=precision,
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


def input_grad_kernel(kernel: jax.Array) -> jax.Array:
  """The kernel (3, 3, O, I) whose 3x3 padded convolution of dL/dy gives dL/dx for `_conv3x3`
  with `kernel` (3, 3, I, O): spatially flipped, input and output channels swapped."""
  return jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _frozen_conv3x3(x: jax.Array, kernel: jax.Array, grad_kernel: jax.Array, precision) -> jax.Array:
  """`_conv3x3(x, kernel)` whose input gradient convolves with the precomputed `grad_kernel`
  (= input_grad_kernel(kernel)). XLA would otherwise transpose every kernel in every backward
  pass: 9.4 MB copies for each 512-wide VGG conv, ~25% of a small tokenizer step on a CPU."""
  return _conv3x3(x, kernel, precision)


def _frozen_conv3x3_fwd(x, kernel, grad_kernel, precision):
  return _conv3x3(x, kernel, precision), (x, kernel, grad_kernel)


def _frozen_conv3x3_bwd(precision, residuals, dy):
  x, kernel, grad_kernel = residuals
  # The kernel's own gradient (dead code, removed by XLA, unless someone differentiates LPIPS' weights);
  # grad_kernel is a copy of it, so its cotangent is zero.
  _, kernel_vjp = jax.vjp(lambda k: _conv3x3(x, k, precision), kernel)
  return _conv3x3(dy, grad_kernel, precision), kernel_vjp(dy)[0], jnp.zeros_like(grad_kernel)


_frozen_conv3x3.defvjp(_frozen_conv3x3_fwd, _frozen_conv3x3_bwd)


class VGGConv(nn.Module):
  """3x3 conv (padding 1) + bias, the parameters of torch's Conv2d: kernel (3, 3, I, O), bias (O,).

  With a `grad_kernel` (3, 3, O, I) parameter beside them (`with_input_grad_kernels`), gradients
  w.r.t. the input use it instead of transposing the kernel in every backward pass.
  """
  features: int
  precision: jax.lax.Precision = jax.lax.Precision.HIGHEST
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param("kernel", partitioned(nn.initializers.lecun_normal(), (None, None, "conv_in", "conv_out")),
                        (3, 3, x.shape[-1], self.features))
    bias = self.param("bias", partitioned(nn.initializers.zeros, ("conv_out",)), (self.features,))
    x, kernel, bias = (a.astype(self.dtype) for a in (x, kernel, bias))
    if self.has_variable("params", "grad_kernel"):
      y = _frozen_conv3x3(x, kernel, self.get_variable("params", "grad_kernel").astype(self.dtype), self.precision)
    else:
      y = _conv3x3(x, kernel, self.precision)
    return y + bias


def with_input_grad_kernels(params: dict) -> dict:
  """LPIPS params -> the same params plus `vgg/conv*/grad_kernel` (`input_grad_kernel` of each
  kernel). Computed once where the frozen network is loaded; a training step that backpropagates
  through LPIPS (the reconstruction loss) then does no per-step kernel transposes. Same function,
  same gradients; 1x the VGG weights in extra memory (59 MB)."""
  vgg = {name: dict(conv, grad_kernel=input_grad_kernel(jnp.asarray(conv["kernel"])))
         for name, conv in params["vgg"].items()}
  return dict(params, vgg=vgg)


class VGG16Features(nn.Module):
  """VGG16 convolutional trunk returning the ReLU output that closes each stage.

  images: (B, H, W, 3) float32, already shifted/scaled; H, W >= 2**(len(stages)-1).
  Returns one (B, H / 2**s, W / 2**s, C_s) array per stage s (relu1_2, relu2_2, …).
  """
  stages: tuple[tuple[int, ...], ...] = VGG16_STAGES
  precision: jax.lax.Precision = jax.lax.Precision.HIGHEST
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array) -> list[jax.Array]:
    taps = []
    x = images
    names = iter(vgg_conv_names(self.stages))
    for s, widths in enumerate(self.stages):
      if s > 0:
        # torch MaxPool2d(2, 2) floors odd sizes, as VALID pooling does.
        x = nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")
      for width in widths:
        x = nn.relu(VGGConv(width, self.precision, self.dtype, name=next(names))(x))
      taps.append(x)
    return taps


def normalize_channels(features: jax.Array, eps: float) -> jax.Array:
  """f / (sqrt(Σ_c f²) + eps) over the last axis (the `lpips` package's normalize_tensor)."""
  norm = jnp.sqrt(jnp.sum(jnp.square(features), axis=-1, keepdims=True))
  return features / (norm + eps)


class LPIPS(nn.Module):
  """LPIPS-VGG distance between two image batches.

  `__call__(x, y)`: x, y: (B, H, W, 3) float in [-1, 1], H, W >= 16 (five stages,
  four pools; use >= 32 so relu5_3 is at least 2×2). Returns (B,) float32 distances.
  """
  config: LPIPSConfig = LPIPSConfig()
  # Highest precision: TPU/GPU default matmul precision (bf16 / TF32 passes) would make the
  # loss differ from the reference LPIPS (docs/design.md §2).
  precision: jax.lax.Precision = jax.lax.Precision.HIGHEST
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, y: jax.Array) -> jax.Array:
    c = self.config
    if x.shape != y.shape:
      raise ValueError(f"LPIPS inputs differ in shape: {x.shape} vs {y.shape}")
    shift = jnp.asarray(c.shift, jnp.float32)
    scale = jnp.asarray(c.scale, jnp.float32)
    vgg = VGG16Features(c.stages, self.precision, self.dtype, name="vgg")
    # Two trunk passes, not one over [x; y]: as a training loss only x = the reconstruction is
    # differentiated, and y's pass then needs no backward and keeps no activations for one (one
    # pass over both computed the VGG's input gradients for y too, half of its backward:
    # docs/planning.md, the tokenizer's FLOPs). Each batch keeps its sharding, so no activation
    # changes device (concatenating [x; y] along a sharded batch did).
    taps_x, taps_y = (vgg(((z.astype(jnp.float32) - shift) / scale).astype(self.dtype)) for z in (x, y))
    total = jnp.zeros((x.shape[0],), jnp.float32)
    for level, (tap_x, tap_y) in enumerate(zip(taps_x, taps_y)):
      diff = jnp.square(normalize_channels(tap_x.astype(jnp.float32), c.eps)
                        - normalize_channels(tap_y.astype(jnp.float32), c.eps))
      # Init to ones = the un-learned "sum over channels" baseline; real heads are loaded.
      head = nn.Dense(1, use_bias=False, precision=self.precision,
                      kernel_init=partitioned(nn.initializers.ones, ("conv_in", None)),
                      name=f"lin{level}")
      total = total + jnp.mean(head(diff)[..., 0], axis=(1, 2))
    return total
