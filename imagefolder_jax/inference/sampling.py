"""The jitted batch sampler: next-scale generation with a KV cache, guidance and forcing (docs/design.md §3).

One compiled program samples a whole batch: the scales are unrolled (they are static), each scale
runs one cached forward of the generator on all of its positions at once, the P branches of every
position are filtered (top-k then top-p) and drawn independently, the drawn ids are embedded by the
tokenizer (phi(upsample(codebook[ids]))) into the running f_hat, and the next scale's input is the
area-downsampled f_hat. The final f_hat is decoded to pixels in the same program.

Classifier-free guidance (official `autoregressive_infer_cfg`): the batch is doubled with an
unconditional row beside each label's (official: [labels; unconditional], the same rows in another
order), and at scale s the logits are (1 + t) cond - t uncond, t = cfg s / (S - 1).
The head is affine, so the mix is taken on its input and the head runs on B rows, not 2B.

Randomness: one key per call; sample b gets `fold_in(key, indices[b])` (indices default to
0..B-1; pass global sample numbers when one run is split into batches, devices or processes) and
draws its uniforms from it, a few per (position, branch), all scales at once, so a sample's draws
depend only on (key, its index, settings), not on the batch size or on how the batch is sharded.
Each draw is inverse-CDF from the top-k distribution, redrawn when top-p removes it (exact top-p
fallback after `top_p_rounds` draws): the law of the official sampler.

Forcing (teacher-forced conditional generation, paper §4.3): `forced = {branch: [ids (B, n_s, n_s)
per scale]}` replaces the drawn ids of those branches (e.g. force the detail branch of a reference
image and sample the semantic branch).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp

from imagefolder_jax.models.generator import NextScaleGenerator, init_cache
from imagefolder_jax.models.tokenizer import ImageFolderTokenizer
from imagefolder_jax.ops import packed_attention
from imagefolder_jax.ops.filtering import compiler_options, sample_with_retries
from imagefolder_jax.ops.platform import compiling_for, platform_of
from imagefolder_jax.ops.resample import area_downsample

ForcedIds = Mapping[int, Sequence[jax.Array]]


@dataclasses.dataclass(frozen=True)
class SamplerSettings:
  """Static (compile-time) sampler settings. cfg and temperature are runtime arguments.

  Attributes:
    top_k: keep the k largest logits per branch (0 disables); static because it fixes shapes.
    top_p: nucleus mass on the top-k-filtered logits (<= 0 or >= 1 disables).
    guidance: run the doubled [cond; uncond] batch (needed for cfg > 0).
    return_logits: also return the guided logits (B, L, P, V) float32 (tests, analysis).
    decode: decode the final f_hat to pixels.
    top_p_rounds: draws per (position, branch) from the top-k distribution before the exact top-p
      fallback (`ops.filtering.sample_with_retries`); changes which ids a seed gives, not their law.
  """
  top_k: int = 750
  top_p: float = 0.95
  guidance: bool = True
  return_logits: bool = False
  decode: bool = True
  top_p_rounds: int = 4

  def validate(self) -> None:
    if self.top_k < 0:
      raise ValueError(f"top_k must be >= 0, got {self.top_k}")
    if not 0.0 <= self.top_p <= 1.0:
      raise ValueError(f"top_p must be in [0, 1], got {self.top_p}")
    if self.top_p_rounds < 1:
      raise ValueError(f"top_p_rounds must be >= 1, got {self.top_p_rounds}")


def guidance_weights(num_scales: int, cfg) -> list:
  """t_s = cfg * s / (S - 1) for every scale (scale 0 is purely conditional)."""
  denom = max(num_scales - 1, 1)
  return [cfg * (si / denom) for si in range(num_scales)]


def sample(generator: NextScaleGenerator, tokenizer: ImageFolderTokenizer, settings: SamplerSettings,
           generator_variables: Any, tokenizer_variables: Any, labels: jax.Array, key: jax.Array,
           cfg: jax.Array, temperature: jax.Array, forced: Optional[ForcedIds] = None,
           indices: Optional[jax.Array] = None) -> dict:
  """Samples a batch (traceable; `make_sampler` jits it).

  Args:
    generator, tokenizer: the modules (their configs must agree on P, V, Cq and scales).
    settings: static settings.
    generator_variables, tokenizer_variables: their variables.
    labels: (B,) int32 class ids in [0, num_classes] (num_classes = unconditional).
    key: a PRNG key (`jax.random.key`).
    cfg: scalar guidance scale (ignored unless settings.guidance).
    temperature: scalar > 0; logits are divided by it after guidance, before filtering.
    forced: optional {branch: [ids (B, n_s, n_s) int per scale]}.
    indices: optional (B,) int32 sample numbers; sample b's randomness is `fold_in(key, indices[b])`
      (default 0..B-1).

  Returns a dict:
    ids: ids[branch][scale] (B, n_s, n_s) int32.
    f_hat: per branch (B, n, n, Cq) float32.
    images: (B, H, W, 3) float32 in [-1, 1] (clamped), when settings.decode.
    logits: (B, L, P, V) float32 guided logits, when settings.return_logits.
  """
  c = generator.config
  forced = dict(forced or {})
  scales = c.scales
  batch = labels.shape[0]
  labels = labels.astype(jnp.int32)
  apply_gen = functools.partial(generator.apply, generator_variables)
  apply_tok = functools.partial(tokenizer.apply, tokenizer_variables)

  if indices is None:
    indices = jnp.arange(batch, dtype=jnp.int32)
  sample_keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.asarray(indices, jnp.int32))
  uniforms = jax.vmap(lambda k: jax.random.uniform(k, (c.num_tokens, c.num_branches, settings.top_p_rounds + 1))
                      )(sample_keys)
  # Guidance doubles the batch as interleaved (cond, uncond) pairs, (B, 2) -> (2B,): under a
  # mesh that shards the batch in contiguous blocks, each sample's pair stays on its device (a
  # [cond; uncond] concatenation would move every scale's activations between devices).
  if settings.guidance:
    model_labels = jnp.stack([labels, jnp.full_like(labels, c.uncond_label)], axis=1).reshape(2 * batch)
  else:
    model_labels = labels
  cond = apply_gen(model_labels, method=NextScaleGenerator.condition)
  cache = init_cache(c, model_labels.shape[0])
  tokens = apply_gen(cond, method=NextScaleGenerator.first_scale_tokens)
  t_per_scale = guidance_weights(len(scales), cfg)

  f_hat = [jnp.zeros((batch, scales[-1], scales[-1], c.latent_dim), jnp.float32) for _ in range(c.num_branches)]
  ids_out: list[list[jax.Array]] = [[] for _ in range(c.num_branches)]
  logits_out = []
  for si, side in enumerate(scales):
    features, cache = apply_gen(si, tokens, cond, cache, method=NextScaleGenerator.decode_scale_features)
    if settings.guidance:
      t = t_per_scale[si]
      pairs = features.reshape(batch, 2, *features.shape[1:])
      features = (1 + t) * pairs[:, 0] - t * pairs[:, 1]
    logits = apply_gen(features, method=NextScaleGenerator.head_logits)
    if settings.return_logits:
      logits_out.append(logits)
    begin, end = c.begin_ends[si]
    drawn = sample_with_retries(uniforms[:, begin:end], logits / temperature, settings.top_k,
                                settings.top_p)  # (B, n_s^2, P)
    scale_ids = []
    for b in range(c.num_branches):
      if b in forced:
        ids_b = jnp.asarray(forced[b][si], jnp.int32).reshape(batch, side, side)
      else:
        ids_b = drawn[..., b].reshape(batch, side, side)
      scale_ids.append(ids_b)
      ids_out[b].append(ids_b)
    contributions = apply_tok(si, scale_ids, method=ImageFolderTokenizer.embed_scale)
    f_hat = [f + h.astype(jnp.float32) for f, h in zip(f_hat, contributions)]
    if si + 1 < len(scales):
      nxt = jnp.concatenate([area_downsample(f, scales[si + 1]) for f in f_hat], axis=-1)
      tokens = apply_gen(si + 1, nxt.reshape(batch, -1, c.input_dim), method=NextScaleGenerator.scale_tokens)
      if settings.guidance:
        tokens = jnp.repeat(tokens, 2, axis=0)

  out = {"ids": ids_out, "f_hat": f_hat}
  if settings.decode:
    # No gradient is taken here: on TPUs the decoder's attention may run as one kernel.
    with packed_attention.forward_only():
      out["images"] = jnp.clip(apply_tok(f_hat, method=ImageFolderTokenizer.decode), -1.0, 1.0)
  if settings.return_logits:
    out["logits"] = jnp.concatenate(logits_out, axis=1)
  return out


def check_compatible(generator: NextScaleGenerator, tokenizer: ImageFolderTokenizer) -> None:
  """Raises ValueError when the generator cannot run on this tokenizer's tokens."""
  g, t = generator.config, tokenizer.config
  pairs = (("num_branches", g.num_branches, t.num_branches),
           ("codebook_size", g.codebook_size, t.quantizer.codebook_size),
           ("latent_dim", g.latent_dim, t.quantizer.latent_dim),
           ("scales", tuple(g.scales), tuple(t.quantizer.scales)))
  for name, a, b in pairs:
    if a != b:
      raise ValueError(f"generator {name}={a} does not match the tokenizer's {b}")


