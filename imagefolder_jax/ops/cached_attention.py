"""The sampler's attention over its KV cache as one fused TPU kernel (Pallas).

While sampling, scale s's queries (positions [begin, end)) attend to every cached position < end:
no mask inside that prefix. XLA's attention reads the lane-dense cache (B, L, H * D), copies the
prefix to heads first (B, H, end, D) for every scale and block, and writes the float32 scores
(B, H, l, end) to HBM between its fusions; for the d16 sampler at 256 samples per chip those were the
largest parts of its HBM traffic (docs/planning.md). This kernel reads the cache where it lies, a
128-lane column (128 / D heads) at a time, and keeps the scores on chip: per grid step (sample,
lane column) it loads the queries (l, 128) and the prefix's keys and values (end, 128) into VMEM,
and for each head of the column masks the other heads' lanes (a 128-wide contraction on the MXU, as
XLA pads head_dim 64 anyway) instead of slicing lanes.

The arithmetic is `models.layers.heads_first_attention`'s: float32 logits and softmax,
probabilities cast to the values' dtype, float32 accumulation.

Used by `models/generator.py` for cached decoding (`applies`): when the program is compiled for
TPUs (any generation: the sampler's XLA attention relays the prefix out on each of them) outside
`block_causal_attention.xla_attention()`, in bfloat16 or float16, with the cache's minor axis whole
128-lane columns of whole heads (`supported`); elsewhere XLA's attention runs. Within
`block_causal_attention.kernel_interpreted()` Pallas's interpreter runs it on any backend (tests).
Under a mesh (`jax.set_mesh` / `use_abstract_mesh`, as `inference.sampling.make_sampler` sets), the
kernel runs per device inside `shard_map` over the batch shards.
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from imagefolder_jax.ops.block_causal_attention import interpreted, xla_forced
from imagefolder_jax.ops.platform import target_platform

LANES = 128  # the TPU's vector lane count: the kernel's column width
KERNEL_NAME = "cached_attention"  # the compiled program's custom calls are named after it


def column_width(head_dim: int) -> int:
  """Lanes per grid step: 128 holding whole heads (head_dim 32/64/128), or one head of a multiple of 128."""
  return math.lcm(head_dim, LANES)


def supported(heads: int, head_dim: int) -> bool:
  """Whether the cache's minor axis (heads x head_dim) splits into whole columns of whole heads."""
  width = column_width(head_dim)
  return width <= 4 * LANES and (heads * head_dim) % width == 0


def applies(dtype, heads: int, head_dim: int) -> bool:
  """Whether cached decoding of this program takes the kernel (see the module docstring)."""
  if not supported(heads, head_dim) or jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
    return False
  return interpreted() or (target_platform() == "tpu" and not xla_forced())


def kernel_flops(batch: int, queries: int, keys: int, heads: int, head_dim: int) -> float:
  """FLOPs the kernel executes for one call: per head of a column, QKᵀ and PV over the whole column
  (the other heads' lanes masked to zero): 4 x column width x queries x keys per head."""
  return 4.0 * column_width(head_dim) * queries * keys * batch * heads


