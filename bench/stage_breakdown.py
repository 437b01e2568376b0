"""Per-stage wall time of both samplers (used by bench_sampling.py and bench_vs_official.py).

Ours: the sampler's stages run one by one, each its own jitted program per scale, on the inputs the
real sampler would give them; each is timed (median of `reps`) and summed over the scales. The sum
is above the whole program's time by what XLA fuses across stages and by ~10 dispatches per scale.
Stages: blocks (the transformer over one scale with the KV cache, up to the head's input), head
(guidance mix + the 8192-way head), filter+draw (top-k threshold, rejection draws with the top-p
fallback: ours never builds the filtered distribution, so filtering and draws are one pass),
f_hat update (codebook rows, bicubic upsample, phi), downsample (area-downsample of f_hat + the
generator's input embedding), decode (the tokenizer's decoder ViT).

Official: torch.profiler over one eager `autoregressive_infer_cfg` call, self CPU time of every
aten op, grouped by what the op is in the official op sequence (bench/torch_reference.py).
"""
from __future__ import annotations

import collections
import statistics
import time

import jax
import jax.numpy as jnp

from imagefolder_jax.inference.sampling import guidance_weights
from imagefolder_jax.models.generator import NextScaleGenerator, init_cache
from imagefolder_jax.models.tokenizer import ImageFolderTokenizer
from imagefolder_jax.ops.filtering import compiler_options, sample_with_retries
from imagefolder_jax.ops.resample import area_downsample

STAGES = ("blocks", "head", "filter+draw", "f_hat update", "downsample", "decode")


def _timed(fn, *args, reps: int):
  out = jax.block_until_ready(fn(*args))  # compile + warm-up
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
  return out, statistics.median(times)


def ours(gen: NextScaleGenerator, tok: ImageFolderTokenizer, gen_vars, tok_vars, batch: int, *, cfg: float = 3.25,
         top_k: int = 750, top_p: float = 0.95, rounds: int = 4, reps: int = 3) -> dict:
  """{stage: seconds per batch} of our sampler (guidance on), summed over scales."""
  c = gen.config
  g = lambda *a, method: gen.apply(gen_vars, *a, method=method)  # noqa: E731
  labels = jnp.arange(batch, dtype=jnp.int32) * 7 % c.num_classes
  model_labels = jnp.concatenate([labels, jnp.full_like(labels, c.uncond_label)])
  cond = jax.jit(lambda l: g(l, method=NextScaleGenerator.condition))(model_labels)
  cache = init_cache(c, 2 * batch)
  tokens = jax.jit(lambda cd: g(cd, method=NextScaleGenerator.first_scale_tokens))(cond)
  uniforms = jax.random.uniform(jax.random.key(0), (batch, c.num_tokens, c.num_branches, rounds + 1))
  ts = guidance_weights(len(c.scales), cfg)
  f_hat = [jnp.zeros((batch, c.scales[-1], c.scales[-1], c.latent_dim)) for _ in range(c.num_branches)]
  total = collections.Counter()
  for si, side in enumerate(c.scales):
    blocks = jax.jit(lambda tk, cd, ca, si=si: g(si, tk, cd, ca, method=NextScaleGenerator.decode_scale_features))
    (features, cache), total["blocks"] = (lambda o: (o[0], total["blocks"] + o[1]))(
        _timed(blocks, tokens, cond, cache, reps=reps))
    head = jax.jit(lambda f, t=ts[si]: g((1 + t) * f[:batch] - t * f[batch:], method=NextScaleGenerator.head_logits))
    logits, dt = _timed(head, features, reps=reps)
    total["head"] += dt
    begin, end = c.begin_ends[si]
    draw = jax.jit(lambda u, x: sample_with_retries(u, x, top_k, top_p), compiler_options=compiler_options())
    drawn, dt = _timed(draw, uniforms[:, begin:end], logits, reps=reps)
    total["filter+draw"] += dt
    ids = [drawn[..., b].reshape(batch, side, side) for b in range(c.num_branches)]
    embed = jax.jit(lambda i, si=si: tok.apply(tok_vars, si, i, method=ImageFolderTokenizer.embed_scale))
    contributions, dt = _timed(embed, ids, reps=reps)
    total["f_hat update"] += dt
    f_hat = [f + h for f, h in zip(f_hat, contributions)]
    if si + 1 < len(c.scales):
      def down(fh, si=si):
        nxt = jnp.concatenate([area_downsample(f, c.scales[si + 1]) for f in fh], axis=-1)
        t = g(si + 1, nxt.reshape(batch, -1, c.input_dim), method=NextScaleGenerator.scale_tokens)
        return jnp.concatenate([t, t])
      tokens, dt = _timed(jax.jit(down), f_hat, reps=reps)
      total["downsample"] += dt
  decode = jax.jit(lambda fh: jnp.clip(tok.apply(tok_vars, fh, method=ImageFolderTokenizer.decode), -1, 1))
  total["decode"] = _timed(decode, f_hat, reps=reps)[1]
  return {s: total[s] for s in STAGES}


