"""The generator's teacher-forced attention as one fused TPU kernel (Pallas splash attention).

XLA's attention writes the float32 score matrix (B, H, L, L) and its gradient to HBM between fusions:
for the d16 generator at 24 images per v5p chip that is over half of the step's HBM traffic, and the
step is memory-bound (docs/planning.md). Splash attention keeps each (query tile, key tile) of
scores on chip, runs online softmax over the key tiles, and skips the tiles the block-causal mask
removes entirely (a query sees every token of its own scale and of earlier ones: `ops/masks.py`).
Up to MAX_QUERY_TILE tokens the queries are one unpadded tile and only the keys are padded to whole
128-key tiles (`tiling`): padding the queries too grew the d16 step's HBM traffic by 7%.

Where a device's heads make whole 128-lane columns and the sequence fits one tile
(`lane_dense_attention.supported`: the released models), `block_causal_attention` runs the
lane-dense kernels of `ops/lane_dense_attention.py` instead, which read q, k, v without splash's
head-first relayout and head_dim padding; splash attention serves the other shapes.

Used by `models/generator.py` when the program is compiled for TPUs (`ops.platform.target_platform`,
so `plan --topology v5p-64` on a CPU machine compiles it too), except the generations where XLA's
attention compiled to less HBM traffic (`XLA_ATTENTION_KINDS`); elsewhere XLA's attention runs.
Within `kernel_interpreted()` Pallas's interpreter runs the kernel on any backend: that is how the
tests check it against XLA's attention on CPU.

Under a mesh with logical rules (training), the kernel runs per device inside `shard_map`, over the
batch shards and head shards of the activations; the sequence and head_dim axes must be whole.
"""
from __future__ import annotations

import concurrent.futures
import contextvars
import functools
import math
from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from imagefolder_jax.ops import lane_dense_attention
from imagefolder_jax.ops.masks import block_causal_mask
from imagefolder_jax.ops.platform import set_within, target_device_kind, target_platform

BLOCK = 128  # tile side (queries and keys): the MXU's width on v4/v5, and the sequence padding unit
_INTERPRET: contextvars.ContextVar[bool] = contextvars.ContextVar("imagefolder_jax_splash_interpret", default=False)


def kernel_interpreted():
  """Within the block (a context manager), `block_causal_attention` runs the kernel in Pallas's
  interpreter, on any backend (to check its numerics on CPU; far slower than XLA's attention)."""
  return set_within(_INTERPRET, True)


def interpreted() -> bool:
  """Whether `kernel_interpreted` is in effect."""
  return _INTERPRET.get()


_XLA: contextvars.ContextVar[bool] = contextvars.ContextVar("imagefolder_jax_xla_attention", default=False)


def xla_attention(enabled: bool = True):
  """Within the block (a context manager; when `enabled`), programs traced for TPUs keep XLA's
  attention (`train.attention_kernel='xla'`)."""
  return set_within(_XLA, enabled)


def xla_forced() -> bool:
  """Whether `xla_attention()` is in effect."""
  return _XLA.get()


# TPU generations where XLA's own attention compiled to fewer HBM bytes than splash attention: on a
# v6e-64 the d16 step at 12 images per chip moved 64.6 GB per chip with XLA's attention against 72.3 GB
# with splash (43 against 47 ms by the roofline), while on v5p (24 and 12 per chip) and v5e splash
# moved less. The lane-dense kernels moved less than both on each (55.9 GB on the v6e-64;
# docs/planning.md), so these generations keep XLA's attention only for the shapes those do not take.
XLA_ATTENTION_KINDS = ("TPU v6",)


def applies(shape: Optional[Sequence[int]] = None) -> bool:
  """Whether the program being traced takes a fused kernel for a (B, L, H, D) attention of `shape`
  (under the mesh and logical rules in effect): compiled for TPUs outside `xla_attention()`, or
  interpreted; on `XLA_ATTENTION_KINDS` only where the lane-dense kernels take the shape (None: a
  shape they do not take)."""
  if interpreted():
    return True
  if xla_forced() or target_platform() != "tpu":
    return False
  if shape is not None and _lane_dense(shape):
    return True
  return not (target_device_kind() or "").startswith(XLA_ATTENTION_KINDS)


