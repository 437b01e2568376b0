"""The tokenizer ViT's attention as one TPU kernel (Pallas) for the sampler's decode, reading q, k
and v where the packed qkv projection leaves them.

The sampler decodes its whole batch in float32 at the end of its program (256 images of 379 tokens
per chip for the released models). XLA's attention there relays the packed projection (B, L, 3 x H x D)
out to heads first and writes float32 scores (B, H, L, L) to HBM between its fusions: 100 GB a call
for the d16 sampler at 256 per v5p chip (docs/planning.md). This kernel takes the projection itself
three times, its q, k and v columns picked by the blocks' index maps (no slice is materialized),
and keeps the scores on chip: per grid step (sample, lane column) the column's queries, keys and
values (L, 128) are loaded into VMEM and `cached_attention.cached_attention_kernel` runs over every
key (bidirectional: no mask).

Numerics: float32 inputs enter the MXU as bfloat16 with float32 accumulation, as XLA's float32
matmuls do on TPUs at the default precision; logits and softmax in float32 (the arithmetic of
`models.layers.heads_first_attention`). The kernel has no gradient: it is taken only inside
`forward_only()`, which the sampler enters around its decode, when the program is compiled for TPUs
at the default matmul precision (`applies`). Within `block_causal_attention.kernel_interpreted()`
Pallas's interpreter runs it on any backend (tests). Under a mesh it runs per batch shard.
"""
from __future__ import annotations

import contextvars
import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from imagefolder_jax.ops.block_causal_attention import interpreted, xla_forced
from imagefolder_jax.ops.cached_attention import cached_attention_kernel, column_width, kernel_flops, supported
from imagefolder_jax.ops.platform import set_within, target_platform

KERNEL_NAME = "packed_attention"  # the compiled program's custom calls are named after it

_FORWARD_ONLY: contextvars.ContextVar[bool] = contextvars.ContextVar("imagefolder_jax_forward_only", default=False)


def forward_only():
  """Within the block (a context manager) no gradient is taken through the ViT's attention, so it
  may take the kernel."""
  return set_within(_FORWARD_ONLY, True)


def _default_precision() -> bool:
  """Whether matmuls run at the default precision (float32 operands rounded to bfloat16 on TPUs)."""
  return jax.config.jax_default_matmul_precision in (None, "default", "bfloat16", "fastest")


def applies(dtype, heads: int, head_dim: int) -> bool:
  """Whether the ViT's attention over a packed projection of this dtype and heads takes the kernel."""
  if not _FORWARD_ONLY.get() or not supported(heads, head_dim):
    return False
  if jnp.dtype(dtype) not in (jnp.float32, jnp.bfloat16, jnp.float16):
    return False
  if interpreted():
    return True
  return target_platform() == "tpu" and not xla_forced() and _default_precision()


def packed_attention(qkv: jax.Array, *, heads: int, head_dim: int, scale: float) -> jax.Array:
  """Bidirectional softmax attention over a packed projection.

  qkv: (B, L, 3 x H x D), q's H x D columns first, then k's, then v's (heads in order within each).
  `scale` multiplies the logits. Returns (B, L, H x D) in qkv's dtype.
  """
  b, length, packed = qkv.shape
  flat = heads * head_dim
  if packed != 3 * flat:
    raise ValueError(f"packed_attention: a projection of {packed} columns is not q, k and v of "
                     f"{heads} heads of {head_dim}")
  if not supported(heads, head_dim):
    raise ValueError(f"packed_attention: {heads} heads of {head_dim} do not make whole "
                     f"{column_width(head_dim)}-lane columns")
  local = functools.partial(_call, heads=heads, head_dim=head_dim, scale=float(scale))
  from imagefolder_jax.parallel import traced_batch_spec
  spec = traced_batch_spec(qkv.shape)
  if spec is None:
    return local(qkv)
  # A custom call is not partitioned: without shard_map XLA would gather the batch on every chip.
  return jax.shard_map(local, in_specs=(spec,), out_specs=spec, check_vma=False)(qkv)


def _operand_dtype(dtype) -> Optional[jnp.dtype]:
  """The MXU operands' dtype: bfloat16 for float32 inputs (XLA's default precision), else the input's."""
  return jnp.dtype(jnp.bfloat16) if jnp.dtype(dtype) == jnp.float32 else None


def _call(qkv: jax.Array, *, heads: int, head_dim: int, scale: float) -> jax.Array:
  """The kernel over the batch it is given (one device's shard under shard_map)."""
  b, length, _ = qkv.shape
  width = column_width(head_dim)
  columns = heads * head_dim // width
  kernel = functools.partial(cached_attention_kernel, end=length, head_dim=head_dim, scale=scale,
                             operand_dtype=_operand_dtype(qkv.dtype))
  item = qkv.dtype.itemsize
  # The TPU compiler's cost model prices a kernel by this estimate (else at 0): q, k and v read
  # once, the result written once, and the MXU work over whole lane columns.
  cost = pl.CostEstimate(flops=int(kernel_flops(b, length, length, heads, head_dim)),
                         transcendentals=b * heads * length * length,
                         bytes_accessed=int(item * b * length * heads * head_dim * 4))
  block = (1, length, width)
  return pl.pallas_call(
      kernel,
      grid=(b, columns),
      in_specs=[pl.BlockSpec(block, lambda i, j, part=part: (i, 0, part * columns + j)) for part in range(3)],
      out_specs=pl.BlockSpec(block, lambda i, j: (i, 0, j)),
      out_shape=jax.ShapeDtypeStruct((b, length, heads * head_dim), qkv.dtype),
      interpret=interpreted(),
      name=KERNEL_NAME,
      cost_estimate=cost,
  )(qkv, qkv, qkv)


__all__ = ["KERNEL_NAME", "applies", "forward_only", "packed_attention"]