def make_sampler(generator: NextScaleGenerator, tokenizer: ImageFolderTokenizer, settings: SamplerSettings,
                 mesh: Optional[jax.sharding.Mesh] = None, precision: Optional[str] = None) -> Callable:
  """One jitted sampler: fn(generator_variables, tokenizer_variables, labels, key, cfg, temperature,
  forced, indices=None) -> dict (see `sample`).

  mesh: optional device mesh; the batch (labels, forced ids, every output) is then sharded over its
    ('data', 'fsdp') axes (indices too) and the variables replicated (place them with `parallel.replicated(mesh)`).
    The batch size must be divisible by the number of batch shards.
  precision: optional `jax.default_matmul_precision` inside the program (e.g. 'highest' on
    accelerators for float32-exact results).
  """
  settings.validate()
  check_compatible(generator, tokenizer)

  # Platform-specific paths (filter chunking, fused attention) follow the devices compiled for.
  platform = platform_of(mesh)

  # The mesh's abstract form while tracing: kernels run per batch shard under it (ops.cached_attention).
  def traced_mesh():
    return contextlib.nullcontext() if mesh is None else jax.sharding.use_abstract_mesh(mesh.abstract_mesh)

  def fn(generator_variables, tokenizer_variables, labels, key, cfg, temperature, forced, indices=None):
    with compiling_for(platform), jax.default_matmul_precision(precision), traced_mesh():
      return sample(generator, tokenizer, settings, generator_variables, tokenizer_variables, labels, key,
                    cfg, temperature, forced, indices)

  if mesh is None:
    return jax.jit(fn, compiler_options=compiler_options(platform))
  from imagefolder_jax.parallel import batch_sharding, replicated
  batch, rep = batch_sharding(mesh), replicated(mesh)
  # Shardings are pytree prefixes: one NamedSharding covers a whole variable tree / output dict.
  return jax.jit(fn, in_shardings=(rep, rep, batch, rep, rep, rep, batch, batch), out_shardings=batch,
                 compiler_options=compiler_options(platform))
