"""Public generator API: `Generator` (class-conditional sampling, teacher-forced logits).

  gen = Generator.load(bundle_dir)                    # bundle with 'tokenizer' and 'generator'
  out = gen.sample([207, 360], seed=0)                # out.codes (Codes), out.images (B, H, W, 3)
  ref = gen.tokenizer.encode(images)
  out = gen.sample(labels, force={0: ref})            # keep the reference's detail branch
  logits = gen.logits(labels, ref)                    # (B, L, P, V) float32, teacher forced
"""
from __future__ import annotations

import dataclasses
import functools
import numbers
from typing import Any, Mapping, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from imagefolder_jax.inference.sampling import SamplerSettings, check_compatible, make_sampler
from imagefolder_jax.inference.tokenizer import Codes, Tokenizer
from imagefolder_jax.models.generator import DTYPES, GeneratorConfig, NextScaleGenerator
from imagefolder_jax.models.tokenizer import ImageFolderTokenizer, TokenizerConfig
from imagefolder_jax.parallel import BATCH_AXES, Mesh, put_global, replicated, shard_batch
from imagefolder_jax.parallel.multihost import compile_then_sync
from imagefolder_jax.storage.bundle import BundleError, load_bundle, save_bundle

Force = Mapping[int, Union[Codes, Sequence[Any]]]


@dataclasses.dataclass
class Samples:
  """Sampler output: `codes.ids[branch][scale]` (B, n_s, n_s) int32 and `images` (B, H, W, 3) float32
  in [-1, 1]."""
  codes: Codes
  images: jax.Array
  labels: np.ndarray