def cached_attention_kernel(q_ref, k_ref, v_ref, *refs, end: int, head_dim: int, scale: float,
                            operand_dtype=None, l2_norm: bool = False, fresh: bool = False):
  """One (sample, lane column) step: refs (1, l, W), (1, keys, W), (1, keys, W), [fresh keys and values
  (1, l', W) x 2], [head scales (1, W)] -> (1, l, W).
  operand_dtype: the MXU operands' dtype (q, k, v and the probabilities cast to it; None: the inputs').
  l2_norm: each head's q and k are l2-normalized first, in float32, and q multiplied by its head's
    scale (a lane vector: the scale of the head each lane belongs to), as `models.generator`'s
    attention does before it casts them back to their dtype.
  fresh: the queries also attend to l' keys after the first `end` cached rows, given apart (one
    softmax over both)."""
  refs = list(refs)
  fresh_refs = (refs.pop(0), refs.pop(0)) if fresh else ()
  scale_ref, o_ref = refs if l2_norm else (None, *refs)
  q = q_ref[0]                                                  # (l, W)
  key_sets = [(k_ref[0], v_ref[0])] + ([(fresh_refs[0][0], fresh_refs[1][0])] if fresh else [])  # (Lk, W) pairs
  if operand_dtype is not None:
    q = q.astype(operand_dtype)
    key_sets = [(k.astype(operand_dtype), v.astype(operand_dtype)) for k, v in key_sets]
  width = q.shape[-1]
  lane = jax.lax.broadcasted_iota(jnp.int32, (1, width), 1)
  out = jnp.zeros(o_ref.shape[1:], jnp.float32)
  for h in range(width // head_dim):
    own = (lane >= h * head_dim) & (lane < (h + 1) * head_dim)
    if l2_norm:
      qh = (_l2_normalized(jnp.where(own, q.astype(jnp.float32), 0.0)) * scale_ref[...]).astype(q.dtype)
      keys = [_l2_normalized(jnp.where(own, k.astype(jnp.float32), 0.0)).astype(k.dtype) for k, _ in key_sets]
    else:
      qh, keys = jnp.where(own, q, jnp.zeros_like(q)), [k for k, _ in key_sets]
    logits = [jax.lax.dot_general(qh, kh, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
              * jnp.float32(scale) for kh in keys]
    cached_rows = key_sets[0][0].shape[0]
    if cached_rows > end:  # the rows past `end` of a block rounded up to 8 are not this scale's keys
      key = jax.lax.broadcasted_iota(jnp.int32, (1, cached_rows), 1)
      logits[0] = jnp.where(key < end, logits[0], -jnp.inf)
    top = functools.reduce(jnp.maximum, [jnp.max(x, axis=-1, keepdims=True) for x in logits])
    weights = [jnp.exp(x - top) for x in logits]
    total = functools.reduce(jnp.add, [jnp.sum(w, axis=-1, keepdims=True) for w in weights])
    pv = functools.reduce(jnp.add, [jax.lax.dot_general((w / total).astype(v.dtype), v, (((1,), (0,)), ((), ())),
                                                        preferred_element_type=jnp.float32)
                                    for w, (_, v) in zip(weights, key_sets)])
    out = out + jnp.where(own, pv, 0.0)
  o_ref[0] = out.astype(o_ref.dtype)


def _l2_normalized(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  """Rows of x (zero outside one head's lanes) / max(their norm, eps): `models.generator.l2_normalize`."""
  return x / jnp.maximum(jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True)), eps)


def cached_attention(q: jax.Array, cache_k: jax.Array, cache_v: jax.Array, *, end: int, head_dim: int,
                     scale: float, head_scale: Optional[jax.Array] = None, fresh_k: Optional[jax.Array] = None,
                     fresh_v: Optional[jax.Array] = None) -> jax.Array:
  """Softmax attention of queries over cached positions [0, end) (no mask), lane-dense.

  q: (B, l, H * D); cache_k, cache_v: (B, L, H * D) with positions < end filled (end <= L, static).
  `scale` multiplies the logits. head_scale: optional (H,) float32; then q and the cached k are
  l2-normalized per head inside the kernel (float32, cast back to their dtype) and q multiplied by
  its head's scale (the generator's `attn_l2_norm`; the cache holds k before the normalization).
  fresh_k, fresh_v: optional (B, l', H * D) keys and values of positions [end, end + l'), not
  written to the cache (the sampler's last scale, which no later scale reads); then end may be 0.
  Returns (B, l, H * D) in q's dtype.
  """
  b, l, flat = q.shape
  length = cache_k.shape[1]
  fresh = fresh_k is not None or fresh_v is not None
  if fresh and (fresh_k is None or fresh_v is None or fresh_k.shape != fresh_v.shape
                or fresh_k.shape[::2] != (b, flat) or fresh_k.dtype != cache_k.dtype):
    raise ValueError(f"cached_attention: fresh keys {getattr(fresh_k, 'shape', None)} and values "
                     f"{getattr(fresh_v, 'shape', None)} do not match queries {q.shape} and cache {cache_k.shape}")
  if not (0 if fresh else 1) <= end <= length or cache_k.shape != cache_v.shape or cache_k.shape[::2] != (b, flat):
    raise ValueError(f"cached_attention: queries {q.shape} and cache {cache_k.shape} / {cache_v.shape} "
                     f"with end={end} do not match")
  if not supported(flat // head_dim, head_dim):
    raise ValueError(f"cached_attention: {flat // head_dim} heads of {head_dim} do not make whole "
                     f"{column_width(head_dim)}-lane columns")
  if fresh and end == 0:   # nothing cached before them: the fresh keys are the whole prefix
    cache_k, cache_v, end, fresh = fresh_k, fresh_v, fresh_k.shape[1], False
    length = end
  keys = min(-(-end // 8) * 8, length)  # a block's second-minor side: a multiple of 8, or the whole axis
  operands = (q, cache_k, cache_v) + ((fresh_k, fresh_v) if fresh else ())
  if head_scale is not None:
    if head_scale.shape != (flat // head_dim,):
      raise ValueError(f"cached_attention: head_scale {head_scale.shape} is not one scale per head "
                       f"({flat // head_dim},)")
    # One float32 lane vector: each lane holds the scale of its head.
    operands += (jnp.repeat(head_scale.astype(jnp.float32), head_dim)[None],)
  local = functools.partial(_call, end=end, head_dim=head_dim, scale=float(scale), keys=keys, fresh=fresh,
                            l2_norm=head_scale is not None)
  from imagefolder_jax.parallel import traced_batch_spec
  spec = traced_batch_spec(q.shape)
  if spec is None:
    return local(*operands)
  # A custom call is not partitioned: without shard_map XLA would gather the whole cache on every chip.
  in_specs = (spec,) * (5 if fresh else 3) + ((jax.P(),) if head_scale is not None else ())
  return jax.shard_map(local, in_specs=in_specs, out_specs=spec, check_vma=False)(*operands)


def _call(q: jax.Array, cache_k: jax.Array, cache_v: jax.Array, *rest: jax.Array, end: int, head_dim: int,
          scale: float, keys: int, fresh: bool, l2_norm: bool) -> jax.Array:
  """The kernel over the whole batch it is given (one device's shard under shard_map): a grid of
  (sample, lane column) steps, each with the column's queries (l, W), first `keys` cached rows and,
  when `fresh`, the fresh keys and values (l', W); rest: [fresh_k, fresh_v], [head scales (1, W)]."""
  b, l, flat = q.shape
  width = column_width(head_dim)
  fresh_rows = rest[0].shape[1] if fresh else 0
  kernel = functools.partial(cached_attention_kernel, end=end, head_dim=head_dim, scale=scale, l2_norm=l2_norm,
                             fresh=fresh)
  heads, item = flat // head_dim, q.dtype.itemsize
  # The TPU compiler's cost model prices a kernel by this estimate (else at 0): what the grid reads
  # (queries, and `keys` rows of each cache and the fresh rows per sample) and writes, and the MXU work.
  attended = keys + fresh_rows
  cost = pl.CostEstimate(flops=int(kernel_flops(b, l, attended, heads, head_dim)),
                         transcendentals=b * heads * l * attended,
                         bytes_accessed=int(item * b * flat * (2 * l + 2 * attended)))
  rows = lambda n: pl.BlockSpec((1, n, width), lambda i, j: (i, 0, j))
  return pl.pallas_call(
      kernel,
      grid=(b, flat // width),
      in_specs=[rows(l), rows(keys), rows(keys)] + [rows(fresh_rows)] * (2 if fresh else 0)
               + ([pl.BlockSpec((1, width), lambda i, j: (0, j))] if l2_norm else []),
      out_specs=rows(l),
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      interpret=interpreted(),
      name=KERNEL_NAME,
      cost_estimate=cost,
  )(q, cache_k, cache_v, *rest)


__all__ = ["KERNEL_NAME", "LANES", "applies", "cached_attention", "cached_attention_kernel", "column_width",
           "kernel_flops", "supported"]