def _lane_dense(shape: Sequence[int]) -> bool:
  """Whether `block_causal_attention` runs a (B, L, H, D) attention through `ops.lane_dense_attention`:
  each device's heads (H over the mesh axes the rules give heads) make whole columns."""
  spec = _activation_spec(shape)
  heads = shape[2] // _axes_size(spec[2] if spec is not None and len(spec) > 2 else None)
  return lane_dense_attention.supported(shape[1], heads, shape[3])


# Sequences up to this long are one query tile (unpadded: the queries, outputs and their gradients
# keep length L); longer ones are cut into BLOCK-query tiles, so the mask can skip whole tiles.
MAX_QUERY_TILE = 1024


def padded_length(length: int, block: int = BLOCK) -> int:
  """`length` rounded up to whole tiles."""
  return -(-length // block) * block


def tiling(length: int) -> tuple[int, int, int]:
  """(query length Lq, key length Lk, query tile) of the kernel for a sequence of `length`: keys
  padded to whole BLOCK tiles; queries one unpadded tile up to MAX_QUERY_TILE, else padded too."""
  if length <= MAX_QUERY_TILE:
    return length, padded_length(length), length
  return padded_length(length), padded_length(length), BLOCK


def padded_mask(scales: Sequence[int]) -> np.ndarray:
  """(Lq, Lk) bool: the block-causal mask of `scales` on the kernel's padded lengths (`tiling`). No
  real query sees a padding key; a padding query sees only its own position (a row with no key
  would divide by zero)."""
  mask = block_causal_mask(scales)
  length = mask.shape[0]
  lq, lk, _ = tiling(length)
  full = np.eye(lq, lk, dtype=bool)
  full[:length, :length] = mask
  return full


# FLOPs per (query, key) pair and head_dim unit of each kernel: the forward's QKᵀ and PV; the dq
# kernel recomputes QKᵀ, then dP = dO·Vᵀ and dQ = dS·K; the dkv kernel recomputes QKᵀ and dP and
# adds dV = Pᵀ·dO and dK = dSᵀ·Q.
KERNEL_PAIR_FLOPS = {"fwd": 4.0, "dq": 6.0, "dkv": 8.0}


def computed_pairs(scales: Sequence[int]) -> int:
  """(query, key) pairs the kernel computes per sequence and head: all pairs of every (query tile,
  BLOCK keys) tile that the mask does not remove entirely."""
  mask = padded_mask(scales)
  lq, lk = mask.shape
  tile = tiling(sum(s * s for s in scales))[2]
  tiles = mask.reshape(lq // tile, tile, lk // BLOCK, BLOCK).any(axis=(1, 3)).sum()
  return int(tiles) * tile * BLOCK


def kernel_flops(kind: str, scales: Sequence[int], batch: int, heads: int, head_dim: int) -> float:
  """FLOPs one call of the `kind` kernel ('fwd', 'dq' or 'dkv') executes over `batch` sequences of
  `heads` heads: every pair of each computed tile, masked or not. The TPU compiler's cost model
  cannot see into a kernel, so `planning` adds these to its count."""
  return KERNEL_PAIR_FLOPS[kind] * head_dim * computed_pairs(scales) * batch * heads


def _kernel(scales: tuple[int, ...], heads: int, interpret: bool):
  return _cached_kernel(scales, heads, interpret, tiling(sum(s * s for s in scales))[2])


@functools.lru_cache(maxsize=None)
def _cached_kernel(scales: tuple[int, ...], heads: int, interpret: bool, tile: int):
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask
  blocks = splash.BlockSizes(block_q=tile, block_kv=BLOCK, block_kv_compute=BLOCK, block_q_dkv=tile,
                             block_kv_dkv=BLOCK, block_kv_dkv_compute=BLOCK, block_q_dq=tile, block_kv_dq=BLOCK)
  mask = splash_mask.NumpyMask(padded_mask(scales))
  make = functools.partial(splash.make_splash_mha, splash_mask.MultiHeadMask([mask] * heads), block_sizes=blocks,
                           head_shards=1, q_seq_shards=1, interpret=interpret)
  # The kernel is cached across traces, so its mask tables must be concrete arrays: made in a thread
  # of its own, outside the caller's trace (e.g. `jax.make_jaxpr`) and mesh, which are per thread.
  with concurrent.futures.ThreadPoolExecutor(1) as pool:
    return pool.submit(make).result()


def _local_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, scales: tuple[int, ...], scale: float,
                     interpret: bool) -> jax.Array:
  """The kernel over whole sequences of one device's shard. q/k/v: (b, L, h, D) -> (b, L, h, D)."""
  length = q.shape[1]
  lq, lk, _ = tiling(length)

  def heads_first(x, padded):  # (b, L, h, D) -> (b, h, padded, D): the kernel's layout
    return jnp.swapaxes(jnp.pad(x, ((0, 0), (0, padded - length), (0, 0), (0, 0))), 1, 2)

  kernel = _kernel(scales, q.shape[2], interpret)
  if scale != 1.0:  # the kernel has no logit scale; the l2-normalised generator's is 1
    q = q * jnp.asarray(scale, q.dtype)
  out = jax.vmap(kernel)(heads_first(q, lq), heads_first(k, lk), heads_first(v, lk))
  return jnp.swapaxes(out[:, :, :length], 1, 2).astype(q.dtype)


def _local_lane_dense(q: jax.Array, k: jax.Array, v: jax.Array, *, scales: tuple[int, ...], scale: float,
                      interpret: bool) -> jax.Array:
  """`ops.lane_dense_attention` over one device's shard. q/k/v: (b, L, h, D) -> (b, L, h, D)."""
  b, length, heads, head_dim = q.shape
  flat = lambda x: x.reshape(b, length, heads * head_dim)
  out = lane_dense_attention.lane_dense_attention(flat(q), flat(k), flat(v), scales=scales, head_dim=head_dim,
                                                  scale=scale, interpret=interpret)
  return out.reshape(q.shape)


def _axes_size(axes) -> int:
  """Devices along the mesh axes of one PartitionSpec entry (None, a name or a tuple of names)."""
  if axes is None:
    return 1
  shape = dict(jax.sharding.get_abstract_mesh().shape)
  return math.prod(shape[a] for a in ((axes,) if isinstance(axes, str) else axes))


def block_causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, scales: Sequence[int],
                           scale: float) -> jax.Array:
  """Softmax attention under the block-causal mask of `scales`, as `models.layers.attention` with
  `mask=block_causal_mask(scales)` computes it (float32 logits and softmax, probabilities in v's
  dtype), in one fused kernel.

  q/k/v: (B, L, H, D) with L = sum(s² for s in scales); `scale` multiplies the logits.
  Returns (B, L, H, D) in q's dtype.
  """
  scales = tuple(int(s) for s in scales)
  if q.shape[1] != sum(s * s for s in scales):
    raise ValueError(f"block_causal_attention: sequence length {q.shape[1]} is not that of scales {scales}")
  spec = _activation_spec(q.shape)
  if _lane_dense(q.shape):
    local = functools.partial(_local_lane_dense, scales=scales, scale=scale, interpret=interpreted())
  else:
    local = functools.partial(_local_attention, scales=scales, scale=scale, interpret=interpreted())
  if spec is None:
    return local(q, k, v)
  return jax.shard_map(local, in_specs=(spec,) * 3, out_specs=spec, check_vma=False)(q, k, v)


def _activation_spec(shape: Sequence[int]) -> Optional[jax.sharding.PartitionSpec]:
  """The mesh PartitionSpec of a (B, L, H, D) activation under the logical rules in effect, or None
  when no mesh and rules are set (then the kernel sees the whole array)."""
  rules = nn.get_logical_axis_rules()
  mesh = jax.sharding.get_abstract_mesh()
  if not rules or mesh.empty:
    return None
  from imagefolder_jax.parallel import fit_spec
  spec = fit_spec(dict(mesh.shape), nn.logical_to_mesh_axes(("batch", "length", "heads", "head_dim"), rules), shape)
  if spec[1] is not None or (len(spec) > 3 and spec[3] is not None):
    raise ValueError(f"block_causal_attention needs whole sequences and head vectors per device; the rules "
                     f"shard (B, L, H, D) as {spec}")
  return spec


__all__ = ["BLOCK", "KERNEL_PAIR_FLOPS", "MAX_QUERY_TILE", "XLA_ATTENTION_KINDS", "applies", "block_causal_attention",
           "computed_pairs", "interpreted", "kernel_flops", "kernel_interpreted", "padded_length", "padded_mask",
           "tiling", "xla_attention", "xla_forced"]