class Generator:
  """A loaded tokenizer + next-scale generator pair.

  `sample` is jit-compiled once per (batch size, top_k, top_p, guidance on/off, forced branches);
  cfg, temperature and seed are runtime values and do not recompile.
  """

  def __init__(self, tokenizer: Tokenizer, config: GeneratorConfig, variables: Any,
               mesh: Optional[Mesh] = None, precision: Optional[str] = None):
    """tokenizer: the `api.Tokenizer` the generator's tokens belong to. mesh: optional device mesh
    (batch sharded over ('data', 'fsdp'), variables replicated). precision: matmul precision of the
    sampler (None = backend default; 'highest' for float32-exact accelerator runs)."""
    config.validate()
    self.tokenizer = tokenizer
    self.config = config
    self.mesh = mesh
    self.precision = precision
    self.module = NextScaleGenerator(config)
    check_compatible(self.module, tokenizer.module)
    # On the device once: NumPy trees (what `load_bundle` returns) would be copied in on every call.
    self.variables = (put_global(variables, jax.tree.map(lambda _: replicated(mesh), variables))
                      if mesh is not None else jax.device_put(variables))
    self._samplers: dict[tuple[SamplerSettings, str], Any] = {}

  # ------------------------------------------------------------------------------- loading
  @classmethod
  def load(cls, bundle_dir: str, mesh: Optional[Mesh] = None, precision: Optional[str] = None) -> "Generator":
    configs, variables = load_bundle(bundle_dir)
    for name in ("tokenizer", "generator"):
      if name not in configs:
        raise BundleError(f"{bundle_dir}: the bundle holds no {name} (models: {sorted(configs)})")
    tokenizer = Tokenizer(TokenizerConfig.from_dict(configs["tokenizer"]), variables["tokenizer"], mesh=mesh)
    return cls(tokenizer, GeneratorConfig.from_dict(configs["generator"]), variables["generator"],
               mesh=mesh, precision=precision)

  @classmethod
  def from_official(cls, generator_checkpoint: str, tokenizer_checkpoint: Optional[str] = None,
                    arch_json: Optional[str] = None, mesh: Optional[Mesh] = None) -> "Generator":
    """Official AR checkpoint; the tokenizer comes from its `trainer.vae_local` (what the official
    inference uses) or, when absent, from `tokenizer_checkpoint`."""
    from imagefolder_jax.convert.official import convert_tokenizer
    from imagefolder_jax.convert.official_generator import convert_generator, tokenizer_from_generator_checkpoint
    found = tokenizer_from_generator_checkpoint(generator_checkpoint, arch_json)
    if found is None:
      if tokenizer_checkpoint is None:
        raise ValueError(f"{generator_checkpoint} holds no trainer.vae_local; pass tokenizer_checkpoint")
      tok_config, tok_vars, _ = convert_tokenizer(tokenizer_checkpoint, arch_json)
    else:
      tok_config, tok_vars = found
    gen_config, gen_vars = convert_generator(generator_checkpoint, tok_config, arch_json)
    return cls(Tokenizer(tok_config, tok_vars, mesh=mesh), gen_config, gen_vars, mesh=mesh)

  def save(self, bundle_dir: str) -> None:
    """Writes a bundle holding both models (`Generator.load` and `Tokenizer.load` read it)."""
    save_bundle(bundle_dir, {"tokenizer": self.tokenizer.config.to_dict(), "generator": self.config.to_dict()},
                {"tokenizer": self.tokenizer.variables, "generator": self.variables})

  # ------------------------------------------------------------------------------- validation
  def _labels(self, labels) -> np.ndarray:
    arr = np.asarray(labels)
    if arr.ndim == 0:
      arr = arr[None]
    if arr.ndim != 1 or arr.size == 0 or not np.issubdtype(arr.dtype, np.integer):
      raise ValueError(f"labels must be a non-empty 1-D sequence of ints, got {np.asarray(labels)!r:.80}")
    bad = arr[(arr < 0) | (arr > self.config.num_classes)]
    if bad.size:
      raise ValueError(f"class id {int(bad[0])} is outside [0, {self.config.num_classes}] "
                       f"({self.config.num_classes} = unconditional)")
    if self.mesh is not None:
      shards = int(np.prod([self.mesh.shape[a] for a in BATCH_AXES]))
      if arr.size % shards:
        raise ValueError(f"batch size {arr.size} is not divisible by the {shards} batch shards of the mesh")
    return arr.astype(np.int32)

  def _codes(self, codes, batch: int, what: str) -> Codes:
    if not isinstance(codes, Codes):
      codes = Codes(ids=codes)
    codes.validate(self.tokenizer.config)
    if codes.batch_size != batch:
      raise ValueError(f"{what} has batch size {codes.batch_size}, labels have {batch}")
    return codes

  def _force(self, force: Optional[Force], batch: int) -> dict:
    if not force:
      return {}
    if not isinstance(force, Mapping):
      raise ValueError(f"force must be a dict {{branch: Codes or ids per scale}}, got {type(force).__name__}")
    out = {}
    p = self.config.num_branches
    for branch, value in force.items():
      if not isinstance(branch, numbers.Integral) or not 0 <= branch < p:
        raise ValueError(f"force branch {branch!r} is not in [0, {p})")
      if isinstance(value, Codes):
        ids = self._codes(value, batch, f"force[{branch}]").ids[branch]
      else:
        ids = list(value)
        scales = self.config.scales
        if len(ids) != len(scales):
          raise ValueError(f"force[{branch}] has {len(ids)} scales, expected {len(scales)}")
        ids = [np.asarray(x) for x in ids]
        for s, (x, side) in enumerate(zip(ids, scales)):
          if x.shape != (batch, side, side):
            raise ValueError(f"force[{branch}][{s}] has shape {x.shape}, expected ({batch}, {side}, {side})")
          if x.size and (x.min() < 0 or x.max() >= self.config.codebook_size):
            raise ValueError(f"force[{branch}][{s}] holds ids outside [0, {self.config.codebook_size})")
      out[int(branch)] = [jnp.asarray(x, jnp.int32) for x in ids]
    return out

  def _place(self, tree):
    return shard_batch(self.mesh, tree) if self.mesh is not None else tree

  # ------------------------------------------------------------------------------- compute
  def _sampler(self, settings: SamplerSettings, dtype: str):
    if (settings, dtype) not in self._samplers:
      # Only the generator's compute dtype changes (its parameters stay float32; the head, the
      # filtering, the draws and the tokenizer's quantization and decode stay float32).
      module = self.module if dtype == self.config.dtype else NextScaleGenerator(
          dataclasses.replace(self.config, dtype=dtype))
      self._samplers[settings, dtype] = compile_then_sync(
          make_sampler(module, self.tokenizer.module, settings, mesh=self.mesh, precision=self.precision), "sampler",
          self.mesh)
    return self._samplers[settings, dtype]

  def sample(self, labels, seed: int = 0, cfg: float = 3.25, top_k: int = 750, top_p: float = 0.95,
             temperature: float = 1.0, force: Optional[Force] = None, indices=None,
             dtype: Optional[str] = None) -> Samples:
    """Class-conditional samples (paper settings by default).

    Args:
      labels: (B,) class ids in [0, num_classes]; num_classes is the unconditional class.
      seed: PRNG seed; the same seed and settings give the same samples.
      cfg: guidance scale >= 0 (t = cfg s / (S - 1) at scale s; 0 runs the conditional model only).
      top_k: keep the k most likely tokens per branch (0 = all).
      top_p: nucleus mass in (0, 1] (1 = no nucleus filtering).
      temperature: > 0, divides the guided logits.
      force: optional {branch: Codes (its ids of that branch are used) or ids per scale}: those
        branches are not sampled but fixed (paper §4.3: force the detail branch, sample the semantic).
      indices: optional (B,) ints, the samples' numbers within a larger run (default 0..B-1). Sample
        number i depends only on (seed, i, settings): split a run into batches by passing each
        batch's global numbers, and it gives the same images at any batch size or device count.
      dtype: the generator's compute dtype for this call ('float32', 'bfloat16', 'float16'; None =
        the config's). 'bfloat16' runs the transformer's matmuls in bf16 (the backend accumulates
        in float32), the head, filtering, draws and the tokenizer in float32; the draws use the
        same uniforms, so most ids equal the float32 sampler's (docs/benchmarks.md, "bf16 sampling").

    Returns Samples(codes, images (B, H, W, 3) float32 in [-1, 1], labels).
    """
    labels = self._labels(labels)
    if not isinstance(seed, numbers.Integral):
      raise ValueError(f"seed must be an int, got {seed!r}")
    if not isinstance(top_k, numbers.Integral) or top_k < 0:
      raise ValueError(f"top_k must be an int >= 0, got {top_k!r}")
    if not 0.0 < float(top_p) <= 1.0:
      raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    if not float(cfg) >= 0.0:
      raise ValueError(f"cfg must be >= 0, got {cfg!r}")
    if not float(temperature) > 0.0 or not np.isfinite(float(temperature)):
      raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    dtype = self.config.dtype if dtype is None else dtype
    if dtype not in DTYPES:
      raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    forced = self._force(force, labels.size)
    indices = np.arange(labels.size) if indices is None else np.asarray(indices)
    if indices.shape != labels.shape or not np.issubdtype(indices.dtype, np.integer) or (indices < 0).any():
      raise ValueError(f"indices must be {labels.size} non-negative ints (one per label), got {indices!r:.80}")
    settings = SamplerSettings(top_k=int(top_k), top_p=float(top_p), guidance=float(cfg) > 0)
    out = self._sampler(settings, dtype)(self.variables, self.tokenizer.variables, self._place(labels),
                                  jax.random.key(int(seed)), jnp.float32(cfg), jnp.float32(temperature),
                                  self._place(forced), self._place(indices.astype(np.int32)))
    return Samples(codes=Codes(ids=out["ids"]), images=out["images"], labels=labels)

  @functools.cached_property
  def _logits_fn(self):
    gen, tok = self.module, self.tokenizer.module

    def fn(gen_vars, tok_vars, labels, ids):
      with jax.default_matmul_precision("highest"):
        inputs = tok.apply(tok_vars, ids, method=ImageFolderTokenizer.next_scale_inputs)
        return gen.apply(gen_vars, labels, inputs)

    return jax.jit(fn)

  def logits(self, labels, codes) -> jax.Array:
    """Teacher-forced folded logits (B, L, P, V) float32 of `codes` (Codes or ids[branch][scale]);
    position l of branch b scores codes' token l of branch b. Label dropout is off."""
    labels = self._labels(labels)
    codes = self._codes(codes, labels.size, "codes")
    return self._logits_fn(self.variables, self.tokenizer.variables, self._place(labels), self._place(codes.ids))