class _Stopwatch:
  """Accumulates wall time per stage of wrapped callables; only the outermost wrapped call counts
  (a bicubic interpolate inside the decoder is decode time, not f_hat update)."""

  def __init__(self):
    self.totals = collections.Counter()
    self.depth = 0

  def wrap(self, stage, fn):
    def timed(*args, **kwargs):
      if self.depth:
        return fn(*args, **kwargs)
      name = stage(*args, **kwargs) if callable(stage) else stage
      self.depth += 1
      t = time.perf_counter()
      try:
        return fn(*args, **kwargs)
      finally:
        self.totals[name] += time.perf_counter() - t
        self.depth -= 1
    return timed


def official(ref, var, tokenizer, labels, *, seed: int = 1, **kwargs) -> dict:
  """{stage: seconds} of one eager `ref.autoregressive_infer_cfg` call, by timing its pieces.

  The official op sequence (bench/torch_reference.py) is patched for the one call: VarBlock.forward
  (blocks), Var.logits (head), the top-k/top-p filter (filter) and torch.multinomial (draw),
  Phi.forward and bicubic F.interpolate (f_hat update), area F.interpolate and word_embed
  (downsample), fhat_to_img (decode). 'other' is the rest (guidance mix, KV-cache concatenation,
  embeddings, Python).
  """
  import torch
  import torch.nn.functional as F
  watch = _Stopwatch()
  saved = [(ref.VarBlock, "forward"), (ref.Var, "logits"), (ref, "sample_with_top_k_top_p_"), (torch, "multinomial"),
           (ref.Phi, "forward"), (F, "interpolate"), (ref.SamplingTokenizer, "fhat_to_img")]
  originals = [getattr(obj, name) for obj, name in saved]
  word_embed = var.word_embed.forward
  try:
    ref.VarBlock.forward = watch.wrap("blocks", originals[0])
    ref.Var.logits = watch.wrap("head", originals[1])
    ref.sample_with_top_k_top_p_ = watch.wrap("filter", originals[2])
    def multinomial(*a, **k):  # called inside the filter: timed apart, taken out of 'filter' below
      t0 = time.perf_counter()
      try:
        return originals[3](*a, **k)
      finally:
        watch.totals["draw"] += time.perf_counter() - t0
    torch.multinomial = multinomial
    ref.Phi.forward = watch.wrap("f_hat update", originals[4])
    ref.F.interpolate = watch.wrap(lambda *a, mode="nearest", **k: "downsample" if mode == "area" else "f_hat update",
                                   originals[5])
    ref.SamplingTokenizer.fhat_to_img = watch.wrap("decode", originals[6])
    var.word_embed.forward = watch.wrap("downsample", word_embed)
    t = time.perf_counter()
    ref.autoregressive_infer_cfg(var, tokenizer, labels, seed=seed, **kwargs)
    whole = time.perf_counter() - t
  finally:
    for (obj, name), fn in zip(saved, originals):
      setattr(obj, name, fn)
    var.word_embed.forward = word_embed
  totals = dict(watch.totals)
  totals["filter"] = totals.get("filter", 0.0) - totals.get("draw", 0.0)
  totals["other"] = whole - sum(totals.values())
  return totals, whole


def format_row(name: str, stages: dict, whole: float) -> str:
  parts = ", ".join(f"{k} {v * 1e3:.1f} ms ({100 * v / whole:.0f}%)" for k, v in stages.items())
  return f"{name}: whole {whole * 1e3:.1f} ms; {parts}"
