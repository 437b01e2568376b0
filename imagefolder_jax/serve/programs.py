"""The compiled programs the server keeps warm.

* `RowSampler`: the library's sampler (`imagefolder_jax.inference.sampling.sample`, the program behind
  `Generator.sample`) mapped over rows with `jax.vmap`, so that every row carries its own seed, cfg,
  temperature, sample number and forced ids. Requests with different seeds and cfgs can then share
  one call; row r gives exactly the tokens of `Generator.sample([label_r], seed=seed_r, cfg=cfg_r,
  temperature=temperature_r, indices=[index_r], ...)`, which in turn are those of
  `imagefolder-jax sample` for the same settings (sample i depends only on (seed, i, settings)).
  top-k, top-p, guidance on/off and the set of forced branches fix the program (they are static in
  the library's sampler too); each combination and padded batch size is one compile.
* `progressive_decode`: the image after each scale, (S, B, H, W, 3): the f_hat summed over scales
  0..s of every branch, decoded (the progressive-generation figure of VAR and ImageFolder).
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import threading
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from imagefolder_jax.inference.sampling import SamplerSettings, sample
from imagefolder_jax.inference.tokenizer import Tokenizer
from imagefolder_jax.models.tokenizer import ImageFolderTokenizer
from imagefolder_jax.ops.filtering import compiler_options
from imagefolder_jax.ops.platform import compiling_for, platform_of


@dataclasses.dataclass(frozen=True)
class ProgramKey:
  """What fixes a compiled sampler: static filter settings, guidance, forced branches, batch rows."""
  top_k: int
  top_p: float
  guidance: bool
  forced_branches: tuple[int, ...]
  rows: int


@dataclasses.dataclass
class Rows:
  """A batch of sampler rows (host arrays), R rows.

  labels (R,) int32; seeds (R,) int in [0, 2**31); cfg, temperature (R,) float32; indices (R,)
  int32 (the sample's number within its request, as the CLI numbers them); forced {branch: [ids
  (R, n_s, n_s) int32 per scale]}.
  """
  labels: np.ndarray
  seeds: np.ndarray
  cfg: np.ndarray
  temperature: np.ndarray
  indices: np.ndarray
  forced: dict

  def __len__(self) -> int:
    return int(self.labels.shape[0])

  def padded(self, rows: int) -> "Rows":
    """Repeats the last row up to `rows` rows (the extra outputs are dropped by the caller)."""
    extra = rows - len(self)
    if extra <= 0:
      return self
    pad = lambda x: np.concatenate([x, np.repeat(x[-1:], extra, axis=0)])  # noqa: E731
    return Rows(pad(self.labels), pad(self.seeds), pad(self.cfg), pad(self.temperature), pad(self.indices),
                {b: [pad(s) for s in scales] for b, scales in self.forced.items()})


class RowSampler:
  """Compiled per-row samplers of one `Generator`, cached per `ProgramKey` (least recently used out
  beyond `max_programs`, so that a client cycling top-k values cannot grow memory without end).

  Thread-safe for the engine's single worker; `compile` may be called from the starting thread.
  """

  def __init__(self, generator, max_programs: int = 24):
    self.generator = generator
    self.max_programs = max_programs
    self._programs: collections.OrderedDict[ProgramKey, Any] = collections.OrderedDict()
    self._lock = threading.Lock()
    # The library's program for `Generator.sample` uses these XLA options (they change how float
    # reductions are ordered); the vmapped program must use the same so its tokens are the same.
    self._platform = platform_of(None)
    self._compiler_options = compiler_options(self._platform)

  def _build(self, key: ProgramKey):
    gen = self.generator
    settings = SamplerSettings(top_k=key.top_k, top_p=key.top_p, guidance=key.guidance)
    settings.validate()

    # The body of `sampling.make_sampler`'s program for a batch of one row (a nested jit may not
    # carry compiler options, so the library function is called here and the outer jit carries them).
    # The key is built in the program from the int32 seed: `jax.random.key` of a seed in [0, 2**31)
    # gives the same key traced as from the Python int `Generator.sample` passes (no host call per seed).
    def row(gen_vars, tok_vars, label, seed, cfg, temperature, forced, index):
      with compiling_for(self._platform), jax.default_matmul_precision(gen.precision):
        out = sample(gen.module, gen.tokenizer.module, settings, gen_vars, tok_vars, label[None],
                     jax.random.key(seed), cfg, temperature, jax.tree.map(lambda x: x[None], forced),
                     index[None])
      return {"ids": jax.tree.map(lambda x: x[0], out["ids"]), "images": out["images"][0]}

    batched = jax.vmap(row, in_axes=(None, None, 0, 0, 0, 0, 0, 0))
    return jax.jit(batched, compiler_options=self._compiler_options)

  def program(self, key: ProgramKey):
    with self._lock:
      if key in self._programs:
        self._programs.move_to_end(key)
        return self._programs[key]
    fn = self._build(key)
    with self._lock:
      self._programs[key] = fn
      while len(self._programs) > self.max_programs:
        self._programs.popitem(last=False)
    return fn

  def __call__(self, rows: Rows, top_k: int, top_p: float, guidance: bool, padded_rows: int) -> dict:
    """Samples `rows` padded to `padded_rows`. Returns host arrays for the real rows: ids[branch][scale]
    (R, n_s, n_s) int32 and images (R, H, W, 3) float32 in [-1, 1]."""
    count = len(rows)
    full = rows.padded(padded_rows)
    key = ProgramKey(int(top_k), float(top_p), bool(guidance), tuple(sorted(full.forced)), padded_rows)
    gen = self.generator
    forced = {b: [jnp.asarray(s, jnp.int32) for s in scales] for b, scales in full.forced.items()}
    out = self.program(key)(gen.variables, gen.tokenizer.variables, jnp.asarray(full.labels, jnp.int32),
                            jnp.asarray(full.seeds, jnp.int32), jnp.asarray(full.cfg, jnp.float32),
                            jnp.asarray(full.temperature, jnp.float32), forced,
                            jnp.asarray(full.indices, jnp.int32))
    out = jax.device_get(out)
    return {"ids": [[np.asarray(s[:count]) for s in branch] for branch in out["ids"]],
            "images": np.asarray(out["images"][:count])}


@functools.lru_cache(maxsize=8)
def _progressive_program(module: ImageFolderTokenizer):
  def decode_each_scale(variables, ids):
    num_scales = len(ids[0])

    def one(mod, ids):
      f_hats = None
      images = []
      for s in range(num_scales):
        parts = mod.embed_scale(s, [branch[s] for branch in ids])
        f_hats = parts if f_hats is None else [f + p for f, p in zip(f_hats, parts)]
        images.append(jnp.clip(mod.decode(f_hats), -1.0, 1.0))
      return jnp.stack(images)

    with jax.default_matmul_precision("highest"):  # as `Tokenizer.decode`
      return module.apply(variables, ids, method=one)

  return jax.jit(decode_each_scale)


def progressive_decode(tokenizer: Tokenizer, ids: list) -> np.ndarray:
  """ids[branch][scale] (B, n_s, n_s) -> (S, B, H, W, 3) float32 in [-1, 1]: entry s decodes the
  sum of every branch's scales 0..s (the last entry equals `tokenizer.decode`)."""
  ids = [[jnp.asarray(s, jnp.int32) for s in branch] for branch in ids]
  return np.asarray(_progressive_program(tokenizer.module)(tokenizer.variables, ids))


def warm_progressive(tokenizer: Tokenizer, batch: int = 1) -> None:
  """Compiles `progressive_decode` for `batch` images (zeros, output dropped)."""
  scales = tokenizer.config.quantizer.scales
  zeros = [[np.zeros((batch, s, s), np.int32) for s in scales] for _ in range(tokenizer.config.num_branches)]
  progressive_decode(tokenizer, zeros)


def default_rows(labels, seed: int, cfg: float, temperature: float, forced: Optional[dict] = None) -> Rows:
  """Rows of one request as the CLI numbers them: sample i of `labels` gets index i."""
  labels = np.asarray(labels, np.int32)
  n = labels.shape[0]
  return Rows(labels, np.full(n, seed, np.int64), np.full(n, cfg, np.float32),
              np.full(n, temperature, np.float32), np.arange(n, dtype=np.int32), forced or {})
