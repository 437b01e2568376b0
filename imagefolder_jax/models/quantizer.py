"""Multi-scale residual quantizer (VAR-style) of one ImageFolder branch (paper §3.1, docs/design.md §2).

Per scale s with side n_s, on a latent `f: (B, n, n, Cq)` (n = last scale):
  r   = area_downsample(f_rest, n_s)                (the last scale uses f_rest as is)
  id  = argmax_v cos(r, codebook_v)                 (cosine look-up, first index on ties)
  h   = codebook[id]                                (raw, un-normalised rows)
  h   = phi_k(bicubic_upsample(h, n))               (PyTorch bicubic a=-0.75; phi_k = 0.5 h + 0.5 conv3x3(h))
  f_hat += h * active_s;  f_rest -= h

Quantization always runs in float32. Two codebook-update modes:
  * 'ema' (default): the codebook lives in the non-trainable collection 'codebook' with EMA cluster
    sizes and sums; it is refreshed from the batch assignments of every scale during training
    (global-batch statistics, so data-parallel replicas stay identical under jit), and codes whose
    EMA cluster size falls below `dead_code_threshold` restart from random batch residuals.
  * 'gradient' (official): the codebook is a parameter trained by the vq loss.
Per-scale usage counters (the official `ema_vocab_hit_SV`) live in the 'quantizer_stats' collection.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from imagefolder_jax.models.layers import partitioned
from imagefolder_jax.ops.resample import area_downsample, bicubic_upsample

CODEBOOK_UPDATES = ("ema", "gradient")


@dataclasses.dataclass(frozen=True)
class QuantizerConfig:
  """One branch's quantizer.

  Attributes:
    codebook_size: V, entries per codebook.
    latent_dim: Cq, channels of the quantized latent.
    scales: side of each scale's token grid; the last one is the latent grid side.
    num_phi: number of phi convs shared over scales (official `share_quant_resi`).
    phi_ratio: phi(h) = (1 - r) h + r conv3x3(h) (official `quant_resi`).
    beta: commitment weight.
    codebook_update: 'ema' or 'gradient'.
    ema_decay: EMA decay of cluster sizes/sums ('ema' mode).
    dead_code_threshold: codes whose EMA cluster size (expected hits per step) falls below this
      restart from batch residuals ('ema' mode); 0 disables restarts after the first update (which
      always initialises every code from batch residuals).
    ema_epsilon: Laplace smoothing of cluster sizes.
  """
  codebook_size: int = 4096
  latent_dim: int = 32
  scales: tuple[int, ...] = (1, 1, 2, 3, 3, 4, 5, 6, 8, 11)
  num_phi: int = 4
  phi_ratio: float = 0.5
  beta: float = 0.25
  codebook_update: str = "ema"
  ema_decay: float = 0.99
  dead_code_threshold: float = 0.01
  ema_epsilon: float = 1e-5

  def validate(self) -> None:
    if self.codebook_update not in CODEBOOK_UPDATES:
      raise ValueError(f"codebook_update must be one of {CODEBOOK_UPDATES}, got {self.codebook_update!r}")
    if not self.scales or any(s < 1 for s in self.scales):
      raise ValueError(f"scales must be positive ints, got {self.scales}")
    if max(self.scales) != self.scales[-1]:
      raise ValueError(f"the last scale must be the largest (the latent grid), got {self.scales}")
    if self.num_phi < 1:
      raise ValueError(f"num_phi must be >= 1, got {self.num_phi}")

  @property
  def grid(self) -> int:
    return self.scales[-1]

  @property
  def num_tokens(self) -> int:
    return sum(s * s for s in self.scales)

  @property
  def phi_index(self) -> tuple[int, ...]:
    return phi_index_per_scale(len(self.scales), self.num_phi)


def phi_index_per_scale(num_scales: int, num_phi: int) -> tuple[int, ...]:
  """Which phi conv each scale uses: argmin |ticks - s/(S-1)|, ticks = linspace(1/3K, 1-1/3K, K).

  Computed in float64 as the official code does: scales lying exactly between two ticks are decided
  by float rounding ([0,0,1,1,1,2,2,3,3,3] for 10 scales and 4 convs).
  """
  ticks = np.linspace(1 / 3 / num_phi, 1 - 1 / 3 / num_phi, num_phi)
  denom = max(num_scales - 1, 1)
  return tuple(int(np.argmin(np.abs(ticks - s / denom))) for s in range(num_scales))


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-12) -> jax.Array:
  """x / max(||x||, eps), as torch.nn.functional.normalize."""
  norm = jnp.sqrt(jnp.sum(x * x, axis=axis, keepdims=True))
  return x / jnp.maximum(norm, eps)


class Phi(nn.Module):
  """phi(h) = (1 - ratio) h + ratio conv3x3(h), on (B, n, n, Cq)."""
  ratio: float

  @nn.compact
  def __call__(self, h: jax.Array) -> jax.Array:
    conv = nn.Conv(h.shape[-1], (3, 3), padding=1, precision="highest", name="conv",
                   kernel_init=partitioned(nn.initializers.lecun_normal(), (None, None, "latent", "latent")),
                   bias_init=partitioned(nn.initializers.zeros, ("latent",)))
    return (1.0 - self.ratio) * h + self.ratio * conv(h)


class ResidualQuantizer(nn.Module):
  """Multi-scale residual quantizer of one branch. See the module docstring."""
  config: QuantizerConfig

  def setup(self):
    c = self.config
    c.validate()
    init = partitioned(_uniform_codebook_init, ("vocab", "latent"))
    shape = (c.codebook_size, c.latent_dim)
    if c.codebook_update == "gradient":
      self._codebook_param = self.param("embedding", init, shape)
    else:
      self._codebook_var = self.variable("codebook", "embedding",
                                         lambda: init(self.make_rng("params"), shape))
      self.cluster_size = self.variable("codebook", "cluster_size",
                                        lambda: jnp.ones((c.codebook_size,), jnp.float32))
      self.embed_sum = self.variable("codebook", "embed_sum",
                                     lambda: self._codebook_var.value.astype(jnp.float32))
      self.initialized = self.variable("codebook", "initialized", lambda: jnp.zeros((), jnp.bool_))
    self.usage = self.variable("quantizer_stats", "usage",
                               lambda: jnp.zeros((len(c.scales), c.codebook_size), jnp.float32))
    self.usage_steps = self.variable("quantizer_stats", "usage_steps", lambda: jnp.zeros((), jnp.int32))
    self.phis = [Phi(c.phi_ratio, name=f"phi_{k}") for k in range(c.num_phi)]

  @property
  def codebook(self) -> jax.Array:
    """(V, Cq) float32 raw codebook rows."""
    if self.config.codebook_update == "gradient":
      return self._codebook_param.astype(jnp.float32)
    return self._codebook_var.value.astype(jnp.float32)

  def lookup(self, residual: jax.Array, normed_codebook: Optional[jax.Array] = None) -> jax.Array:
    """Cosine nearest code. residual: (B, h, w, Cq) -> ids (B, h, w) int32."""
    if normed_codebook is None:
      normed_codebook = l2_normalize(self.codebook)
    sim = jnp.einsum("bhwc,vc->bhwv", l2_normalize(residual.astype(jnp.float32)), normed_codebook,
                     precision="highest")
    return jnp.argmax(sim, axis=-1).astype(jnp.int32)

  def embed_scale(self, scale_index: int, ids: jax.Array) -> jax.Array:
    """Contribution of one scale's ids to f_hat: phi(upsample(codebook[ids])).

    ids: (B, n_s, n_s) int -> (B, n, n, Cq) float32.
    """
    c = self.config
    h = jnp.take(self.codebook, ids, axis=0)
    h = bicubic_upsample(h, c.grid)
    return self.phis[c.phi_index[scale_index]](h)

  def ids_to_f_hat(self, ids: Sequence[jax.Array]) -> jax.Array:
    """Decode per-scale ids [(B, n_s, n_s)] (a prefix of the scales is allowed) -> f_hat (B, n, n, Cq)."""
    f_hat = 0.0
    for si, ids_s in enumerate(ids):
      f_hat = f_hat + self.embed_scale(si, ids_s)
    return f_hat

  def next_scale_inputs(self, ids: Sequence[jax.Array]) -> jax.Array:
    """Teacher-forcing inputs of the next-scale generator (official `idxBl_to_var_input`).

    ids: per-scale (B, n_s, n_s). Returns (B, L - n_0^2, Cq): for s = 0..S-2, the running f_hat
    area-downsampled to scale s+1's grid, flattened row-major and concatenated.
    """
    scales = self.config.scales
    f_hat = 0.0
    inputs = []
    for si in range(len(scales) - 1):
      f_hat = f_hat + self.embed_scale(si, ids[si])
      nxt = area_downsample(f_hat, scales[si + 1])
      inputs.append(nxt.reshape(nxt.shape[0], -1, nxt.shape[-1]))
    return jnp.concatenate(inputs, axis=1)

  def __call__(self, f: jax.Array, *, num_active_scales: Optional[jax.Array] = None,
               train: bool = False, update_codebook: bool = False) -> dict:
    """Quantizes a latent over all scales.

    Args:
      f: (B, n, n, Cq) continuous latent.
      num_active_scales: optional (B,) int; only scales s < num_active_scales[b] contribute to
        sample b's f_hat (quantizer dropout). The residual is still updated at every scale.
      train: record per-scale usage in 'quantizer_stats' (when that collection is mutable).
      update_codebook: in 'ema' mode, refresh the codebook from this batch (needs the 'codebook'
        collection mutable and an rng named 'codebook_restart').

    Returns a dict with
      f_hat: (B, n, n, Cq) straight-through output: sg(f_hat) - sg(f) + f.
      f_hat_raw: (B, n, n, Cq) f_hat itself (gradient reaches codebook/phi only in 'gradient' mode).
      ids: list over scales of (B, n_s, n_s) int32.
      vq_loss, commit_loss: scalars, mean over scales of mse(f_hat_s, sg f) and beta mse(sg f_hat_s, f).
      usage: (S,) fraction of codes hit at each scale in this batch.
      perplexity: (S,) exp(entropy) of each scale's code histogram in this batch.
    """
    c = self.config
    f = f.astype(jnp.float32)
    f_detached = jax.lax.stop_gradient(f)
    codebook = self.codebook
    normed_codebook = l2_normalize(codebook)
    b = f.shape[0]
    f_rest = f_detached
    f_hat = jnp.zeros_like(f)
    vq_loss = commit_loss = 0.0
    ids_per_scale, hits_per_scale = [], []
    sums = jnp.zeros_like(codebook)
    residuals = []
    for si, side in enumerate(c.scales):
      residual = area_downsample(f_rest, side) if si < len(c.scales) - 1 else f_rest
      ids = self.lookup(residual, normed_codebook)
      flat_ids = ids.reshape(-1)
      hits_per_scale.append(jnp.bincount(flat_ids, length=c.codebook_size).astype(jnp.float32))
      if c.codebook_update == "ema" and update_codebook:
        flat_residual = residual.reshape(-1, c.latent_dim)
        sums = sums + jax.ops.segment_sum(flat_residual, flat_ids, num_segments=c.codebook_size)
        residuals.append(flat_residual)
      h = self.embed_scale(si, ids)
      if num_active_scales is not None:
        active = (si < num_active_scales).astype(h.dtype).reshape(b, 1, 1, 1)
        f_hat = f_hat + h * active
      else:
        f_hat = f_hat + h
      # f_rest only feeds look-ups (argmax), so no gradient needs to flow through it.
      f_rest = f_rest - jax.lax.stop_gradient(h)
      ids_per_scale.append(ids)
      vq_loss = vq_loss + jnp.mean((f_hat - f_detached) ** 2)
      commit_loss = commit_loss + c.beta * jnp.mean((jax.lax.stop_gradient(f_hat) - f) ** 2)
    num_scales = len(c.scales)
    hits = jnp.stack(hits_per_scale)  # (S, V)
    if train and self.is_mutable_collection("quantizer_stats"):
      self._record_usage(hits)
    if c.codebook_update == "ema" and update_codebook and self.is_mutable_collection("codebook"):
      self._ema_update(hits.sum(0), sums, jnp.concatenate(residuals, axis=0))
    return dict(
        f_hat=jax.lax.stop_gradient(f_hat) - f_detached + f,
        f_hat_raw=f_hat,
        ids=ids_per_scale,
        vq_loss=vq_loss / num_scales,
        commit_loss=commit_loss / num_scales,
        usage=(hits > 0).mean(axis=-1),
        perplexity=_perplexity(hits),
    )

  def _record_usage(self, hits: jax.Array) -> None:
    # Official schedule: copy on the first step, EMA 0.9 for the next 99, then 0.99.
    steps = self.usage_steps.value
    decay = jnp.where(steps == 0, 0.0, jnp.where(steps < 100, 0.9, 0.99))
    self.usage.value = decay * self.usage.value + (1.0 - decay) * hits
    self.usage_steps.value = steps + 1

  def _ema_update(self, counts: jax.Array, sums: jax.Array, residuals: jax.Array) -> None:
    c = self.config
    decay = c.ema_decay
    cluster_size = decay * self.cluster_size.value + (1 - decay) * counts
    embed_sum = decay * self.embed_sum.value + (1 - decay) * sums
    total = cluster_size.sum()
    smoothed = (cluster_size + c.ema_epsilon) / (total + c.codebook_size * c.ema_epsilon) * total
    codebook = embed_sum / smoothed[:, None]
    # Data-dependent init: the first update restarts every code from batch residuals. Without it
    # the U(-1/V, 1/V) init makes f_hat ~ 0 and the commitment loss drags the latents to zero
    # before the EMA catches up (an absorbing state: a zero latent always picks code 0).
    dead = (cluster_size < c.dead_code_threshold) | ~self.initialized.value
    pick = jax.random.randint(self.make_rng("codebook_restart"), (c.codebook_size,), 0, residuals.shape[0])
    fresh = residuals[pick]
    codebook = jnp.where(dead[:, None], fresh, codebook)
    # A restarted code starts as a cluster of one hit at its new position.
    cluster_size = jnp.where(dead, 1.0, cluster_size)
    embed_sum = jnp.where(dead[:, None], fresh, embed_sum)
    self._codebook_var.value = codebook.astype(self._codebook_var.value.dtype)
    self.cluster_size.value = cluster_size
    self.embed_sum.value = embed_sum
    self.initialized.value = jnp.ones((), jnp.bool_)


def _perplexity(hits: jax.Array) -> jax.Array:
  p = hits / jnp.maximum(hits.sum(-1, keepdims=True), 1.0)
  return jnp.exp(-jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0), axis=-1))


def _uniform_codebook_init(key, shape, dtype=jnp.float32):
  """U(-1/V, 1/V), the official codebook initialisation."""
  return jax.random.uniform(key, shape, dtype, -1.0 / shape[0], 1.0 / shape[0])
