"""The generator's teacher-forced block-causal attention as two lane-dense TPU kernels (Pallas):
forward, and one backward kernel for dq, dk and dv.

Splash attention (`ops/block_causal_attention.py`) takes q, k, v as (B, H, L, D) arrays: with
head_dim 64 every one of them, the output and their gradients are padded to 128 lanes in HBM, and
its softmax statistics go out as (B, H, L, 128) float32 (one value per row, repeated over the lanes)
and come back relaid out. For the d16 step at 24 images per v5p chip that was 9.3 GB of the kernels'
own traffic plus 2.1 GB of relayouts per step (docs/planning.md). These kernels read q, k, v where
the qkv projection leaves them, lane-dense (B, L, H x D), a 128-lane column (128 / D heads) per grid
step, as the sampler's `ops/cached_attention.py` does: for each head of the column the other heads'
lanes are masked to zero (a 128-wide contraction on the MXU, which pads head_dim 64 anyway). The
whole sequence is one tile (the released schedule's L is 286), so nothing is carried between grid
steps, and the backward kernel recomputes the probabilities instead of reading saved statistics
(keys by queries, so that dV and dK are plain products; dS is transposed on chip for dQ).

The arithmetic is `models.layers.heads_first_attention`'s: float32 logits and softmax, the masked
logits at -0.7 x float32's max, probabilities cast to v's dtype, float32 accumulation. Both kernels
declare a `pl.CostEstimate` (the TPU cost model prices a kernel at 0 without one).
"""
from __future__ import annotations

import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from imagefolder_jax.ops.masks import scale_begin_ends

LANES = 128
FORWARD_NAME = "lane_dense_attention_fwd"     # the compiled program's custom calls are named after these
BACKWARD_NAME = "lane_dense_attention_bwd"
# Whole sequences up to this long are one tile: the backward kernel keeps several (L, L) float32
# arrays per head on chip (Mosaic fits them in v5e's and v5p's scoped VMEM at 1216 tokens;
# tests/ops/test_lane_dense_attention.py compiles 1004). Longer sequences take splash, which tiles.
MAX_LENGTH = 1024
_MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)
_NT = (((1,), (1,)), ((), ()))   # x @ yᵀ
_NN = (((1,), (0,)), ((), ()))   # x @ y
# MXU products per head of a column in each kernel, each 2 x L x L x column-width FLOPs: the forward's
# QKᵀ and PV; the backward's KQᵀ, dV = Pᵀ·dO, dPᵀ, dK = dSᵀ·Q (keys by queries) and dQ = (dSᵀ)ᵀ·K.
PRODUCTS = {"fwd": 2, "bwd": 5}


def column_width(head_dim: int) -> int:
  """Lanes per grid step: 128 holding whole heads (head_dim 32/64/128), or one head of a multiple of 128."""
  return math.lcm(head_dim, LANES)


def supported(length: int, heads: int, head_dim: int) -> bool:
  """Whether a (B, length, heads, head_dim) attention fits these kernels: the whole sequence in one
  tile, and heads x head_dim whole columns of whole heads."""
  width = column_width(head_dim)
  return length <= MAX_LENGTH and width <= 4 * LANES and (heads * head_dim) % width == 0


def kernel_flops(kind: str, batch: int, length: int, heads: int, head_dim: int) -> float:
  """MXU FLOPs of one call of the `kind` kernel ('fwd' or 'bwd') over `batch` sequences: every
  product over whole columns (the other heads' lanes are zeros, not skipped) and every (query, key)
  pair, masked or not."""
  return 2.0 * PRODUCTS[kind] * length * length * column_width(head_dim) * heads * batch


def _visible(shape: tuple[int, int], query_axis: int, ends: tuple[int, ...]) -> jax.Array:
  """(L, L) bool over (queries, keys) when query_axis is 0, (keys, queries) when 1: key j is visible
  to query i iff j < the end of i's scale (block-causal: `ops.masks.block_causal_mask`)."""
  query = jax.lax.broadcasted_iota(jnp.int32, shape, query_axis)
  key = jax.lax.broadcasted_iota(jnp.int32, shape, 1 - query_axis)
  end = jnp.full(shape, ends[-1], jnp.int32)
  for e in reversed(ends[:-1]):
    end = jnp.where(query < e, e, end)
  return key < end


def _own_lanes(width: int, head: int, head_dim: int) -> jax.Array:
  lane = jax.lax.broadcasted_iota(jnp.int32, (1, width), 1)
  return (lane >= head * head_dim) & (lane < (head + 1) * head_dim)


def _softmax(logits: jax.Array, visible: jax.Array, axis: int) -> jax.Array:
  logits = jnp.where(visible, logits, _MASKED)
  weights = jnp.exp(logits - jnp.max(logits, axis=axis, keepdims=True))
  return weights / jnp.sum(weights, axis=axis, keepdims=True)


