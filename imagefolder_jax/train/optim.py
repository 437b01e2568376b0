"""Optimizers and schedules: AdamW with warm-up + cosine/linear decay, clipping, masks, weight EMA."""
from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import optax

SCHEDULES = ("cosine", "linear", "constant")


def learning_rate_schedule(peak: float, total_steps: int, warmup_steps: int, kind: str = "cosine",
                           end_factor: float = 0.0) -> optax.Schedule:
  """Linear warm-up from 0 to `peak` over `warmup_steps`, then cosine/linear decay to `end_factor * peak`."""
  if kind not in SCHEDULES:
    raise ValueError(f"schedule must be one of {SCHEDULES}, got {kind!r}")
  if peak < 0 or total_steps < 1 or warmup_steps < 0:
    raise ValueError(f"bad schedule: peak={peak}, total_steps={total_steps}, warmup_steps={warmup_steps}")
  warmup_steps = min(warmup_steps, total_steps)
  decay_steps = max(total_steps - warmup_steps, 1)
  if kind == "cosine":
    decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=end_factor)
  elif kind == "linear":
    decay = optax.linear_schedule(peak, peak * end_factor, decay_steps)
  else:
    decay = optax.constant_schedule(peak)
  if warmup_steps == 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup_steps), decay], [warmup_steps])


def decay_mask(params: Any) -> Any:
  """True for weight matrices/kernels (ndim >= 2) except embeddings and tokens: no decay on 1-D,
  biases, norms, scales, embedding tables, position tables (the VAR recipe)."""
  def keep(path, leaf):
    names = [getattr(p, "key", str(p)) for p in path]
    if jnp.ndim(leaf) < 2:
      return False
    return not any(n in ("embedding", "pos_embed", "cls_token", "mask_token", "latent_tokens", "pos_start",
                         "pos_1LC") for n in names)
  return jax.tree_util.tree_map_with_path(keep, params)


def adamw(schedule: optax.Schedule, *, b1: float = 0.9, b2: float = 0.95, weight_decay: float = 0.0,
          clip_norm: Optional[float] = None, trainable: Optional[Callable[[Any], Any]] = None
          ) -> optax.GradientTransformation:
  """AdamW (decay masked by `decay_mask`), optional global-norm clipping, optional frozen leaves.

  trainable: function params -> bool tree; False leaves get zero updates and no optimizer state.
  """
  chain = []
  if clip_norm:
    chain.append(optax.clip_by_global_norm(clip_norm))
  chain.append(optax.adamw(schedule, b1=b1, b2=b2, weight_decay=weight_decay, mask=decay_mask))
  tx = optax.chain(*chain)
  if trainable is not None:
    tx = optax.multi_transform({True: tx, False: optax.set_to_zero()},
                               lambda p: trainable(p))
  return tx


def ema_update(ema: Any, params: Any, decay: float | jax.Array) -> Any:
  """ema <- decay * ema + (1 - decay) * params (leaf-wise, in the EMA's dtype)."""
  return jax.tree.map(lambda e, p: (decay * e + (1.0 - decay) * p.astype(e.dtype)).astype(e.dtype), ema, params)


def all_finite(tree: Any) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def select_tree(pred: jax.Array, on_true: Any, on_false: Any) -> Any:
  """Leaf-wise `where(pred, a, b)`: keeps the old state when a step is skipped."""
  return jax.tree.map(lambda a, b: jnp.where(pred, a, b), on_true, on_false)
