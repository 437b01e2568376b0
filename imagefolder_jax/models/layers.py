"""Small building blocks with logical axis names on every parameter.

Logical axis names used across the package (mapped to mesh axes by
`imagefolder_jax.parallel.LOGICAL_RULES`):
  'embed'   model width            'mlp'     FFN hidden width
  'qkv'     fused q/k/v output     'heads'   attention heads
  'vocab'   codebook / logit rows  'latent'  quantizer channel width
  'conv_in' / 'conv_out' conv channels, None for small or replicated axes.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
Initializer = Callable[..., jax.Array]

TRUNC_NORMAL_02 = nn.initializers.truncated_normal(stddev=0.02)


def partitioned(init: Initializer, axes: Sequence[Optional[str]]) -> Initializer:
  return nn.with_logical_partitioning(init, tuple(axes))


def dense(features: int, axes: tuple[Optional[str], Optional[str]] = ("embed", "mlp"), *,
          use_bias: bool = True, kernel_init: Initializer = TRUNC_NORMAL_02,
          bias_init: Initializer = nn.initializers.zeros, dtype: Dtype = jnp.float32,
          name: Optional[str] = None) -> nn.Dense:
  """`nn.Dense` with logical axes `axes=(in, out)` on the kernel and `(out,)` on the bias."""
  return nn.Dense(features, use_bias=use_bias, dtype=dtype, name=name,
                  kernel_init=partitioned(kernel_init, axes),
                  bias_init=partitioned(bias_init, (axes[1],)))


def layer_norm(epsilon: float = 1e-6, *, use_affine: bool = True, dtype: Dtype = jnp.float32,
               name: Optional[str] = None) -> nn.LayerNorm:
  """LayerNorm over the last axis; statistics in float32 whatever the compute dtype."""
  return nn.LayerNorm(epsilon=epsilon, use_bias=use_affine, use_scale=use_affine, dtype=dtype,
                      name=name, scale_init=partitioned(nn.initializers.ones, ("embed",)),
                      bias_init=partitioned(nn.initializers.zeros, ("embed",)))