def forward_kernel(q_ref, k_ref, v_ref, o_ref, *, ends: tuple[int, ...], head_dim: int, scale: float):
  """One (sequence, lane column) step: refs (1, L, W) -> (1, L, W)."""
  q, k, v = q_ref[0], k_ref[0], v_ref[0]
  length, width = q.shape
  visible = _visible((length, length), 0, ends)
  out = jnp.zeros((length, width), jnp.float32)
  for h in range(width // head_dim):
    own = _own_lanes(width, h, head_dim)
    logits = jax.lax.dot_general(jnp.where(own, q, 0), k, _NT, preferred_element_type=jnp.float32)
    probs = _softmax(logits * jnp.float32(scale), visible, axis=1).astype(v.dtype)
    out = out + jnp.where(own, jax.lax.dot_general(probs, v, _NN, preferred_element_type=jnp.float32), 0.0)
  o_ref[0] = out.astype(o_ref.dtype)


def backward_kernel(q_ref, k_ref, v_ref, do_ref, dq_ref, dk_ref, dv_ref, *, ends: tuple[int, ...], head_dim: int,
                    scale: float):
  """One (sequence, lane column) step: refs q, k, v, dO (1, L, W) -> dq, dk, dv (1, L, W)."""
  q, k, v, do = q_ref[0], k_ref[0], v_ref[0], do_ref[0]
  length, width = q.shape
  by_key = _visible((length, length), 1, ends)
  dq = dk = dv = jnp.zeros((length, width), jnp.float32)
  scale = jnp.float32(scale)
  for h in range(width // head_dim):
    own = _own_lanes(width, h, head_dim)
    q_h, do_h = jnp.where(own, q, 0), jnp.where(own, do, 0)
    # Keys by queries: dV = Pᵀ dO and dK = dSᵀ Q are plain products.
    probs_t = _softmax(jax.lax.dot_general(k, q_h, _NT, preferred_element_type=jnp.float32) * scale, by_key, axis=0)
    dv = dv + jnp.where(own, jax.lax.dot_general(probs_t.astype(v.dtype), do, _NN,
                                                 preferred_element_type=jnp.float32), 0.0)
    dprobs_t = jax.lax.dot_general(v, do_h, _NT, preferred_element_type=jnp.float32)
    dlogits_t = probs_t * (dprobs_t - jnp.sum(probs_t * dprobs_t, axis=0, keepdims=True)) * scale
    dk = dk + jnp.where(own, jax.lax.dot_general(dlogits_t.astype(q.dtype), q, _NN,
                                                 preferred_element_type=jnp.float32), 0.0)
    # dQ = dS K, with dS transposed on chip.
    dq = dq + jnp.where(own, jax.lax.dot_general(dlogits_t.T.astype(k.dtype), k, _NN,
                                                 preferred_element_type=jnp.float32), 0.0)
  dq_ref[0], dk_ref[0], dv_ref[0] = dq.astype(dq_ref.dtype), dk.astype(dk_ref.dtype), dv.astype(dv_ref.dtype)


def _call(kernel, name: str, kind: str, inputs: Sequence[jax.Array], outputs: int, *, head_dim: int,
          interpret: bool):
  b, length, flat = inputs[0].shape
  width = column_width(head_dim)
  block = pl.BlockSpec((1, length, width), lambda i, j: (i, 0, j))
  item = inputs[0].dtype.itemsize
  heads = flat // head_dim
  # What the grid reads and writes (each block once) and its MXU work; exp per (query, key) pair.
  cost = pl.CostEstimate(flops=int(kernel_flops(kind, b, length, heads, head_dim)),
                         transcendentals=b * heads * length * length * (1 if kind == "fwd" else 2),
                         bytes_accessed=int(item * b * length * flat * (len(inputs) + outputs)))
  shape = jax.ShapeDtypeStruct(inputs[0].shape, inputs[0].dtype)
  return pl.pallas_call(
      kernel, grid=(b, flat // width), in_specs=[block] * len(inputs),
      out_specs=block if outputs == 1 else [block] * outputs,
      out_shape=shape if outputs == 1 else [shape] * outputs,
      interpret=interpret, name=name, cost_estimate=cost,
  )(*inputs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _attention(q, k, v, ends, head_dim, scale, interpret):
  kernel = functools.partial(forward_kernel, ends=ends, head_dim=head_dim, scale=scale)
  return _call(kernel, FORWARD_NAME, "fwd", (q, k, v), 1, head_dim=head_dim, interpret=interpret)


def _attention_fwd(q, k, v, ends, head_dim, scale, interpret):
  return _attention(q, k, v, ends, head_dim, scale, interpret), (q, k, v)


def _attention_bwd(ends, head_dim, scale, interpret, residuals, d_out):
  q, k, v = residuals
  kernel = functools.partial(backward_kernel, ends=ends, head_dim=head_dim, scale=scale)
  dq, dk, dv = _call(kernel, BACKWARD_NAME, "bwd", (q, k, v, d_out.astype(q.dtype)), 3, head_dim=head_dim,
                     interpret=interpret)
  return dq, dk, dv


_attention.defvjp(_attention_fwd, _attention_bwd)


def lane_dense_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, scales: Sequence[int], head_dim: int,
                         scale: float, interpret: bool = False) -> jax.Array:
  """Softmax attention under the block-causal mask of `scales` over whole sequences, lane-dense.

  q/k/v: (B, L, H x D) with L = sum(s² for s in scales), heads of `head_dim` side by side; `scale`
  multiplies the logits. Returns (B, L, H x D) in q's dtype. Differentiable (the backward kernel).
  Runs the kernels over the arrays it is given: under a mesh the caller wraps it in shard_map.
  """
  b, length, flat = q.shape
  if k.shape != q.shape or v.shape != q.shape or length != sum(s * s for s in scales):
    raise ValueError(f"lane_dense_attention: q {q.shape}, k {k.shape}, v {v.shape} do not match scales {tuple(scales)}")
  if flat % head_dim or not supported(length, flat // head_dim, head_dim):
    raise ValueError(f"lane_dense_attention: {flat / head_dim:g} heads of {head_dim} over {length} tokens do not make "
                     f"whole {column_width(head_dim)}-lane columns of at most {MAX_LENGTH} tokens")
  ends = tuple(end for _, end in scale_begin_ends(scales))
  return _attention(q, k, v, ends, int(head_dim), float(scale), bool(interpret))


__all__ = ["BACKWARD_NAME", "FORWARD_NAME", "LANES", "MAX_LENGTH", "PRODUCTS", "backward_kernel", "column_width",
           "forward_kernel", "kernel_flops", "lane_dense_attention", "supported"]
